"""Key-prefix listings and session TTL at the backend level (backends/base.py), the same
on SQLite (private memory and a file) and PostgreSQL (the session's database, or a new
one for a test that sweeps); then what is SQLite's own: the migration of an existing
file and the plans of the new queries."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psycopg
import pytest

from hivemem import open_backend
from hivemem.backends.base import Backend
from hivemem.backends.rows import NewMessage, PutWrite, SessionRow, session_expired
from hivemem.backends.sqlite import backend as sqlite_backend
from hivemem.backends.sqlite.schema import MIGRATIONS
from hivemem.config import Settings
from hivemem.errors import Conflict, NotFound

#: NORMAL: these tests are not about durability, and each fsync costs a busy disk dearly.
SETTINGS = Settings(embedder="none", sqlite_synchronous="NORMAL")
KINDS = ["sqlite-memory", "sqlite-file", "postgres"]


@contextlib.asynccontextmanager
async def opened(
    request: pytest.FixtureRequest, tmp_path: Path, *, own_database: bool
) -> AsyncIterator[Backend]:
    """An opened backend of kind ``request.param``: SQLite stores are new; PostgreSQL's
    is the session's database, or with ``own_database`` a new one (for the tests whose
    sweep must touch no other test's rows)."""
    dropped: str | None = None
    if request.param == "sqlite-memory":
        url = "sqlite://:memory:"
    elif request.param == "sqlite-file":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        admin = url.rsplit("/", 1)[0] + "/postgres"
        if own_database:
            dropped = f"t_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{dropped}"')
            url = url.rsplit("/", 1)[0] + f"/{dropped}"
    backend = open_backend(url, SETTINGS)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
        if dropped is not None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{dropped}" WITH (FORCE)')


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A backend; tests name their namespaces, sessions and apps uniquely."""
    async with opened(request, tmp_path, own_database=False) as backend:
        yield backend


@pytest.fixture(params=KINDS)
async def own_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A backend holding nothing but what the test writes."""
    async with opened(request, tmp_path, own_database=True) as backend:
        yield backend


def unique() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def put(ns: str, key: str, *, expires_at: float | None = None) -> PutWrite:
    return PutWrite(ns, key, orjson.dumps(key), None, None, expires_at, None)


async def keys_of(
    store: Backend,
    ns: str,
    key_prefix: str,
    now: float,
    *,
    limit: int = 100,
    after: tuple[str, str] | None = None,
) -> list[str]:
    rows = await store.list_items(ns, after, limit, now, key_prefix=key_prefix)
    assert {r.namespace for r in rows} <= {ns}
    return [r.key for r in rows]


# list_items(key_prefix=) ----------------------------------------------------------------


async def test_key_prefix_lists_only_that_namespaces_keys_starting_with_it(
    store: Backend,
) -> None:
    now, ns = time.time(), unique()
    writes = [put(ns, k) for k in ("a", "aa", "ab", "ab/x", "abc", "ac", "b")]
    writes += [put(f"{ns}/sub", "ab1"), put(f"{ns}2", "ab2"), put(ns[:-1], "ab3")]
    await store.write_items(writes, author="t", now=now, history_limit=1)
    assert await keys_of(store, ns, "ab", now) == ["ab", "ab/x", "abc"]
    assert await keys_of(store, ns, "", now) == ["a", "aa", "ab", "ab/x", "abc", "ac", "b"]
    assert await keys_of(store, ns, "z", now) == []


async def test_key_prefix_leaves_out_expired_items(store: Backend) -> None:
    now, ns = time.time(), unique()
    writes = [put(ns, "k1"), put(ns, "k2", expires_at=now + 5), put(ns, "k3")]
    await store.write_items(writes, author="t", now=now, history_limit=1)
    assert await keys_of(store, ns, "k", now) == ["k1", "k2", "k3"]
    assert await keys_of(store, ns, "k", now + 5) == ["k1", "k3"]


async def test_key_prefix_pages_after_a_cursor(store: Backend) -> None:
    now, ns = time.time(), unique()
    keys = [f"p{i:02d}" for i in range(7)]
    await store.write_items(
        [put(ns, k) for k in [*keys, "q"]], author="t", now=now, history_limit=1
    )
    pages: list[list[str]] = []
    after: tuple[str, str] | None = None
    while page := await keys_of(store, ns, "p", now, limit=3, after=after):
        pages.append(page)
        after = (ns, page[-1])
    assert pages == [keys[:3], keys[3:6], keys[6:]]


async def test_key_prefix_compares_code_points_not_a_locale(store: Backend) -> None:
    """Keys a locale would interleave (case, punctuation, accents) come back in code
    point order, and the bound past the prefix is exact at the top of the range."""
    now, ns = time.time(), unique()
    keys = ["aB", "a_1", "a-", "ab", "ab\x7f", "ab\uffff", "ab\U0010ffff", "ac", "Ab", "é", "e"]
    top = ["\U0010ffff", "\U0010ffffz", "\U0010fffe"]
    await store.write_items([put(ns, k) for k in keys + top], author="t", now=now, history_limit=1)
    assert await keys_of(store, ns, "a", now) == sorted(k for k in keys if k[0] == "a")
    assert await keys_of(store, ns, "ab", now) == ["ab", "ab\x7f", "ab\uffff", "ab\U0010ffff"]
    assert await keys_of(store, ns, "e", now) == ["e"]
    assert await keys_of(store, ns, "\U0010ffff", now) == ["\U0010ffff", "\U0010ffffz"]


# Session TTL --------------------------------------------------------------------------


def session(now: float, ttl: float | None, **kw: str | None) -> SessionRow:
    return SessionRow(
        id=kw.get("id") or f"s{uuid.uuid4().hex[:12]}",
        app=kw.get("app") or "app",
        user=kw.get("user"),
        agent=None,
        created_by="t",
        metadata=b"{}",
        state=b"{}",
        state_version=0,
        messages=0,
        turns=0,
        tokens_in=0,
        tokens_out=0,
        cost=0.0,
        started_at=now,
        last_activity_at=now,
        ttl=ttl,
    )


MESSAGE = NewMessage("user", b'"hi"', 1, 0, 0.0, b"{}")


async def session_events(store: Backend, session_id: str) -> list[tuple[str, str]]:
    rows, _ = await store.read_events(f"_sessions/{session_id}", None, 100)
    return [(r.type, r.author) for r in rows]


async def test_a_session_keeps_its_ttl(store: Backend) -> None:
    now = time.time()
    with_ttl = await store.create_session(session(now, 30.0))
    without = await store.create_session(session(now, None))
    assert with_ttl.ttl == 30.0 and without.ttl is None
    assert await store.get_session(with_ttl.id) == with_ttl
    assert await store.get_session(without.id) == without


async def test_appends_and_state_saves_slide_the_expiry(store: Backend) -> None:
    t0 = time.time()
    row = await store.create_session(session(t0, 10.0))
    await store.append_messages(row.id, [MESSAGE], author="t", now=t0 + 8)
    saved = await store.save_state(row.id, b'{"n":1}', None, author="t", now=t0 + 17)
    assert saved.last_activity_at == t0 + 17 and not session_expired(saved, t0 + 26)
    await store.append_messages(row.id, [MESSAGE], author="t", now=t0 + 26)
    found = await store.get_session(row.id)
    assert found is not None
    assert (found.messages, found.state_version, found.last_activity_at) == (2, 1, t0 + 26)


async def test_an_expired_session_refuses_appends_and_saves_and_writes_nothing(
    store: Backend,
) -> None:
    t0 = time.time()
    row = await store.create_session(session(t0, 10.0))
    with pytest.raises(NotFound) as info:
        await store.append_messages(row.id, [MESSAGE], author="t", now=t0 + 10)  # the boundary
    assert info.value.field == "session_id"
    with pytest.raises(NotFound):
        await store.save_state(row.id, b'{"n":1}', 0, author="t", now=t0 + 11)
    with pytest.raises(NotFound):
        await store.save_state(row.id, b'{"n":1}', None, author="t", now=t0 + 11)
    assert await store.get_session(row.id) == row
    assert await session_events(store, row.id) == [("session.created", "t")]


async def test_a_live_sessions_stale_state_save_is_a_conflict(store: Backend) -> None:
    now = time.time()
    row = await store.create_session(session(now, 10.0))
    with pytest.raises(Conflict) as info:
        await store.save_state(row.id, b"{}", 3, author="t", now=now + 1)
    assert (info.value.field, info.value.current_version) == ("if_version", 0)


async def test_reading_an_expired_sessions_messages_is_not_found(store: Backend) -> None:
    """read_messages judges expiry at the ``now`` it is given."""
    now = time.time()
    live = await store.create_session(session(now - 100, 1000.0))
    expired = await store.create_session(session(now - 100, 50.0))
    for row in (live, expired):
        await store.append_messages(row.id, [MESSAGE], author="t", now=now - 99)
    assert [m.seq for m in await store.read_messages(live.id, 0, 10, now)] == [1]
    with pytest.raises(NotFound):
        await store.read_messages(expired.id, 0, 10, now)
    # The same session read as of a time before it expired.
    assert [m.seq for m in await store.read_messages(expired.id, 0, 10, now - 60)] == [1]


async def test_deleting_an_expired_session_finds_nothing_and_writes_nothing(
    store: Backend,
) -> None:
    t0 = time.time()
    row = await store.create_session(session(t0, 10.0))
    assert await store.delete_session(row.id, author="t", now=t0 + 10) is False
    assert await store.get_session(row.id) == row
    assert await session_events(store, row.id) == [("session.created", "t")]
    assert await store.delete_session(row.id, author="t", now=t0 + 9) is True
    assert await store.get_session(row.id) is None


async def test_listing_leaves_out_expired_sessions(store: Backend) -> None:
    t0 = time.time()
    app = unique()
    rows = [
        await store.create_session(session(t0, ttl, app=app, user="u"))
        for ttl in (None, 10.0, 20.0)
    ]
    ids = sorted(r.id for r in rows)

    async def listed(now: float, user: str | None = None, after: str | None = None) -> list[str]:
        return [r.id for r in await store.list_sessions(app, user, None, after, 100, now)]

    assert await listed(t0 + 9) == ids
    assert await listed(t0 + 9, after=ids[0]) == ids[1:]
    assert await listed(t0 + 10) == sorted([rows[0].id, rows[2].id])
    assert await listed(t0 + 10, user="u") == sorted([rows[0].id, rows[2].id])
    assert await listed(t0 + 25) == [rows[0].id]


async def test_sweep_deletes_expired_sessions_with_their_messages_and_events(
    own_store: Backend,
) -> None:
    store = own_store
    t0 = time.time()
    forever = await store.create_session(session(t0, None))
    short = await store.create_session(session(t0, 10.0))
    long = await store.create_session(session(t0, 100.0))
    for row in (forever, short, long):
        await store.append_messages(row.id, [MESSAGE, MESSAGE], author="t", now=t0 + 1)
    await store.write_items(
        [put("ns", "k", expires_at=t0 + 5)], author="t", now=t0, history_limit=1
    )
    expired, _ = await store.sweep(t0 + 11, 0.0, 0.0)
    assert expired == 2  # the item and the short session
    assert await store.get_session(short.id) is None
    assert await session_events(store, short.id) == [
        ("session.created", "t"),
        ("session.messages", "t"),
        ("session.expired", "hivemem"),
    ]
    for row in (forever, long):
        assert [m.seq for m in await store.read_messages(row.id, 0, 10, t0 + 11)] == [1, 2]
    assert await store.sweep(t0 + 11, 0.0, 0.0) == (0, 0)
    # The id is free again, and the old messages are gone with the session.
    again = await store.create_session(session(t0 + 12, None, id=short.id))
    assert await store.read_messages(again.id, 0, 10, t0 + 12) == []


async def test_an_expired_session_holds_its_id_until_swept(store: Backend) -> None:
    t0 = time.time() - 100
    row = await store.create_session(session(t0, 10.0))
    with pytest.raises(Conflict) as info:
        await store.create_session(session(t0 + 50, None, id=row.id))
    assert info.value.field == "session_id"


async def test_expiry_rests_on_the_stored_ttl_alone(own_store: Backend) -> None:
    """A session without ttl never expires, however long idle; the sweep leaves it."""
    store = own_store
    t0 = time.time()
    row = await store.create_session(session(t0, None))
    far = t0 + 10 * 365 * 86400
    assert [r.id for r in await store.list_sessions("app", None, None, None, 100, far)] == [row.id]
    assert await store.sweep(far, 0.0, 0.0) == (0, 0)
    await store.append_messages(row.id, [MESSAGE], author="t", now=far)


# SQLite's own -------------------------------------------------------------------------


async def test_an_existing_file_migrates_and_its_sessions_never_expire(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    for number, script in enumerate(MIGRATIONS[:4], start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version={number}")
    cols = "id, app, created_by, metadata, state, state_version, messages, turns, tokens_in"
    cols += ", tokens_out, cost, started_at, last_activity_at"
    conn.execute(
        f"INSERT INTO sessions ({cols}) VALUES ('old', 'app', 't', x'7b7d', x'7b7d', "
        "0, 0, 0, 0, 0, 0.0, 1.0, 1.0)"
    )
    conn.close()
    backend = open_backend(f"sqlite:///{path}", SETTINGS)
    await backend.open()
    try:
        row = await backend.get_session("old")
        assert row is not None and row.ttl is None
        now = time.time()
        assert [r.id for r in await backend.list_sessions("app", None, None, None, 10, now)] == [
            "old"
        ]
        assert await backend.sweep(now, 0.0, 0.0) == (0, 0)
    finally:
        await backend.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


def query_plan(sql: str, args: tuple[object, ...]) -> str:
    conn = sqlite3.connect(":memory:")
    for script in MIGRATIONS:
        conn.executescript(script)
    return " ".join(str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def test_the_sweep_finds_expired_sessions_through_their_index() -> None:
    plan = query_plan(sqlite_backend.EXPIRED_SESSIONS, (1.0, 10))
    assert "USING INDEX sessions_expiry" in plan


async def test_a_key_prefix_listing_is_one_range_of_the_primary_key(tmp_path: Path) -> None:
    one_reader = SETTINGS.model_copy(update={"sqlite_readers": 1})  # the traced connection
    backend = open_backend(f"sqlite:///{tmp_path / 'plan.db'}", one_reader)
    assert isinstance(backend, sqlite_backend.SqliteBackend)
    await backend.open()
    statements: list[str] = []
    try:
        await backend.write_items([put("ns", "ab")], author="t", now=1.0, history_limit=1)

        def traced(c: sqlite3.Connection) -> None:
            c.set_trace_callback(statements.append)

        await backend._engine.read(traced)
        rows = await backend.list_items("ns", ("ns", "a"), 10, 1.0, key_prefix="a")
        await backend._engine.read(lambda c: c.set_trace_callback(None))
    finally:
        await backend.close()
    assert [r.key for r in rows] == ["ab"]
    (listing,) = [s for s in statements if s.startswith("SELECT") and "FROM items" in s]
    plan = query_plan(listing, ())
    assert "USING INDEX sqlite_autoindex_items_1 (ns=? AND key>? AND key<?)" in plan


async def test_a_write_whose_caller_gave_up_leaves_the_others_of_its_group_answered(
    tmp_path: Path,
) -> None:
    """A cancelled await cancels its job's future; the writer must still answer the jobs
    committed in the same group after it (it used to stop at the cancelled one)."""
    import asyncio
    import threading

    from hivemem.backends.signals import ChangeSignal
    from hivemem.backends.sqlite.engine import SqliteEngine

    engine = SqliteEngine(str(tmp_path / "e.db"), Settings(), ChangeSignal())
    await engine.open()
    try:
        gate = threading.Event()

        def blocked(c: sqlite3.Connection) -> None:
            gate.wait(10)

        def insert(value: int) -> object:
            def run(c: sqlite3.Connection) -> int:
                c.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"t{value}", value))
                return value

            return run

        first = asyncio.create_task(engine.write(blocked))  # holds the writer thread
        await asyncio.sleep(0.1)
        gave_up = asyncio.create_task(engine.write(insert(1)))  # type: ignore[arg-type]
        waiting = asyncio.create_task(engine.write(insert(2)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        gave_up.cancel()  # both queued: they commit in one group after ``first``
        gate.set()
        await first
        assert await asyncio.wait_for(waiting, 5) == 2
        names = await engine.read(
            lambda c: sorted(r[0] for r in c.execute("SELECT name FROM meta WHERE name LIKE 't%'"))
        )
        assert names == ["t1", "t2"]  # the abandoned write ran all the same
    finally:
        await engine.close()


async def test_queued_writes_beyond_one_group_all_commit_with_their_own_outcomes(
    tmp_path: Path,
) -> None:
    """One drain serves the queue (the writer takes up to GROUP_COMMIT_MAX jobs a
    transaction): 600 writes queued behind a held writer commit in groups of at most
    that many, in order, and each caller gets its own outcome (one that raises gets its
    error; the others of its group are committed)."""
    import asyncio
    import threading

    from hivemem.backends.signals import ChangeSignal
    from hivemem.backends.sqlite import engine as engine_module
    from hivemem.backends.sqlite.engine import GROUP_COMMIT_MAX, SqliteEngine

    engine = SqliteEngine(str(tmp_path / "e.db"), Settings(), ChangeSignal())
    await engine.open()
    groups: list[int] = []
    commit_group = SqliteEngine._commit_group

    def counted(self: SqliteEngine, jobs: list[object]) -> None:
        groups.append(len(jobs))
        commit_group(self, jobs)  # type: ignore[arg-type]

    try:
        gate = threading.Event()
        first = asyncio.create_task(engine.write(lambda c: gate.wait(10)))
        await asyncio.sleep(0.1)  # the writer holds ``first``'s group

        def insert(value: int) -> object:
            def run(c: sqlite3.Connection) -> int:
                if value % 97 == 13:
                    raise ValueError(f"job {value} refused")
                c.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"t{value}", value))
                return value

            return run

        engine_module.SqliteEngine._commit_group = counted  # type: ignore[method-assign]
        writes = [asyncio.ensure_future(engine.write(insert(i))) for i in range(600)]  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 30)
    finally:
        engine_module.SqliteEngine._commit_group = commit_group  # type: ignore[method-assign]
    try:
        refused = [i for i in range(600) if i % 97 == 13]
        for i, outcome in enumerate(outcomes):
            if i in refused:
                assert isinstance(outcome, ValueError) and str(outcome) == f"job {i} refused"
            else:
                assert outcome == i
        stored = await engine.read(
            lambda c: [
                r[0]
                for r in c.execute("SELECT value FROM meta WHERE name LIKE 't%' ORDER BY rowid")
            ]
        )
        assert stored == [i for i in range(600) if i not in refused]  # in queue order
        assert sum(groups) == 600 and max(groups) == GROUP_COMMIT_MAX and len(groups) == 3
    finally:
        await engine.close()


async def test_a_read_of_an_in_memory_store_waits_for_one_group_not_the_whole_queue() -> None:
    """An in-memory store's reads run on its writer thread. A read queued behind 600
    writes runs after the first group of them (GROUP_COMMIT_MAX), not after all three:
    the drain of the rest goes back in line behind it."""
    import asyncio
    import threading

    from hivemem.backends.signals import ChangeSignal
    from hivemem.backends.sqlite.engine import GROUP_COMMIT_MAX, SqliteEngine

    engine = SqliteEngine(":memory:", Settings(), ChangeSignal())
    await engine.open()
    try:
        gate = threading.Event()
        first = asyncio.create_task(engine.write(lambda c: gate.wait(10)))
        await asyncio.sleep(0.1)  # the writer thread holds ``first``'s group
        writes = [
            asyncio.ensure_future(
                engine.write(
                    lambda c, i=i: c.execute(
                        "INSERT INTO meta (name, value) VALUES (?, ?)", (f"t{i}", i)
                    )
                )
            )
            for i in range(600)
        ]
        await asyncio.sleep(0.05)  # all 600 queued, and one drain for them
        read = asyncio.ensure_future(
            engine.read(lambda c: c.execute("SELECT count(*) FROM meta").fetchone()[0])
        )
        await asyncio.sleep(0.05)
        gate.set()
        seen = await asyncio.wait_for(read, 10)
        await asyncio.wait_for(asyncio.gather(first, *writes), 30)
        assert seen == GROUP_COMMIT_MAX
    finally:
        await engine.close()
