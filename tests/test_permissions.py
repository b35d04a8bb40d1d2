"""Namespace permissions: an agent allowed only ``team/<itself>/**`` learns nothing about
another agent's namespace through any route of the service or any method of the
embedded hive, and writes there get 403.

The HTTP test walks every (method, path) of the service's OpenAPI document, so a new
route without a probe here fails it; the embedded test walks every abstract method of
:class:`hivemem.Hive` likewise.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import hivemem
from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.errors import Conflict, NotFound, PermissionDenied
from hivemem.hive import Hive
from hivemem.policy import Principal
from tests.conftest import ServiceProcess

POLICY = """
[[rules]]
actions = ["read", "write", "search", "watch", "publish", "sessions", "tasks"]
namespaces = ["team/{agent}/**"]
agents = ["*"]
"""
SECRET_WORD = "zebracorn"


def add_agent(store_url: str, name: str, *roles: str) -> str:
    """``hivemem agents add`` in a subprocess; the key is the last line of stdout."""
    cmd = [sys.executable, "-m", "hivemem", "agents", "add", name, "--store", store_url]
    for role in roles:
        cmd += ["--role", role]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("hm_"), out.stdout
    return key


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A service with auth on and the policy above; API keys of agents a, b and an admin."""
    base = tmp_path_factory.mktemp("perm")
    policy = base / "policy.toml"
    policy.write_text(POLICY)
    store = f"sqlite:///{base / 'hive.db'}"
    keys = {
        "a": add_agent(store, "a"),
        "b": add_agent(store, "b"),
        "root": add_agent(store, "root", "admin"),
    }
    svc = ServiceProcess(
        base / "hive.db",
        env={
            "HIVEMEM_AUTH": "true",
            "HIVEMEM_POLICY_FILE": str(policy),
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_AUTH_CACHE_SECONDS": "0",
        },
    )
    svc.start()
    try:
        yield {"svc": svc, "keys": keys, "store": store, "policy": policy}
    finally:
        svc.terminate()


class Caller:
    """Raw HTTP as one agent (so the test controls every header)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, key: str | None) -> None:
        self.http, self.base, self.key = http, base, key

    async def __call__(
        self, method: str, path: str, body: Any = None, **params: Any
    ) -> tuple[int, Any]:
        headers = {} if self.key is None else {"Authorization": f"Bearer {self.key}"}
        query = {k: str(v) for k, v in params.items()}
        async with self.http.request(
            method, self.base + path, json=body, params=query, headers=headers
        ) as resp:
            data = await resp.read()
            try:
                return resp.status, json.loads(data) if data else None
            except ValueError:
                return resp.status, data.decode()


@pytest.fixture
async def callers(secured: dict[str, Any]) -> AsyncIterator[dict[str, Caller]]:
    async with aiohttp.ClientSession() as http:
        base = secured["svc"].url
        yield {name: Caller(http, base, key) for name, key in secured["keys"].items()}


async def seed(b: Caller, a: Caller, tag: str) -> dict[str, Any]:
    """What agent b holds (items, history, a searchable text, a session with messages and
    state, a published event) and a's own control item."""
    ns_b, ns_a = f"team/b/{tag}", f"team/a/{tag}"
    for version in (1, 2):
        status, _ = await b(
            "PUT",
            f"/v1/items/{ns_b}/k1",
            {"value": {"text": f"{SECRET_WORD} plan v{version}"}, "metadata": {"n": version}},
        )
        assert status in (200, 201)
    status, _ = await a("PUT", f"/v1/items/{ns_a}/k1", {"value": {"text": f"{SECRET_WORD} for a"}})
    assert status == 201
    status, session = await b(
        "POST", "/v1/sessions", {"app": "team", "user": "b", "state": {"x": 1}}
    )
    assert status == 201, session
    status, _ = await b(
        "POST",
        f"/v1/sessions/{session['id']}/messages",
        {"messages": [{"role": "user", "content": SECRET_WORD}]},
    )
    assert status == 200
    status, _ = await b("POST", f"/v1/publish/{ns_b}/chan", {"payload": {"word": SECRET_WORD}})
    assert status == 200
    # Tasks and coordination: a ready task, a running one (held by b), a lease, a signal,
    # a once call with its result and b's registration.
    status, ready = await b("POST", f"/v1/queues/{ns_b}/q/tasks", {"payload": SECRET_WORD})
    assert status == 201, ready
    status, running = await b("POST", f"/v1/queues/{ns_b}/busy/tasks", {"payload": 1})
    assert status == 201, running
    status, running = await b("POST", f"/v1/queues/{ns_b}/busy/claim", {"lease": 60})
    assert status == 200, running
    status, lease = await b("POST", f"/v1/leases/{ns_b}/lock/acquire", {"ttl": 60})
    assert status == 200, lease
    status, _ = await b("PUT", f"/v1/signals/{ns_b}/sig", {"value": SECRET_WORD})
    assert status == 200
    once_key = f"{tag}:turn-1:send"
    status, ticket = await b("POST", "/v1/once/begin", {"key": once_key})
    assert status == 200 and ticket["status"] == "run", ticket
    status, _ = await b(
        "POST", "/v1/once/end", {"key": once_key, "token": ticket["token"], "result": SECRET_WORD}
    )
    assert status == 204
    status, _ = await b("PUT", "/v1/registry/b", {"capabilities": ["probe"], "ttl": 600})
    assert status == 200
    return {
        "ns_b": ns_b,
        "ns_a": ns_a,
        "session": session["id"],
        "task": ready["id"],
        "running": running,
        "lease": lease,
        "once_key": once_key,
    }


def mentions_b(data: Any) -> bool:
    """Whether a response body shows anything of agent b's."""
    text = json.dumps(data)
    return "team/b" in text or '"author": "b"' in text or '"created_by": "b"' in text


async def read_watch(caller: Caller, seconds: float, **params: Any) -> list[dict[str, Any]]:
    """The events of a watch stream during ``seconds`` (SSE data lines)."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {caller.key}"}
    try:
        async with caller.http.get(
            caller.base + "/v1/watch", params=params, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            async with asyncio.timeout(seconds):
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))
    except TimeoutError:
        pass
    return events


#: How agent a probes each route against agent b's things, and what must come back.
#: Each probe returns None when it held, or a message.
Probe = Callable[[Caller, Caller, dict[str, Any]], Awaitable[None]]


async def probe_item_get(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    denied = await a("GET", f"/v1/items/{s['ns_b']}/k1")
    absent = await a("GET", f"/v1/items/{s['ns_b']}/never-written")
    assert denied[0] == absent[0] == 404
    assert denied[1]["type"] == absent[1]["type"] and denied[1]["field"] == absent[1]["field"]
    assert (await b("GET", f"/v1/items/{s['ns_b']}/k1"))[0] == 200  # control


async def probe_item_put(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for target in ("k1", "never-written"):
        status, body = await a("PUT", f"/v1/items/{s['ns_b']}/{target}", {"value": "forged"})
        assert status == 403 and body["field"] == "namespace", body
        status, body = await a(
            "PUT", f"/v1/items/{s['ns_b']}/{target}", {"value": "x", "if_version": 0}
        )
        assert status == 403, body  # not 409: a version check would reveal existence
    status, item = await b("GET", f"/v1/items/{s['ns_b']}/k1")
    assert item["value"] != "forged" and item["version"] == 2


async def probe_item_delete(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for target in ("k1", "never-written"):
        status, body = await a("DELETE", f"/v1/items/{s['ns_b']}/{target}")
        assert status == 403, body
    assert (await b("GET", f"/v1/items/{s['ns_b']}/k1"))[0] == 200


async def probe_list(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for prefix in ("", "team", "team/b", s["ns_b"]):
        status, page = await a("GET", "/v1/items", prefix=prefix, limit=1000)
        assert status == 200 and not mentions_b(page), (prefix, page)
    status, page = await a("GET", "/v1/items", prefix="team")
    assert any(i["namespace"] == s["ns_a"] for i in page["items"])  # control: a sees its own


async def probe_namespaces(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for prefix in ("", "team", "team/b"):
        for depth in ({}, {"max_depth": 2}, {"max_depth": 3}):
            status, page = await a("GET", "/v1/namespaces", prefix=prefix, **depth)
            assert status == 200 and not any(
                n == "team/b" or n.startswith("team/b/") for n in page["items"]
            ), (prefix, depth, page)


async def probe_namespace_counts(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for prefix in ("", "team", "team/b"):
        status, page = await a("GET", "/v1/namespaces/counts", prefix=prefix, limit=1000)
        assert status == 200, page
        names = [c["namespace"] for c in page["items"]]
        assert not any(n == "team/b" or n.startswith("team/b/") for n in names), (prefix, page)
        listed = (await a("GET", "/v1/namespaces", prefix=prefix, limit=1000))[1]["items"]
        assert names == listed  # the same namespaces, counted


async def probe_batch(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    ops = [
        {"op": "put", "namespace": s["ns_a"], "key": "ok", "value": 1},
        {"op": "put", "namespace": s["ns_b"], "key": "k1", "value": "forged"},
    ]
    status, body = await a("POST", "/v1/batch", {"ops": ops})
    assert status == 403 and body["field"] == "ops.1.namespace", body
    assert (await a("GET", f"/v1/items/{s['ns_a']}/ok"))[0] == 404  # all or nothing
    status, body = await a(
        "POST", "/v1/batch", {"ops": [{"op": "delete", "namespace": s["ns_b"], "key": "k1"}]}
    )
    assert status == 403


async def probe_history(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    denied = await a("GET", f"/v1/history/{s['ns_b']}/k1")
    absent = await a("GET", f"/v1/history/{s['ns_b']}/never-written")
    assert denied == absent and denied[0] == 200 and denied[1]["items"] == []
    assert len((await b("GET", f"/v1/history/{s['ns_b']}/k1"))[1]["items"]) == 2


async def probe_search(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for prefix in ("", "team", "team/b", s["ns_b"]):
        for extra in ({}, {"filter": {"n": {"$gte": 1}}}, {"author": "b"}):
            status, found = await a(
                "POST",
                "/v1/search",
                {"query": SECRET_WORD, "prefix": prefix, "mode": "lexical", **extra},
            )
            assert status == 200 and not mentions_b(found), (prefix, extra, found)
    status, found = await a("POST", "/v1/search", {"query": SECRET_WORD, "mode": "lexical"})
    assert [h["item"]["namespace"] for h in found["hits"]] == [s["ns_a"]]  # control
    status, found = await b("POST", "/v1/search", {"query": SECRET_WORD, "mode": "lexical"})
    assert [h["item"]["namespace"] for h in found["hits"]] == [s["ns_b"]]


async def probe_sessions_create(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", "/v1/sessions", {"app": "team", "user": "b"})
    assert status == 403, body
    status, body = await a("POST", "/v1/sessions", {"app": "team", "user": "a"})
    assert status == 201, body  # control: its own


async def probe_sessions_list(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for params in ({}, {"app": "team"}, {"user": "b"}, {"app": "team", "user": "b"}):
        status, page = await a("GET", "/v1/sessions", **params)
        assert status == 200 and all(x["id"] != s["session"] for x in page["items"]), page
        assert not mentions_b(page)


async def _same_as_absent(
    a: Caller, method: str, suffix: str, s: dict[str, Any], body: Any = None
) -> None:
    denied = await a(method, f"/v1/sessions/{s['session']}{suffix}", body)
    absent = await a(method, f"/v1/sessions/x{uuid.uuid4().hex[:12]}{suffix}", body)
    assert denied[0] == absent[0] == 404, (denied, absent)
    assert denied[1]["type"] == absent[1]["type"] and denied[1]["field"] == absent[1]["field"]


async def probe_session_get(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _same_as_absent(a, "GET", "", s)


async def probe_session_delete(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _same_as_absent(a, "DELETE", "", s)
    assert (await b("GET", f"/v1/sessions/{s['session']}"))[0] == 200


async def probe_messages_get(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _same_as_absent(a, "GET", "/messages", s)


async def probe_messages_post(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _same_as_absent(
        a, "POST", "/messages", s, {"messages": [{"role": "user", "content": "forged"}]}
    )
    _, got = await b("GET", f"/v1/sessions/{s['session']}/messages")
    assert "forged" not in [m["content"] for m in got["messages"]]


async def probe_state_put(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _same_as_absent(a, "PUT", "/state", s, {"state": {"forged": True}})
    assert (await b("GET", f"/v1/sessions/{s['session']}"))[1]["state"] == {"x": 1}


def not_registry(events: list[Any]) -> list[Any]:
    """The events (or their namespaces) but the registry's (``_agents``): the registry
    is for agents to find each other, so every agent allowed ``tasks`` sees its events."""
    return [e for e in events if (e if isinstance(e, str) else e["namespace"]) != "_agents"]


async def probe_events(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for prefix in ("", "team", "team/b", "_sessions", "_tasks", f"_tasks/{s['ns_b']}"):
        status, page = await a("GET", "/v1/events", prefix=prefix, limit=1000)
        assert status == 200, page
        events = not_registry(page["items"])
        assert not mentions_b(events) and not any(e["namespace"].startswith("_") for e in events), (
            prefix,
            page,
        )
    status, page = await a("GET", "/v1/events", limit=1000)
    assert any(e["namespace"] == s["ns_a"] for e in page["items"])  # control
    status, page = await b("GET", "/v1/events", limit=1000)
    assert any(e["namespace"] == f"_sessions/{s['session']}" for e in page["items"])
    assert any(e["namespace"] == f"_tasks/{s['ns_b']}/q" for e in page["items"])


async def probe_index(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    # Counts over the whole store, no namespace or key: open to every principal.
    status, body = await a("GET", "/v1/index")
    assert status == 200 and set(body) >= {"pending", "lag_seconds"}


async def probe_index_wait(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", "/v1/index/wait", {"timeout": 5})
    assert status == 200 and body == {"indexed": True}


async def probe_head(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, head = await a("GET", "/v1/events/head")
    assert status == 200 and set(head) == {"cursor"}


async def probe_info(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, info = await a("GET", "/v1/info")
    assert status == 200 and info["agent"] == "a" and info["auth"] is True, info
    assert not mentions_b(info)
    anonymous = Caller(a.http, a.base, None)
    assert (await anonymous("GET", "/v1/info"))[0] == 401


async def probe_watch(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    async def writes() -> None:
        await asyncio.sleep(0.3)
        await b("PUT", f"/v1/items/{s['ns_b']}/live", {"value": 1})
        await b(
            "POST",
            f"/v1/sessions/{s['session']}/messages",
            {"messages": [{"role": "user", "content": "x"}]},
        )
        await b("POST", f"/v1/publish/{s['ns_b']}/chan", {"payload": 1})
        await b("POST", f"/v1/queues/{s['ns_b']}/live/tasks", {"payload": 1})
        await a("PUT", f"/v1/items/{s['ns_a']}/live", {"value": 1})

    for prefix in ("", "team/b"):
        writer = asyncio.create_task(writes())
        seen = not_registry(await read_watch(a, 2.5, prefix=prefix))
        await writer
        assert not mentions_b(seen) and not any(e["namespace"].startswith("_") for e in seen), seen
        if prefix == "":
            assert any(e["namespace"] == s["ns_a"] and e["key"] == "live" for e in seen), seen
    seen = not_registry(await read_watch(a, 1.0, prefix="", after="0"))  # replay
    assert seen and not mentions_b(seen)


async def probe_publish(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", f"/v1/publish/{s['ns_b']}/chan", {"payload": "forged"})
    assert status == 403 and body["field"] == "channel", body
    assert (await a("POST", f"/v1/publish/{s['ns_a']}/chan", {"payload": 1}))[0] == 200


async def probe_metrics(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("GET", "/metrics")
    assert status == 403 and body["field"] == "Authorization", body


async def probe_health(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    anonymous = Caller(a.http, a.base, None)
    assert (await anonymous("GET", "/healthz"))[0] == 200
    assert (await anonymous("GET", "/readyz"))[0] == 200


async def _task_same_as_absent(
    a: Caller, method: str, suffix: str, s: dict[str, Any], body: Any = None
) -> None:
    for task in (s["task"], s["running"]["id"]):
        denied = await a(method, f"/v1/tasks/{task}{suffix}", body)
        absent = await a(method, f"/v1/tasks/{'0' * 24}{suffix}", body)
        assert denied[0] == absent[0] == 404, (denied, absent)
        assert denied[1]["type"] == absent[1]["type"] and denied[1]["field"] == absent[1]["field"]
        assert not mentions_b(denied[1]) and SECRET_WORD not in json.dumps(denied[1])


async def _b_tasks_unchanged(b: Caller, s: dict[str, Any]) -> None:
    status, task = await b("GET", f"/v1/tasks/{s['task']}")
    assert status == 200 and task["state"] == "ready", task
    status, running = await b("GET", f"/v1/tasks/{s['running']['id']}")
    assert status == 200 and running["state"] == "running", running
    assert running["claimed_by"] == "b" and running["attempt"] == 1


async def probe_submit(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", f"/v1/queues/{s['ns_b']}/q/tasks", {"payload": "forged"})
    assert status == 403 and body["field"] == "queue", body
    status, body = await a("POST", f"/v1/queues/{s['ns_a']}/q/tasks", {"payload": 1})
    assert status == 201 and body["submitted_by"] == "a", body  # control
    _, stats = await b("GET", f"/v1/queues/{s['ns_b']}/q/stats")
    assert stats["ready"] == 1, stats


async def probe_claim(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for queue in ("q", "never-used"):
        status, body = await a("POST", f"/v1/queues/{s['ns_b']}/{queue}/claim", {"wait": 0.2})
        assert status == 403 and body["field"] == "queue", body
    await _b_tasks_unchanged(b, s)


async def probe_tasks_list(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for queue in ("q", "never-used"):
        status, body = await a("GET", f"/v1/queues/{s['ns_b']}/{queue}/tasks")
        assert status == 403 and body["field"] == "queue", body
    status, page = await b("GET", f"/v1/queues/{s['ns_b']}/q/tasks")
    assert [t["id"] for t in page["items"]] == [s["task"]]  # control


async def probe_queue_stats(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    denied = await a("GET", f"/v1/queues/{s['ns_b']}/q/stats")
    absent = await a("GET", f"/v1/queues/{s['ns_b']}/never-used/stats")
    assert denied[0] == absent[0] == 403 and denied[1]["field"] == "queue", denied


async def probe_queues(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await a("POST", f"/v1/queues/{s['ns_a']}/mine/tasks", {"payload": 1})
    status, found = await a("GET", "/v1/queues")
    assert status == 200 and f"{s['ns_a']}/mine" in [q["queue"] for q in found], found
    assert not mentions_b(found), found


async def probe_task_get(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "GET", "", s)


async def probe_task_result(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for task in (s["task"], s["running"]["id"]):
        denied = await a("GET", f"/v1/tasks/{task}/result", None, wait=0.2)
        absent = await a("GET", f"/v1/tasks/{'0' * 24}/result", None, wait=0.2)
        assert denied[0] == absent[0] == 404 and denied[1]["field"] == absent[1]["field"]


async def probe_task_heartbeat(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/heartbeat", s, {"attempt": 1, "lease": 60})
    await _b_tasks_unchanged(b, s)


async def probe_task_complete(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/complete", s, {"attempt": 1, "result": "forged"})
    await _b_tasks_unchanged(b, s)


async def probe_task_fail(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/fail", s, {"attempt": 1, "error": "forged"})
    await _b_tasks_unchanged(b, s)


async def probe_task_release(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/release", s, {"attempt": 1})
    await _b_tasks_unchanged(b, s)


async def probe_task_cancel(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/cancel", s, {})
    await _b_tasks_unchanged(b, s)


async def probe_task_requeue(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    await _task_same_as_absent(a, "POST", "/requeue", s, {"delay": 0})
    await _b_tasks_unchanged(b, s)


async def _b_lease_unchanged(b: Caller, s: dict[str, Any]) -> None:
    lease = s["lease"]
    status, renewed = await b(
        "POST",
        f"/v1/leases/{s['ns_b']}/lock/renew",
        {"token": lease["token"], "version": lease["version"]},
    )
    assert status == 200 and renewed["holder"] == "b", renewed
    s["lease"] = renewed


async def probe_lease_acquire(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    for name in ("lock", "never-used"):
        status, body = await a("POST", f"/v1/leases/{s['ns_b']}/{name}/acquire", {"ttl": 5})
        assert status == 403 and body["field"] == "name", body
    status, body = await a("POST", f"/v1/leases/{s['ns_a']}/lock/acquire", {"ttl": 5})
    assert status == 200 and body["holder"] == "a", body  # control
    await _b_lease_unchanged(b, s)


async def probe_lease_renew(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    lease = s["lease"]
    body = {"token": lease["token"], "version": lease["version"], "ttl": 1}
    status, got = await a("POST", f"/v1/leases/{s['ns_b']}/lock/renew", body)
    assert status == 403 and got["field"] == "lease", got
    await _b_lease_unchanged(b, s)


async def probe_lease_release(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    lease = s["lease"]
    body = {"token": lease["token"], "version": lease["version"]}
    status, got = await a("POST", f"/v1/leases/{s['ns_b']}/lock/release", body)
    assert status == 403 and got["field"] == "lease", got
    await _b_lease_unchanged(b, s)


async def probe_signal_set(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("PUT", f"/v1/signals/{s['ns_b']}/sig", {"value": "forged"})
    assert status == 403 and body["field"] == "name", body
    status, sig = await b("GET", f"/v1/signals/{s['ns_b']}/sig")
    assert status == 200 and sig["value"] == SECRET_WORD, sig
    assert (await a("PUT", f"/v1/signals/{s['ns_a']}/sig", {"value": 1}))[0] == 200  # control


async def probe_signal_get(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    denied = await a("GET", f"/v1/signals/{s['ns_b']}/sig")
    absent = await a("GET", f"/v1/signals/{s['ns_b']}/never-set", None, changed_from=0, wait=0.2)
    assert denied[0] == absent[0] == 403 and denied[1]["field"] == absent[1]["field"] == "name"
    assert SECRET_WORD not in json.dumps(denied[1])


async def probe_once_begin(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, ticket = await a("POST", "/v1/once/begin", {"key": s["once_key"]})
    assert status == 200 and ticket["status"] == "run", ticket  # keys are per agent
    assert SECRET_WORD not in json.dumps(ticket) and ticket["holder"] == "a"
    status, _ = await a(
        "POST", "/v1/once/end", {"key": s["once_key"], "token": ticket["token"], "error": "x"}
    )
    assert status == 204
    status, ticket = await b("POST", "/v1/once/begin", {"key": s["once_key"]})
    assert ticket["status"] == "done" and ticket["result"] == SECRET_WORD  # control


async def probe_once_renew(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", "/v1/once/renew", {"key": s["once_key"], "token": 1})
    assert status == 409 and body["field"] == "token", body


async def probe_once_end(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a(
        "POST", "/v1/once/end", {"key": s["once_key"], "token": 1, "result": "forged"}
    )
    assert status == 409 and body["field"] == "token", body
    _, ticket = await b("POST", "/v1/once/begin", {"key": s["once_key"]})
    assert ticket["status"] == "done" and ticket["result"] == SECRET_WORD


async def _b_registered(b: Caller) -> None:
    status, agents = await b("GET", "/v1/registry", healthy="all")
    assert status == 200 and any(r["name"] == "b" for r in agents), agents


async def probe_register(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("PUT", "/v1/registry/b", {"capabilities": ["forged"]})
    assert status == 403 and body["field"] == "name", body
    status, body = await a("PUT", "/v1/registry/a", {"ttl": 600})
    assert status == 200 and body["registered_by"] == "a", body  # control: itself
    await _b_registered(b)
    _, agents = await b("GET", "/v1/registry", healthy="all")
    assert [r["capabilities"] for r in agents if r["name"] == "b"] == [["probe"]]


async def probe_registry_heartbeat(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("POST", "/v1/registry/b/heartbeat")
    assert status == 403 and body["field"] == "name", body


async def probe_unregister(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    status, body = await a("DELETE", "/v1/registry/b")
    assert status == 403 and body["field"] == "name", body
    await _b_registered(b)


async def probe_registry_list(a: Caller, b: Caller, s: dict[str, Any]) -> None:
    # The registry is for finding each other: every agent allowed tasks sees it.
    status, agents = await a("GET", "/v1/registry", capability="probe")
    assert status == 200 and [r["name"] for r in agents] == ["b"], agents
    assert not mentions_b(agents)


PROBES: dict[tuple[str, str], Probe] = {
    ("put", "/v1/items/{path}"): probe_item_put,
    ("get", "/v1/items/{path}"): probe_item_get,
    ("delete", "/v1/items/{path}"): probe_item_delete,
    ("get", "/v1/items"): probe_list,
    ("get", "/v1/namespaces"): probe_namespaces,
    ("get", "/v1/namespaces/counts"): probe_namespace_counts,
    ("post", "/v1/batch"): probe_batch,
    ("get", "/v1/history/{path}"): probe_history,
    ("post", "/v1/search"): probe_search,
    ("post", "/v1/sessions"): probe_sessions_create,
    ("get", "/v1/sessions"): probe_sessions_list,
    ("get", "/v1/sessions/{session_id}"): probe_session_get,
    ("delete", "/v1/sessions/{session_id}"): probe_session_delete,
    ("post", "/v1/sessions/{session_id}/messages"): probe_messages_post,
    ("get", "/v1/sessions/{session_id}/messages"): probe_messages_get,
    ("put", "/v1/sessions/{session_id}/state"): probe_state_put,
    ("get", "/v1/events"): probe_events,
    ("get", "/v1/events/head"): probe_head,
    ("get", "/v1/info"): probe_info,
    ("get", "/v1/index"): probe_index,
    ("post", "/v1/index/wait"): probe_index_wait,
    ("get", "/v1/watch"): probe_watch,
    ("post", "/v1/publish/{channel}"): probe_publish,
    ("post", "/v1/queues/{queue}/tasks"): probe_submit,
    ("post", "/v1/queues/{queue}/claim"): probe_claim,
    ("get", "/v1/queues/{queue}/tasks"): probe_tasks_list,
    ("get", "/v1/queues/{queue}/stats"): probe_queue_stats,
    ("get", "/v1/queues"): probe_queues,
    ("get", "/v1/tasks/{task_id}"): probe_task_get,
    ("get", "/v1/tasks/{task_id}/result"): probe_task_result,
    ("post", "/v1/tasks/{task_id}/heartbeat"): probe_task_heartbeat,
    ("post", "/v1/tasks/{task_id}/complete"): probe_task_complete,
    ("post", "/v1/tasks/{task_id}/fail"): probe_task_fail,
    ("post", "/v1/tasks/{task_id}/release"): probe_task_release,
    ("post", "/v1/tasks/{task_id}/cancel"): probe_task_cancel,
    ("post", "/v1/tasks/{task_id}/requeue"): probe_task_requeue,
    ("post", "/v1/leases/{name}/acquire"): probe_lease_acquire,
    ("post", "/v1/leases/{name}/renew"): probe_lease_renew,
    ("post", "/v1/leases/{name}/release"): probe_lease_release,
    ("put", "/v1/signals/{name}"): probe_signal_set,
    ("get", "/v1/signals/{name}"): probe_signal_get,
    ("post", "/v1/once/begin"): probe_once_begin,
    ("post", "/v1/once/renew"): probe_once_renew,
    ("post", "/v1/once/end"): probe_once_end,
    ("put", "/v1/registry/{name}"): probe_register,
    ("post", "/v1/registry/{name}/heartbeat"): probe_registry_heartbeat,
    ("delete", "/v1/registry/{name}"): probe_unregister,
    ("get", "/v1/registry"): probe_registry_list,
    ("get", "/healthz"): probe_health,
    ("get", "/readyz"): probe_health,
    ("get", "/metrics"): probe_metrics,
}


async def test_every_route_hides_another_agents_namespace(callers: dict[str, Caller]) -> None:
    a, b = callers["a"], callers["b"]
    status, doc = await a("GET", "/openapi.json")
    assert status == 200
    routes = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == set(PROBES), (
        f"routes without a permission probe: {sorted(routes - set(PROBES))}; "
        f"probes of routes that are gone: {sorted(set(PROBES) - routes)}"
    )
    state = await seed(b, a, f"t{uuid.uuid4().hex[:8]}")
    failures = []
    for route in sorted(routes):
        try:
            await PROBES[route](a, b, state)
        except AssertionError as exc:
            failures.append(f"{route}: {exc}")
    assert not failures, "\n".join(failures)


async def test_every_route_but_health_needs_credentials(
    secured: dict[str, Any], callers: dict[str, Caller]
) -> None:
    anonymous = Caller(callers["a"].http, callers["a"].base, None)
    forged = Caller(callers["a"].http, callers["a"].base, "hm_000000000000_" + "A" * 43)
    _, doc = await callers["a"]("GET", "/openapi.json")
    for path, ops in doc["paths"].items():
        if path in ("/healthz", "/readyz"):
            continue
        concrete = (
            path.replace("{path}", "team/a/k")
            .replace("{session_id}", "s1")
            .replace("{channel}", "team/a")
            .replace("{queue}", "team/a/q")
            .replace("{task_id}", "0" * 24)
            .replace("{name}", "a")
        )
        for method in ops:
            for caller in (anonymous, forged):
                status, body = await caller(
                    method.upper(), concrete, {} if method != "get" else None
                )
                assert status == 401, (method, path, status, body)
                assert body["type"] == "/problems/unauthenticated"


async def test_admin_sees_everything_and_admin_events(callers: dict[str, Caller]) -> None:
    root, b = callers["root"], callers["b"]
    tag = f"t{uuid.uuid4().hex[:8]}"
    await b("PUT", f"/v1/items/team/b/{tag}/k", {"value": 1})
    status, item = await root("GET", f"/v1/items/team/b/{tag}/k")
    assert status == 200 and item["author"] == "b"
    status, page = await root("GET", "/v1/events", limit=1000)
    kinds = {
        (
            e["namespace"],
            (e.get("data") or {}).get("action") if isinstance(e.get("data"), dict) else None,
        )
        for e in page["items"]
    }
    assert ("_admin", "policy.loaded") in kinds, kinds
    assert any(ns == "_auth/agents" for ns, _ in kinds)
    status, page = await b("GET", "/v1/events", limit=1000)
    assert not any(
        e["namespace"].startswith("_auth") or e["namespace"] == "_admin" for e in page["items"]
    )


async def test_forged_agent_header_changes_nothing(callers: dict[str, Caller]) -> None:
    a = callers["a"]
    headers = {"Authorization": f"Bearer {a.key}", "X-Hivemem-Agent": "b"}
    async with a.http.put(
        a.base + "/v1/items/team/b/forged/k", json={"value": 1}, headers=headers
    ) as resp:
        assert resp.status == 403
    async with a.http.put(
        a.base + "/v1/items/team/a/signed/k", json={"value": 1}, headers=headers
    ) as resp:
        assert resp.status in (200, 201)
        assert (await resp.json())["author"] == "a"


async def test_revoked_key_gets_401(secured: dict[str, Any], callers: dict[str, Caller]) -> None:
    key = add_agent(secured["store"], "shortlived")
    caller = Caller(callers["a"].http, callers["a"].base, key)
    assert (await caller("GET", "/v1/events/head"))[0] == 200
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "hivemem",
            "agents",
            "revoke",
            "shortlived",
            "--store",
            secured["store"],
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    status, body = await caller("GET", "/v1/events/head")
    assert status == 401 and body["type"] == "/problems/unauthenticated"


# The embedded hive with the same policy ---------------------------------------------


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[Hive, Hive]]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    settings = Settings(policy_file=str(policy), embedder="none")
    hive = hivemem.connect(f"sqlite:///{tmp_path / 'hive.db'}", agent="a", settings=settings)
    assert isinstance(hive, LocalHive)
    async with hive:
        yield hive, hive.as_principal(Principal("b"))


async def test_embedded_hive_applies_the_same_policy(embedded: tuple[Hive, Hive]) -> None:
    a, b = embedded
    ns_b, ns_a = "team/b/x", "team/a/x"
    await b.put(ns_b, "k", {"text": SECRET_WORD}, metadata={"n": 1})
    await b.put(ns_b, "k", {"text": SECRET_WORD + " again"}, metadata={"n": 2})
    await a.put(ns_a, "k", {"text": SECRET_WORD})
    session = await b.create_session(app="team", user="b")
    await b.append_messages(session.id, [{"role": "user", "content": SECRET_WORD}])
    await b.publish(f"{ns_b}/chan", 1)
    queue_b = f"{ns_b}/q"
    ready = await b.submit(queue_b, SECRET_WORD)
    await b.submit(f"{ns_b}/busy", 1)
    running = await b.claim(f"{ns_b}/busy", lease=60)
    assert running is not None
    lease_b = await b.acquire(f"{ns_b}/lock", 60)
    await b.set_signal(f"{ns_b}/sig", SECRET_WORD)
    ticket = await b.begin_once("turn-1:send")
    assert ticket.token is not None
    await b.end_once("turn-1:send", ticket.token, result=SECRET_WORD)
    await b.register("b", capabilities=["probe"], heartbeat=False)

    async def own_once() -> None:
        got = await a.begin_once("turn-1:send")
        assert got.status == "run" and got.result is None, got  # keys are per agent
        assert got.token is not None
        await a.end_once("turn-1:send", got.token, error="x")

    async def found_b() -> None:
        assert [r.name for r in await a.agents(capability="probe")] == ["b"]

    async def watched() -> list[str]:
        seen = []

        async def follow() -> None:
            async for event in a.watch("", after="0"):
                seen.append(event.namespace)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        task.cancel()
        return seen

    async def denied(call: Awaitable[Any], error: type[Exception]) -> None:
        with pytest.raises(error):
            await call

    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "get": lambda: _eq(a.get(ns_b, "k"), None),
        "put": lambda: denied(a.put(ns_b, "k", "forged"), PermissionDenied),
        "delete": lambda: denied(a.delete(ns_b, "k"), PermissionDenied),
        "batch": lambda: denied(
            a.batch([{"op": "put", "namespace": ns_b, "key": "k", "value": 1}]), PermissionDenied
        ),
        "list": lambda: _none_of_b(a.list("", limit=1000)),
        "list_namespaces": lambda: _none_of_b(a.list_namespaces("")),
        "namespace_counts": lambda: _none_of_b(a.namespace_counts("")),
        "queues": lambda: _none_of_b(a.queues()),
        "history": lambda: _eq(a.history(ns_b, "k"), []),
        "search": lambda: _none_of_b(a.search("", SECRET_WORD, mode="lexical")),
        "read_events": lambda: _none_of_b(a.read_events("", limit=1000), internal=True),
        "watch": lambda: _none_of_b(watched(), internal=True),
        "head": lambda: _ok(a.head()),
        "index_status": lambda: _ok(a.index_status()),
        "wait_indexed": lambda: _ok(a.wait_indexed(timeout=5)),
        "publish": lambda: denied(a.publish(f"{ns_b}/chan", 1), PermissionDenied),
        "create_session": lambda: denied(a.create_session(app="team", user="b"), PermissionDenied),
        "get_session": lambda: denied(a.get_session(session.id), NotFound),
        "list_sessions": lambda: _none_of_b(a.list_sessions()),
        "delete_session": lambda: _eq(a.delete_session(session.id), False),
        "append_messages": lambda: denied(
            a.append_messages(session.id, [{"role": "user", "content": "x"}]), NotFound
        ),
        "get_messages": lambda: denied(a.get_messages(session.id), NotFound),
        "save_state": lambda: denied(a.save_state(session.id, {"forged": 1}), NotFound),
        "submit": lambda: denied(a.submit(queue_b, "forged"), PermissionDenied),
        "claim": lambda: denied(a.claim(queue_b), PermissionDenied),
        "heartbeat": lambda: denied(a.heartbeat(running), NotFound),
        "complete": lambda: denied(a.complete(running, "forged"), NotFound),
        "fail": lambda: denied(a.fail(running, "forged"), NotFound),
        "release_task": lambda: denied(a.release_task(running), NotFound),
        "result": lambda: denied(a.result(ready.id), NotFound),
        "cancel": lambda: denied(a.cancel(ready.id), NotFound),
        "requeue": lambda: denied(a.requeue(ready.id), NotFound),
        "get_task": lambda: _eq(a.get_task(ready.id), None),
        "list_tasks": lambda: denied(a.list_tasks(queue_b), PermissionDenied),
        "queue_stats": lambda: denied(a.queue_stats(queue_b), PermissionDenied),
        "acquire": lambda: denied(a.acquire(f"{ns_b}/lock", 5), PermissionDenied),
        "renew": lambda: denied(a.renew(lease_b), PermissionDenied),
        "release": lambda: denied(a.release(lease_b), PermissionDenied),
        "set_signal": lambda: denied(a.set_signal(f"{ns_b}/sig", "forged"), PermissionDenied),
        "get_signal": lambda: denied(a.get_signal(f"{ns_b}/sig"), PermissionDenied),
        "begin_once": own_once,
        "renew_once": lambda: denied(a.renew_once("turn-1:send", 1), Conflict),
        "end_once": lambda: denied(a.end_once("turn-1:send", 1, result="forged"), Conflict),
        "register": lambda: denied(a.register("b", heartbeat=False), PermissionDenied),
        "heartbeat_agent": lambda: denied(a.heartbeat_agent("b"), PermissionDenied),
        "unregister": lambda: denied(a.unregister("b"), PermissionDenied),
        "agents": found_b,
        # Lifecycle methods touch no namespace.
        "as_agent": lambda: _ok(asyncio.sleep(0)),
        "open": lambda: _ok(a.open()),
        "ping": lambda: _ok(a.ping()),
        "close": lambda: _ok(asyncio.sleep(0)),
    }
    assert set(checks) == set(Hive.__abstractmethods__), (
        "Hive methods without a permission check: "
        f"{sorted(set(Hive.__abstractmethods__) - set(checks))}"
    )
    for name, check in checks.items():
        try:
            await check()
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    # b still has everything, and a's view of as_agent is restricted too.
    assert (await b.get(ns_b, "k")).version == 2  # type: ignore[union-attr]
    assert await a.as_agent("a").get(ns_b, "k") is None
    assert [m.content for m in await b.get_messages(session.id)] == [SECRET_WORD]
    assert (await b.get_task(running.id)).state == "running"  # type: ignore[union-attr]
    assert (await b.get_signal(f"{ns_b}/sig")).value == SECRET_WORD  # type: ignore[union-attr]
    assert (await b.begin_once("turn-1:send")).result == SECRET_WORD


async def _eq(call: Awaitable[Any], expected: Any) -> None:
    got = await call
    assert got == expected, got


async def _ok(call: Awaitable[Any]) -> None:
    await call


async def _none_of_b(call: Awaitable[Any], *, internal: bool = False) -> None:
    got = await call
    data = (
        got.model_dump(mode="json")
        if hasattr(got, "model_dump")
        else [x.model_dump(mode="json") if hasattr(x, "model_dump") else x for x in got]
    )
    if internal:  # the registry's events are every agent's (see not_registry)
        if isinstance(data, dict):
            data["items"] = not_registry(data["items"])
        else:
            data = not_registry(data)
    text = json.dumps(data)
    assert "team/b" not in text and '"author": "b"' not in text, text
    if internal:
        assert '"namespace": "_' not in text and '"_sessions' not in text, text
