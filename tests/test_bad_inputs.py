"""Each bad input the trust issue names gets its 4xx within 1 s from a real service, and
the service keeps answering ``/healthz`` meanwhile (polled every 20 ms while the bad
request is in flight). The bound asserted is 1 s (:data:`HEALTHY_SECONDS`), not the
100 ms the service holds on a quiet machine: the suite shares two cores with other
work, which stalls any process that long now and then. A loop that a bad input blocks
is held for as long as the input takes (a minute, once, for a long ``$in`` list), so
1 s still catches it. Each case prints its slowest ``/healthz``."""

from __future__ import annotations

import asyncio
import random
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest

from tests.conftest import ServiceProcess

BODY_TIMEOUT = 0.5
#: The slowest /healthz answer allowed while a bad request is handled (seconds): a loop
#: blocked by one is held for as long as it runs (a minute for the long $in list once);
#: 1 s leaves room for two cores that also run other work.
HEALTHY_SECONDS = 1.0


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        tmp_path_factory.mktemp("bad") / "hive.db",
        env={
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_LEXICAL_INDEX": "memory",
            "HIVEMEM_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
            "HIVEMEM_MAX_WATCH_STREAMS_PER_AGENT": "2",
        },
    )
    service.start()
    try:
        yield service
    finally:
        service.terminate()


Probe = Callable[[aiohttp.ClientSession, str], Awaitable[int]]


def _json(method: str, path: str, body: object, **headers: str) -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        async with http.request(
            method, base + path, json=body, headers={"X-Hivemem-Agent": "prober", **headers}
        ) as resp:
            await resp.read()
            return resp.status

    return send


def _raw(method: str, path: str, body: bytes, **headers: str) -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        async with http.request(
            method,
            base + path,
            data=body,
            headers={"Content-Type": "application/json", "X-Hivemem-Agent": "prober", **headers},
        ) as resp:
            await resp.read()
            return resp.status

    return send


async def _socket(base: str, request: bytes, hold: bool = False) -> int:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        line = await reader.readline()  # HTTP/1.1 408 ...
        return int(line.split()[1])
    finally:
        writer.close()


def _slow_body() -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        head = (
            b"PUT /v1/items/bad/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"value": '
        )
        return await _socket(base, head)  # the rest never comes

    return send


def _bad_utf8_path() -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        return await _socket(base, b"GET /v1/items/bad/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n")

    return send


def _huge_header() -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        filler = b"X-Filler: " + b"a" * 60_000 + b"\r\n"
        return await _socket(
            base, b"GET /v1/events/head HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n"
        )

    return send


def _third_watch() -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        headers = {"X-Hivemem-Agent": f"watcher{uuid.uuid4().hex[:6]}"}
        open_ = [await http.get(base + "/v1/watch", headers=headers) for _ in range(2)]
        try:
            async with http.get(base + "/v1/watch", headers=headers) as resp:
                return resp.status
        finally:
            for resp in open_:
                resp.close()

    return send


def _reused_request_id() -> Probe:
    async def send(http: aiohttp.ClientSession, base: str) -> int:
        rid = {"X-Hivemem-Request-Id": f"r{uuid.uuid4().hex}"}
        status = await _json("PUT", "/v1/items/bad/rid", {"value": 1}, **rid)(http, base)
        assert status in (200, 201)
        return await _json("PUT", "/v1/items/bad/rid", {"value": 2}, **rid)(http, base)

    return send


def _many_terms() -> str:
    rng = random.Random(8)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(30_000))


CASES: dict[str, tuple[Probe, int]] = {
    "long $in list": (
        _json("POST", "/v1/search", {"query": "x", "filter": {"k": {"$in": list(range(50_000))}}}),
        422,
    ),
    "many filter keys": (
        _json("POST", "/v1/search", {"query": "x", "filter": {f"k{i}": i for i in range(2_000)}}),
        422,
    ),
    "text with too many distinct terms": (
        _json("PUT", "/v1/items/bad/terms", {"value": _many_terms()}),
        413,
    ),
    "ttl of 1e12": (_json("PUT", "/v1/items/bad/ttl", {"value": 1, "ttl": 1e12}), 422),
    "if_version beyond int64": (
        _json("PUT", "/v1/items/bad/v", {"value": 1, "if_version": 2**70}),
        422,
    ),
    "limit beyond int64": (_json("GET", "/v1/items?limit=" + "9" * 30, None), 422),
    "NaN value": (_raw("PUT", "/v1/items/bad/nan", b'{"value": NaN}'), 422),
    "Infinity in metadata": (
        _raw("PUT", "/v1/items/bad/inf", b'{"value": 1, "metadata": {"x": Infinity}}'),
        422,
    ),
    "request id reused for another request": (_reused_request_id(), 422),
    "malformed Idempotency-Key": (
        _json("PUT", "/v1/items/bad/idem", {"value": 1}, **{"Idempotency-Key": "a b"}),
        422,
    ),
    "body over max_request_bytes": (
        _raw("PUT", "/v1/items/bad/big", b'{"value": "' + b"a" * 5_000_000 + b'"}'),
        413,
    ),
    "body that never arrives": (_slow_body(), 408),
    "invalid UTF-8 in the path": (_bad_utf8_path(), 422),
    "headers over max_header_bytes": (_huge_header(), 431),
    "a third watch stream of one agent": (_third_watch(), 429),
}


async def _measure(svc: ServiceProcess, probe: Probe) -> tuple[int, float, list[float]]:
    """(status, seconds to the answer, each /healthz answer's seconds meanwhile)."""
    health: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with http.get(svc.url + "/healthz") as resp:
                    assert resp.status == 200
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        started = time.perf_counter()
        try:
            status = await probe(http, svc.url)
        finally:
            elapsed = time.perf_counter() - started
            done.set()
            await poller
    return status, elapsed, health


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_gets_its_4xx_in_a_second_while_health_answers(
    svc: ServiceProcess, case: str
) -> None:
    """A bad input that holds the service is slow every time; a machine that stalls the
    test now and then is not: a case over its bound is measured once more, and the
    second measurement decides (both are printed)."""
    probe, expected = CASES[case]
    status, elapsed, health = await _measure(svc, probe)
    if elapsed >= 1.0 or not health or max(health) >= HEALTHY_SECONDS:
        print(f"{case}: {elapsed:.3f} s, slowest /healthz {max(health, default=0):.3f} s; again")
        status, elapsed, health = await _measure(svc, probe)
    assert status == expected, (case, status)
    print(f"{case}: {elapsed * 1000:.1f} ms, slowest /healthz {max(health) * 1000:.1f} ms")
    assert elapsed < 1.0, (case, elapsed)
    assert health and max(health) < HEALTHY_SECONDS, (case, max(health), len(health))


async def test_nothing_was_written_by_the_bad_inputs(svc: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(svc.url + "/v1/items", params={"prefix": "bad"}) as resp:
            keys = {item["key"] for item in (await resp.json())["items"]}
    assert keys <= {"rid"}, keys  # only the first, valid write of the request-id case


async def test_the_process_wide_watch_stream_cap_refuses_one_more_from_any_agent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    service = ServiceProcess(
        tmp_path_factory.mktemp("streams") / "hive.db",
        env={"HIVEMEM_EMBEDDER": "none", "HIVEMEM_MAX_WATCH_STREAMS": "3"},
    )
    service.start()
    try:
        async with aiohttp.ClientSession() as http:
            streams = [
                await http.get(service.url + "/v1/watch", headers={"X-Hivemem-Agent": f"w{i}"})
                for i in range(3)
            ]
            try:
                assert [s.status for s in streams] == [200, 200, 200]
                async with http.get(
                    service.url + "/v1/watch", headers={"X-Hivemem-Agent": "w9"}
                ) as refused:
                    assert refused.status == 429
                    assert "max_watch_streams" in (await refused.json(content_type=None))["detail"]
            finally:
                for s in streams:
                    s.close()
    finally:
        service.terminate()
