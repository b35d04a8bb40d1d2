"""Task queues on PostgreSQL (backends/postgres/tasks.py), on a real server: the claim's
SKIP LOCKED statements under concurrency from several pools, settling leases exactly
once, errors appended in SQL exactly as ``add_task_error`` writes them, idempotency keys,
request ids, the claim index, and ``CheckWrite`` in ``write_items``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields, replace

import orjson
import psycopg
import pytest

from hivemem.backends.postgres import PostgresBackend
from hivemem.backends.postgres import schema as pg_schema
from hivemem.backends.postgres.engine import key_lock
from hivemem.backends.postgres.tasks import SETTLE_BATCH
from hivemem.backends.results import RequestIdReused
from hivemem.backends.rows import (
    LEASE_EXPIRED,
    CheckWrite,
    DeleteWrite,
    PutWrite,
    TaskRow,
    add_task_error,
    task_namespace,
)
from hivemem.config import Settings
from hivemem.errors import Conflict, NotFound, Unavailable

from .test_task_store import events, task

SETTINGS = Settings(embedder="none")


@contextlib.asynccontextmanager
async def opened(url: str, n: int = 1) -> AsyncIterator[list[PostgresBackend]]:
    """``n`` opened backends on ``url`` (separate pools, as separate processes have)."""
    backends = [PostgresBackend.from_url(url, SETTINGS) for _ in range(n)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        yield backends
    finally:
        for b in backends:
            await b.close()


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[PostgresBackend]:
    async with opened(postgres_url) as (backend,):
        yield backend


@pytest.fixture
def queue() -> str:
    return f"q{uuid.uuid4().hex[:12]}"


# Round trip and events ------------------------------------------------------------------


async def test_submit_claim_complete_round_trip(pg: PostgresBackend, queue: str) -> None:
    now = time.time()
    row = task(queue, now, payload=b'{"x":"\\u0000 \xc3\xa9"}')
    assert await pg.submit_task(row) == (row, True)
    claimed = await pg.claim_task(queue, worker="w1", now=now + 1, lease=10)
    assert claimed is not None
    assert (claimed.state, claimed.attempt, claimed.claimed_by, claimed.lease) == (
        "running",
        1,
        "w1",
        10,
    )
    assert claimed.lease_until == now + 1 + 10 and claimed.updated_at == now + 1
    assert claimed.payload == row.payload
    done = await pg.finish_task(
        row.id, worker="w1", attempt=1, now=now + 2, outcome="completed", result=b"[1]"
    )
    assert (done.state, done.result, done.claimed_by, done.lease_until, done.finished_at) == (
        "completed",
        b"[1]",
        "w1",
        None,
        now + 2,
    )
    assert await pg.get_task(row.id) == done
    assert await events(pg, queue) == [
        ("task.submitted", row.id, 0, "boss"),
        ("task.claimed", row.id, 1, "w1"),
        ("task.completed", row.id, 1, "w1"),
    ]


async def test_a_duplicate_task_id_is_a_conflict_and_writes_nothing(
    pg: PostgresBackend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now)
    await pg.submit_task(row)
    with pytest.raises(Conflict) as err:
        await pg.submit_task(replace(row, payload=b"2"))
    assert err.value.field == "task_id"
    assert await pg.get_task(row.id) == row
    assert len(await events(pg, queue)) == 1


async def test_priority_then_fifo_then_delayed(pg: PostgresBackend, queue: str) -> None:
    now = time.time()
    rows = [
        task(queue, now, priority=1),
        task(queue, now - 5, priority=1),  # earlier run_at wins within a priority
        task(queue, now, priority=9, run_at=now + 30),  # not due yet
        task(queue, now, priority=-1),
        task(queue, now, priority=1),
    ]
    for row in rows:
        await pg.submit_task(row)
    taken = []
    while (got := await pg.claim_task(queue, worker="w", now=now, lease=5)) is not None:
        taken.append(got.id)
    assert taken == [rows[1].id, rows[0].id, rows[4].id, rows[3].id]
    stats = await pg.task_stats(queue, now)
    assert (stats.ready, stats.delayed, stats.running) == (0, 1, 4)
    got = await pg.claim_task(queue, worker="w", now=now + 30, lease=5)
    assert got is not None and got.id == rows[2].id


async def test_the_claim_reads_the_ready_index(pg: PostgresBackend, queue: str) -> None:
    """The claim's SELECT walks hivemem_tasks_ready for the queue, in claim order."""
    now = time.time()
    await asyncio.gather(*(pg.submit_task(task(queue, now + i / 1e4)) for i in range(50)))

    async def plan(c: psycopg.AsyncConnection[tuple[object, ...]]) -> str:
        await c.execute("ANALYZE hivemem_tasks")
        cur = await c.execute(
            "EXPLAIN SELECT id FROM hivemem_tasks WHERE queue = %s AND state = 'ready' "
            "AND run_at <= %s ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            (queue, now + 1),
        )
        return "\n".join(str(r[0]) for r in await cur.fetchall())

    explained = await pg._engine.read(plan)
    assert "hivemem_tasks_ready" in explained and "Sort" not in explained


# Leases -------------------------------------------------------------------------------


async def test_settled_lease_errors_are_exactly_what_add_task_error_writes(
    pg: PostgresBackend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now, max_attempts=3)
    await pg.submit_task(row)
    worker = 'w "1" \\ é \x01'
    await pg.claim_task(queue, worker=worker, now=now, lease=1)
    again = await pg.claim_task(queue, worker="w2", now=now + 1.25, lease=1)
    assert again is not None and again.attempt == 2
    expected = add_task_error(b"[]", 1, LEASE_EXPIRED, now + 1.25, worker)
    assert again.errors == expected
    error = 'bad "input"\n\x00 ☃'
    failed = await pg.finish_task(
        row.id, worker="w2", attempt=2, now=now + 2, outcome="failed", error=error, retry_at=now
    )
    assert failed.errors == add_task_error(expected, 2, error, now + 2, "w2")
    assert orjson.loads(failed.errors)[1]["error"] == error


async def test_expiry_is_settled_once_by_concurrent_claims_and_sweepers(
    postgres_url: str, queue: str
) -> None:
    now = time.time()
    async with opened(postgres_url, 3) as backends:
        rows = [task(queue, now + i / 1e4, max_attempts=5) for i in range(20)]
        for row in rows:
            await backends[0].submit_task(row)
            got = await backends[0].claim_task(queue, worker="gone", now=now + 1, lease=1)
            assert got is not None and got.id == row.id
        jobs = [
            b.claim_task(queue, worker=f"w{i}", now=now + 3, lease=60)
            for i, b in enumerate(backends * 5)
        ] + [b.expire_leases(now + 3, 5) for b in backends]
        await asyncio.gather(*jobs)
        expired = [e for e in await events(backends[0], queue) if e[0] == "task.expired"]
        assert sorted(str(e[1]) for e in expired) == sorted(r.id for r in rows)
        for row in rows:
            got = await backends[0].get_task(row.id)
            assert got is not None and len(orjson.loads(got.errors)) == 1


async def test_a_claim_settles_at_most_a_batch(pg: PostgresBackend, queue: str) -> None:
    now = time.time()
    n = SETTLE_BATCH + 5
    for i in range(n):
        await pg.submit_task(task(queue, now - i / 1e5, max_attempts=1))
    for _ in range(n):
        assert await pg.claim_task(queue, worker="gone", now=now, lease=1) is not None
    assert await pg.claim_task(queue, worker="w", now=now + 2, lease=1) is None
    stats = await pg.task_stats(queue, now + 2)
    assert (stats.dead, stats.running) == (SETTLE_BATCH, 5)
    assert await pg.claim_task(queue, worker="w", now=now + 2, lease=1) is None
    assert (await pg.task_stats(queue, now + 2)).dead == n


async def test_heartbeat_past_the_lease_is_accepted_until_settled(
    pg: PostgresBackend, queue: str
) -> None:
    now = time.time()
    row = task(queue, now)
    await pg.submit_task(row)
    await pg.claim_task(queue, worker="w", now=now, lease=1)
    beat = await pg.heartbeat_task(row.id, worker="w", attempt=1, now=now + 5, lease=10)
    assert (beat.state, beat.lease, beat.lease_until, beat.updated_at) == (
        "running",
        10,
        now + 15,
        now + 5,
    )
    assert [e[0] for e in await events(pg, queue)] == ["task.submitted", "task.claimed"]
    assert await pg.expire_leases(now + 14, 100) >= 0
    assert (await pg.get_task(row.id)).state == "running"  # type: ignore[union-attr]
    with pytest.raises(NotFound) as err:
        await pg.finish_task("nope", worker="w", attempt=1, now=now, outcome="completed")
    assert err.value.field == "task_id"


# Concurrency ----------------------------------------------------------------------------


async def test_concurrent_claims_from_several_pools_take_each_task_once(
    postgres_url: str, queue: str
) -> None:
    now = time.time()
    async with opened(postgres_url, 4) as backends:
        rows = [task(queue, now + i / 1e4) for i in range(60)]
        await asyncio.gather(*(backends[i % 4].submit_task(r) for i, r in enumerate(rows)))
        got = await asyncio.gather(
            *(
                backends[i % 4].claim_task(queue, worker=f"w{i}", now=now + 1, lease=30)
                for i in range(80)
            )
        )
        ids = [g.id for g in got if g is not None]
        assert sorted(ids) == sorted(r.id for r in rows)
        claimed = [e for e in await events(backends[0], queue) if e[0] == "task.claimed"]
        assert len(claimed) == 60


async def test_concurrent_submits_with_one_idempotency_key_create_one_task(
    postgres_url: str, queue: str
) -> None:
    now = time.time()
    async with opened(postgres_url, 4) as backends:
        results = await asyncio.gather(
            *(backends[i % 4].submit_task(task(queue, now, idempotency_key="k")) for i in range(12))
        )
        created = [r for r, new in results if new]
        assert len(created) == 1
        assert {r.id for r, _ in results} == {created[0].id}
        assert all(isinstance(r, tuple) for r in results)
        assert [e[0] for e in await events(backends[0], queue)] == ["task.submitted"]


# Request ids ---------------------------------------------------------------------------


async def test_request_id_repeats_return_the_stored_result(pg: PostgresBackend, queue: str) -> None:
    now = time.time()
    row = task(queue, now)
    rid = f"a/{uuid.uuid4().hex}#01"
    assert await pg.submit_task(row, request_id=rid) == (row, True)
    repeat = await pg.submit_task(row, request_id=rid)
    assert repeat == (row, True) and isinstance(repeat, tuple)
    with pytest.raises(RequestIdReused):
        await pg.submit_task(row, request_id=rid[:-2] + "02")
    claim_rid = f"a/{uuid.uuid4().hex}"
    first = await pg.claim_task(queue, worker="w", now=now, lease=30, request_id=claim_rid)
    assert first is not None
    assert await pg.claim_task(queue, worker="w", now=now, lease=30, request_id=claim_rid) == first
    fin_rid = f"a/{uuid.uuid4().hex}"
    done = await pg.finish_task(
        row.id, worker="w", attempt=1, now=now, outcome="completed", request_id=fin_rid
    )
    again = await pg.finish_task(
        row.id, worker="w", attempt=1, now=now, outcome="completed", request_id=fin_rid
    )
    assert again == done
    # A refused write stores nothing: the same id is checked again.
    cancel_rid = f"a/{uuid.uuid4().hex}"
    for _ in range(2):
        with pytest.raises(Conflict):
            await pg.cancel_task(row.id, author="boss", now=now, request_id=cancel_rid)
    assert [e[0] for e in await events(pg, queue)] == [
        "task.submitted",
        "task.claimed",
        "task.completed",
    ]


# Claim times ----------------------------------------------------------------------------


async def test_the_claim_statements_of_transactions_store_the_claim_time(
    pg: PostgresBackend, queue: str
) -> None:
    now = time.time()
    a, b = task(queue, now), task(queue, now + 0.001)
    for row in (a, b):
        await pg.submit_task(row)
    rid = f"a/{uuid.uuid4().hex}"
    first = await pg.claim_task(queue, worker="w", now=now + 1, lease=5, request_id=rid)
    assert first is not None and (first.id, first.claimed_at) == (a.id, now + 1)
    # An expired lease first: settled, then the claim, in one transaction.
    second = await pg.claim_task(queue, worker="w", now=now + 7, lease=5)
    assert second is not None and (second.id, second.claimed_at) == (b.id, now + 7)
    settled = await pg.get_task(a.id)
    assert settled is not None and (settled.state, settled.claimed_at) == ("ready", now + 1)


@pytest.fixture
def fresh_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the session's server (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_a_database_of_the_last_schema_gains_the_claim_time(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made before ``claimed_at`` (schema 4) is migrated when opened: its
    tasks read with no claim time until claimed again."""
    migrations = list(pg_schema.MIGRATIONS)
    monkeypatch.setattr(pg_schema, "MIGRATIONS", migrations[:4])
    async with opened(fresh_url):
        pass
    now = time.time()
    old = task("old", now, state="running", attempt=1, claimed_by="w", lease_until=now + 60)
    waiting = task("old", now + 0.001)
    cols = [f.name for f in fields(TaskRow) if f.name != "claimed_at"]
    insert = (
        f"INSERT INTO hivemem_tasks ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
    )
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        for row in (old, waiting):
            conn.execute(insert, [getattr(row, c) for c in cols])
    monkeypatch.setattr(pg_schema, "MIGRATIONS", migrations)
    async with opened(fresh_url) as (b,):
        assert await b.get_task(old.id) == old  # claimed_at None
        done = await b.finish_task(old.id, worker="w", attempt=1, now=now + 1, outcome="completed")
        assert (done.state, done.claimed_at) == ("completed", None)
        claimed = await b.claim_task("old", worker="w", now=now + 2, lease=30)
        assert claimed is not None and (claimed.id, claimed.claimed_at) == (waiting.id, now + 2)
    with psycopg.connect(fresh_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM hivemem_schema ORDER BY 1")]
    assert versions == list(range(1, len(migrations) + 1))


# Sweep ----------------------------------------------------------------------------------


async def test_sweep_tasks_deletes_old_finished_tasks_without_events(
    pg: PostgresBackend, queue: str
) -> None:
    now = time.time() - 10_000
    done, live = task(queue, now, idempotency_key="k"), task(queue, now)
    await pg.submit_task(done)
    await pg.submit_task(live)
    await pg.cancel_task(done.id, author="boss", now=now)
    before = await events(pg, queue)
    while await pg.sweep_tasks(now + 1, 1000):
        pass
    assert await pg.get_task(done.id) is None and await pg.get_task(live.id) is not None
    assert await events(pg, queue) == before
    assert (await pg.submit_task(task(queue, now, idempotency_key="k")))[1] is True


# CheckWrite -----------------------------------------------------------------------------


def put(ns: str, key: str, value: bytes, **kw: object) -> PutWrite:
    return PutWrite(ns, key, value, None, None, kw.get("expires_at"), kw.get("if_version"))  # type: ignore[arg-type]


async def test_check_write_mismatch_is_a_conflict_and_writes_nothing(pg: PostgresBackend) -> None:
    now = time.time()
    ns = f"c{uuid.uuid4().hex[:8]}"
    (tok,) = await pg.write_items([put(ns, "tok", b"1")], author="a", now=now, history_limit=5)
    with pytest.raises(Conflict) as err:
        await pg.write_items([CheckWrite(ns, "tok", 2)], author="a", now=now, history_limit=5)
    assert (err.value.field, err.value.current_version) == ("if_version", 1)
    with pytest.raises(Conflict) as err:
        await pg.write_items(
            [put(ns, "doc", b"2"), CheckWrite(ns, "tok", 0), DeleteWrite(ns, "tok", None)],
            author="a",
            now=now,
            history_limit=5,
        )
    assert err.value.field == "ops.1.if_version"
    assert await pg.get_item(ns, "doc", now) is None
    assert await pg.get_item(ns, "tok", now) == tok
    result = await pg.write_items(
        [CheckWrite(ns, "tok", 1), put(ns, "doc", b"2"), CheckWrite(ns, "doc", 1)],
        author="a",
        now=now,
        history_limit=5,
    )
    assert result[0] is True and result[2] is True
    feed, _ = await pg.read_events(ns, None, 100)
    assert [(e.type, e.key) for e in feed] == [("item.put", "tok"), ("item.put", "doc")]


async def test_check_write_counts_an_expired_item_as_absent_and_leaves_it(
    pg: PostgresBackend,
) -> None:
    now = time.time()
    ns = f"c{uuid.uuid4().hex[:8]}"
    await pg.write_items(
        [put(ns, "tok", b"1", expires_at=now + 1)], author="a", now=now, history_limit=5
    )
    assert await pg.write_items(
        [CheckWrite(ns, "tok", 0)], author="a", now=now + 2, history_limit=5
    ) == [True]
    with pytest.raises(Conflict):
        await pg.write_items([CheckWrite(ns, "tok", 1)], author="a", now=now + 2, history_limit=5)
    feed, _ = await pg.read_events(ns, None, 100)
    assert [e.type for e in feed] == ["item.put"]  # no event, no removal by a check


async def test_check_write_waits_for_the_key_lock(postgres_url: str, pg: PostgresBackend) -> None:
    """A check takes the key's advisory lock, so it is ordered with a concurrent write."""
    now = time.time()
    ns = f"c{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as other:
        await other.execute("BEGIN")
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (key_lock(ns, "tok"),))
        check = asyncio.create_task(
            pg.write_items([CheckWrite(ns, "tok", 0)], author="a", now=now, history_limit=5)
        )
        await asyncio.sleep(0.3)
        assert not check.done()
        await other.execute("COMMIT")
        assert await asyncio.wait_for(check, 5) == [True]


# One-statement writes ---------------------------------------------------------------------


async def test_one_statement_writes_keep_the_feed_gapless_and_wake_watchers(
    postgres_url: str, queue: str
) -> None:
    """Submits, claims and completes from four pools (one statement each, head moved in
    the statement) while a reader follows the queue's feed in small pages: it sees every
    event once, in the order a later full read gives."""
    now = time.time()
    async with opened(postgres_url, 4) as backends:
        seen: list[str] = []
        done = asyncio.Event()

        async def follow() -> None:
            cursor: str | None = None
            while True:
                finished = done.is_set()
                rows, cursor = await backends[0].read_events(task_namespace(queue), cursor, 7)
                seen.extend(r.cursor for r in rows)
                if finished and not rows:
                    return

        async def life(i: int) -> None:
            b = backends[i % 4]
            await b.submit_task(task(queue, now + i / 1e4))
            # SKIP LOCKED may pass over a task another claim holds while a task submitted
            # meanwhile is not yet in this statement's snapshot: None, then a retry finds one.
            for _ in range(200):
                got = await b.claim_task(queue, worker=f"w{i}", now=now + 1, lease=30)
                if got is not None:
                    break
                await asyncio.sleep(0.005)
            assert got is not None
            await b.finish_task(got.id, worker=f"w{i}", attempt=1, now=now + 2, outcome="completed")

        reader = asyncio.create_task(follow())
        generation = backends[1].changes.generation
        await asyncio.gather(*(life(i) for i in range(40)))
        assert backends[1].changes.generation > generation
        done.set()
        await reader
        full, _ = await backends[0].read_events(task_namespace(queue), None, 1000)
        assert len(full) == 120 and seen == [r.cursor for r in full]
        assert [int(c) for c in seen] == sorted(int(c) for c in seen)


async def test_one_statement_writes_are_unavailable_when_closed(postgres_url: str) -> None:
    async with opened(postgres_url) as (backend,):
        pass
    with pytest.raises(Unavailable):
        await backend.claim_task("q", worker="w", now=time.time(), lease=5)
    with pytest.raises(Unavailable):
        await backend.submit_task(task("q", time.time()))
