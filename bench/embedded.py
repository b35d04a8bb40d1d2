"""Sections 1 and 2: the embedded hive against raw sqlite3 on a comparable table.

Both run in this process, on files in the same temporary directory, over the same
key count and the same value. Each operation is a point get or an unconditional put
of one key; keys are visited round-robin so every put replaces an existing row.

The raw sqlite3 table is what the embedded hive must at least do: one row per
(namespace, key) holding the value as JSON text and a version, WAL journal,
``synchronous=FULL``, one transaction per write (autocommit). Its figures are a
floor for our overhead, not a fair fight: the hive also validates input, keeps
history, writes a feed event per change and returns a full :class:`Item`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
from common import Result, run_async_loop, run_sync_loop

__all__ = ["NAMESPACE", "bench_embedded", "bench_sqlite", "make_value"]

NAMESPACE = "bench/items"


def make_value(i: int) -> dict[str, Any]:
    """The value written by every put benchmark: a small JSON object (~120 bytes)."""
    return {"i": i, "kind": "note", "text": "x" * 64, "tags": ["a", "b"], "score": 0.5}


def key_of(i: int) -> str:
    """The i-th key of the key set."""
    return f"k{i:06d}"


async def _preload_hive(hive: Any, keys: int) -> None:
    from hivemem import PutOp

    for start in range(0, keys, 100):
        ops = [
            PutOp(namespace=NAMESPACE, key=key_of(i), value=make_value(i))
            for i in range(start, min(keys, start + 100))
        ]
        await hive.batch(ops)


async def bench_embedded_async(db: Path, keys: int, duration: float, warmup: float) -> list[Result]:
    """LocalHive, async API, one task awaiting one operation at a time."""
    import hivemem

    hive = hivemem.connect(f"sqlite:///{db}", agent="bench")
    results: list[Result] = []
    try:
        await hive.open()
        await _preload_hive(hive, keys)

        async def get(i: int) -> None:
            item = await hive.get(NAMESPACE, key_of(i % keys))
            if item is None:
                raise AssertionError(f"missing {key_of(i % keys)}")

        async def put(i: int) -> None:
            await hive.put(NAMESPACE, key_of(i % keys), make_value(i))

        results.append(
            await run_async_loop("embedded.async.get", "embedded get, async", get, duration, warmup)
        )
        results.append(
            await run_async_loop("embedded.async.put", "embedded put, async", put, duration, warmup)
        )
    finally:
        await hive.close()
    return results


def bench_embedded_sync(db: Path, keys: int, duration: float, warmup: float) -> list[Result]:
    """SyncHive over LocalHive, called from this (main) thread."""
    import hivemem

    results: list[Result] = []
    with hivemem.connect_sync(f"sqlite:///{db}", agent="bench") as hive:
        from hivemem import PutOp

        for start in range(0, keys, 100):
            hive.batch(
                [
                    PutOp(namespace=NAMESPACE, key=key_of(i), value=make_value(i))
                    for i in range(start, min(keys, start + 100))
                ]
            )

        def get(i: int) -> None:
            if hive.get(NAMESPACE, key_of(i % keys)) is None:
                raise AssertionError(f"missing {key_of(i % keys)}")

        def put(i: int) -> None:
            hive.put(NAMESPACE, key_of(i % keys), make_value(i))

        results.append(
            run_sync_loop("embedded.sync.get", "embedded get, SyncHive", get, duration, warmup)
        )
        results.append(
            run_sync_loop("embedded.sync.put", "embedded put, SyncHive", put, duration, warmup)
        )
    return results


def bench_embedded(tmp: Path, keys: int, duration: float, warmup: float) -> list[Result]:
    """Section 1: embedded get/put, async (single task) and through SyncHive.

    Each variant gets its own fresh database file in ``tmp``.
    """
    results = asyncio.run(bench_embedded_async(tmp / "embedded_async.db", keys, duration, warmup))
    results += bench_embedded_sync(tmp / "embedded_sync.db", keys, duration, warmup)
    return results


# Raw sqlite3 ----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID
"""
_UPSERT = (
    "INSERT INTO items (namespace, key, value, version) VALUES (?, ?, ?, 1) "
    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, version = version + 1"
)
_SELECT = "SELECT value, version FROM items WHERE namespace = ? AND key = ?"


def _open_raw(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(_SCHEMA)
    return conn


def bench_sqlite(tmp: Path, keys: int, duration: float, warmup: float) -> list[Result]:
    """Section 2: raw sqlite3 point select and upsert, then the same through a thread hop.

    The thread-hop variant (``asyncio.to_thread`` around the same statement) shows how
    much of an async store's cost is only handing work to a thread and back.
    """
    db = tmp / "raw.db"
    conn = _open_raw(db)
    results: list[Result] = []
    try:
        conn.execute("BEGIN")
        conn.executemany(
            _UPSERT,
            [(NAMESPACE, key_of(i), orjson.dumps(make_value(i)).decode()) for i in range(keys)],
        )
        conn.execute("COMMIT")

        def get(i: int) -> None:
            row = conn.execute(_SELECT, (NAMESPACE, key_of(i % keys))).fetchone()
            if row is None:
                raise AssertionError("missing row")
            orjson.loads(row[0])

        def put(i: int) -> None:
            value = orjson.dumps(make_value(i)).decode()
            conn.execute(_UPSERT, (NAMESPACE, key_of(i % keys), value))

        results.append(run_sync_loop("sqlite.get", "sqlite3 select", get, duration, warmup))
        results.append(run_sync_loop("sqlite.put", "sqlite3 upsert", put, duration, warmup))

        async def threaded() -> list[Result]:
            async def tget(i: int) -> None:
                await asyncio.to_thread(get, i)

            async def tput(i: int) -> None:
                await asyncio.to_thread(put, i)

            return [
                await run_async_loop(
                    "sqlite.thread.get",
                    "sqlite3 select, to_thread",
                    tget,
                    duration,
                    warmup,
                ),
                await run_async_loop(
                    "sqlite.thread.put",
                    "sqlite3 upsert, to_thread",
                    tput,
                    duration,
                    warmup,
                ),
            ]

        results += asyncio.run(threaded())
    finally:
        conn.close()
    return results
