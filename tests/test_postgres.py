"""PostgreSQL backend specifics, on a real server: the feed has no gaps under concurrent
writers, compare-and-set and request ids hold across connections, migrations run once,
replicas wake each other, filters follow ``row_matches``, and engine failures are
Unavailable."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest

import hivemem
from hivemem import Conflict, CursorExpired, InvalidInput, Settings, Unavailable
from hivemem.backends import postgres as pg_package
from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.postgres import PostgresBackend
from hivemem.backends.postgres import backend as pg_backend
from hivemem.backends.postgres import engine as pg_engine
from hivemem.backends.postgres import schema as pg_schema
from hivemem.backends.rows import DeleteWrite, IndexEntry, ItemRow, NewMessage, PutWrite, SessionRow
from tests.conftest import free_port
from tests.servers.postgres import PostgresServer

SETTINGS = Settings(embedder="none")


def admin_url(url: str) -> str:
    """The URL of the ``postgres`` database on the server of ``url``."""
    return url.rsplit("/", 1)[0] + "/postgres"


@pytest.fixture
def fresh_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the session's server (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url(postgres_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def opened(url: str, n: int = 1) -> AsyncIterator[list[PostgresBackend]]:
    """``n`` opened backends on ``url`` (separate pools: separate processes' view)."""
    backends = [PostgresBackend.from_url(url, SETTINGS) for _ in range(n)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        yield backends
    finally:
        for b in backends:
            await b.close()


def put(ns: str, key: str, value: Any, *, if_version: int | None = None, **kw: Any) -> PutWrite:
    return PutWrite(
        ns,
        key,
        orjson.dumps(value),
        kw.get("text"),
        kw.get("metadata"),
        kw.get("expires_at"),
        if_version,
        kw.get("index_text"),
        kw.get("vector"),
        kw.get("model"),
    )


def ns_() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


# URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h/db",
        "postgresql:/h/db",
        "postgresql//h/db",
        "postgresql://u@h:port/db",
        "postgresql://u@h:99999/db",
        "postgresql://u@h/db?badoption=1",
    ],
)
def test_bad_url_is_invalid_input_naming_url(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        PostgresBackend.from_url(url, SETTINGS)
    assert info.value.field == "url"


def test_postgres_and_postgresql_schemes_are_accepted() -> None:
    for url in ("postgres://u:pw@h:5433/db", "postgresql://u@h/db?sslmode=disable"):
        backend = hivemem.open_backend(url, SETTINGS)
        assert isinstance(backend, PostgresBackend)
        assert "pw" not in repr(backend)


async def test_unreachable_server_is_unavailable() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/db"  # nothing listens there
    backend = PostgresBackend.from_url(url, SETTINGS)
    with pytest.raises(Unavailable):
        await backend.open()
    with pytest.raises(Unavailable):
        await backend.ping()
    await backend.close()


# Feed ---------------------------------------------------------------------------------


async def test_feed_has_no_gaps_under_concurrent_writers(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers on four pools commit transactions of varying length (batches of 1..8 puts,
    deletes, expiries by a concurrent sweeper, publishes, session writes; a random delay
    between the events' append and COMMIT, as a slow commit would have) while a reader
    follows the feed in small pages. The reader must see every committed event exactly
    once, in the order of the feed, with cursors that only move forward. Each of the 12
    writers goes on for 3 s and at least 10 writes, however busy the machine."""
    real_append = pg_backend.append_events

    async def slow_append(conn: Any, events: Any, *, fetch: bool = False) -> int | None:
        await asyncio.sleep(random.uniform(0, 0.004))  # a longer transaction
        head = await real_append(conn, events, fetch=True)  # executed now: the head is locked
        await asyncio.sleep(random.choice([0, 0, 0.001, 0.005]))  # a slow commit
        return head

    monkeypatch.setattr(pg_backend, "append_events", slow_append)
    # Groups of single puts append in their one statement: a slow commit there too
    # (the head is locked when the NOTIFY runs, and held through the sleep).
    slow_group = pg_backend._PUT_GROUP.replace(
        "SELECT count(pg_notify(",
        "SELECT count(pg_sleep((ARRAY[0, 0, 0.001, 0.005])[1 + floor(random() * 4)::int]))"
        " + count(pg_notify(",
    )
    assert slow_group != pg_backend._PUT_GROUP
    monkeypatch.setattr(pg_backend, "_PUT_GROUP", slow_group)
    grouped = 0
    real_group = PostgresBackend._put_group

    async def counting_group(c: Any, group: Any) -> Any:
        nonlocal grouped
        rows = await real_group(c, group)
        grouped += sum(r is not None for r in rows)
        return rows

    monkeypatch.setattr(PostgresBackend, "_put_group", staticmethod(counting_group))
    ns = ns_()
    seconds = 3.0
    async with opened(postgres_url, 5) as backends:
        reader_backend, writers = backends[0], backends[1:]
        start = await reader_backend.head()
        done = asyncio.Event()
        seen: list[str] = []
        seen_events: list[tuple[str, str, str | None, int | None]] = []

        async def write(b: PostgresBackend, slot: int) -> int:
            rng = random.Random(slot)
            n = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline or n < 10:
                now = time.time()
                roll = rng.random()
                if roll < 0.6:
                    size = rng.randint(1, 8)
                    keys = [f"k{rng.randint(0, 30)}" for _ in range(size)]
                    ttl = now + 0.05 if rng.random() < 0.2 else None
                    ops = [put(f"{ns}/w", k, n, expires_at=ttl) for k in dict.fromkeys(keys)]
                    await b.write_items(ops, author=f"w{slot}", now=now, history_limit=3)
                elif roll < 0.75:
                    ops2 = [DeleteWrite(f"{ns}/w", f"k{rng.randint(0, 30)}", None)]
                    await b.write_items(ops2, author=f"w{slot}", now=now, history_limit=3)
                elif roll < 0.9:
                    await b.publish(f"{ns}/p", b"1", author=f"w{slot}", now=now)
                elif roll < 0.95:
                    await b.sweep(now, 0.0, 0.0)
                else:
                    sid = f"{ns}-{slot}-{n}"
                    row = SessionRow(
                        sid, "app", None, None, "w", b"{}", b"{}", 0, 0, 0, 0, 0, 0.0, now, now
                    )
                    await b.create_session(row)
                    msg = NewMessage("user", b'"hi"', 1, 1, 0.0, b"{}")
                    await b.append_messages(sid, [msg, msg], author="w", now=now)
                n += 1
            return n

        async def follow() -> None:
            cursor = start
            while True:
                finished = done.is_set()
                rows, nxt = await reader_backend.read_events("", cursor, 7)
                previous = int(cursor)
                for r in rows:
                    assert int(r.cursor) > previous, "cursors must only move forward"
                    previous = int(r.cursor)
                    seen.append(r.cursor)
                    seen_events.append((r.type, r.namespace, r.key, r.version))
                assert int(nxt) >= int(cursor)
                assert int(nxt) >= previous
                cursor = nxt
                if finished and not rows:
                    return
                if not rows:
                    await asyncio.sleep(0.001)

        reader = asyncio.create_task(follow())
        await asyncio.gather(*(write(b, i) for i, b in enumerate(writers * 3)))
        done.set()
        await reader
        # Everything committed, read afterwards in one pass.
        everything: list[tuple[str, tuple[str, str, str | None, int | None]]] = []
        cursor = start
        while True:
            rows, cursor = await reader_backend.read_events("", cursor, 1000)
            everything.extend((r.cursor, (r.type, r.namespace, r.key, r.version)) for r in rows)
            if not rows:
                break
    assert grouped > 0, "no single put went through a group"
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert seen == [c for c, _ in everything], "the live reader missed events"
    assert seen_events == [e for _, e in everything]
    # The ids of the feed are consecutive: nothing was skipped or lost.
    ids = [int(c) for c in seen]
    assert ids == list(range(int(start) + 1, int(start) + 1 + len(ids)))
    # Per key, versions in feed order are those of the writes, in order.
    last: dict[tuple[str, str | None], int] = {}
    for type_, namespace, key, version in seen_events:
        if type_ == "item.put" and namespace == f"{ns}/w":
            assert version == last.get((namespace, key), 0) + 1
            last[(namespace, key)] = version
        elif type_ in ("item.deleted", "item.expired") and namespace == f"{ns}/w":
            assert version == last.get((namespace, key))
            last[(namespace, key)] = 0


async def test_head_and_next_cursor(postgres_url: str) -> None:
    async with opened(postgres_url) as (b,):
        ns = ns_()
        head = await b.head()
        rows, nxt = await b.read_events(ns, head, 10)
        assert (rows, nxt) == ([], head)
        await b.write_items([put(ns, "a", 1)], author="t", now=time.time(), history_limit=1)
        await b.write_items([put("other", "b", 1)], author="t", now=time.time(), history_limit=1)
        rows, nxt = await b.read_events(ns, head, 10)
        assert [r.key for r in rows] == ["a"]
        assert nxt == await b.head()  # past the non-matching event too
        assert int(nxt) == int(rows[0].cursor) + 1
        rows, nxt = await b.read_events("", head, 1)
        assert nxt == rows[0].cursor


@pytest.mark.parametrize("cursor", ["x", "-1", "1.5", "", " 1", "1" * 19, "١٢"])
async def test_foreign_cursor_is_invalid_input_naming_after(postgres_url: str, cursor: str) -> None:
    async with opened(postgres_url) as (b,):
        with pytest.raises(InvalidInput) as info:
            await b.read_events("", cursor, 10)
        assert info.value.field == "after"


async def test_cursor_before_trimmed_events_expires(fresh_url: str) -> None:
    async with opened(fresh_url) as (b,):
        now = time.time()
        await b.write_items([put("f", "a", 1)], author="t", now=now - 100, history_limit=1)
        await b.write_items([put("f", "b", 1)], author="t", now=now - 100, history_limit=1)
        await b.write_items([put("f", "c", 1)], author="t", now=now, history_limit=1)
        assert await b.sweep(now, now - 50, now - 50) == (0, 2)
        with pytest.raises(CursorExpired) as info:
            await b.read_events("", "1", 10)
        assert info.value.field == "after"
        assert [r.key for r in (await b.read_events("", "2", 10))[0]] == ["c"]
        assert [r.key for r in (await b.read_events("", "0", 10))[0]] == ["c"]
        assert [r.key for r in (await b.read_events("", None, 10))[0]] == ["c"]


# Writes -------------------------------------------------------------------------------


async def test_concurrent_creates_of_one_key_let_exactly_one_win(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url, 4) as backends:
        for round_ in range(5):
            key = f"k{round_}"

            async def create(b: PostgresBackend, i: int, key: str = key) -> str:
                try:
                    await b.write_items(
                        [put(ns, key, i, if_version=0)],
                        author="t",
                        now=time.time(),
                        history_limit=5,
                    )
                except Conflict as exc:
                    assert exc.current_version == 1
                    return "conflict"
                return "won"

            outcomes = await asyncio.gather(*(create(b, i) for i, b in enumerate(backends * 4)))
            assert outcomes.count("won") == 1


async def test_concurrent_compare_and_set_loses_no_update(postgres_url: str) -> None:
    ns = ns_()
    per_worker = 15
    async with opened(postgres_url, 4) as backends:
        b0 = backends[0]
        await b0.write_items([put(ns, "n", 0)], author="t", now=time.time(), history_limit=100)

        async def increment(b: PostgresBackend) -> None:
            done = 0
            while done < per_worker:
                row = await b.get_item(ns, "n", time.time())
                assert row is not None
                value = orjson.loads(row.value)
                try:
                    await b.write_items(
                        [put(ns, "n", value + 1, if_version=row.version)],
                        author="t",
                        now=time.time(),
                        history_limit=100,
                    )
                except Conflict:
                    await asyncio.sleep(random.uniform(0, 0.003))
                    continue
                done += 1

        await asyncio.gather(*(increment(b) for b in backends * 2))
        row = await b0.get_item(ns, "n", time.time())
        assert row is not None
        assert orjson.loads(row.value) == 8 * per_worker
        assert row.version == 8 * per_worker + 1
        history = await b0.item_history(ns, "n", 1000, time.time())
        total = 8 * per_worker
        assert [orjson.loads(h.value) for h in history] == list(range(total, total - 100, -1))


async def test_one_statement_puts_and_transactions_of_one_key_lose_no_version(
    postgres_url: str,
) -> None:
    """Single puts take the one-statement path, puts with a request id the transaction;
    on one key, from several pools at once, every write gets its own version."""
    ns = ns_()
    per_writer = 25
    async with opened(postgres_url, 4) as backends:

        async def write(b: PostgresBackend, slot: int) -> list[int]:
            versions = []
            for i in range(per_writer):
                rid = f"r{slot}-{i}-{uuid.uuid4().hex[:6]}" if slot % 2 else None
                (row,) = await b.write_items(
                    [put(ns, "k", [slot, i], index_text=f"note {slot} {i}")],
                    author=f"w{slot}",
                    now=time.time(),
                    history_limit=5,
                    request_id=rid,
                )
                assert isinstance(row, ItemRow)
                versions.append(row.version)
            return versions

        got = await asyncio.gather(*(write(b, i) for i, b in enumerate(backends * 2)))
        every = sorted(v for vs in got for v in vs)
        assert every == list(range(1, 8 * per_writer + 1))
        b0 = backends[0]
        row = await b0.get_item(ns, "k", time.time())
        assert row is not None and row.version == 8 * per_writer
        history = await b0.item_history(ns, "k", 100, time.time())
        assert [h.version for h in history] == list(range(row.version, row.version - 5, -1))
        events, _ = await b0.read_events(ns, None, 1000)
        assert sorted(e.version or 0 for e in events if e.type == "item.put") == every


async def test_concurrent_single_puts_commit_in_groups(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        commits = 0
        grouped = 0
        real_write, real_alone = b._engine.write, b._engine.write_alone
        real_group = PostgresBackend._put_group

        async def counting(fn: Any, **kw: Any) -> Any:
            nonlocal commits
            commits += 1
            return await real_write(fn, **kw)

        async def counting_alone(fn: Any) -> Any:
            nonlocal commits
            commits += 1
            return await real_alone(fn)

        async def counting_group(c: Any, group: Any) -> Any:
            nonlocal grouped
            keys = [(p.write.namespace, p.write.key) for p in group]
            assert len(keys) == len(set(keys)), "a group holds one put per key"
            rows = await real_group(c, group)
            grouped += sum(r is not None for r in rows)
            return rows

        monkeypatch.setattr(b._engine, "write", counting)
        monkeypatch.setattr(b._engine, "write_alone", counting_alone)
        monkeypatch.setattr(PostgresBackend, "_put_group", staticmethod(counting_group))
        start = await b.head()
        now = time.time()
        rows = await asyncio.gather(
            *(
                b.write_items([put(ns, f"k{i % 10}", i)], author="t", now=now, history_limit=3)
                for i in range(60)
            )
        )
        assert commits < 60  # several puts shared a transaction
        assert grouped == 60  # puts of one key went in successive groups, none alone
        versions: dict[str, list[int]] = {}
        for (row,) in rows:
            assert isinstance(row, ItemRow)
            versions.setdefault(row.key, []).append(row.version)
        assert {k: sorted(v) for k, v in versions.items()} == {
            f"k{j}": list(range(1, 7)) for j in range(10)
        }
        events, _ = await b.read_events(ns, start, 1000)
        assert len(events) == 60
        for j in range(10):  # per key, the feed holds its versions in order
            assert [e.version for e in events if e.key == f"k{j}"] == list(range(1, 7))


async def test_a_group_that_fails_lets_each_put_run_alone(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        failures = 0
        real_group = PostgresBackend._put_group

        async def failing(c: Any, group: Any) -> Any:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise psycopg.errors.DataError("a bad row in the group")
            return await real_group(c, group)

        monkeypatch.setattr(PostgresBackend, "_put_group", staticmethod(failing))
        rows = await asyncio.gather(
            *(
                b.write_items([put(ns, f"k{i}", i)], author="t", now=time.time(), history_limit=3)
                for i in range(5)
            )
        )
        assert failures == 1
        assert sorted((r.key, r.version) for (r,) in rows if isinstance(r, ItemRow)) == [
            (f"k{i}", 1) for i in range(5)
        ]


async def test_one_group_mixes_creates_updates_and_the_unusual(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single puts of every kind in one group statement: each is decided on its own
    (what it cannot decide it leaves to its transaction), and the events of those it
    wrote are numbered after the head, consecutive, with the versions written."""
    ns = ns_()
    vector = np.arange(1, 5, dtype="<f4").tobytes()
    async with opened(postgres_url) as (b,):
        now = time.time()
        for k in ("have", "cas", "stale", "plain"):
            await b.write_items([put(ns, k, 0)], author="t", now=now, history_limit=5)
        await b.write_items(
            [put(ns, "exp", 0, expires_at=now + 0.01)], author="t", now=now, history_limit=5
        )
        sizes: list[int] = []
        real_group = PostgresBackend._put_group

        async def recording(c: Any, group: Any) -> Any:
            sizes.append(len(group))
            return await real_group(c, group)

        monkeypatch.setattr(PostgresBackend, "_put_group", staticmethod(recording))
        start = await b.head()
        later = now + 1
        writes = [
            put(ns, "new", 1, if_version=0),
            put(ns, "have", 1, if_version=0),
            put(ns, "cas", 1, if_version=1, metadata=b'{"a": 7}', text="t\u00e9xt"),
            put(ns, "stale", 1, if_version=5),
            put(ns, "exp", 1),
            put(ns, "plain", 1, index_text="some words", vector=vector, model="m"),
        ]

        async def one(w: PutWrite) -> ItemRow | int:
            try:
                (row,) = await b.write_items([w], author="g", now=later, history_limit=5)
            except Conflict as exc:
                assert exc.current_version is not None
                return -exc.current_version
            assert isinstance(row, ItemRow)
            return row

        results = await asyncio.gather(*map(one, writes))
        got = dict(zip([w.key for w in writes], results, strict=True))
        assert sizes[0] == 6  # one group first; the unusual then ran alone
        assert got["have"] == -1 and got["stale"] == -1
        versions = {k: r.version for k, r in got.items() if isinstance(r, ItemRow)}
        assert versions == {"new": 1, "cas": 2, "exp": 1, "plain": 2}
        cas = got["cas"]
        assert isinstance(cas, ItemRow)
        assert (cas.text, cas.metadata, cas.author, cas.updated_at) == (
            "t\u00e9xt",
            b'{"a": 7}',
            "g",
            later,
        )
        assert cas.created_at == now  # kept from version 1
        assert await b.get_item(ns, "cas", later) == cas
        assert [h.version for h in await b.item_history(ns, "plain", 10, later)] == [2, 1]
        events, _ = await b.read_events(ns, start, 100)
        assert [int(e.cursor) for e in events] == list(
            range(int(start) + 1, int(start) + 1 + len(events))
        )
        assert sorted((e.type, e.key, e.version) for e in events) == [
            ("item.expired", "exp", 1),
            ("item.put", "cas", 2),
            ("item.put", "exp", 1),
            ("item.put", "new", 1),
            ("item.put", "plain", 2),
        ]
        assert all(e.author == "g" for e in events if e.type == "item.put")
    with psycopg.connect(postgres_url) as conn:
        found = conn.execute(
            "SELECT key, version, text, model, dim, vec::text FROM hivemem_search "
            "WHERE ns = %s ORDER BY key",
            (ns,),
        ).fetchall()
        meta = conn.execute(
            "SELECT meta->>'a' FROM hivemem_items WHERE ns = %s AND key = 'cas'", (ns,)
        ).fetchone()
    assert found == [("plain", 2, "some words", "m", 4, "[1,2,3,4]")]
    assert meta == ("7",)


async def test_an_idle_connection_the_server_closed_is_replaced_before_a_group(
    fresh_url: str,
) -> None:
    """A group is one statement on an autocommit connection: once sent, its outcome
    is unknown if the connection fails. A pooled connection the server closed while it
    was idle is seen before anything is sent, so the group runs on a new one."""
    async with opened(fresh_url) as (b,):
        now = time.time()
        await b.write_items([put("n", "k", 1)], author="t", now=now, history_limit=1)
        with psycopg.connect(admin_url(fresh_url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (fresh_url.rsplit("/", 1)[1],),
            )
        await asyncio.sleep(0.5)  # the connections' ends of file have arrived
        (row,) = await b.write_items([put("n", "k", 2)], author="t", now=now, history_limit=1)
        assert isinstance(row, ItemRow) and row.version == 2


async def test_one_statement_puts_leave_the_unusual_to_the_transaction(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        now = time.time()
        await b.write_items([put(ns, "a", 1)], author="t", now=now, history_limit=5)
        with pytest.raises(Conflict) as info:  # only if absent: it is there
            await b.write_items(
                [put(ns, "a", 2, if_version=0)], author="t", now=now, history_limit=5
            )
        assert info.value.current_version == 1
        with pytest.raises(Conflict) as info:  # a stale version
            await b.write_items(
                [put(ns, "a", 2, if_version=3)], author="t", now=now, history_limit=5
            )
        assert info.value.current_version == 1
        (row,) = await b.write_items(
            [put(ns, "a", 2, if_version=1)], author="t", now=now, history_limit=5
        )
        assert isinstance(row, ItemRow) and row.version == 2
        # Expired: the write expires it first (its event, its history gone), then creates.
        await b.write_items(
            [put(ns, "e", 1, expires_at=now + 0.05)], author="t", now=now, history_limit=5
        )
        later = now + 1
        (row,) = await b.write_items([put(ns, "e", 2)], author="t", now=later, history_limit=5)
        assert isinstance(row, ItemRow) and row.version == 1 and row.created_at == later
        events, _ = await b.read_events(ns, None, 100)
        assert [(e.type, e.key, e.version) for e in events if e.key == "e"] == [
            ("item.put", "e", 1),
            ("item.expired", "e", 1),
            ("item.put", "e", 1),
        ]
        assert [h.version for h in await b.item_history(ns, "e", 10, later)] == [1]


async def test_batches_in_opposite_key_orders_do_not_deadlock(postgres_url: str) -> None:
    ns = ns_()
    keys = [f"k{i}" for i in range(6)]
    async with opened(postgres_url, 2) as backends:

        async def run(b: PostgresBackend, order: list[str]) -> None:
            for _ in range(15):
                ops = [put(ns, k, 1) for k in order]
                await b.write_items(ops, author="t", now=time.time(), history_limit=2)

        await asyncio.gather(
            *(run(b, keys if i % 2 else keys[::-1]) for i, b in enumerate(backends * 3))
        )
        row = await backends[0].get_item(ns, "k0", time.time())
        assert row is not None and row.version == 90


async def test_same_request_id_concurrently_writes_once(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url, 4) as backends:
        rid = f"agent:{uuid.uuid4().hex}"
        results = await asyncio.gather(
            *(
                b.write_items(
                    [put(ns, "r", i)], author="t", now=time.time(), history_limit=5, request_id=rid
                )
                for i, b in enumerate(backends * 3)
            )
        )
        assert all(r == results[0] for r in results)
        row = await backends[0].get_item(ns, "r", time.time())
        assert row is not None and row.version == 1
        published = await asyncio.gather(
            *(
                b.publish(f"{ns}/c", b"1", author="t", now=time.time(), request_id=rid + "p")
                for b in backends
            )
        )
        assert len({p.cursor for p in published}) == 1
        rows, _ = await backends[0].read_events(f"{ns}/c", "0", 100)
        assert [r.cursor for r in rows] == [published[0].cursor]


async def test_failed_write_stores_no_request_result(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        with pytest.raises(Conflict):
            await b.write_items(
                [put(ns, "x", 1, if_version=3)],
                author="t",
                now=time.time(),
                history_limit=1,
                request_id="rq-fail",
            )
        (row,) = await b.write_items(
            [put(ns, "x", 1, if_version=0)],
            author="t",
            now=time.time(),
            history_limit=1,
            request_id="rq-fail",
        )
        assert isinstance(row, ItemRow) and row.version == 1


async def test_append_messages_concurrently_assigns_consecutive_seqs(postgres_url: str) -> None:
    sid = f"s{uuid.uuid4().hex[:10]}"
    async with opened(postgres_url, 3) as backends:
        now = time.time()
        row = SessionRow(sid, "app", "u", None, "t", b"{}", b"{}", 0, 0, 0, 0, 0, 0.0, now, now)
        await backends[0].create_session(row)
        msg = NewMessage("user", b'"x"', 2, 3, 0.5, b"{}")
        batches = await asyncio.gather(
            *(
                b.append_messages(sid, [msg] * (1 + i % 3), author="t", now=time.time())
                for i, b in enumerate(backends * 5)
            )
        )
        for batch in batches:
            seqs = [m.seq for m in batch]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        all_seqs = sorted(m.seq for batch in batches for m in batch)
        assert all_seqs == list(range(1, len(all_seqs) + 1))
        session = await backends[0].get_session(sid)
        assert session is not None
        assert session.messages == len(all_seqs) == session.turns
        assert (session.tokens_in, session.tokens_out) == (2 * len(all_seqs), 3 * len(all_seqs))
        read = await backends[1].read_messages(sid, 0, 1000, time.time())
        assert [m.seq for m in read] == all_seqs


async def test_exact_bytes_and_nul_characters_round_trip(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        value = orjson.dumps({"a": "x\x00y", "f": 1e16, "n": 1.0})
        meta = orjson.dumps({"s": "a\x00b", "n": 1.5e300, "z": 0.1})
        w = PutWrite(ns, "k", value, "t\x00ext é", meta, None, None, "nul\x00word text", None, None)
        (row,) = await b.write_items([w], author="t", now=time.time(), history_limit=2)
        got = await b.get_item(ns, "k", time.time())
        assert got == row
        assert (got.value, got.metadata, got.text) == (value, meta, "t\x00ext é")
        texts = await b.texts_of([(ns, "k")])
        assert texts[(ns, "k")].split() == ["nul", "word", "text"]
        found = await b.matching_keys(ns, [Condition("metadata", "s", "=", "a b")], time.time())
        assert found == [(ns, "k")]


# Search -------------------------------------------------------------------------------

META_VALUES: list[Any] = [
    True,
    False,
    0,
    1,
    -3,
    2**60 + 1,
    0.1,
    1.5,
    -2.25,
    1e16,
    "",
    "a",
    "B",
    "é",
    "中",
    "10",
    None,
    [1],
    {"a": 1},
]


async def test_matching_keys_follow_row_matches_exactly(postgres_url: str) -> None:
    ns = ns_()
    rng = random.Random(7)
    async with opened(postgres_url) as (b,):
        now = time.time()
        ops = []
        for i in range(80):
            meta: dict[str, Any] = {}
            for field in ("f", "g"):
                if rng.random() < 0.85:
                    meta[field] = rng.choice(META_VALUES)
            ops.append(
                put(
                    f"{ns}/{'ab'[i % 2]}",
                    f"k{i:02d}",
                    i,
                    metadata=orjson.dumps(meta),
                    index_text=f"doc {i}",
                    expires_at=now - 1 if i % 17 == 0 else None,
                )
            )
        await b.write_items(ops, author="t", now=now - 2, history_limit=1)
        await b.write_items(
            [put(f"{ns}/a", "other", 0, metadata=b'{"f": 1}', index_text="x")],
            author="someone",
            now=now - 1,
            history_limit=1,
        )
        keys = [(op.namespace, op.key) for op in ops] + [(f"{ns}/a", "other")]
        rows = await b.get_items(keys, now)
        scalars = [v for v in META_VALUES if v is not None and not isinstance(v, list | dict)]
        checked = 0
        for _ in range(250):
            conds: list[Condition] = []
            for _ in range(rng.randint(1, 2)):
                kind = rng.choice(["metadata"] * 6 + ["author", "updated_at"])
                op = rng.choice(["=", "in", ">", ">=", "<", "<="])
                name: str | None
                pool: list[Any]
                if kind == "metadata":
                    name = rng.choice(["f", "g", "missing"])
                    pool = scalars
                elif kind == "author":
                    name, pool = None, ["t", "someone", "s", "u", 3]
                else:
                    name, pool = None, [now - 2, now - 1.5, now - 1, 0, now]
                if op == "in":
                    value: Any = tuple(rng.sample(pool, rng.randint(1, 4)))
                else:
                    value = rng.choice(pool)
                conds.append(Condition(kind, name, op, value))
            for prefix in (ns, f"{ns}/a"):
                got = sorted(await b.matching_keys(prefix, conds, now))
                want = sorted(
                    (r.namespace, r.key)
                    for r in rows
                    if row_matches(r, conds)
                    and (r.namespace == prefix or r.namespace.startswith(prefix + "/"))
                )
                assert got == want, conds
                checked += len(want)
        assert checked > 100


async def test_search_lexical_terms_are_never_query_syntax(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url) as (b,):
        now = time.time()
        docs = {
            "a": "the quick brown fox jumps",
            "b": "foxes and hounds: quick, quick!",
            "c": "nothing to see here",
            "d": "a fox expired",
        }
        ops = [put(ns, k, k, index_text=t) for k, t in docs.items()]
        ops[3] = put(ns, "d", "d", index_text=docs["d"], expires_at=now - 1)
        await b.write_items(ops, author="t", now=now - 2, history_limit=1)
        hits = await b.search_lexical(ns, ["quick", "fox"], [], 10, now)
        assert [k for _, k, _ in hits] == ["b", "a"]
        assert hits[0][2] > hits[1][2] > 0
        assert [k for _, k, _ in await b.search_lexical(ns, ["quick", "fox"], [], 1, now)] == ["b"]
        for term in ["fox:*", "fox & !quick", "'", "\\", "a|b", "<->", "(", "", "!"]:
            await b.search_lexical(ns, [term], [], 10, now)  # no syntax error
        assert await b.search_lexical(ns, ["qu:*"], [], 10, now) == []
        assert await b.search_lexical(f"{ns}x", ["fox"], [], 10, now) == []
        cond = Condition("metadata", "nope", "=", 1)
        assert await b.search_lexical(ns, ["fox"], [cond], 10, now) == []


async def test_engine_lexical_search_through_a_hive(postgres_url: str) -> None:
    ns = ns_()
    settings = Settings(embedder="none", lexical_index="engine")
    hive = hivemem.connect(postgres_url, agent="t", settings=settings)
    await hive.open()
    try:
        await hive.put(ns, "car", "the red sports car needs new tyres")
        await hive.put(ns, "cat", "the cat sleeps")
        hits = await hive.search(ns, "sports car tyres", mode="lexical")
        assert [h.item.key for h in hits] == ["car"]
    finally:
        await hive.close()


async def test_vectors_round_trip_as_float32_bytes(postgres_url: str) -> None:
    ns = ns_()
    rng = np.random.default_rng(3)
    async with opened(postgres_url) as (b,):
        vectors = {
            f"k{i}": rng.standard_normal(5 + i % 2).astype("<f4").tobytes() for i in range(6)
        }
        ops = [put(ns, k, 1, index_text="t", vector=v, model="m") for k, v in vectors.items()]
        ops.append(put(ns, "plain", 1, index_text="t"))
        rows = await b.write_items(ops, author="t", now=time.time(), history_limit=1)
        loaded = {k: v for n, k, v in await b.load_vectors("m") if n == ns}
        assert loaded == vectors
        assert await b.vectors_of([(ns, "k1"), (ns, "plain"), (ns, "zz")], "m") == {
            (ns, "k1"): vectors["k1"]
        }
        assert await b.vectors_of([(ns, "k1")], "other") == {}
        # set_index stores only entries still at their version.
        assert isinstance(rows[0], ItemRow)
        new = rng.standard_normal(4).astype("<f4").tobytes()
        stale = IndexEntry(ns, "k0", rows[0].version + 1, "t", new, "m2")
        fresh = IndexEntry(ns, "k0", rows[0].version, "t", new, "m2")
        assert await b.set_index([stale], time.time()) == 0
        assert await b.set_index([fresh], time.time()) == 1
        assert await b.vectors_of([(ns, "k0")], "m2") == {(ns, "k0"): new}
        pending = await b.unindexed_items("m", (ns, ""), 100, time.time())
        assert [r.key for r in pending if r.namespace == ns] == ["k0", "plain"]
        # A deferred entry (model named, no vector) waits in exactly one part until set.
        await b.write_items(
            [put(ns, "later", 1, index_text="t", model="m3")],
            author="t",
            now=time.time(),
            history_limit=1,
        )
        parts = [await b.pending_vectors("m3", p, 4, 100, time.time()) for p in range(4)]
        assert sorted(r.key for rows in parts for r in rows if r.namespace == ns) == ["later"]
        waiting, oldest = await b.pending_count("m3", time.time())
        assert waiting >= 1 and oldest is not None
        assert await b.set_index([IndexEntry(ns, "later", 1, "t", new, "m3")], time.time()) == 1
        parts = [await b.pending_vectors("m3", p, 4, 100, time.time()) for p in range(4)]
        assert not [r for rows in parts for r in rows if r.namespace == ns]
        events, _ = await b.read_events(ns, None, 100)
        assert [(e.type, e.key) for e in events if e.type == "item.indexed"] == [
            ("item.indexed", "k0"),
            ("item.indexed", "later"),
        ]


# Schema -------------------------------------------------------------------------------


def schema_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM hivemem_schema ORDER BY 1")]


async def test_replicas_starting_together_migrate_once(fresh_url: str) -> None:
    async with opened(fresh_url, 6) as backends:
        await backends[0].write_items(
            [put("m", "k", 1)], author="t", now=time.time(), history_limit=1
        )
        assert await backends[5].get_item("m", "k", time.time()) is not None
    assert schema_versions(fresh_url) == list(range(1, len(pg_schema.MIGRATIONS) + 1))
    async with opened(fresh_url) as (b,):  # reopening applies nothing
        assert await b.head() == "1"
    assert schema_versions(fresh_url) == list(range(1, len(pg_schema.MIGRATIONS) + 1))


async def test_new_migrations_apply_in_order_all_or_nothing(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = list(pg_schema.MIGRATIONS)
    async with opened(fresh_url):
        pass
    broken = [*base, "CREATE TABLE hivemem_extra (x int)", "SELECT * FROM no_such_table"]
    monkeypatch.setattr(pg_schema, "MIGRATIONS", broken)
    backend = PostgresBackend.from_url(fresh_url, SETTINGS)
    with pytest.raises(Unavailable, match="no_such_table"):
        await backend.open()
    await backend.close()
    assert schema_versions(fresh_url) == list(range(1, len(base) + 1))
    with psycopg.connect(fresh_url) as conn:
        assert conn.execute("SELECT to_regclass('hivemem_extra')").fetchone() == (None,)
    fixed = [*base, "CREATE TABLE hivemem_extra (x int)", "INSERT INTO hivemem_extra VALUES (7)"]
    monkeypatch.setattr(pg_schema, "MIGRATIONS", fixed)
    async with opened(fresh_url, 3):
        pass
    assert schema_versions(fresh_url) == list(range(1, len(base) + 3))
    with psycopg.connect(fresh_url) as conn:
        assert conn.execute("SELECT x FROM hivemem_extra").fetchall() == [(7,)]


# Notifications and failures ---------------------------------------------------------


async def wait_for_generation(b: PostgresBackend, generation: int, within: float) -> None:
    deadline = time.monotonic() + within
    while b.changes.generation == generation:
        assert time.monotonic() < deadline, "no change notification arrived"
        await b.changes.wait(generation, 0.05)


async def test_a_commit_in_another_replica_wakes_watchers(postgres_url: str) -> None:
    ns = ns_()
    async with opened(postgres_url, 2) as (a, b):
        generation = a.changes.generation
        await b.publish(ns, b"1", author="t", now=time.time())
        await wait_for_generation(a, generation, 2.0)
        # The listening connection dies; it comes back and still wakes watchers.
        with psycopg.connect(admin_url(postgres_url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            )
        await asyncio.sleep(0.5)
        generation = a.changes.generation
        await b.publish(ns, b"2", author="t", now=time.time())
        await wait_for_generation(a, generation, 5.0)


async def test_a_watcher_in_one_replica_sees_another_replicas_write_at_once(
    postgres_url: str,
) -> None:
    """With the safety poll a minute away, only the notification can wake the watcher."""
    ns = ns_()
    slow_poll = Settings(embedder="none", feed_poll_seconds=60)
    a = hivemem.connect(postgres_url, agent="a", settings=slow_poll)
    b = hivemem.connect(postgres_url, agent="b", settings=slow_poll)
    await a.open()
    await b.open()
    try:
        async with contextlib.aclosing(a.watch(ns)) as events:
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.3)  # the watcher has read the head and waits
            started = time.monotonic()
            await b.put(ns, "k", 1)
            event = await asyncio.wait_for(first, 10)
            assert time.monotonic() - started < 2.0
            assert (event.type, event.key, event.author) == ("item.put", "k", "b")
    finally:
        await a.close()
        await b.close()


async def test_server_gone_is_unavailable_and_the_pool_recovers() -> None:
    # A database name of its own: once killed, its port may be taken by another test
    # process's server, which must not answer for it.
    with PostgresServer(database=f"gone{uuid.uuid4().hex[:8]}") as server:
        async with opened(server.url) as (b,):
            await b.write_items([put("x", "k", 1)], author="t", now=time.time(), history_limit=1)
            server.kill9()
            # A pooled connection's backend can outlive the postmaster by a moment (on a
            # busy machine, past kill9's wait): the ping must fail soon, not at once.
            deadline = time.monotonic() + 5
            while True:
                try:
                    await b.ping()
                except Unavailable:
                    break
                assert time.monotonic() < deadline, "the store still answers 5 s after a kill"
                await asyncio.sleep(0.05)
            with pytest.raises(Unavailable):
                await b.get_item("x", "k", time.time())
            with pytest.raises(Unavailable):
                await b.write_items(
                    [put("x", "k", 2)], author="t", now=time.time(), history_limit=1
                )
            server.restart()
            await b.ping()
            (row,) = await b.write_items(
                [put("x", "k", 3)], author="t", now=time.time(), history_limit=1
            )
            assert isinstance(row, ItemRow) and row.version == 2
            assert (await b.read_events("", "0", 10))[1] == "2"


def test_package_exports_the_backend() -> None:
    assert pg_package.PostgresBackend is PostgresBackend


# Session TTL and key prefixes (the behaviour on every SQL engine: test_sqlite_store.py) ----


async def test_an_existing_database_migrates_and_its_sessions_never_expire(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = list(pg_schema.MIGRATIONS)
    monkeypatch.setattr(pg_schema, "MIGRATIONS", migrations[:2])
    async with opened(fresh_url):
        pass
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hivemem_sessions (id, app, created_by, metadata, state, state_version, "
            "messages, turns, tokens_in, tokens_out, cost, started_at, last_activity_at) "
            "VALUES ('old', 'app', 't', '{}', '{}', 0, 0, 0, 0, 0, 0, 1, 1)"
        )
    monkeypatch.setattr(pg_schema, "MIGRATIONS", migrations)
    async with opened(fresh_url) as (b,):
        row = await b.get_session("old")
        assert row is not None and row.ttl is None
        now = time.time()
        assert [r.id for r in await b.list_sessions("app", None, None, None, 10, now)] == ["old"]
        assert await b.sweep(now, 0.0, 0.0) == (0, 0)
    assert schema_versions(fresh_url) == list(range(1, len(migrations) + 1))


async def explain(b: PostgresBackend, sql: str, args: Any) -> str:
    async def run(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> str:
        cur = await c.execute(f"EXPLAIN {sql}", args)
        return "\n".join(str(r[0]) for r in await cur.fetchall())

    return await b._engine.read(run)


async def test_the_sweep_finds_expired_sessions_through_their_index(fresh_url: str) -> None:
    async with opened(fresh_url) as (b,):
        with psycopg.connect(fresh_url, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO hivemem_sessions ({pg_schema.SESSION_COLS}) SELECT 's' || i, 'app', "
                "NULL, NULL, 't', '{}', '{}', 0, 0, 0, 0, 0, 0, 1, 1, "
                "CASE WHEN i % 1000 = 0 THEN 10 END FROM generate_series(1, 5000) AS i"
            )
            conn.execute("ANALYZE hivemem_sessions")
        plan = await explain(b, pg_backend.EXPIRE_SESSIONS, {"now": 100.0, "batch": 1000})
        assert "hivemem_sessions_expiry" in plan, plan
        expired, _ = await b.sweep(100.0, 0.0, 0.0)
        assert expired == 5


async def test_a_key_prefix_listing_is_one_range_of_the_primary_key(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement list_items sends, explained: the key range is an index condition
    on hivemem_items_pkey (text parameters compare with the columns' COLLATE "C")."""
    ns = ns_()
    async with opened(postgres_url) as (b,):
        now = time.time()
        for start in range(0, 2000, 500):
            await b.write_items(
                [put(ns, f"k{i:05d}", i) for i in range(start, start + 500)],
                author="t",
                now=now,
                history_limit=0,
            )
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("ANALYZE hivemem_items")
        sent: list[tuple[str, Any]] = []
        read = b._engine.read

        async def recording(fn: Any, wait: float | None = None) -> Any:
            async def run(c: Any) -> Any:
                class Recorder:
                    async def execute(self, sql: str, args: Any = None, **kw: Any) -> Any:
                        sent.append((sql, args))
                        return await c.execute(sql, args, **kw)

                return await fn(Recorder())

            return await read(run, wait)

        monkeypatch.setattr(b._engine, "read", recording)
        rows = await b.list_items(ns, (ns, "k00100"), 3, now, key_prefix="k001")
        assert [r.key for r in rows] == ["k00101", "k00102", "k00103"]
        monkeypatch.setattr(b._engine, "read", read)
        ((sql, args),) = sent
        plan = await explain(b, sql, args)
    # A plain or a bitmap index scan, as the planner's statistics of the shared table
    # have it: either way the range is the primary key's index condition.
    assert re.search(r"(Index Scan using|Bitmap Index Scan on) hivemem_items_pkey", plan), plan
    (cond,) = [line for line in plan.splitlines() if "Index Cond" in line]
    assert "key >=" in cond and "key <" in cond, plan


async def test_a_sweep_racing_appends_leaves_each_session_whole_or_gone(fresh_url: str) -> None:
    """Each append either wins (the session lives on, its messages counted) or finds the
    session expired and swept (NotFound); no message outlives its session."""
    t0 = time.time()
    async with opened(fresh_url, 2) as (a, b):
        rows = [
            SessionRow(
                f"s{i:03d}", "app", None, None, "t", b"{}", b"{}", 0, 0, 0, 0, 0, 0.0, t0, t0, 10.0
            )
            for i in range(40)
        ]
        for row in rows:
            await a.create_session(row)
        msg = NewMessage("user", b'"x"', 0, 0, 0.0, b"{}")

        async def append(session_id: str) -> bool:
            try:
                await a.append_messages(session_id, [msg], author="t", now=t0 + 9.9)
            except hivemem.NotFound:
                return False
            return True

        async def sweeps() -> int:
            swept = 0
            for _ in range(5):
                swept += (await b.sweep(t0 + 10.5, 0.0, 0.0))[0]
                await asyncio.sleep(0)
            return swept

        *appended, swept = await asyncio.gather(*(append(r.id) for r in rows), sweeps())
        swept += (await b.sweep(t0 + 10.5, 0.0, 0.0))[0]
        assert swept == appended.count(False)
        for row, kept in zip(rows, appended, strict=True):
            found = await a.get_session(row.id)
            assert (found is not None) == kept
            if found is not None:
                assert found.messages == 1 and found.last_activity_at == t0 + 9.9
    with psycopg.connect(fresh_url) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM hivemem_messages m WHERE NOT EXISTS "
            "(SELECT 1 FROM hivemem_sessions s WHERE s.id = m.session_id)"
        ).fetchone()
    assert orphans == (0,)


# Retries --------------------------------------------------------------------------------


@pytest.fixture
def flaky(postgres_url: str) -> Iterator[str]:
    """The name of a new SQL function ``<name>(n)`` that raises a serialisation failure
    (40001) on its first n calls, then returns the number of calls; the sequence
    ``<name>_calls`` counts them (it survives the rollbacks)."""
    name = f"flaky_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SEQUENCE {name}_calls")
        conn.execute(
            f"CREATE FUNCTION {name}(n int) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN "
            f"IF nextval('{name}_calls') <= n THEN "
            "RAISE EXCEPTION 'serialisation failure' USING ERRCODE = '40001'; END IF; "
            f"RETURN currval('{name}_calls'); END $$"
        )
    try:
        yield name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP FUNCTION {name}(int)")
            conn.execute(f"DROP SEQUENCE {name}_calls")


def calls(url: str, flaky: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT last_value FROM {flaky}_calls").fetchone()
    return int(row[0]) if row else 0


async def test_an_aborted_statement_is_retried_until_it_commits(
    postgres_url: str, flaky: str
) -> None:
    async with opened(postgres_url) as (b,):
        assert await b._engine.write_one(f"SELECT {flaky}(%(n)s)", {"n": 3}) == (4,)


async def test_an_aborted_transaction_is_retried_until_it_commits(
    postgres_url: str, flaky: str
) -> None:
    async def fn(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
        cur = await c.execute(f"SELECT {flaky}(3)")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async with opened(postgres_url) as (b,):
        assert await b._engine.write(fn) == 4


async def test_writes_aborted_every_time_are_unavailable_after_the_budget(
    postgres_url: str, flaky: str
) -> None:
    attempts = pg_engine.WRITE_RETRIES + 1

    async def fn(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        await (await c.execute(f"SELECT {flaky}(1000)")).fetchone()

    async with opened(postgres_url) as (b,):
        with pytest.raises(Unavailable, match=f"aborted {attempts} times"):
            await b._engine.write_one(f"SELECT {flaky}(1000)", {})
        assert calls(postgres_url, flaky) == attempts
        with pytest.raises(Unavailable, match=f"aborted {attempts} times"):
            await b._engine.write(fn)
        assert calls(postgres_url, flaky) == 2 * attempts


async def test_a_connection_lost_before_the_commit_is_retried_once_on_a_new_one(
    postgres_url: str,
) -> None:
    kill = "SELECT pg_terminate_backend(pg_backend_pid())"
    async with opened(postgres_url) as (b,):
        pids: list[int] = []

        async def dies_once(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
            pids.append(c.info.backend_pid)
            if len(pids) == 1:
                await (await c.execute(kill)).fetchone()
            return len(pids)

        assert await b._engine.write(dies_once) == 2
        assert pids[0] != pids[1]

        async def always_dies(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
            pids.append(c.info.backend_pid)
            await (await c.execute(kill)).fetchone()

        with pytest.raises(Unavailable):
            await b._engine.write(always_dies)
        assert len(pids) == 4
        await b.ping()  # the pool recovers


async def test_a_connection_lost_while_committing_is_not_retried(postgres_url: str) -> None:
    """In pipeline mode the unfetched statement goes out with the COMMIT: the connection
    dies then, and whether the transaction committed is unknown."""
    async with opened(postgres_url) as (b,):
        pids: list[int] = []

        async def dies_committing(c: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
            pids.append(c.info.backend_pid)
            await c.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(Unavailable):
            await b._engine.write(dies_committing)
        assert len(pids) == 1
        await b.ping()
