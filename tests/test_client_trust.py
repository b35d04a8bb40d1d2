"""RemoteHive's trust and safety: API keys, TLS with a private CA, no redirects, no NaN on
the wire, 429 handling and a bounded SSE reader.

Every test talks to real HTTP servers on loopback ports: small aiohttp apps run in a
background thread (so blocking SyncHive tests can use them too), and one real
``hivemem serve`` behind a recording proxy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web

import hivemem
from hivemem.client.remote import RemoteHive
from hivemem.client.sse import SSEMessage, read_sse
from hivemem.config import Settings
from hivemem.errors import HivememError, InvalidInput, RateLimited, Unavailable
from hivemem.models import PutOp
from tests.conftest import ServiceProcess

KEY = "hm_test-Key.123~secret"
NOW = "2024-05-01T12:00:00Z"
ITEM = {
    "namespace": "ns",
    "key": "k",
    "value": 1,
    "version": 1,
    "author": "a",
    "created_at": NOW,
    "updated_at": NOW,
}
EVENT = {"cursor": "7", "type": "put", "namespace": "ns", "key": "k", "author": "a", "at": NOW}


# Servers -----------------------------------------------------------------------------


class Recorded:
    """One request a test server received."""

    def __init__(self, request: web.Request) -> None:
        self.method = request.method
        self.path = request.path
        self.headers = dict(request.headers)

    def __repr__(self) -> str:
        return f"<{self.method} {self.path}>"


class ThreadServer:
    """An aiohttp app served on a free 127.0.0.1 port by an event loop in its own thread.

    ``requests`` lists every request received (a middleware records them before the
    handler runs).
    """

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.requests.append(Recorded(request))
            return await handler(request)

        app.middlewares.append(record)
        self.app = app
        self.ssl_context = ssl_context
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="test-http", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(_cancel_the_rest())  # streams still open
            loop.close()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    content_type = "application/problem+json" if status >= 400 else "application/json"
    return web.Response(
        body=orjson.dumps(body), status=status, content_type=content_type, headers=headers
    )


def problem_429(retry_after: int) -> web.Response:
    body = {"type": "/problems/rate-limited", "status": 429, "detail": "slow down"}
    return json_response(
        body | {"retry_after": retry_after}, 429, **{"Retry-After": str(retry_after)}
    )


def fake_service() -> web.Application:
    """Answers head, put, get, publish and watch (one event, then quiet) like the service."""

    async def head(_: web.Request) -> web.Response:
        return json_response({"cursor": "0"})

    async def item(_: web.Request) -> web.Response:
        return json_response(ITEM)

    async def event(_: web.Request) -> web.Response:
        return json_response(EVENT)

    async def watch(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Hivemem-Cursor": "0"}
        )
        await resp.prepare(request)
        await resp.write(
            b": ping\r\n\r\nevent: hivemem\r\ndata: " + orjson.dumps(EVENT) + b"\r\n\r\n"
        )
        await asyncio.sleep(5)
        return resp

    app = web.Application()
    app.router.add_get("/v1/events/head", head)
    app.router.add_route("*", "/v1/items/{ns}/{key}", item)
    app.router.add_post("/v1/publish/{channel:.*}", event)
    app.router.add_get("/v1/watch", watch)
    return app


@pytest.fixture
def fake() -> Iterator[ThreadServer]:
    with ThreadServer(fake_service()) as server:
        yield server


def quick(**overrides: Any) -> Settings:
    """Settings with short timeouts for tests."""
    return Settings(**({"request_timeout_seconds": 5.0} | overrides))


async def first_event(hive: hivemem.Hive, **kw: Any) -> hivemem.Event:
    gen = hive.watch(**kw)
    try:
        return await asyncio.wait_for(anext(gen), 10)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


# API keys ----------------------------------------------------------------------------


async def test_bearer_key_on_every_request_and_view_and_watch(fake: ThreadServer) -> None:
    hive = hivemem.connect(fake.url, agent="alice", api_key=KEY, settings=quick())
    async with hive:
        await hive.head()
        await hive.put("ns", "k", 1)
        assert (await hive.get("ns", "k")) is not None
        await hive.publish("chan", {"x": 1})
        view = hive.as_agent("bob")
        await view.head()
        event = await first_event(view)
        assert event.cursor == "7"
        assert KEY not in repr(hive) and KEY not in repr(view)
    assert len(fake.requests) == 6
    assert {r.headers.get("Authorization") for r in fake.requests} == {f"Bearer {KEY}"}
    assert [r.headers["X-Hivemem-Agent"] for r in fake.requests] == ["alice"] * 4 + ["bob"] * 2
    assert fake.requests[-1].path == "/v1/watch"


async def test_key_from_environment_and_empty_key_sends_none(
    fake: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEMEM_API_KEY", KEY)
    async with hivemem.connect(fake.url, settings=Settings(request_timeout_seconds=5)) as hive:
        await hive.head()
    async with hivemem.connect(fake.url, api_key="", settings=quick()) as hive:
        await hive.head()  # an explicit "" overrides the environment
    monkeypatch.delenv("HIVEMEM_API_KEY")
    async with RemoteHive(fake.url, settings=Settings()) as hive:
        await hive.head()
    auth = [r.headers.get("Authorization") for r in fake.requests]
    assert auth == [f"Bearer {KEY}", None, None]


def test_connect_sync_sends_key(fake: ThreadServer) -> None:
    with hivemem.connect_sync(fake.url, api_key=KEY, settings=quick()) as hive:
        assert hive.head() == "0"
        assert hive.as_agent("other").head() == "0"
    assert [r.headers.get("Authorization") for r in fake.requests] == [f"Bearer {KEY}"] * 2


async def test_embedded_store_ignores_key() -> None:
    async with hivemem.connect("sqlite://:memory:", api_key=KEY) as hive:
        await hive.put("ns", "k", 1)
        item = await hive.get("ns", "k")
        assert item is not None and item.value == 1


async def test_key_never_shown_in_errors(fake: ThreadServer) -> None:
    bad = "abc\r\nX-Evil: 1"
    with pytest.raises(InvalidInput) as info:
        hivemem.connect(fake.url, api_key=bad)
    assert info.value.field == "api_key" and bad not in str(info.value)
    assert "abc" not in str(info.value)

    async def unauthorized(_: web.Request) -> web.Response:
        return json_response({"type": "/problems/unauthenticated", "detail": "bad key"}, 401)

    app = web.Application()
    app.router.add_get("/v1/events/head", unauthorized)
    with ThreadServer(app) as server:
        async with hivemem.connect(server.url, api_key=KEY, settings=quick()) as hive:
            with pytest.raises(hivemem.Unauthenticated) as err:
                await hive.head()
            assert KEY not in str(err.value)
    # An unreachable service: the Unavailable message names the URL, not the key.
    async with hivemem.connect(
        "http://127.0.0.1:9", api_key=KEY, settings=quick(client_attempts=1)
    ) as hive:
        with pytest.raises(Unavailable) as down:
            await hive.head()
        assert KEY not in str(down.value)


# TLS ---------------------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hivemem test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


async def test_https_with_private_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    with ThreadServer(fake_service(), ssl_context=server_ctx) as server:
        assert server.url.startswith("https://")
        settings = quick(client_ca_file=str(ca))
        async with hivemem.connect(server.url, api_key=KEY, settings=settings) as hive:
            assert await hive.head() == "0"
            assert (await first_event(hive)).cursor == "7"
        assert [r.headers.get("Authorization") for r in server.requests] == [f"Bearer {KEY}"] * 2

        # Without the CA the certificate does not verify: no request reaches the handler.
        settings = quick(client_attempts=2, client_backoff_seconds=0.01)
        async with hivemem.connect(server.url, settings=settings) as hive:
            with pytest.raises(Unavailable, match=r"(?i)certificate"):
                await hive.head()
        assert len(server.requests) == 2

    with pytest.raises(InvalidInput) as info:
        hivemem.connect(server.url, settings=quick(client_ca_file=str(tmp_path / "none.pem")))
    assert info.value.field == "client_ca_file"
    # An http URL has no use for the CA file: not even read.
    hivemem.connect("http://127.0.0.1:1", settings=quick(client_ca_file=str(tmp_path / "x")))


# Redirects ---------------------------------------------------------------------------


async def test_redirect_is_an_error_and_is_not_followed(fake: ThreadServer) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(fake.url + request.path_qs)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    with ThreadServer(app) as server:
        async with hivemem.connect(server.url, api_key=KEY, settings=quick()) as hive:
            for call in (
                hive.head(),
                hive.put("ns", "k", 1),
                hive.get("ns", "k"),
                first_event(hive),
            ):
                with pytest.raises(HivememError) as info:
                    await call
                assert type(info.value) is HivememError
                assert "307" in info.value.message and fake.url in info.value.message
                assert KEY not in info.value.message
            assert isinstance(hive, RemoteHive)
            assert all(ep.closed and ep.failures == 0 for ep in hive._shared.endpoints.all)
        assert len(server.requests) == 4  # one each: never retried
    assert fake.requests == []  # never followed: the key went nowhere else


# NaN and Infinity --------------------------------------------------------------------


async def test_non_finite_numbers_are_refused_before_sending(fake: ThreadServer) -> None:
    nan, inf = float("nan"), float("inf")
    async with hivemem.connect(fake.url, settings=quick()) as hive:
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("value", lambda: hive.put("ns", "k", nan)),
            ("value.a.1", lambda: hive.put("ns", "k", {"a": [1.0, -inf]})),
            ("metadata.score", lambda: hive.put("ns", "k", 1, metadata={"score": nan})),
            ("ttl", lambda: hive.put("ns", "k", 1, ttl=inf)),
            ("filter.score.$gt", lambda: hive.search("ns", "q", filter={"score": {"$gt": nan}})),
            ("updated_after", lambda: hive.search("ns", "q", updated_after=nan)),
            ("payload.1", lambda: hive.publish("chan", [None, inf])),
            ("state.x", lambda: hive.save_state("s1", {"x": nan})),
            ("metadata.m", lambda: hive.create_session(app="a", metadata={"m": inf})),
            (
                "messages.0.content.x",
                lambda: hive.append_messages("s1", [{"role": "user", "content": {"x": nan}}]),
            ),
            (
                "messages.0.cost",
                lambda: hive.append_messages(
                    "s1", [{"role": "user", "content": "hi", "cost": nan}]
                ),
            ),
            (
                "ops.1.value",
                lambda: hive.batch(
                    [
                        PutOp(namespace="ns", key="a", value=1),
                        PutOp(namespace="ns", key="b", value=nan),
                    ]
                ),
            ),
            (
                "ops.0.ttl",
                lambda: hive.batch(
                    [{"op": "put", "namespace": "ns", "key": "a", "value": 1, "ttl": -inf}]  # type: ignore[list-item]
                ),
            ),
            ("limit", lambda: hive.list("ns", limit=nan)),  # type: ignore[arg-type]
            ("if_version", lambda: hive.delete("ns", "k", if_version=inf)),  # type: ignore[arg-type]
        ]
        for field, call in cases:
            with pytest.raises(InvalidInput) as info:
                await call()
            assert info.value.field == field, (field, info.value)
        assert fake.requests == []
        # None is sent as null as always (the slow path finds nothing), finite floats too.
        await hive.put("ns", "k", None, metadata={"a": None, "b": 1.5, "c": "null"})
        await hive.put("ns", "k", {"x": 1e308, "y": -0.0})
        assert len(fake.requests) == 2


# 429 ---------------------------------------------------------------------------------


def limited_app(fail_first: int | None, retry_after: int = 1) -> web.Application:
    """429 (Retry-After ``retry_after``) for the first ``fail_first`` requests of each
    route (None: always), then a normal answer."""
    counts: dict[str, int] = {}

    def limited(ok: Callable[[], web.Response]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            n = counts[request.path] = counts.get(request.path, 0) + 1
            if fail_first is None or n <= fail_first:
                return problem_429(retry_after)
            return ok()

        return handler

    app = web.Application()
    app.router.add_get("/v1/events/head", limited(lambda: json_response({"cursor": "3"})))
    app.router.add_post("/v1/publish/{c}", limited(lambda: json_response(EVENT)))
    app.router.add_put("/v1/items/{ns}/{key}", limited(lambda: json_response(ITEM)))
    return app


async def test_read_waits_retry_after_then_succeeds() -> None:
    with ThreadServer(limited_app(fail_first=1)) as server:
        settings = quick(client_rate_limit_wait_seconds=10)
        async with hivemem.connect(server.url, settings=settings) as hive:
            started = time.monotonic()
            assert await hive.head() == "3"
            elapsed = time.monotonic() - started
            assert isinstance(hive, RemoteHive)
            assert all(ep.closed and ep.failures == 0 for ep in hive._shared.endpoints.all)
        assert 1.0 <= elapsed < 3.0
        assert len(server.requests) == 2


async def test_read_gives_up_after_the_wait_budget() -> None:
    with ThreadServer(limited_app(fail_first=None)) as server:
        async with hivemem.connect(
            server.url, settings=quick(client_rate_limit_wait_seconds=1.5)
        ) as hive:
            started = time.monotonic()
            with pytest.raises(RateLimited) as info:
                await hive.head()
            assert 1.0 <= time.monotonic() - started < 1.6
            assert info.value.retry_after == 1.0
            assert len(server.requests) == 2
        async with hivemem.connect(
            server.url, settings=quick(client_rate_limit_wait_seconds=0)
        ) as hive:
            with pytest.raises(RateLimited):
                await hive.head()
            assert len(server.requests) == 3  # no wait allowed: one try


async def test_write_429_raises_at_once_and_never_opens_a_circuit() -> None:
    with ThreadServer(limited_app(fail_first=None, retry_after=7)) as server:
        settings = quick(client_circuit_failures=2, client_rate_limit_wait_seconds=30)
        async with hivemem.connect(server.url, settings=settings) as hive:
            assert isinstance(hive, RemoteHive)
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(RateLimited) as info:
                    await hive.publish("chan", 1)
                assert time.monotonic() - started < 0.5
                assert info.value.retry_after == 7.0
                with pytest.raises(RateLimited):
                    await hive.put("ns", "k", 1)
            assert all(ep.closed and ep.failures == 0 for ep in hive._shared.endpoints.all)
        assert len(server.requests) == 10


async def test_watch_waits_out_a_429_when_opening() -> None:
    calls = 0

    async def watch(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return problem_429(1)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: hivemem\ndata: " + orjson.dumps(EVENT) + b"\n\n")
        await asyncio.sleep(5)
        return resp

    app = web.Application()
    app.router.add_get("/v1/watch", watch)
    with ThreadServer(app) as server:
        async with hivemem.connect(server.url, api_key=KEY, settings=quick()) as hive:
            started = time.monotonic()
            assert (await first_event(hive)).cursor == "7"
            assert time.monotonic() - started >= 1.0
        assert [r.headers.get("Authorization") for r in server.requests] == [f"Bearer {KEY}"] * 2


def test_retry_after_forms() -> None:
    from email.utils import format_datetime

    from hivemem.wire import retry_after_seconds

    soon = format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after_seconds({"Retry-After": soon}, 4.0) <= 30
    assert retry_after_seconds({"Retry-After": " 2 "}, 4.0) == 2.0
    assert retry_after_seconds({"Retry-After": "-5"}, 4.0) == 0.0
    assert retry_after_seconds({"Retry-After": "nan"}, 4.0) == 4.0
    assert retry_after_seconds({"Retry-After": "soon"}, 4.0) == 4.0
    assert retry_after_seconds({}, 4.0) == 4.0
    assert retry_after_seconds({}, float("nan")) == 1.0


# Server-sent events ------------------------------------------------------------------


def endless_stream_app(body: Callable[[int], bytes], sent: list[int]) -> web.Application:
    """GET /v1/watch: the stream opens, then ``body(i)`` chunks follow until the client
    leaves (at most 256 MiB). ``sent`` collects the bytes written per connection."""

    async def watch(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Hivemem-Cursor": "0"}
        )
        await resp.prepare(request)
        total = 0
        try:
            for i in range(4096):
                chunk = body(i)
                await resp.write(chunk)
                total += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            sent.append(total)
        return resp

    app = web.Application()
    app.router.add_get("/v1/watch", watch)
    return app


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda i: (b"data: " if i == 0 else b"") + b"x" * 65536, id="endless-line"),
        pytest.param(lambda i: b"data: " + b"y" * 65530 + b"\n", id="endless-event"),
    ],
)
async def test_oversized_stream_is_a_protocol_error_not_a_reconnect(
    body: Callable[[int], bytes],
) -> None:
    sent: list[int] = []
    with ThreadServer(endless_stream_app(body, sent)) as server:
        settings = quick(client_max_sse_bytes=1024 * 1024, watch_reconnect_seconds=5)
        async with hivemem.connect(server.url, settings=settings) as hive:
            with pytest.raises(HivememError, match="client_max_sse_bytes") as info:
                await first_event(hive)
            assert type(info.value) is HivememError
        for _ in range(50):  # the server notices the closed connection
            if sent:
                break
            await asyncio.sleep(0.1)
    assert len(server.requests) == 1  # not reopened
    assert sent and sent[0] < 256 * 1024 * 1024


class FakeContent:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class FakeResponse:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = FakeContent(chunks)


async def parse(stream: bytes, chunk: int, max_bytes: int = 1 << 20) -> list[SSEMessage]:
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    return [m async for m in read_sse(FakeResponse(chunks), max_bytes=max_bytes)]  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
async def test_sse_parsing_whatever_the_chunking(chunk: int) -> None:
    stream = (
        "\ufeff: hello\r\n"
        'event: hivemem\r\nid: 1\r\ndata: {"a":\r\ndata:1}\r\n\r\n'
        "data: é ünïcode\rdata:second\r\r"
        "id: 2\ndata\n\n"
        "data: dropped at the end"
    ).encode()
    messages = await parse(stream, chunk)
    assert messages == [
        SSEMessage("1", "hivemem", '{"a":\n1}'),
        SSEMessage(None, "message", "é ünïcode\nsecond"),
        SSEMessage("2", "message", ""),
    ]


async def test_sse_limits_and_linear_time() -> None:
    assert [m.data for m in await parse(b"data: " + b"z" * 100 + b"\n\n", 3, 106)] == ["z" * 100]
    with pytest.raises(HivememError, match="line"):
        await parse(b"data: " + b"z" * 101 + b"\n\n", 1000, 106)
    with pytest.raises(HivememError, match="line"):
        await parse(b"data: " + b"z" * 1000, 7, 106)  # no line end ever
    with pytest.raises(HivememError, match="event"):
        await parse(b"data: 0123456789\n" * 20, 5, 100)
    # 8 MiB in 1 KiB chunks: quadratic buffering would copy ~32 GiB.
    big = b"data: " + b"q" * (8 << 20) + b"\r\n\r\n"
    started = time.monotonic()
    messages = await parse(big, 1024, 9 << 20)
    assert len(messages[0].data) == 8 << 20
    assert time.monotonic() - started < 5.0


# Against a real service --------------------------------------------------------------


CLIENT = web.AppKey("client", ClientSession)


def recording_proxy(upstream: str) -> web.Application:
    """A reverse proxy to ``upstream`` that streams answers (the watch stream too)."""
    hop = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}

    async def on_startup(app: web.Application) -> None:
        app[CLIENT] = ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[CLIENT].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with request.app[CLIENT].request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in hop},
            )
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                return resp
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def test_real_service_receives_bearer_and_works(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "trust.db", log_path=tmp_path / "trust.log")
    svc.start()
    try:
        with ThreadServer(recording_proxy(svc.url)) as proxy:
            async with hivemem.connect(proxy.url, agent="tls", api_key=KEY) as hive:
                start = await hive.head()
                item = await hive.put("trust", "k", {"v": 1.5, "n": None})
                got = await hive.get("trust", "k")
                assert got is not None and got.value == {"v": 1.5, "n": None}
                assert got.version == item.version == 1 and got.author == "tls"
                event = await first_event(hive, prefix="trust", after=start)
                assert event.key == "k" and event.type in ("put", "item.put", "set")
            assert len(proxy.requests) == 4
            assert {r.headers.get("Authorization") for r in proxy.requests} == {f"Bearer {KEY}"}
        # And straight to the service.
        with hivemem.connect_sync(svc.url, agent="tls", api_key=KEY) as sync_hive:
            sync_hive.put("trust", "k2", [1, 2])
            got2 = sync_hive.get("trust", "k2")
            assert got2 is not None and got2.value == [1, 2]
    finally:
        svc.terminate()
