"""The task queue and coordination over HTTP: status codes, problem+json bodies naming
the field, long polls cut to ``max_wait_seconds`` (and the client repeating them until
its own wait ends), fenced item writes, and what belongs to the authenticated agent
(a claimed task, a lease, a registration) when the service runs with ``--auth``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

import hivemem
from hivemem.client import RemoteHive
from hivemem.config import Settings
from hivemem.errors import Conflict, PermissionDenied
from tests.conftest import ServiceProcess
from tests.test_permissions import add_agent

MAX_WAIT = 0.5
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service without auth whose requests wait at most MAX_WAIT seconds."""
    service = ServiceProcess(
        tmp_path_factory.mktemp("tasks-http") / "hive.db",
        env={"HIVEMEM_EMBEDDER": "none", "HIVEMEM_MAX_WAIT_SECONDS": str(MAX_WAIT)},
    )
    service.start()
    try:
        yield service
    finally:
        service.terminate()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A service with auth on (built-in roles, no policy file) and keys of two writers."""
    base = tmp_path_factory.mktemp("tasks-auth")
    store = f"sqlite:///{base / 'hive.db'}"
    keys = {name: add_agent(store, name, "writer") for name in ("w1", "w2")}
    service = ServiceProcess(
        base / "hive.db", env={"HIVEMEM_AUTH": "true", "HIVEMEM_EMBEDDER": "none"}
    )
    service.start()
    try:
        yield {"svc": service, "keys": keys}
    finally:
        service.terminate()


class Http:
    """Raw requests to one service, as one agent (header or key)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, **headers: str) -> None:
        self.http, self.base, self.headers = http, base, headers

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        **params: Any,
    ) -> tuple[int, Any, str]:
        """(status, decoded body or None, content type)."""
        kw: dict[str, Any] = {"json": body} if raw is None else {"data": raw}
        all_headers = {**self.headers, **(headers or {})}
        if raw is not None:
            all_headers["Content-Type"] = "application/json"
        query = {k: str(v) for k, v in params.items()}
        async with self.http.request(
            method, self.base + path, params=query, headers=all_headers, **kw
        ) as resp:
            data = await resp.read()
            return (
                resp.status,
                (await resp.json(content_type=None)) if data else None,
                (resp.content_type),
            )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def queue() -> str:
    return f"t{uuid.uuid4().hex[:8]}/jobs"


async def test_status_codes_of_a_task_lifecycle(svc: ServiceProcess, http: Any) -> None:
    call = Http(http, svc.url, **{"X-Hivemem-Agent": "boss"})
    worker = Http(http, svc.url, **{"X-Hivemem-Agent": "worker"})
    q = queue()
    status, _, _ = await worker("POST", f"/v1/queues/{q}/claim", {})
    assert status == 204  # nothing due, no wait
    status, _, _ = await worker("POST", f"/v1/queues/{q}/claim")  # no body at all
    assert status == 204
    status, task, _ = await call("POST", f"/v1/queues/{q}/tasks", {"payload": {"n": 1}})
    assert status == 201 and task["state"] == "ready" and task["submitted_by"] == "boss"
    status, held, _ = await worker("POST", f"/v1/queues/{q}/claim", {"lease": 10})
    assert status == 200 and held["claimed_by"] == "worker" and held["attempt"] == 1
    status, beat, _ = await worker("POST", f"/v1/tasks/{held['id']}/heartbeat", {"attempt": 1})
    assert status == 200 and beat["lease_seconds"] == 10  # the claim's lease by default
    status, done, _ = await worker(
        "POST", f"/v1/tasks/{held['id']}/complete", {"attempt": 1, "result": [1, 2]}
    )
    assert status == 200 and done["state"] == "completed" and done["result"] == [1, 2]
    status, got, _ = await call("GET", f"/v1/tasks/{task['id']}/result", wait=5)
    assert status == 200 and got["result"] == [1, 2]
    status, page, _ = await call("GET", f"/v1/queues/{q}/tasks", state="completed")
    assert status == 200 and [t["id"] for t in page["items"]] == [task["id"]]
    status, stats, _ = await call("GET", f"/v1/queues/{q}/stats")
    assert status == 200 and stats["completed"] == 1 and stats["queue"] == q
    status, body, kind = await call("POST", f"/v1/tasks/{task['id']}/cancel", {})
    assert status == 409 and kind == PROBLEM and body["field"] == "task_id"
    status, body, kind = await call("GET", f"/v1/tasks/{'0' * 24}")
    assert status == 404 and kind == PROBLEM and body["field"] == "task_id"


async def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(
    svc: ServiceProcess, http: Any
) -> None:
    call = Http(http, svc.url, **{"X-Hivemem-Agent": "prober"})
    q = queue()
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", f"/v1/queues/{q}/tasks", {"priority": 5000}, "priority"),
        ("POST", f"/v1/queues/{q}/tasks", {"max_attempts": 0}, "max_attempts"),
        ("POST", f"/v1/queues/{q}/tasks", {"timeout": -1}, "timeout"),
        ("POST", f"/v1/queues/{q}/tasks", {"backoff": "1"}, "backoff"),
        ("POST", f"/v1/queues/{q}/tasks", {"delay": True}, "delay"),
        ("POST", f"/v1/queues/{q}/tasks", {"idempotency_key": ""}, "idempotency_key"),
        ("POST", f"/v1/queues/{q}/tasks", {"surprise": 1}, "surprise"),
        ("POST", f"/v1/queues/{q}/tasks", {"payload": 2**70}, "payload"),
        ("POST", "/v1/queues/_tasks/tasks", {}, "queue"),
        ("POST", "/v1/queues//tasks", {}, "queue"),
        ("POST", f"/v1/queues/{q}/claim", {"lease": 0}, "lease"),
        ("POST", f"/v1/queues/{q}/claim", {"wait": -1}, "wait"),
        ("POST", "/v1/tasks/not-hex/cancel", {}, "task_id"),
        ("POST", "/v1/tasks/..etc/cancel", {}, "task_id"),
        ("POST", f"/v1/tasks/{'0' * 24}/fail", {"attempt": 1, "error": "x" * 5000}, "error"),
        ("POST", f"/v1/tasks/{'0' * 24}/heartbeat", {"attempt": 0}, "attempt"),
        ("POST", f"/v1/tasks/{'0' * 24}/requeue", {"delay": -1}, "delay"),
        ("POST", f"/v1/leases/{q}/acquire", {"ttl": 0}, "ttl"),
        ("POST", f"/v1/leases/{q}/acquire", {"ttl": 5, "wait": -2}, "wait"),
        ("POST", f"/v1/leases/{q}/renew", {"token": "1", "version": 1}, "token"),
        ("PUT", f"/v1/signals/{q}", {"value": 1, "ttl": 0}, "ttl"),
        ("POST", "/v1/once/begin", {"key": "a/b"}, "key"),
        ("POST", "/v1/once/begin", {"key": "k", "lease": -1}, "lease"),
        ("PUT", "/v1/registry/_a", {}, "name"),
        ("PUT", "/v1/registry/prober", {"capabilities": ["ok", "not ok"]}, "capabilities.1"),
        ("PUT", "/v1/registry/prober", {"ttl": 0.5}, "ttl"),
        ("PUT", f"/v1/items/{q}/k", {"value": 1, "fence": {"lease": "_x", "token": 1}}, "fence"),
        ("PUT", f"/v1/items/{q}/k", {"value": 1, "fence": {"lease": q, "token": 0}}, "fence"),
    ]
    for method, path, body, field in cases:
        status, problem, kind = await call(method, path, body)
        assert status in (413, 422), (path, body, status, problem)
        assert kind == PROBLEM and problem["field"] == field, (path, body, problem)
    for wait in ("soon", "nan", "inf", "-1"):
        status, problem, _ = await call("GET", f"/v1/tasks/{'0' * 24}/result", wait=wait)
        assert status == 422 and problem["field"] == "wait", problem
    status, problem, _ = await call("GET", f"/v1/signals/{q}", changed_from=-1)
    assert status == 422 and problem["field"] == "changed_from"
    status, problem, _ = await call("GET", "/v1/registry", healthy="maybe")
    assert status == 422 and problem["field"] == "healthy"
    status, problem, _ = await call("POST", f"/v1/queues/{q}/tasks", raw=b'{"delay": NaN}')
    assert status == 422 and problem["field"] == "body"
    _, stats, _ = await call("GET", f"/v1/queues/{q}/stats")
    assert stats["ready"] == stats["delayed"] == 0
    assert (await call("GET", f"/v1/items/{q}/k"))[0] == 404
    assert (await call("GET", f"/v1/signals/{q}"))[0] == 404


async def test_long_polls_are_cut_to_max_wait_seconds(svc: ServiceProcess, http: Any) -> None:
    call = Http(http, svc.url, **{"X-Hivemem-Agent": "poller"})
    q = queue()
    started = time.monotonic()
    status, _, _ = await call("POST", f"/v1/queues/{q}/claim", {"wait": 3600})
    assert status == 204  # a longer wait is no error: it is cut to the cap
    assert MAX_WAIT - 0.1 <= time.monotonic() - started < MAX_WAIT + 1.0
    _, task, _ = await call("POST", f"/v1/queues/{q}/tasks", {"payload": 1})
    started = time.monotonic()
    status, got, _ = await call("GET", f"/v1/tasks/{task['id']}/result", wait=1e9)
    assert status == 200 and got["state"] == "ready"  # not done: the wait ran out
    assert MAX_WAIT - 0.1 <= time.monotonic() - started < MAX_WAIT + 1.0
    started = time.monotonic()
    status, body, _ = await call("GET", f"/v1/signals/{q}", changed_from=0, wait=100)
    assert status == 404 and body["field"] == "name"
    assert MAX_WAIT - 0.1 <= time.monotonic() - started < MAX_WAIT + 1.0
    held = Http(http, svc.url, **{"X-Hivemem-Agent": "holder"})
    assert (await held("POST", f"/v1/leases/{q}/acquire", {"ttl": 30}))[0] == 200
    started = time.monotonic()
    status, body, _ = await call("POST", f"/v1/leases/{q}/acquire", {"ttl": 5, "wait": 60})
    assert status == 409 and body["field"] == "name"
    assert MAX_WAIT - 0.1 <= time.monotonic() - started < MAX_WAIT + 1.0


async def test_the_client_repeats_long_polls_until_its_own_wait_ends(
    svc: ServiceProcess,
) -> None:
    # A request timeout shorter than the waits: each long poll's timeout must exceed
    # the wait it asks for, or the client would give up (Unavailable) mid-wait.
    settings = Settings(request_timeout_seconds=0.3, max_wait_seconds=MAX_WAIT * 2)
    async with RemoteHive(svc.url, agent="waiter", settings=settings) as hive:
        q = queue()
        started = time.monotonic()
        assert await hive.claim(q, wait=1.6) is None
        assert 1.5 <= time.monotonic() - started < 3.5  # several requests of MAX_WAIT

        async def later() -> None:
            await asyncio.sleep(1.3)
            await hive.submit(q, "late")

        submitter = asyncio.create_task(later())
        got = await hive.claim(q, wait=5)
        await submitter
        assert got is not None and got.payload == "late"

        async def finish() -> None:
            await asyncio.sleep(1.3)
            await hive.complete(got, "ok")

        finisher = asyncio.create_task(finish())
        started = time.monotonic()
        result = await hive.result(got.id, wait=5)
        await finisher
        assert (result.state, result.result) == ("completed", "ok")
        assert time.monotonic() - started < 3

    async with RemoteHive(svc.url, agent="signaller", settings=settings) as hive:
        name = f"{queue()}/ready"

        async def set_later() -> None:
            await asyncio.sleep(1.3)
            await hive.set_signal(name, "go")

        setter = asyncio.create_task(set_later())
        signal = await hive.wait_signal(name, timeout=5)
        await setter
        assert signal.value == "go"
        assert await hive.get_signal(f"{name}-never") is None


async def test_a_fenced_put_is_refused_with_409_naming_fence(
    svc: ServiceProcess, http: Any
) -> None:
    a = Http(http, svc.url, **{"X-Hivemem-Agent": "a"})
    b = Http(http, svc.url, **{"X-Hivemem-Agent": "b"})
    ns = queue()
    _, first, _ = await a("POST", f"/v1/leases/{ns}/lock/acquire", {"ttl": 0.3})
    fence = {"lease": f"{ns}/lock", "token": first["token"]}
    status, _, _ = await a("PUT", f"/v1/items/{ns}/k", {"value": 1, "fence": fence})
    assert status == 201
    await asyncio.sleep(0.5)
    status, second, _ = await b("POST", f"/v1/leases/{ns}/lock/acquire", {"ttl": 30})
    assert status == 200 and second["token"] > first["token"]
    for headers in ({}, {"If-Match": '"1"'}):
        status, body, kind = await a(
            "PUT", f"/v1/items/{ns}/k", {"value": "stale", "fence": fence}, headers=headers
        )
        assert status == 409 and kind == PROBLEM and body["field"] == "fence", body
    _, item, _ = await a("GET", f"/v1/items/{ns}/k")
    assert item["value"] == 1
    async with RemoteHive(svc.url, agent="b") as hive:
        stored = await hive.put(ns, "k", 2, fence=(f"{ns}/lock", second["token"]))
        assert stored.version == 2
        with pytest.raises(Conflict) as err:
            await hive.put(ns, "k", 3, fence=(f"{ns}/lock", first["token"]))
        assert err.value.field == "fence"


async def test_a_repeated_request_id_applies_a_finish_once(svc: ServiceProcess, http: Any) -> None:
    call = Http(http, svc.url, **{"X-Hivemem-Agent": "rid"})
    q = queue()
    await call("POST", f"/v1/queues/{q}/tasks", {"payload": 1})
    _, held, _ = await call("POST", f"/v1/queues/{q}/claim", {})
    rid = {"X-Hivemem-Request-Id": f"r{uuid.uuid4().hex}"}
    body = {"attempt": 1, "error": "boom", "retryable": True}
    first = await call("POST", f"/v1/tasks/{held['id']}/fail", body, headers=rid)
    again = await call("POST", f"/v1/tasks/{held['id']}/fail", body, headers=rid)
    assert first[0] == again[0] == 200 and first[1] == again[1]
    assert len(first[1]["errors"]) == 1
    status, problem, _ = await call(
        "POST", f"/v1/tasks/{held['id']}/fail", {**body, "error": "other"}, headers=rid
    )
    assert status == 422 and problem["field"] == "X-Hivemem-Request-Id"


async def test_client_heartbeats_keep_a_registration_healthy_until_unregister(
    svc: ServiceProcess,
) -> None:
    async with RemoteHive(svc.url, agent="beater") as hive:
        view = hive.as_agent("other")
        name = f"beater{uuid.uuid4().hex[:6]}"
        record = await view.register(name, capabilities=["beat"], ttl=1, heartbeat=True)
        assert record.healthy and record.registered_by == "other"
        await asyncio.sleep(1.8)  # beyond the ttl: heartbeats came from the client
        (found,) = [r for r in await hive.agents(capability="beat") if r.name == name]
        assert found.healthy and found.last_seen > record.last_seen
        assert await hive.unregister(name)  # a view's heartbeats stop through any view
        assert name not in [r.name for r in await hive.agents(healthy=None)]
        again = await hive.register(name, ttl=1, heartbeat=True)
        assert again.healthy
    # close() stopped the heartbeats: the agent goes down.
    async with RemoteHive(svc.url, agent="watcher") as hive:
        await asyncio.sleep(2.5)
        down = [r for r in await hive.agents(healthy=False) if r.name == name]
        assert down and not down[0].healthy


async def test_tasks_leases_and_registrations_belong_to_the_authenticated_agent(
    secured: dict[str, Any], http: Any
) -> None:
    svc, keys = secured["svc"], secured["keys"]
    w1 = Http(http, svc.url, Authorization=f"Bearer {keys['w1']}")
    # w2 claims to be w1 in the agent header: the key decides.
    w2 = Http(http, svc.url, Authorization=f"Bearer {keys['w2']}", **{"X-Hivemem-Agent": "w1"})
    q = queue()
    _, task, _ = await w2("POST", f"/v1/queues/{q}/tasks", {"payload": 1})
    assert task["submitted_by"] == "w2"
    status, held, _ = await w1("POST", f"/v1/queues/{q}/claim", {})
    assert status == 200 and held["claimed_by"] == "w1"
    for action, body in (
        ("heartbeat", {"attempt": 1}),
        ("complete", {"attempt": 1, "result": "forged"}),
        ("fail", {"attempt": 1, "error": "forged"}),
        ("release", {"attempt": 1}),
    ):
        status, problem, _ = await w2("POST", f"/v1/tasks/{held['id']}/{action}", body)
        assert status == 409 and problem["field"] == "attempt", (action, problem)
    _, still, _ = await w1("GET", f"/v1/tasks/{held['id']}")
    assert still["state"] == "running" and still["result"] is None
    status, _, _ = await w1("POST", f"/v1/tasks/{held['id']}/complete", {"attempt": 1})
    assert status == 200

    _, lease, _ = await w1("POST", f"/v1/leases/{q}/acquire", {"ttl": 30})
    assert lease["holder"] == "w1"
    parts = {"token": lease["token"], "version": lease["version"]}
    status, problem, _ = await w2("POST", f"/v1/leases/{q}/renew", parts)
    assert status == 409 and problem["field"] == "lease"
    status, problem, _ = await w2("POST", f"/v1/leases/{q}/acquire", {"ttl": 5})
    assert status == 409 and problem["field"] == "name"
    status, released, _ = await w2("POST", f"/v1/leases/{q}/release", parts)
    assert status == 200 and released == {"released": False}
    status, renewed, _ = await w1("POST", f"/v1/leases/{q}/renew", parts)
    assert status == 200 and renewed["holder"] == "w1" and renewed["ttl"] == 30

    status, problem, _ = await w2("PUT", "/v1/registry/w1", {"ttl": 60})
    assert status == 403 and problem["field"] == "name"
    status, record, _ = await w2("PUT", "/v1/registry/w2", {"ttl": 60})
    assert status == 200 and record["registered_by"] == "w2"
    for method, path in (("POST", "/v1/registry/w2/heartbeat"), ("DELETE", "/v1/registry/w2")):
        status, problem, _ = await w1(method, path)
        assert status == 403 and problem["field"] == "name", (method, problem)

    async with hivemem.connect(svc.url, agent="w1", api_key=keys["w2"]) as hive:
        assert isinstance(hive, RemoteHive)
        with pytest.raises(PermissionDenied):
            await hive.register("w1", heartbeat=False)
        assert await hive.unregister("w2")
