"""Metrics and access logs: /metrics parses with prometheus-client's parser and its
request counters equal the requests made, by route and status; the store, search,
feed, task, session, auth and rate-limit figures move with the work that feeds them;
client-chosen labels stay bounded; an embedded hive serves its metrics on a port; the
access log has one line per request and no values or credentials."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import hivemem
from hivemem.metrics import MAX_LABEL_VALUES, Metrics
from hivemem.policy.keys import KeyStore
from hivemem.service.app import create_app

AGENT = {"X-Hivemem-Agent": "tester"}
SECRET = "s" * 40


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = hivemem.Settings(embedder="none")
    with TestClient(create_app(f"sqlite:///{tmp_path}/m.db", settings)) as c:
        yield c


def test_request_counters_equal_the_requests_made_by_route_and_status(
    client: TestClient,
) -> None:
    # The service's own store writes so far (its replica row, written at start).
    before = value(
        samples(client.get("/metrics").text),
        "hivemem_store_operation_duration_seconds_count",
        backend="sqlite",
        operation="write_items",
    )
    for i in range(7):
        assert client.put(f"/v1/items/ns/k{i}", json={"value": i}, headers=AGENT).status_code == 201
    for i in range(5):
        assert client.get(f"/v1/items/ns/k{i}", headers=AGENT).status_code == 200
    for _ in range(3):
        assert client.get("/v1/items/ns/absent", headers=AGENT).status_code == 404
    bad = client.put("/v1/items/ns/k", json={"value": 1, "ttl": -1}, headers=AGENT)
    assert bad.status_code == 422
    assert client.get("/no/such/route").status_code == 404
    # Refused by the guards before any route: still counted, by the status sent.
    big = client.put(
        "/v1/items/ns/k", content=b"x", headers={**AGENT, "content-length": "99999999"}
    )
    assert big.status_code == 413
    assert (
        client.get("/v1/items/ns/k0", headers={**AGENT, "x-pad": "p" * 20_000}).status_code == 431
    )
    found = samples(client.get("/metrics").text)
    route = "/v1/items/{path:anypath}"
    total = "hivemem_http_requests_total"
    assert value(found, total, route=route, method="PUT", status="201") == 7
    assert value(found, total, route=route, method="PUT", status="422") == 1
    assert value(found, total, route=route, method="GET", status="200") == 5
    assert value(found, total, route=route, method="GET", status="404") == 3
    assert value(found, total, route="unmatched", method="GET", status="404") == 1
    assert value(found, total, route="unmatched", method="PUT", status="413") == 1
    assert value(found, total, route="unmatched", method="GET", status="431") == 1
    seconds = "hivemem_http_request_duration_seconds_count"
    assert value(found, seconds, route=route, method="PUT") == 8
    # No key or namespace ever becomes a label value.
    assert not any("k3" in v or "absent" in v for (_, labels) in found for _, v in labels)
    # The store calls behind them: one write per accepted put, none for the refused one.
    store = "hivemem_store_operation_duration_seconds_count"
    assert value(found, store, backend="sqlite", operation="write_items") - before == 7
    assert found[("process_resident_memory_bytes", ())] > 0
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_search_feed_tasks_and_sessions_figures_move(client: TestClient) -> None:
    client.put("/v1/items/docs/a", json={"value": {"text": "tea and biscuits"}}, headers=AGENT)
    hits = client.post("/v1/search", json={"prefix": "docs", "query": "tea"}, headers=AGENT)
    assert hits.status_code == 200 and len(hits.json()["hits"]) == 1
    task = client.post("/v1/queues/q1/tasks", json={"payload": {"n": 1}}, headers=AGENT).json()
    claimed = client.post("/v1/queues/q1/claim", json={"lease": 30}, headers=AGENT).json()
    assert claimed["id"] == task["id"]
    done = client.post(
        f"/v1/tasks/{task['id']}/complete",
        json={"attempt": claimed["attempt"], "result": {"ok": True}},
        headers=AGENT,
    )
    assert done.status_code == 200, done.text
    client.post("/v1/queues/q1/tasks", json={"payload": {"n": 2}}, headers=AGENT)
    # A queue no worker has claimed from through this process is reported all the same.
    for n in range(3):
        client.post("/v1/queues/unclaimed/tasks", json={"payload": {"n": n}}, headers=AGENT)
    sid = client.post("/v1/sessions", json={"app": "support"}, headers=AGENT).json()["id"]
    messages = [
        {"role": "user", "content": "hi", "tokens_in": 12},
        {"role": "assistant", "content": "hello", "tokens_out": 30, "cost": 0.25},
    ]
    appended = client.post(
        f"/v1/sessions/{sid}/messages", json={"messages": messages}, headers=AGENT
    )
    assert appended.status_code in (200, 201), appended.text
    found = samples(client.get("/metrics").text)
    # index: the in-process BM25 ("memory"), or FTS5 ("engine") while that still loads
    searches = {
        dict(labels)["index"]: n
        for (name, labels), n in found.items()
        if name == "hivemem_search_duration_seconds_count" and dict(labels)["mode"] == "hybrid"
    }
    assert sum(searches.values()) == 1 and set(searches) <= {"memory", "engine"}, searches
    assert value(found, "hivemem_task_claim_wait_seconds_count", queue="q1") == 1
    assert value(found, "hivemem_task_duration_seconds_count", queue="q1", outcome="completed") == 1
    assert value(found, "hivemem_tasks", queue="q1", state="ready") == 1
    assert value(found, "hivemem_tasks", queue="q1", state="running") == 0
    assert value(found, "hivemem_tasks", queue="unclaimed", state="ready") == 3
    assert value(found, "hivemem_session_tokens_total", app="support", kind="input") == 12
    assert value(found, "hivemem_session_tokens_total", app="support", kind="output") == 30
    assert value(found, "hivemem_session_cost_total", app="support") == 0.25
    assert value(found, "hivemem_index_entries", index="bm25") == 1


async def test_an_embedded_hive_counts_and_serves_its_metrics(tmp_path: Path) -> None:
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path}/e.db", agent="a", settings=settings) as hive:
        for i in range(3):
            await hive.put("ns", f"k{i}", {"text": f"note {i}"})
        got: list[Any] = []

        async def watch() -> None:
            async for event in hive.watch("ns"):
                got.append(event)
                return

        watcher = asyncio.create_task(watch())
        for _ in range(100):
            if samples(hivemem.metrics.exposition(hive.metrics).decode()).get(
                ("hivemem_feed_watchers", ())
            ):
                break
            await asyncio.sleep(0.01)
        await hive.put("ns", "late", "x")
        await asyncio.wait_for(watcher, 10)
        server, _thread = hivemem.metrics.serve(hive, port=0)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        finally:
            server.shutdown()
    found = samples(text.decode())
    store = "hivemem_store_operation_duration_seconds_count"
    assert value(found, store, backend="sqlite", operation="write_items") == 4
    assert value(found, "hivemem_feed_delivery_lag_seconds_count") == 1
    assert value(found, "hivemem_feed_watchers") == 0  # the watch ended
    assert value(found, "hivemem_feed_head_timestamp_seconds") > 0
    with pytest.raises(TypeError):
        hivemem.metrics.serve(hivemem.connect("http://127.0.0.1:1"), port=0)


async def test_store_errors_are_counted_by_operation_and_type(tmp_path: Path) -> None:
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path}/x.db", agent="a", settings=settings) as hive:
        await hive.put("ns", "k", 1)
        with pytest.raises(hivemem.Conflict):
            await hive.put("ns", "k", 2, if_version=7)
        found = samples(hivemem.metrics.exposition(hive.metrics).decode())
    errors = "hivemem_store_errors_total"
    assert value(found, errors, backend="sqlite", operation="write_items", error="Conflict") == 1


def test_metrics_need_the_metrics_or_admin_role_with_auth_on(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/auth.db"
    settings = hivemem.Settings(embedder="none", auth=True, jwt_secret=SECRET)

    async def keys() -> tuple[str, str]:
        async with hivemem.connect(store, agent="setup", settings=settings) as hive:
            ks = KeyStore(hive.backend, settings, cache_seconds=0)
            return await ks.add("scraper", ["metrics"], by="t"), await ks.add(
                "worker", ["writer"], by="t"
            )

    scraper, worker = asyncio.run(keys())
    # The worker's key id with another secret; a key id nobody holds.
    wrong_secret = worker[:-1] + ("A" if worker[-1] != "A" else "B")
    unknown_id = "hm_" + "0" * 12 + worker[15:]
    now = int(time.time())
    expired = jwt.encode({"sub": "planner", "exp": now - 3600}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "admin", "exp": now - 3600}, "x" * 32 + "forged", algorithm="HS256")
    with TestClient(create_app(store, settings)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        for credential in (wrong_secret, wrong_secret, unknown_id, expired, forged):
            refused = c.get("/metrics", headers={"Authorization": f"Bearer {credential}"})
            assert refused.status_code == 401, refused.text
        denied = c.get("/metrics", headers={"Authorization": f"Bearer {worker}"})
        assert denied.status_code == 403 and "metrics" in denied.json()["detail"]
        ok = c.get("/metrics", headers={"Authorization": f"Bearer {scraper}"})
        assert ok.status_code == 200
        found = samples(ok.text)
    failures = {
        tuple(sorted(dict(labels).items())): n
        for (name, labels), n in found.items()
        if name == "hivemem_auth_failures_total"
    }
    # The agent is named only where the credential could be trusted to name it: a stored
    # key id (wrong secret), a token whose signature verified (expired); a forged token's
    # sub ("admin") and an unknown key id name nobody.
    assert failures == {
        (("agent", "unknown"), ("reason", "missing")): 1,
        (("agent", "unknown"), ("reason", "malformed")): 1,
        (("agent", "worker"), ("reason", "api_key")): 2,
        (("agent", "unknown"), ("reason", "api_key")): 1,
        (("agent", "planner"), ("reason", "expired")): 1,
        (("agent", "unknown"), ("reason", "jwt")): 1,
    }, failures


def test_rate_limited_agents_are_counted_with_a_bounded_label(tmp_path: Path) -> None:
    # 1/day: a sliding window lets a second hit through when it falls just after a window
    # boundary (the first one weighs less than 1 then); a day makes that a 1-in-40,000 run.
    settings = hivemem.Settings(embedder="none", rate_limit_read="1/day")
    with TestClient(create_app(f"sqlite:///{tmp_path}/r.db", settings)) as c:
        for i in range(MAX_LABEL_VALUES + 20):
            agent = {"X-Hivemem-Agent": f"agent{i}"}
            assert c.get("/v1/items/ns/k", headers=agent).status_code == 404
            assert c.get("/v1/items/ns/k", headers=agent).status_code == 429
        found = samples(c.get("/metrics").text)
    limited = {
        dict(labels)["agent"]: v
        for (name, labels), v in found.items()
        if name == "hivemem_rate_limited_total"
    }
    assert len(limited) == MAX_LABEL_VALUES + 1 and limited["other"] == 20
    assert sum(limited.values()) == MAX_LABEL_VALUES + 20


def test_the_access_log_has_one_json_line_per_request_and_no_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = hivemem.Settings(embedder="none", access_log=True, log_format="json")
    with (
        caplog.at_level(logging.INFO, logger="hivemem.access"),
        TestClient(create_app(f"sqlite:///{tmp_path}/l.db", settings)) as c,
    ):
        secret = "the-secret-value-123"
        headers = {**AGENT, "X-Hivemem-Request-Id": "req-1"}
        c.put("/v1/items/ns/key1", json={"value": secret}, headers=headers)
        c.get("/v1/items/ns/key1", headers=AGENT)
    lines = [r.getMessage() for r in caplog.records if r.name == "hivemem.access"]
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["agent"] == "tester" and first["method"] == "PUT" and first["status"] == 201
    assert first["route"] == "/v1/items/{path:anypath}" and first["request_id"] == "req-1"
    assert first["duration_ms"] >= 0 and first["time"].endswith("+00:00")
    assert secret not in "".join(lines) and "key1" not in "".join(lines)


def test_a_text_access_log_line_cannot_be_forged_through_a_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = hivemem.Settings(embedder="none", access_log=True, log_format="text")
    with (
        caplog.at_level(logging.INFO, logger="hivemem.access"),
        TestClient(create_app(f"sqlite:///{tmp_path}/l.db", settings)) as c,
    ):
        forged = {
            **AGENT,
            "X-Hivemem-Request-Id": "x agent=admin status=200",
            "traceparent": "00-x trace_id=forged-00f067aa0ba902b7-01",
        }
        c.get("/v1/items/ns/nothing", headers=forged)
        c.get("/v1/items/ns/nothing", headers={**AGENT, "X-Hivemem-Request-Id": "req-2"})
    lines = [r.getMessage() for r in caplog.records if r.name == "hivemem.access"]
    assert len(lines) == 2
    assert "agent=admin" not in lines[0] and "forged" not in lines[0]
    assert lines[0].count("agent=") == 1 and "agent=tester" in lines[0]
    assert "request_id=req-2" in lines[1]


def test_a_label_keeps_its_first_values_then_counts_other() -> None:
    metrics = Metrics("sqlite", process=False)
    names = [metrics.queue_label(f"q{i}") for i in range(MAX_LABEL_VALUES + 5)]
    assert names[:MAX_LABEL_VALUES] == [f"q{i}" for i in range(MAX_LABEL_VALUES)]
    assert set(names[MAX_LABEL_VALUES:]) == {"other"}
    assert metrics.queue_label("q3") == "q3"


async def test_a_task_duration_is_counted_by_the_hive_that_ends_it_not_the_one_that_claimed_it(
    tmp_path: Path,
) -> None:
    # Two replicas of one store (a round-robin proxy's): one hands the tasks out, the
    # other hears of their end; the duration comes from the claim time kept with the task.
    settings = hivemem.Settings(embedder="none")
    url = f"sqlite:///{tmp_path}/replicas.db"
    pause = 0.3
    async with (
        hivemem.connect(url, agent="w", settings=settings) as claimer,
        hivemem.connect(url, agent="w", settings=settings) as finisher,
    ):
        assert claimer.metrics is not finisher.metrics
        await claimer.submit("jobs", 1)
        await claimer.submit("jobs", 2, backoff=0)
        first = await claimer.claim("jobs")
        second = await claimer.claim("jobs")
        assert first is not None and second is not None
        await asyncio.sleep(pause)
        repeat = finisher.with_request_id("done-1")
        await repeat.complete(first, "ok")
        await repeat.complete(first, "ok")  # a retried request: its stored answer
        retried = await finisher.fail(second, "again")
        assert retried.state == "ready"  # ready for a retry, counted all the same
        mine = samples(hivemem.metrics.exposition(finisher.metrics).decode())
        theirs = samples(hivemem.metrics.exposition(claimer.metrics).decode())
    name = "hivemem_task_duration_seconds"
    for outcome in ("completed", "failed"):
        assert value(mine, f"{name}_count", queue="jobs", outcome=outcome) == 1, outcome
        assert pause <= value(mine, f"{name}_sum", queue="jobs", outcome=outcome) < pause + 5
        assert value(theirs, f"{name}_count", queue="jobs", outcome=outcome) == 0
    assert value(theirs, "hivemem_task_claim_wait_seconds_count", queue="jobs") == 2


@pytest.mark.parametrize("threaded", [False, True])
async def test_filter_cache_lookups_are_counted_on_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool
) -> None:
    # A filtered in-process ranking checks its candidates against the row cache, on the
    # event loop for short lists and in a thread for long ones: both count their hits.
    from hivemem.core import search as search_module

    if threaded:
        monkeypatch.setattr(search_module, "_CHECK_IN_THREAD", 0)
    settings = hivemem.Settings(embedder="none", lexical_index="memory")
    async with hivemem.connect(f"sqlite:///{tmp_path}/c.db", agent="a", settings=settings) as hive:
        for i in range(30):
            await hive.put("docs", f"k{i}", {"text": f"tea note {i}"}, metadata={"n": i % 3})
        hits = await hive.search("docs", "tea", mode="lexical", filter={"n": 0}, limit=5)
        assert len(hits) == 5 and all(h.item.metadata["n"] == 0 for h in hits)
        registry = hive.metrics.registry
        hit = registry.get_sample_value(
            "hivemem_cache_requests_total", {"cache": "rows", "result": "hit"}
        )
        miss = registry.get_sample_value(
            "hivemem_cache_requests_total", {"cache": "rows", "result": "miss"}
        )
    # Every one of the 30 items ranks for "tea" and is checked once, from the cache or
    # (written since it caught up) from the store.
    assert (hit or 0) + (miss or 0) == 30
