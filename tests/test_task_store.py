"""The task-queue primitives of every backend (backends/base.py, ``# Tasks``), called
directly: the same behaviour from SQLite, PostgreSQL, Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import fields, replace
from pathlib import Path

import orjson
import pytest

from hivemem import open_backend
from hivemem.backends.base import Backend
from hivemem.backends.rows import LEASE_EXPIRED, CheckWrite, PutWrite, TaskRow, task_namespace
from hivemem.backends.signals import TaskHint
from hivemem.backends.sqlite.schema import MIGRATIONS as SQLITE_MIGRATIONS
from hivemem.config import Settings
from hivemem.errors import Conflict, NotFound

KINDS = ["sqlite-file", "postgres", "redis", "redis-cluster"]
_FIXTURES = {"postgres": "postgres_url", "redis": "redis_url", "redis-cluster": "redis_cluster_url"}


@pytest.fixture(params=KINDS)
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    if request.param == "sqlite-file":
        url = f"sqlite:///{tmp_path_factory.mktemp('tasks') / 'tasks.db'}"
    else:
        url = request.getfixturevalue(_FIXTURES[request.param])
    backend = open_backend(url, Settings())
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def queue() -> str:
    return f"q{uuid.uuid4().hex[:10]}"


_seq = 0


def task(queue: str, now: float, **changes: object) -> TaskRow:
    """A new task row as the core builds it (ids sort in submission order)."""
    global _seq
    _seq += 1
    row = TaskRow(
        id=f"{int(now * 1e6):014x}{_seq:06x}{uuid.uuid4().hex[:6]}",
        queue=queue,
        state="ready",
        payload=b'{"n":1}',
        result=None,
        priority=0,
        run_at=now,
        attempt=0,
        max_attempts=3,
        timeout=None,
        backoff=1.0,
        lease=30.0,
        lease_until=None,
        idempotency_key=None,
        submitted_by="boss",
        claimed_by=None,
        errors=b"[]",
        created_at=now,
        updated_at=now,
        finished_at=None,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


async def events(store: Backend, queue: str) -> list[tuple[str, str | None, int | None, str]]:
    rows, _ = await store.read_events(task_namespace(queue), None, 1000)
    return [(r.type, r.key, r.version, r.author) for r in rows]


async def test_submit_claim_complete_round_trip_with_one_event_per_change(
    store: Backend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now)
    stored, created = await store.submit_task(row)
    assert created and stored == row
    assert await store.get_task(row.id) == row
    claimed = await store.claim_task(queue, worker="w1", now=now + 1, lease=10)
    assert claimed is not None and claimed.id == row.id
    assert (claimed.state, claimed.attempt, claimed.claimed_by) == ("running", 1, "w1")
    assert claimed.lease_until == pytest.approx(now + 11) and claimed.lease == 10
    assert await store.claim_task(queue, worker="w2", now=now + 1, lease=10) is None
    beat = await store.heartbeat_task(row.id, worker="w1", attempt=1, now=now + 5, lease=20)
    assert beat.lease_until == pytest.approx(now + 25)
    done = await store.finish_task(
        row.id, worker="w1", attempt=1, now=now + 6, outcome="completed", result=b'"ok"'
    )
    assert (done.state, done.result, done.finished_at, done.lease_until) == (
        "completed",
        b'"ok"',
        pytest.approx(now + 6),
        None,
    )
    assert await store.get_task(row.id) == done
    assert await events(store, queue) == [
        ("task.submitted", row.id, 0, "boss"),
        ("task.claimed", row.id, 1, "w1"),
        ("task.completed", row.id, 1, "w1"),
    ]


async def test_idempotency_key_returns_the_first_task_and_writes_nothing(
    store: Backend, queue: str
) -> None:
    now = time.time()
    first, created = await store.submit_task(task(queue, now, idempotency_key="k1"))
    again, created_again = await store.submit_task(task(queue, now, idempotency_key="k1"))
    assert created and not created_again and again == first
    other, created_other = await store.submit_task(task(f"{queue}x", now, idempotency_key="k1"))
    assert created_other and other.id != first.id  # keys are per queue
    assert [e[0] for e in await events(store, queue)] == ["task.submitted"]
    assert len(await store.list_tasks(queue, None, None, 10)) == 1


async def test_claims_take_highest_priority_then_oldest_and_skip_delayed(
    store: Backend, queue: str
) -> None:
    now = time.time()
    low = task(queue, now, priority=-5)
    a = task(queue, now)
    b = task(queue, now + 0.001)
    high = task(queue, now + 0.002, priority=7, run_at=now + 0.002)
    later = task(queue, now, priority=1000, run_at=now + 60)
    for row in (low, a, b, high, later):
        await store.submit_task(row)
    order = []
    for _ in range(5):
        got = await store.claim_task(queue, worker="w", now=now + 1, lease=30)
        order.append(None if got is None else got.id)
    assert order == [high.id, a.id, b.id, low.id, None]
    got = await store.claim_task(queue, worker="w", now=now + 61, lease=30)
    assert got is not None and got.id == later.id


async def test_an_expired_lease_is_settled_by_the_next_claim_and_dead_after_max_attempts(
    store: Backend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now, max_attempts=2)
    await store.submit_task(row)
    first = await store.claim_task(queue, worker="w1", now=now, lease=5)
    assert first is not None and first.attempt == 1
    assert await store.claim_task(queue, worker="w2", now=now + 4, lease=5) is None
    second = await store.claim_task(queue, worker="w2", now=now + 6, lease=5)
    assert second is not None and (second.attempt, second.claimed_by) == (2, "w2")
    errors = orjson.loads(second.errors)
    assert [(e["attempt"], e["error"], e["worker"]) for e in errors] == [(1, LEASE_EXPIRED, "w1")]
    # The first worker lost the task: its late finish and heartbeat are refused.
    with pytest.raises(Conflict) as err:
        await store.finish_task(row.id, worker="w1", attempt=1, now=now + 7, outcome="completed")
    assert err.value.field == "attempt"
    with pytest.raises(Conflict):
        await store.heartbeat_task(row.id, worker="w1", attempt=1, now=now + 7, lease=5)
    # The last attempt's lease expires: the next claim (of anything) settles it as dead.
    assert await store.claim_task(queue, worker="w3", now=now + 12, lease=5) is None
    dead = await store.get_task(row.id)
    assert dead is not None and dead.state == "dead" and dead.finished_at == pytest.approx(now + 12)
    assert [e["attempt"] for e in orjson.loads(dead.errors)] == [1, 2]
    assert [e[0] for e in await events(store, queue)] == [
        "task.submitted",
        "task.claimed",
        "task.expired",
        "task.claimed",
        "task.dead",
    ]


async def test_expire_leases_settles_tasks_of_every_queue(store: Backend, queue: str) -> None:
    now = time.time()
    rows = [task(f"{queue}{i}", now) for i in range(3)]
    for row in rows:
        await store.submit_task(row)
        assert await store.claim_task(row.queue, worker="w", now=now, lease=1) is not None
    settled = 0
    for _ in range(10):  # other tests' leases may be settled along the way
        n = await store.expire_leases(now + 2, 1000)
        settled += n
        if n == 0:
            break
    assert settled >= 3
    for row in rows:
        got = await store.get_task(row.id)
        assert got is not None and (got.state, got.attempt, got.claimed_by) == ("ready", 1, None)


async def test_fail_retries_at_the_given_time_then_dead_with_each_attempt_error(
    store: Backend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now, max_attempts=2)
    await store.submit_task(row)
    await store.claim_task(queue, worker="w", now=now, lease=30)
    failed = await store.finish_task(
        row.id,
        worker="w",
        attempt=1,
        now=now + 1,
        outcome="failed",
        error="boom 1",
        retry_at=now + 10,
    )
    assert (failed.state, failed.run_at, failed.claimed_by) == (
        "ready",
        pytest.approx(now + 10),
        None,
    )
    assert await store.claim_task(queue, worker="w", now=now + 5, lease=30) is None
    again = await store.claim_task(queue, worker="w", now=now + 10, lease=30)
    assert again is not None and again.attempt == 2
    dead = await store.finish_task(
        row.id,
        worker="w",
        attempt=2,
        now=now + 11,
        outcome="failed",
        error="boom 2",
        retry_at=now + 20,
    )
    assert dead.state == "dead"
    assert [(e["attempt"], e["error"]) for e in orjson.loads(dead.errors)] == [
        (1, "boom 1"),
        (2, "boom 2"),
    ]
    stats = await store.task_stats(queue, now + 12)
    assert (stats.dead, stats.ready, stats.running) == (1, 0, 0)
    back = await store.requeue_task(row.id, author="ops", now=now + 12, run_at=now + 12)
    assert (back.state, back.attempt, back.finished_at) == ("ready", 0, None)
    assert len(orjson.loads(back.errors)) == 2
    assert [e[0] for e in await events(store, queue)][-3:] == [
        "task.claimed",
        "task.dead",
        "task.requeued",
    ]


async def test_fail_without_retry_is_dead_at_once_and_release_gives_the_attempt_back(
    store: Backend, queue: str
) -> None:
    now = time.time()
    a, b = task(queue, now), task(queue, now + 0.001)
    await store.submit_task(a)
    await store.submit_task(b)
    got = await store.claim_task(queue, worker="w", now=now + 1, lease=30)
    assert got is not None and got.id == a.id
    dead = await store.finish_task(
        a.id, worker="w", attempt=1, now=now + 2, outcome="failed", error="bad input"
    )
    assert dead.state == "dead"
    got = await store.claim_task(queue, worker="w", now=now + 3, lease=30)
    assert got is not None and got.id == b.id
    released = await store.finish_task(b.id, worker="w", attempt=1, now=now + 4, outcome="released")
    assert (released.state, released.attempt, released.claimed_by) == ("ready", 0, None)
    assert (await events(store, queue))[-1][:3] == ("task.released", b.id, 0)


async def test_workers_must_name_the_attempt_they_hold(store: Backend, queue: str) -> None:
    now = time.time()
    row = task(queue, now)
    await store.submit_task(row)
    await store.claim_task(queue, worker="w1", now=now, lease=30)
    for worker, attempt in (("w2", 1), ("w1", 2), ("w1", 0)):
        with pytest.raises(Conflict) as err:
            await store.finish_task(
                row.id, worker=worker, attempt=attempt, now=now, outcome="completed"
            )
        assert err.value.field == "attempt"
    with pytest.raises(NotFound) as missing:
        await store.heartbeat_task("nope", worker="w1", attempt=1, now=now, lease=5)
    assert missing.value.field == "task_id"
    got = await store.get_task(row.id)
    assert got is not None and got.state == "running"  # nothing changed


async def test_cancel_and_requeue_follow_the_states(store: Backend, queue: str) -> None:
    now = time.time()
    row = task(queue, now)
    await store.submit_task(row)
    with pytest.raises(Conflict) as err:
        await store.requeue_task(row.id, author="ops", now=now, run_at=now)
    assert err.value.field == "task_id"
    await store.claim_task(queue, worker="w", now=now, lease=30)
    cancelled = await store.cancel_task(row.id, author="boss", now=now + 1)
    assert (cancelled.state, cancelled.claimed_by, cancelled.lease_until) == (
        "cancelled",
        None,
        None,
    )
    with pytest.raises(Conflict):
        await store.cancel_task(row.id, author="boss", now=now + 1)
    with pytest.raises(Conflict):  # the worker learns on its next heartbeat
        await store.heartbeat_task(row.id, worker="w", attempt=1, now=now + 2, lease=30)
    with pytest.raises(NotFound):
        await store.cancel_task("nope", author="boss", now=now)
    back = await store.requeue_task(row.id, author="ops", now=now + 3, run_at=now + 3)
    assert back.state == "ready"
    assert (await store.claim_task(queue, worker="w", now=now + 4, lease=30)) is not None


async def test_the_claim_time_is_the_claims_now_and_stays_until_a_requeue(
    store: Backend, queue: str
) -> None:
    await check_claim_times(store, queue)


async def check_claim_times(store: Backend, queue: str) -> None:
    """``claimed_at`` through every change of a task (also run on DynamoDB, by
    test_dynamodb.py)."""
    now = time.time()
    row = task(queue, now, max_attempts=2)
    stored, _ = await store.submit_task(row)
    assert stored.claimed_at is None
    first = await store.claim_task(queue, worker="w", now=now + 1, lease=30)
    assert first is not None and first.claimed_at == now + 1
    assert await store.get_task(row.id) == first
    beat = await store.heartbeat_task(row.id, worker="w", attempt=1, now=now + 2, lease=30)
    assert beat.claimed_at == now + 1
    # A failed attempt to be retried is ready again and keeps its claim time.
    retried = await store.finish_task(
        row.id, worker="w", attempt=1, now=now + 3, outcome="failed", error="x", retry_at=now + 3
    )
    assert (retried.state, retried.claimed_at) == ("ready", now + 1)
    assert await store.get_task(row.id) == retried
    second = await store.claim_task(queue, worker="w", now=now + 4, lease=30)
    assert second is not None and (second.attempt, second.claimed_at) == (2, now + 4)
    released = await store.finish_task(
        row.id, worker="w", attempt=2, now=now + 5, outcome="released"
    )
    assert (released.attempt, released.claimed_at) == (1, now + 4)
    third = await store.claim_task(queue, worker="w", now=now + 6, lease=30)
    assert third is not None and (third.attempt, third.claimed_at) == (2, now + 6)
    dead = await store.finish_task(
        row.id, worker="w", attempt=2, now=now + 7, outcome="failed", error="y"
    )
    assert (dead.state, dead.claimed_at) == ("dead", now + 6)
    back = await store.requeue_task(row.id, author="ops", now=now + 8, run_at=now + 8)
    assert (back.state, back.claimed_by, back.claimed_at) == ("ready", None, None)
    got = await store.get_task(row.id)
    assert got is not None and got.claimed_at is None
    fourth = await store.claim_task(queue, worker="w", now=now + 9, lease=30)
    assert fourth is not None and fourth.claimed_at == now + 9
    cancelled = await store.cancel_task(row.id, author="boss", now=now + 10)
    assert (cancelled.state, cancelled.claimed_at) == ("cancelled", now + 9)
    # Completed, and settled after its lease ran out (dead: its last attempt).
    done_q, lost_q = f"{queue}d", f"{queue}l"
    done_row, lost_row = task(done_q, now), task(lost_q, now, max_attempts=1)
    for r in (done_row, lost_row):
        await store.submit_task(r)
        assert await store.claim_task(r.queue, worker="w", now=now + 1, lease=5) is not None
    done = await store.finish_task(
        done_row.id, worker="w", attempt=1, now=now + 2, outcome="completed", result=b"1"
    )
    assert (done.state, done.claimed_at) == ("completed", now + 1)
    assert await store.claim_task(lost_q, worker="w", now=now + 7, lease=5) is None
    lost = await store.get_task(lost_row.id)
    assert lost is not None and (lost.state, lost.claimed_at) == ("dead", now + 1)


async def test_concurrent_claims_never_take_one_task_twice(store: Backend, queue: str) -> None:
    now = time.time()
    rows = [task(queue, now + i / 1000) for i in range(10)]
    for row in rows:
        await store.submit_task(row)
    got = await asyncio.gather(
        *(store.claim_task(queue, worker=f"w{i}", now=now + 1, lease=30) for i in range(20))
    )
    ids = [g.id for g in got if g is not None]
    assert sorted(ids) == sorted(r.id for r in rows)


async def test_list_and_stats_by_state(store: Backend, queue: str) -> None:
    now = time.time()
    rows = [task(queue, now + i / 1000) for i in range(5)]
    rows.append(task(queue, now + 0.01, run_at=now + 100))
    for row in rows:
        await store.submit_task(row)
    await store.claim_task(queue, worker="w", now=now + 1, lease=30)
    page1 = await store.list_tasks(queue, None, None, 4)
    page2 = await store.list_tasks(queue, None, page1[-1].id, 4)
    assert [r.id for r in page1 + page2] == [r.id for r in rows]
    assert [r.id for r in await store.list_tasks(queue, "running", None, 10)] == [rows[0].id]
    stats = await store.task_stats(queue, now + 1)
    assert (stats.ready, stats.delayed, stats.running, stats.dead) == (4, 1, 1, 0)
    assert stats.oldest_ready_at == pytest.approx(rows[1].run_at)
    empty = await store.task_stats(f"{queue}-none", now)
    assert (empty.ready, empty.oldest_ready_at) == (0, None)


async def test_sweep_removes_finished_tasks_and_their_idempotency_keys(
    store: Backend, queue: str
) -> None:
    now = time.time() - 1000
    row = task(queue, now, idempotency_key="once")
    await store.submit_task(row)
    await store.claim_task(queue, worker="w", now=now, lease=30)
    await store.finish_task(row.id, worker="w", attempt=1, now=now + 1, outcome="completed")
    swept = 0
    for _ in range(20):
        n = await store.sweep_tasks(now + 2, 1000)
        swept += n
        if n == 0:
            break
    assert swept >= 1 and await store.get_task(row.id) is None
    fresh, created = await store.submit_task(task(queue, time.time(), idempotency_key="once"))
    assert created and fresh.id != row.id


async def test_request_id_repeat_returns_the_stored_claim(store: Backend, queue: str) -> None:
    now = time.time()
    for i in range(2):
        await store.submit_task(task(queue, now + i / 1000))
    rid = f"agent/{uuid.uuid4().hex}#abc"
    first = await store.claim_task(queue, worker="w", now=now + 1, lease=30, request_id=rid)
    again = await store.claim_task(queue, worker="w", now=now + 1, lease=30, request_id=rid)
    assert first is not None and again == first
    row = task(queue, now)
    sid = f"agent/{uuid.uuid4().hex}#def"
    assert await store.submit_task(row, request_id=sid) == (row, True)
    assert await store.submit_task(row, request_id=sid) == (row, True)


async def test_check_write_guards_a_batch(store: Backend, queue: str) -> None:
    now = time.time()
    ns = f"fence{queue}"
    put = PutWrite(ns, "token", b"1", None, None, None, None)
    (row,) = await store.write_items([put], author="a", now=now, history_limit=0)
    target = PutWrite(ns, "doc", b'"v1"', None, None, None, None)
    ok = await store.write_items(
        [CheckWrite(ns, "token", row.version), target], author="a", now=now, history_limit=0
    )
    assert ok[0] is True
    await store.write_items([put], author="b", now=now, history_limit=0)  # a newer token
    with pytest.raises(Conflict) as err:
        await store.write_items(
            [CheckWrite(ns, "token", row.version), replace(target, value=b'"v2"')],
            author="a",
            now=now,
            history_limit=0,
        )
    assert err.value.field == "ops.0.if_version"
    doc = await store.get_item(ns, "doc", now)
    assert doc is not None and doc.value == b'"v1"'
    absent = await store.write_items(
        [CheckWrite(ns, "nothing", 0)], author="a", now=now, history_limit=0
    )
    assert absent == [True]


async def test_change_notifications_name_the_task_events_where_the_engine_can(
    store: Backend, queue: str
) -> None:
    """PostgreSQL (NOTIFY payload) and Redis (pub/sub payload) name each task event, so
    task waiters need not read the feed; SQLite's notification (a file write) cannot."""
    if "sqlite" in type(store).__name__.lower():
        assert store.task_hints is False
        return
    assert store.task_hints is True
    heard: list[TaskHint | None] = []
    store.changes.listen_hints(heard.append)
    try:
        now = time.time()
        # The backend's listener subscribes in the background: wait until it hears.
        probes: set[str] = set()
        for _ in range(50):
            probe = task(f"{queue}-probe", time.time())
            probes.add(probe.id)
            await store.submit_task(probe)
            await asyncio.sleep(0.1)
            if any(h is not None and h.task_id in probes for h in heard):
                break
        row = task(queue, now)
        await store.submit_task(row)
        await store.claim_task(queue, worker="w", now=now, lease=30)
        await store.finish_task(row.id, worker="w", attempt=1, now=now, outcome="completed")
        wanted = [
            TaskHint("task.submitted", queue, row.id),
            TaskHint("task.claimed", queue, row.id),
            TaskHint("task.completed", queue, row.id),
        ]
        for _ in range(100):
            if all(h in heard for h in wanted):
                break
            await asyncio.sleep(0.05)
        assert [h for h in heard if h is not None and h.task_id == row.id] == wanted
    finally:
        store.changes.unlisten_hints(heard.append)


async def test_an_sqlite_store_of_the_last_schema_gains_the_claim_time(tmp_path: Path) -> None:
    """A file made before ``claimed_at`` (schema 7) is migrated when opened: its tasks
    read with no claim time until claimed again."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(SQLITE_MIGRATIONS[:7], start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version={number}")
    now = time.time()
    old = task("old", now, state="running", attempt=1, claimed_by="w", lease_until=now + 60)
    waiting = task("old", now + 0.001)
    for r in (old, waiting):
        values = [getattr(r, f.name) for f in fields(TaskRow) if f.name != "claimed_at"]
        marks = ", ".join("?" * len(values))
        conn.execute(f"INSERT INTO tasks VALUES ({marks})", values)
    conn.close()
    store = open_backend(f"sqlite:///{path}", Settings())
    await store.open()
    try:
        assert await store.get_task(old.id) == old  # claimed_at None
        done = await store.finish_task(
            old.id, worker="w", attempt=1, now=now + 1, outcome="completed"
        )
        assert (done.state, done.claimed_at) == ("completed", None)
        claimed = await store.claim_task("old", worker="w", now=now + 2, lease=30)
        assert claimed is not None and claimed.id == waiting.id and claimed.claimed_at == now + 2
        assert await store.get_task(waiting.id) == claimed
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SQLITE_MIGRATIONS),)
        cols = [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        assert cols[-1] == "claimed_at"
