"""The promises hivemem makes, each proven with real processes and real servers.

- No lost update: concurrent compare-and-set increments from separate processes all land.
- Durable on acknowledgement: a write the service acknowledged survives ``kill -9``.
- The feed has every committed change exactly once; a watcher that is cut off resumes from
  its last cursor and misses nothing.
- Bad input over HTTP gets a 4xx problem+json naming the field, and writes nothing.
- A watcher on a shared SQLite file wakes promptly and costs almost no CPU while idle.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import pytest

import hivemem
from hivemem import Event, Item

if TYPE_CHECKING:
    from .conftest import ServiceProcess


WORKERS = Path(__file__).with_name("_workers.py")
MiB = 1024 * 1024


# Helpers ----------------------------------------------------------------------------------


def all_events(hive: hivemem.SyncHive, prefix: str) -> list[Event]:
    """Every retained event under ``prefix``, from the oldest."""
    out: list[Event] = []
    after = "0"
    while True:
        page = hive.read_events(prefix, after=after, limit=1000)
        if not page.items:
            return out
        out.extend(page.items)
        assert page.next_cursor is not None
        after = page.next_cursor


async def all_events_async(hive: hivemem.Hive, prefix: str) -> list[Event]:
    """Every retained event under ``prefix``, from the oldest (async)."""
    out: list[Event] = []
    after = "0"
    while True:
        page = await hive.read_events(prefix, after=after, limit=1000)
        if not page.items:
            return out
        out.extend(page.items)
        assert page.next_cursor is not None
        after = page.next_cursor


async def all_items(hive: hivemem.Hive, prefix: str) -> dict[str, Item]:
    """Every live item under ``prefix`` by key."""
    out: dict[str, Item] = {}
    cursor: str | None = None
    while True:
        page = await hive.list(prefix, limit=1000, cursor=cursor)
        for item in page.items:
            assert item.key not in out, f"list returned {item.key!r} twice"
            out[item.key] = item
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def worker(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``tests/_workers.py`` with ``args`` in a new process."""
    return subprocess.Popen(
        [sys.executable, str(WORKERS), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str | None, str, Any]]:
    """Parse a text/event-stream body into (id, event type, decoded data) tuples."""
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event_id, event_type, json.loads("\n".join(data))
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event_type = value
        elif name == "data":
            data.append(value)


async def put_create_only(http: aiohttp.ClientSession, url: str, ns: str, key: str) -> None:
    """PUT (ns, key) = key with If-None-Match: *, retrying until the service answers.

    A 409 after a retry means the earlier attempt was committed before its answer was lost,
    so each key is written exactly once however often the service goes away.
    """
    while True:
        try:
            async with http.put(
                f"{url}/v1/items/{ns}/{key}", json={"value": key}, headers={"If-None-Match": "*"}
            ) as resp:
                await resp.read()
                if resp.status in (200, 201, 409, 412):
                    return
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        await asyncio.sleep(0.05)


# a. No lost update ------------------------------------------------------------------------


def run_cas_counter(
    url: str, ns: str, processes: int = 10, increments: int = 100, timeout: float = 120
) -> None:
    key = "counter"
    with hivemem.connect_sync(url, agent="setup") as hive:
        assert hive.put(ns, key, 0, if_version=0).version == 1

    procs = [worker("cas", url, ns, key, str(increments)) for _ in range(processes)]
    conflicts = 0
    started = time.monotonic()
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().strip()
            assert line == "ready", f"worker did not start: {line!r} {proc.communicate()[1]}"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"worker failed: {out} {err}"
            assert out.startswith("done"), out
            conflicts += int(out.split()[1])
    finally:
        stop(procs)

    print(f"{conflicts} conflicts, {time.monotonic() - started:.1f} s")
    total = processes * increments
    with hivemem.connect_sync(url, agent="checker") as hive:
        item = hive.get(ns, key)
        assert item is not None
        assert (item.value, item.version) == (total, total + 1)
        history = hive.history(ns, key)
        assert [i.version for i in history] == list(range(total + 1, total + 1 - len(history), -1))
        assert [i.value for i in history] == [i.version - 1 for i in history]
        puts = [e for e in all_events(hive, ns) if e.key == key]
        assert all(e.type == "item.put" for e in puts)
        assert [e.version for e in puts] == list(range(1, total + 2))


@pytest.mark.slow
@pytest.mark.matrix  # 20 s; the same promise on a shared file runs by default
def test_cas_increments_from_ten_processes_through_the_service_lose_no_update(
    service: ServiceProcess, ns: str
) -> None:
    run_cas_counter(service.url, ns)


@pytest.mark.slow
def test_cas_increments_from_ten_processes_on_a_shared_sqlite_file_lose_no_update(
    tmp_path: Path, ns: str
) -> None:
    run_cas_counter(f"sqlite:///{tmp_path / 'cas.db'}", ns)


# b. Durable on acknowledgement ------------------------------------------------------------


@pytest.mark.slow
async def test_acknowledged_writes_survive_kill_9_of_the_service(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, ns: str
) -> None:
    svc = await anyio.to_thread.run_sync(service_factory, "crash")
    ackfiles = [tmp_path / f"acks-{i}.txt" for i in range(3)]
    writers = [
        worker("writer", svc.url, ns, f"w{i}", str(ack), "4", "30")
        for i, ack in enumerate(ackfiles)
    ]

    def acked() -> list[str]:
        keys: list[str] = []
        for ack in ackfiles:
            if ack.exists():
                keys.extend(k for k in ack.read_text().splitlines() if k)
        return keys

    try:
        deadline = time.monotonic() + 20
        # The ack files are written by other processes: there is nothing to await but time.
        while len(acked()) < 100 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        svc.kill9()
        for proc in writers:
            await anyio.to_thread.run_sync(lambda p=proc: p.wait(timeout=30))
    finally:
        stop(writers)
    for proc in writers:
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""

    keys = acked()
    print(f"{len(keys)} acknowledged writes before kill -9")
    assert len(keys) >= 100, f"the load did not get going: {len(keys)} acknowledged writes"
    assert len(set(keys)) == len(keys)

    await anyio.to_thread.run_sync(svc.restart)
    async with hivemem.connect(svc.url, agent="checker") as hive:
        items = await all_items(hive, ns)
        missing = [k for k in keys if k not in items]
        assert missing == [], f"{len(missing)} of {len(keys)} acknowledged writes lost"
        for key in keys:
            assert items[key].value["key"] == key
            assert items[key].version == 1

        events = await all_events_async(hive, ns)
        puts = Counter(e.key for e in events if e.type == "item.put")
        assert {k: puts[k] for k in keys if puts[k] != 1} == {}
        assert set(puts) == set(items), "every stored item has its event and vice versa"
        assert all(n == 1 for n in puts.values())


# c. Watchers miss nothing across disconnects ----------------------------------------------


@pytest.mark.slow
async def test_remote_watch_resumes_by_itself_after_kill_9_and_delivers_each_event_once(
    service_factory: Callable[..., ServiceProcess], ns: str
) -> None:
    svc = await anyio.to_thread.run_sync(service_factory, "watch")
    n = 300
    keys = [f"k{i:03d}" for i in range(n)]
    received: list[str | None] = []

    async with hivemem.connect(svc.url, agent="watcher") as hive:
        head = await hive.head()

        async def consume() -> None:
            async with aclosing(hive.watch(ns, after=head)) as events:
                async for event in events:
                    received.append(event.key)
                    if len(received) >= n:
                        return

        async def write() -> None:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for key in keys:
                    await put_create_only(http, svc.url, ns, key)
                    await asyncio.sleep(0.01)

        consumer = asyncio.ensure_future(consume())
        writer = asyncio.ensure_future(write())
        try:
            with anyio.fail_after(30):
                while len(received) < n // 3:
                    assert not consumer.done(), consumer.exception()
                    await asyncio.sleep(0.005)
            cut_at = len(received)
            assert not writer.done(), "the writer finished before the kill; not mid-stream"
            svc.kill9()
            await anyio.to_thread.run_sync(svc.restart)
            with anyio.fail_after(60):
                await writer
            with anyio.fail_after(30):
                await consumer
        finally:
            consumer.cancel()
            writer.cancel()

        written = [e.key for e in await all_events_async(hive, ns)]

    print(f"watch cut after {cut_at} of {n} events")
    assert written == keys, "the writer's puts are each in the feed once, in order"
    assert cut_at < n
    assert received == keys


async def read_sse_until(
    http: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
    received: list[str],
    goal: int,
) -> str:
    """Open GET /v1/watch, append each event's key to ``received`` until it holds ``goal``
    keys, then close the connection. Returns the id of the last event read."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    last_id = ""
    resp = await http.get(
        f"{url}/v1/watch",
        params=params,
        headers={"Accept": "text/event-stream", **headers},
        timeout=timeout,
    )
    try:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        with anyio.fail_after(30):
            async with aclosing(sse_events(resp)) as events:
                async for event_id, event_type, data in events:
                    assert event_type == "hivemem"
                    assert event_id is not None and data["cursor"] == event_id
                    received.append(data["key"])
                    last_id = event_id
                    if len(received) >= goal:
                        break
    finally:
        resp.close()
    return last_id


async def test_sse_stream_cut_and_resumed_with_last_event_id_gets_each_event_once(
    service: ServiceProcess, ns: str
) -> None:
    n, cut = 100, 40
    keys = [f"k{i:03d}" for i in range(n)]
    received: list[str] = []

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/v1/events/head") as resp:
            assert resp.status == 200
            head = (await resp.json())["cursor"]

        async def write() -> None:
            for key in keys:
                await put_create_only(http, service.url, ns, key)
                await asyncio.sleep(0.005)

        writer = asyncio.ensure_future(write())
        try:
            # The reconnect repeats the first URL and adds Last-Event-ID, as EventSource does.
            params = {"prefix": ns, "after": head}
            last_id = await read_sse_until(http, service.url, params, {}, received, cut)
            await read_sse_until(http, service.url, params, {"Last-Event-ID": last_id}, received, n)
            with anyio.fail_after(30):
                await writer
        finally:
            writer.cancel()

    assert received == keys


# d. Bad input over HTTP -------------------------------------------------------------------

# (id, method, path, request kwargs, acceptable statuses, expected field or None)
HTTP_CASES: list[tuple[str, str, str, dict[str, Any], tuple[int, ...], str | None]] = [
    (
        "namespace-illegal-char",
        "PUT",
        "/v1/items/{ns}/bad!ns/k",
        {"json": {"value": 1}},
        (422,),
        "namespace",
    ),
    (
        "namespace-space",
        "PUT",
        "/v1/items/{ns}/bad%20ns/k",
        {"json": {"value": 1}},
        (422,),
        "namespace",
    ),
    (
        "namespace-reserved",
        "PUT",
        "/v1/items/{ns}/_hidden/k",
        {"json": {"value": 1}},
        (422,),
        "namespace",
    ),
    (
        "namespace-9-deep",
        "PUT",
        "/v1/items/{ns}/a/b/c/d/e/f/g/h/k",
        {"json": {"value": 1}},
        (422,),
        "namespace",
    ),
    ("key-513-bytes", "PUT", "/v1/items/{ns}/" + "k" * 513, {"json": {"value": 1}}, (422,), "key"),
    ("key-control-char", "PUT", "/v1/items/{ns}/a%01b", {"json": {"value": 1}}, (422,), "key"),
    ("key-empty", "PUT", "/v1/items/{ns}/", {"json": {"value": 1}}, (404, 405, 422), None),
    (
        "value-over-1mib",
        "PUT",
        "/v1/items/{ns}/k",
        {"json": {"value": "x" * (MiB + 1)}},
        (413,),
        "value",
    ),
    ("ttl-negative", "PUT", "/v1/items/{ns}/k", {"json": {"value": 1, "ttl": -1}}, (422,), "ttl"),
    ("ttl-zero", "PUT", "/v1/items/{ns}/k", {"json": {"value": 1, "ttl": 0}}, (422,), "ttl"),
    ("ttl-string", "PUT", "/v1/items/{ns}/k", {"json": {"value": 1, "ttl": "soon"}}, (422,), "ttl"),
    ("value-missing", "PUT", "/v1/items/{ns}/k", {"json": {"ttl": 5}}, (422,), "value"),
    (
        "if-version-string",
        "PUT",
        "/v1/items/{ns}/k",
        {"json": {"value": 1, "if_version": "x"}},
        (422,),
        "if_version",
    ),
    (
        "metadata-not-object",
        "PUT",
        "/v1/items/{ns}/k",
        {"json": {"value": 1, "metadata": [1]}},
        (422,),
        "metadata",
    ),
    (
        "malformed-json",
        "PUT",
        "/v1/items/{ns}/k",
        {"data": b'{"value": 1', "headers": {"Content-Type": "application/json"}},
        (400, 422),
        "body",
    ),
    (
        "json-not-object",
        "PUT",
        "/v1/items/{ns}/k",
        {"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}},
        (400, 422),
        "body",
    ),
    (
        "stale-if-match",
        "PUT",
        "/v1/items/{ns}/existing",
        {"json": {"value": 2}, "headers": {"If-Match": '"5"'}},
        (409, 412),
        "if_version",
    ),
    (
        "stale-if-version",
        "PUT",
        "/v1/items/{ns}/existing",
        {"json": {"value": 2, "if_version": 3}},
        (409,),
        "if_version",
    ),
    (
        "if-none-match-on-existing",
        "PUT",
        "/v1/items/{ns}/existing",
        {"json": {"value": 2}, "headers": {"If-None-Match": "*"}},
        (409, 412),
        "if_version",
    ),
    (
        "delete-stale-version",
        "DELETE",
        "/v1/items/{ns}/existing?if_version=9",
        {},
        (409,),
        "if_version",
    ),
    (
        "delete-bad-version",
        "DELETE",
        "/v1/items/{ns}/existing?if_version=abc",
        {},
        (422,),
        "if_version",
    ),
    ("get-absent-item", "GET", "/v1/items/{ns}/absent", {}, (404,), None),
    ("delete-absent-item", "DELETE", "/v1/items/{ns}/absent", {}, (404,), None),
    ("session-unknown-get", "GET", "/v1/sessions/{ns}-nosuch", {}, (404,), "session_id"),
    (
        "session-unknown-messages-get",
        "GET",
        "/v1/sessions/{ns}-nosuch/messages",
        {},
        (404,),
        "session_id",
    ),
    (
        "session-unknown-messages-post",
        "POST",
        "/v1/sessions/{ns}-nosuch/messages",
        {"json": {"messages": [{"role": "user", "content": "hi"}]}},
        (404,),
        "session_id",
    ),
    (
        "session-unknown-state-put",
        "PUT",
        "/v1/sessions/{ns}-nosuch/state",
        {"json": {"state": {"a": 1}}},
        (404,),
        "session_id",
    ),
    (
        "session-stale-state",
        "PUT",
        "/v1/sessions/{ns}-s/state",
        {"json": {"state": {"a": 1}, "if_version": 4}},
        (409,),
        "if_version",
    ),
    (
        "message-without-role",
        "POST",
        "/v1/sessions/{ns}-s/messages",
        {"json": {"messages": [{"content": "hi"}]}},
        (422,),
        "messages.0.role",
    ),
    ("session-without-app", "POST", "/v1/sessions", {"json": {"user": "u"}}, (422,), "app"),
    (
        "session-duplicate-id",
        "POST",
        "/v1/sessions",
        {"json": {"app": "a", "session_id": "{ns}-s"}},
        (409,),
        "session_id",
    ),
    ("items-limit-0", "GET", "/v1/items?prefix={ns}&limit=0", {}, (422,), "limit"),
    ("items-limit-100000", "GET", "/v1/items?prefix={ns}&limit=100000", {}, (422,), "limit"),
    ("items-limit-not-int", "GET", "/v1/items?prefix={ns}&limit=ten", {}, (422,), "limit"),
    ("items-bad-prefix", "GET", "/v1/items?prefix=bad%20ns", {}, (422,), "prefix"),
    ("namespaces-limit-0", "GET", "/v1/namespaces?prefix={ns}&limit=0", {}, (422,), "limit"),
    ("sessions-limit-0", "GET", "/v1/sessions?app={ns}&limit=0", {}, (422,), "limit"),
    ("events-limit-0", "GET", "/v1/events?prefix={ns}&limit=0", {}, (422,), "limit"),
    (
        "batch-bad-key",
        "POST",
        "/v1/batch",
        {"json": {"ops": [{"op": "put", "namespace": "{ns}", "key": "a/b", "value": 1}]}},
        (422,),
        "ops.0.key",
    ),
    (
        "batch-stale-op",
        "POST",
        "/v1/batch",
        {
            "json": {
                "ops": [
                    {"op": "put", "namespace": "{ns}", "key": "new", "value": 1},
                    {"op": "delete", "namespace": "{ns}", "key": "existing", "if_version": 7},
                ]
            }
        },
        (409,),
        "ops.1.if_version",
    ),
    (
        "publish-payload-over-64kib",
        "POST",
        "/v1/publish/{ns}",
        {"json": {"payload": "p" * (64 * 1024 + 1)}},
        (413,),
        "payload",
    ),
    (
        "publish-bad-channel",
        "POST",
        "/v1/publish/{ns}/bad!ch",
        {"json": {"payload": 1}},
        (422,),
        "channel",
    ),
]


def fill(template: Any, ns: str) -> Any:
    """Replace ``{ns}`` in every string of a request template."""
    if isinstance(template, str):
        return template.replace("{ns}", ns)
    if isinstance(template, dict):
        return {k: fill(v, ns) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, ns) for v in template]
    return template


async def feed_since(http: aiohttp.ClientSession, url: str, cursor: str) -> list[dict[str, Any]]:
    """Events after ``cursor`` except item.expired (expiry sweeps of other tests' items)."""
    out: list[dict[str, Any]] = []
    while True:
        async with http.get(f"{url}/v1/events", params={"after": cursor, "limit": "1000"}) as r:
            assert r.status == 200
            page = await r.json()
        if not page["items"]:
            return [e for e in out if e["type"] != "item.expired"]
        out.extend(page["items"])
        cursor = page["next_cursor"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "statuses", "field"),
    [c[1:] for c in HTTP_CASES],
    ids=[c[0] for c in HTTP_CASES],
)
async def test_bad_http_request_gets_problem_json_naming_the_field_and_writes_nothing(
    service: ServiceProcess,
    ns: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    statuses: tuple[int, ...],
    field: str | None,
) -> None:
    url = service.url
    headers = {"X-Hivemem-Agent": "http-tester"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.put(f"{url}/v1/items/{ns}/existing", json={"value": 1}) as resp:
            assert resp.status in (200, 201)
        async with http.post(
            f"{url}/v1/sessions", json={"app": "a", "session_id": f"{ns}-s"}
        ) as resp:
            assert resp.status == 201
        async with http.get(f"{url}/v1/events/head") as resp:
            head = (await resp.json())["cursor"]

        async with http.request(method, url + fill(path, ns), **fill(kwargs, ns)) as resp:
            body = await resp.read()
            status = resp.status
            content_type = resp.headers.get("Content-Type", "")

        assert status < 500, f"server error {status}: {body[:500]!r}"
        assert status in statuses, f"status {status}, expected {statuses}: {body[:500]!r}"
        assert content_type.startswith("application/problem+json"), (content_type, body[:300])
        problem = json.loads(body)
        assert problem["status"] == status
        assert problem.get("title") and problem.get("type")
        if field is not None:
            assert problem.get("field") == field, problem
        if field == "if_version" and status in (409, 412):
            assert isinstance(problem.get("current_version"), int), problem

        assert await feed_since(http, url, head) == []
        async with http.get(f"{url}/v1/items/{ns}/existing") as resp:
            existing = await resp.json()
        assert (existing["value"], existing["version"]) == (1, 1)
        async with http.get(f"{url}/v1/items", params={"prefix": ns}) as resp:
            assert [i["key"] for i in (await resp.json())["items"]] == ["existing"]


async def test_http_oversized_request_body_is_rejected_without_server_error(
    service: ServiceProcess, ns: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/v1/events/head") as resp:
            head = (await resp.json())["cursor"]
        big = {"value": "x" * (5 * MiB)}
        async with http.put(f"{service.url}/v1/items/{ns}/k", json=big) as resp:
            body = await resp.read()
            assert resp.status == 413, body[:300]
            assert resp.headers["Content-Type"].startswith("application/problem+json")
            assert json.loads(body).get("field") in ("body", "value")
        assert await feed_since(http, service.url, head) == []


async def test_http_etag_is_the_quoted_version_and_if_match_with_it_succeeds(
    service: ServiceProcess, ns: str
) -> None:
    url = f"{service.url}/v1/items/{ns}/k"
    async with aiohttp.ClientSession(headers={"X-Hivemem-Agent": "etag-agent"}) as http:
        async with http.put(url, json={"value": "a"}, headers={"If-None-Match": "*"}) as resp:
            assert resp.status in (200, 201)  # 201 Created is fine too
            item = await resp.json()
            assert (item["version"], item["author"]) == (1, "etag-agent")
            assert resp.headers["ETag"] == '"1"'
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == '"1"'
        async with http.put(url, json={"value": "b"}, headers={"If-Match": '"1"'}) as resp:
            assert resp.status == 200
            assert (await resp.json())["version"] == 2
            assert resp.headers["ETag"] == '"2"'
        async with http.get(url) as resp:
            got = await resp.json()
            assert resp.headers["ETag"] == '"2"'
            assert (got["value"], got["version"]) == ("b", 2)
        async with http.delete(url, params={"if_version": "2"}) as resp:
            assert resp.status == 204
        async with http.get(url) as resp:
            assert resp.status == 404
            assert resp.headers["Content-Type"].startswith("application/problem+json")


# e. Cheap, prompt cross-process watch on a shared SQLite file ------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (man 5 proc).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_watcher_in_another_process_sees_writes_promptly_and_idles_cheaply(
    tmp_path: Path, ns: str
) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    with hivemem.connect_sync(store, agent="writer") as hive:
        hive.put(ns, "init", 0)
        proc = worker("watcher", store, ns)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.strip())

        threading.Thread(target=pump, daemon=True).start()

        def next_line(timeout: float) -> str:
            try:
                return lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                err = proc.communicate()[1]
                raise AssertionError(
                    f"watcher said nothing in {timeout} s; stderr:\n{err}"
                ) from None

        try:
            assert next_line(30) == "ready"
            time.sleep(0.5)
            cpu_before = cpu_seconds(proc.pid)
            time.sleep(3.0)
            idle_cpu = cpu_seconds(proc.pid) - cpu_before

            latencies = []
            for key in ("first", "second"):
                start = time.monotonic()
                hive.put(ns, key, 1)
                event = json.loads(next_line(10))
                latencies.append(time.monotonic() - start)
                assert (event["type"], event["key"]) == ("item.put", key)
                time.sleep(0.2)
        finally:
            stop([proc])

    print(f"watch latencies {latencies} s, idle CPU {idle_cpu:.3f} s in 3 s")
    assert max(latencies) < 2.0, f"watch latencies {latencies} s"
    assert idle_cpu < 0.3, f"the idle watcher used {idle_cpu:.2f} s of CPU in 3 s"
