"""The Redis backend's task primitives and CheckWrite, on a standalone server and on a
Redis Cluster: claims, leases, events, idempotency, ordering, request ids."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from hivemem.backends.redis import RedisBackend
from hivemem.backends.redis.layout import (
    TASK_PARTITION,
    num,
    partition_of,
    tag,
    task_args,
    task_from,
)
from hivemem.backends.rows import (
    LEASE_EXPIRED,
    CheckWrite,
    DeleteWrite,
    PutWrite,
    TaskRow,
    task_namespace,
)
from hivemem.config import Settings
from hivemem.errors import Conflict, NotFound
from tests.servers.redis import RedisClusterServers, RedisServer

from .test_task_store import task as new_task

NOW = 1_700_000_000.0


# These tests run on servers of their own. On the session's servers, the coordination
# rounds of a service or hive another test left open (each settles, at the real time,
# the expired leases of every queue) settled these tests' leases, all long past on this
# clock; and with a clock past the real time, their own sweeps of finished tasks reached
# other tests' tasks.
@pytest.fixture(scope="module")
def own_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("tasks-redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def own_redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisClusterServers(tmp_path_factory.mktemp("tasks-redis-cluster")) as cluster:
        yield cluster.url


@pytest.fixture(params=["redis", "redis-cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[RedisBackend]:
    name = "own_redis_url" if request.param == "redis" else "own_redis_cluster_url"
    b = RedisBackend.from_url(str(request.getfixturevalue(name)), Settings())
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def queue() -> str:
    return f"q{uuid.uuid4().hex[:12]}"


def task(
    queue: str,
    *,
    priority: int = 0,
    run_at: float = NOW,
    max_attempts: int = 3,
    key: str | None = None,
    at: float = NOW,
) -> TaskRow:
    """A new task as the core would submit it (:func:`tests.test_task_store.task`)."""
    return new_task(
        queue,
        at,
        priority=priority,
        run_at=run_at,
        max_attempts=max_attempts,
        idempotency_key=key,
        submitted_by="alice",
        lease=0.0,
    )


async def events(b: RedisBackend, queue: str) -> list[tuple[str, str | None, int | None, str]]:
    rows, _ = await b.read_events(task_namespace(queue), None, 100)
    return [(e.type, e.key, e.version, e.author) for e in rows]


async def test_tasks_live_in_their_events_partition() -> None:
    assert TASK_PARTITION == partition_of(task_namespace("anything"))


async def test_submit_claim_complete(backend: RedisBackend, queue: str) -> None:
    row, created = await backend.submit_task(task(queue))
    assert created and row.state == "ready" and row.attempt == 0
    got = await backend.claim_task(queue, worker="w1", now=NOW + 1, lease=30.0)
    assert got is not None and got.id == row.id
    assert (got.state, got.attempt, got.claimed_by) == ("running", 1, "w1")
    assert got.lease == 30.0 and got.lease_until == NOW + 31 and got.updated_at == NOW + 1
    assert await backend.claim_task(queue, worker="w2", now=NOW + 1, lease=30.0) is None
    done = await backend.finish_task(
        row.id, worker="w1", attempt=1, now=NOW + 2, outcome="completed", result=b'{"ok":1}'
    )
    assert (done.state, done.result, done.finished_at) == ("completed", b'{"ok":1}', NOW + 2)
    assert done.claimed_by == "w1" and done.lease_until is None
    assert await backend.get_task(row.id) == done
    assert await backend.get_task("nope") is None
    assert await events(backend, queue) == [
        ("task.submitted", row.id, 0, "alice"),
        ("task.claimed", row.id, 1, "w1"),
        ("task.completed", row.id, 1, "w1"),
    ]
    stats = await backend.task_stats(queue, NOW + 3)
    assert (stats.ready, stats.running, stats.completed) == (0, 0, 1)


async def test_idempotency_key(backend: RedisBackend, queue: str) -> None:
    first, created = await backend.submit_task(task(queue, key="k1"))
    again, created2 = await backend.submit_task(task(queue, key="k1"))
    assert created and not created2 and again == first
    other, created3 = await backend.submit_task(task(f"{queue}x", key="k1"))
    assert created3 and other.id != first.id
    assert len(await backend.list_tasks(queue, None, None, 10)) == 1
    # the key stays while the task exists, in any state; sweep_tasks frees it
    await backend.cancel_task(first.id, author="alice", now=NOW + 1)
    assert (await backend.submit_task(task(queue, key="k1")))[1] is False
    assert await backend.sweep_tasks(NOW + 2, 1000) >= 1
    assert await backend.get_task(first.id) is None
    assert (await backend.submit_task(task(queue, key="k1")))[1] is True


async def test_priority_then_fifo(backend: RedisBackend, queue: str) -> None:
    low = (await backend.submit_task(task(queue, priority=-5)))[0]
    a = (await backend.submit_task(task(queue, priority=10, run_at=NOW + 0.5)))[0]
    b = (await backend.submit_task(task(queue, priority=10, run_at=NOW)))[0]
    c = (await backend.submit_task(task(queue, priority=10, run_at=NOW)))[0]
    mid = (await backend.submit_task(task(queue, priority=0)))[0]
    order = []
    for _ in range(6):
        got = await backend.claim_task(queue, worker="w", now=NOW + 1, lease=10)
        order.append(None if got is None else got.id)
    assert order == [b.id, c.id, a.id, mid.id, low.id, None]


async def test_delayed_not_claimable_before_run_at(backend: RedisBackend, queue: str) -> None:
    later = (await backend.submit_task(task(queue, priority=5, run_at=NOW + 60)))[0]
    stats = await backend.task_stats(queue, NOW)
    assert (stats.ready, stats.delayed, stats.oldest_ready_at) == (0, 1, None)
    assert await backend.claim_task(queue, worker="w", now=NOW + 59.9, lease=10) is None
    now_due = (await backend.submit_task(task(queue, priority=0, run_at=NOW)))[0]
    stats = await backend.task_stats(queue, NOW + 1)
    assert (stats.ready, stats.delayed, stats.oldest_ready_at) == (1, 1, NOW)
    got = await backend.claim_task(queue, worker="w", now=NOW + 1, lease=10)
    assert got is not None and got.id == now_due.id
    got = await backend.claim_task(queue, worker="w", now=NOW + 60, lease=10)
    assert got is not None and got.id == later.id


async def test_expired_lease_settled_by_claim(backend: RedisBackend, queue: str) -> None:
    row = (await backend.submit_task(task(queue, max_attempts=2)))[0]
    got = await backend.claim_task(queue, worker="w1", now=NOW, lease=10)
    assert got is not None and got.attempt == 1
    # the lease ended: the next claim settles it and takes the task again
    got = await backend.claim_task(queue, worker="w2", now=NOW + 10, lease=10)
    assert got is not None and got.id == row.id and got.attempt == 2 and got.claimed_by == "w2"
    errors = orjson.loads(got.errors)
    assert errors == [{"attempt": 1, "error": LEASE_EXPIRED, "at": NOW + 10, "worker": "w1"}]
    # w1's late finish is refused
    with pytest.raises(Conflict) as exc:
        await backend.finish_task(row.id, worker="w1", attempt=1, now=NOW + 11, outcome="completed")
    assert exc.value.field == "attempt"
    # the last attempt's lease ends: dead, found by expire_leases
    assert await backend.claim_task(queue, worker="w3", now=NOW + 15, lease=10) is None
    assert await backend.expire_leases(NOW + 21, 100) >= 1
    dead = await backend.get_task(row.id)
    assert dead is not None and dead.state == "dead" and dead.finished_at == NOW + 21
    assert dead.claimed_by is None and dead.lease_until is None
    errors = orjson.loads(dead.errors)
    assert [(e["attempt"], e["worker"]) for e in errors] == [(1, "w1"), (2, "w2")]
    assert all(isinstance(e["at"], float) and isinstance(e["attempt"], int) for e in errors)
    assert await events(backend, queue) == [
        ("task.submitted", row.id, 0, "alice"),
        ("task.claimed", row.id, 1, "w1"),
        ("task.expired", row.id, 1, "hivemem"),
        ("task.claimed", row.id, 2, "w2"),
        ("task.dead", row.id, 2, "hivemem"),
    ]
    assert (await backend.task_stats(queue, NOW + 30)).dead == 1


async def test_heartbeat_and_fencing(backend: RedisBackend, queue: str) -> None:
    row = (await backend.submit_task(task(queue)))[0]
    await backend.claim_task(queue, worker="w1", now=NOW, lease=10)
    beat = await backend.heartbeat_task(row.id, worker="w1", attempt=1, now=NOW + 12, lease=20)
    assert beat.lease_until == NOW + 32 and beat.lease == 20  # accepted past lease_until
    assert await backend.claim_task(queue, worker="w2", now=NOW + 20, lease=10) is None
    for worker, attempt in (("w2", 1), ("w1", 2)):
        with pytest.raises(Conflict) as exc:
            await backend.heartbeat_task(
                row.id, worker=worker, attempt=attempt, now=NOW + 13, lease=10
            )
        assert exc.value.field == "attempt"
        with pytest.raises(Conflict) as exc:
            await backend.finish_task(
                row.id, worker=worker, attempt=attempt, now=NOW + 13, outcome="failed"
            )
        assert exc.value.field == "attempt"
    for call in (
        backend.heartbeat_task("missing", worker="w1", attempt=1, now=NOW, lease=1),
        backend.finish_task("missing", worker="w1", attempt=1, now=NOW, outcome="completed"),
        backend.cancel_task("missing", author="a", now=NOW),
        backend.requeue_task("missing", author="a", now=NOW, run_at=NOW),
    ):
        with pytest.raises(NotFound) as nf:
            await call
        assert nf.value.field == "task_id"
    assert len(await events(backend, queue)) == 2  # a heartbeat writes no event


async def test_fail_retry_release(backend: RedisBackend, queue: str) -> None:
    row = (await backend.submit_task(task(queue, max_attempts=2)))[0]
    await backend.claim_task(queue, worker="w", now=NOW, lease=10)
    failed = await backend.finish_task(
        row.id,
        worker="w",
        attempt=1,
        now=NOW + 1,
        outcome="failed",
        error="boom",
        retry_at=NOW + 5,
    )
    assert (failed.state, failed.run_at, failed.claimed_by, failed.attempt) == (
        "ready",
        NOW + 5,
        None,
        1,
    )
    assert orjson.loads(failed.errors) == [
        {"attempt": 1, "error": "boom", "at": NOW + 1, "worker": "w"}
    ]
    assert await backend.claim_task(queue, worker="w", now=NOW + 4, lease=10) is None
    got = await backend.claim_task(queue, worker="w", now=NOW + 5, lease=10)
    assert got is not None and got.attempt == 2
    released = await backend.finish_task(
        row.id, worker="w", attempt=2, now=NOW + 6, outcome="released"
    )
    assert (released.state, released.attempt, released.run_at) == ("ready", 1, NOW + 6)
    got = await backend.claim_task(queue, worker="w", now=NOW + 6, lease=10)
    assert got is not None and got.attempt == 2
    dead = await backend.finish_task(
        row.id,
        worker="w",
        attempt=2,
        now=NOW + 7,
        outcome="failed",
        error='"quoted" / ü',
        retry_at=NOW + 9,
    )
    assert dead.state == "dead" and dead.finished_at == NOW + 7
    assert orjson.loads(dead.errors)[-1]["error"] == '"quoted" / ü'
    types = [t for t, *_ in await events(backend, queue)]
    assert types == [
        "task.submitted",
        "task.claimed",
        "task.failed",
        "task.claimed",
        "task.released",
        "task.claimed",
        "task.dead",
    ]


async def test_cancel_and_requeue(backend: RedisBackend, queue: str) -> None:
    ready = (await backend.submit_task(task(queue)))[0]
    running = (await backend.submit_task(task(queue)))[0]
    claimed = await backend.claim_task(queue, worker="w", now=NOW, lease=10)
    assert claimed is not None and claimed.id == ready.id
    ready, running = running, ready  # the first one runs now
    with pytest.raises(Conflict) as exc:
        await backend.requeue_task(ready.id, author="bob", now=NOW, run_at=NOW)
    assert exc.value.field == "task_id"
    c1 = await backend.cancel_task(ready.id, author="bob", now=NOW + 1)
    c2 = await backend.cancel_task(running.id, author="bob", now=NOW + 1)
    assert c1.state == c2.state == "cancelled" and c2.claimed_by is None
    with pytest.raises(Conflict) as exc:
        await backend.finish_task(
            running.id, worker="w", attempt=1, now=NOW + 2, outcome="completed"
        )
    assert exc.value.field == "attempt"
    with pytest.raises(Conflict) as exc:
        await backend.cancel_task(ready.id, author="bob", now=NOW + 2)
    assert exc.value.field == "task_id"
    assert await backend.claim_task(queue, worker="w", now=NOW + 2, lease=10) is None
    stats = await backend.task_stats(queue, NOW + 2)
    assert (stats.ready, stats.running, stats.cancelled) == (0, 0, 2)
    back = await backend.requeue_task(running.id, author="bob", now=NOW + 3, run_at=NOW + 4)
    assert (back.state, back.attempt, back.finished_at, back.run_at) == ("ready", 0, None, NOW + 4)
    assert await backend.claim_task(queue, worker="w", now=NOW + 3, lease=10) is None
    got = await backend.claim_task(queue, worker="w", now=NOW + 4, lease=10)
    assert got is not None and got.id == running.id and got.attempt == 1
    listed = await backend.list_tasks(queue, "cancelled", None, 10)
    assert [t.id for t in listed] == [ready.id]
    assert [t.id for t in await backend.list_tasks(queue, None, None, 10)] == sorted(
        [ready.id, running.id]
    )
    assert [t.id for t in await backend.list_tasks(queue, None, ready.id, 10)] == (
        [running.id] if running.id > ready.id else []
    )
    assert (await events(backend, queue))[-2:] == [
        ("task.requeued", running.id, 0, "bob"),
        ("task.claimed", running.id, 1, "w"),
    ]


async def test_concurrent_claims(backend: RedisBackend, queue: str) -> None:
    ids = {(await backend.submit_task(task(queue)))[0].id for _ in range(10)}
    got = await asyncio.gather(
        *(backend.claim_task(queue, worker=f"w{i}", now=NOW, lease=30) for i in range(20))
    )
    taken = [t.id for t in got if t is not None]
    assert len(taken) == 10 and set(taken) == ids


async def test_request_ids(backend: RedisBackend, queue: str) -> None:
    rid = f"r{uuid.uuid4().hex}"
    row = task(queue)
    first = await backend.submit_task(row, request_id=f"{rid}a#f1")
    again = await backend.submit_task(task(queue), request_id=f"{rid}a#f1")
    assert again == first and isinstance(again, tuple)
    claimed = await backend.claim_task(queue, worker="w", now=NOW, lease=10, request_id=rid)
    repeat = await backend.claim_task(queue, worker="w", now=NOW, lease=10, request_id=rid)
    assert claimed is not None and repeat == claimed
    empty = await backend.claim_task(queue, worker="w", now=NOW, lease=10, request_id=rid + "e")
    assert empty is None
    done = await backend.finish_task(
        row.id, worker="w", attempt=1, now=NOW + 1, outcome="completed", request_id=rid + "f"
    )
    assert done == await backend.finish_task(
        row.id, worker="w", attempt=1, now=NOW + 1, outcome="completed", request_id=rid + "f"
    )
    assert len(await events(backend, queue)) == 3


async def test_a_task_hash_without_a_claim_time_reads_as_none(
    backend: RedisBackend, queue: str
) -> None:
    # A task claimed before the field existed: no claim time until claimed again.
    row, _ = await backend.submit_task(task(queue))
    claimed = await backend.claim_task(queue, worker="w", now=NOW + 1, lease=30)
    assert claimed is not None and claimed.claimed_at == NOW + 1
    fields = await backend.client.hgetall(f"{tag(TASK_PARTITION)}:t:{row.id}")
    assert fields[b"claimed_at"] == num(NOW + 1).encode()
    await backend.client.hdel(f"{tag(TASK_PARTITION)}:t:{row.id}", "claimed_at")
    old = await backend.get_task(row.id)
    assert old is not None and old.state == "running" and old.claimed_at is None
    failed = await backend.finish_task(
        row.id, worker="w", attempt=1, now=NOW + 2, outcome="failed", error="x", retry_at=NOW + 2
    )
    assert (failed.state, failed.claimed_at) == ("ready", None)
    again = await backend.claim_task(queue, worker="w", now=NOW + 3, lease=30)
    assert again is not None and again.claimed_at == NOW + 3
    # A requeue removes the field.
    dead = await backend.finish_task(
        row.id, worker="w", attempt=2, now=NOW + 4, outcome="failed", error="y"
    )
    assert (dead.state, dead.claimed_at) == ("dead", NOW + 3)
    await backend.requeue_task(row.id, author="ops", now=NOW + 5, run_at=NOW + 5)
    assert b"claimed_at" not in await backend.client.hgetall(f"{tag(TASK_PARTITION)}:t:{row.id}")


def test_a_record_of_the_fields_before_the_claim_time_decodes() -> None:
    """A task record stored as a request's result by a version without ``claimed_at``
    (20 fields) still decodes."""
    row = task("q")
    record = [None if a == "" else a[1:] for a in task_args(row)]
    encoded = [v.encode() if isinstance(v, str) else v for v in record]
    assert task_from(encoded[:-1]) == row == task_from(encoded)


async def test_check_write(backend: RedisBackend) -> None:
    ns = f"cw{uuid.uuid4().hex[:8]}"
    [item] = await backend.write_items(
        [PutWrite(ns, "a", b"1", None, None, None, None)], author="x", now=NOW, history_limit=5
    )
    assert not isinstance(item, bool)
    ok = await backend.write_items(
        [
            CheckWrite(ns, "a", 1),
            CheckWrite(ns, "b", 0),
            PutWrite(ns, "c", b"2", None, None, None, 0),
        ],
        author="x",
        now=NOW,
        history_limit=5,
    )
    assert ok[:2] == [True, True]
    with pytest.raises(Conflict) as exc:
        await backend.write_items(
            [PutWrite(ns, "d", b"3", None, None, None, None), CheckWrite(ns, "a", 2)],
            author="x",
            now=NOW,
            history_limit=5,
        )
    assert exc.value.field == "ops.1.if_version" and exc.value.current_version == 1
    assert await backend.get_item(ns, "d", NOW) is None
    with pytest.raises(Conflict) as exc:
        await backend.write_items([CheckWrite(ns, "zz", 1)], author="x", now=NOW, history_limit=5)
    assert exc.value.field == "if_version" and exc.value.current_version == 0
    rows, _ = await backend.read_events(ns, None, 100)
    assert [e.type for e in rows] == ["item.put", "item.put"]


async def test_listing_and_stats_across_priorities(backend: RedisBackend, queue: str) -> None:
    rows = [
        (await backend.submit_task(task(queue, priority=p, run_at=NOW + d)))[0]
        for p, d in ((5, 3.0), (0, 1.0), (-3, 2.0), (1, 50.0))
    ]
    stats = await backend.task_stats(queue, NOW + 10)
    assert (stats.ready, stats.delayed, stats.oldest_ready_at) == (3, 1, NOW + 1)
    for _ in range(3):
        assert await backend.claim_task(queue, worker="w", now=NOW + 10, lease=5) is not None
    running = await backend.list_tasks(queue, "running", None, 2)
    assert [t.id for t in running] == [r.id for r in rows[:2]]
    rest = await backend.list_tasks(queue, "running", running[-1].id, 10)
    assert [t.id for t in rest] == [rows[2].id]
    assert [t.id for t in await backend.list_tasks(queue, "ready", None, 10)] == [rows[3].id]
    stats = await backend.task_stats(queue, NOW + 10)
    assert (stats.ready, stats.delayed, stats.running, stats.oldest_ready_at) == (0, 1, 3, None)


async def test_events_named_by_the_core_and_leases_beside_their_tree(backend: RedisBackend) -> None:
    ns = f"ev{uuid.uuid4().hex[:8]}"
    assert partition_of(f"_leases/{ns}/doc") == partition_of(ns)
    await backend.write_items(
        [PutWrite(ns, "a", b"1", None, None, None, None, event="agent.up")],
        author="x",
        now=NOW,
        history_limit=5,
    )
    await backend.write_items(
        [
            CheckWrite(f"_leases/{ns}/doc", "token", 0),
            DeleteWrite(ns, "a", 1, event="agent.unregistered"),
        ],
        author="x",
        now=NOW,
        history_limit=5,
    )
    rows, _ = await backend.read_events(ns, None, 100)
    assert [(e.type, e.version) for e in rows] == [("agent.up", 1), ("agent.unregistered", 1)]
