"""Search on SQLite: FTS5 (BM25) for text, float32 vectors as BLOBs beside the items.

The index lives in ``search_docs`` (one row per searchable item: its version, its
text, the model and its vector), written in the same transaction as the item, so
search never sees an item with a stale vector. ``search_fts`` is an FTS5 index over
``search_docs.text`` (external content, rowid = ``search_docs.id``) that lags the
writes: a put records the entry in ``lexical_pending`` (with the text FTS5 holds for
it, which an external-content table needs to remove it), and FTS5 is brought up to
date in batches (:func:`lexical_catch_up`): in the background every
:data:`LEXICAL_BATCH` entries a process marks, and before any lexical search that
finds an entry pending, which also leaves out the entries a write marks while it runs.
So lexical search sees every write acknowledged before it started, while a put writes
three rows instead of FTS5's segment, structure and size records (half the pages of
its commit; bench/README.md, "2026-12-01, night"). Vector similarity itself is
computed in process (see :mod:`hivemem.core.vectors`); this module only stores and
loads vectors.

Invariant: for an id not in ``lexical_pending`` FTS5 holds exactly
``search_docs.text`` (nothing when the row is gone); for an id in it, FTS5 holds
``lexical_pending.old`` (nothing when NULL). FTS5's ``integrity-check`` holds once
nothing is pending (tests/test_sqlite_lexical.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from hivemem.backends.filters import Condition
from hivemem.backends.rows import INDEXED, SYSTEM, IndexEntry, ItemRow, prefix_range
from hivemem.backends.sqlite.engine import SqliteEngine
from hivemem.backends.sqlite.schema import ITEM_COLS, item_row
from hivemem.errors import HivememError

log = logging.getLogger("hivemem.search")

_OPS = {"=": "=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}

#: Entries a process marks pending before it brings FTS5 up to date in the background
#: (one write of its own, about 15 µs per entry against about 100 µs per put when
#: FTS5 was written with each put).
LEXICAL_BATCH = 256
#: Most entries one background catch-up writes in a transaction (it repeats until
#: fewer are pending); a search's catch-up takes them all.
LEXICAL_CATCH_UP_MAX = 4096


def index_put(
    c: sqlite3.Connection,
    namespace: str,
    key: str,
    version: int,
    text: str | None,
    vector: bytes | None,
    model: str | None,
) -> bool:
    """Store (or, when ``text`` is None, remove) the index entry of an item. Returns
    whether its lexical entry was marked pending (FTS5 now lags it)."""
    if text is None:
        return index_remove(c, namespace, key)
    dim = None if vector is None else len(vector) // 4
    found = c.execute(
        "SELECT id, text FROM search_docs WHERE ns = ? AND key = ?", (namespace, key)
    ).fetchone()
    if found is None:
        doc_id = c.execute(
            "INSERT INTO search_docs (ns, key, version, model, dim, vec, text) "
            "VALUES (?,?,?,?,?,?,?) RETURNING id",
            (namespace, key, version, model, dim, vector, text),
        ).fetchone()[0]
        return _mark(c, doc_id, None)
    doc_id, old = found
    c.execute(
        "UPDATE search_docs SET version = ?, model = ?, dim = ?, vec = ?, text = ? WHERE id = ?",
        (version, model, dim, vector, text, doc_id),
    )
    return old != text and _mark(c, doc_id, old)


def index_remove(c: sqlite3.Connection, namespace: str, key: str) -> bool:
    """Remove the index entry of an item, if any. Returns whether its lexical entry was
    marked pending (FTS5 still holds its text)."""
    found = c.execute(
        "DELETE FROM search_docs WHERE ns = ? AND key = ? RETURNING id, text", (namespace, key)
    ).fetchone()
    return found is not None and _mark(c, found[0], found[1])


def _mark(c: sqlite3.Connection, doc_id: int, old: str | None) -> bool:
    """Mark entry ``doc_id`` pending, ``old`` being the text FTS5 holds for it. An entry
    already pending keeps the text it was marked with: FTS5 still holds that one."""
    return (
        c.execute(
            "INSERT OR IGNORE INTO lexical_pending (id, old) VALUES (?, ?)", (doc_id, old)
        ).rowcount
        == 1
    )


def lexical_catch_up(c: sqlite3.Connection, limit: int | None = None) -> int:
    """Bring FTS5 up to date for the pending entries (the oldest ``limit`` of them;
    None: all), inside the caller's write transaction. Returns how many it wrote."""
    sql = (
        "SELECT p.id, p.old, d.text FROM lexical_pending p "
        "LEFT JOIN search_docs d ON d.id = p.id ORDER BY p.id"
    )
    rows = c.execute(sql if limit is None else f"{sql} LIMIT {int(limit)}").fetchall()
    if not rows:
        return 0
    # An external-content table removes a row's terms given the text it indexed.
    c.executemany(
        "INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', ?, ?)",
        [(i, old) for i, old, _ in rows if old is not None],
    )
    c.executemany(
        "INSERT INTO search_fts (rowid, text) VALUES (?, ?)",
        [(i, new) for i, _, new in rows if new is not None],
    )
    c.executemany("DELETE FROM lexical_pending WHERE id = ?", [(i,) for i, _, _ in rows])
    return len(rows)


def _typed_test(column: str, kind_of: str, op: str, value: Any) -> tuple[str, list[Any]]:
    """One typed comparison (semantics of :func:`~hivemem.backends.filters.row_matches`)."""
    if isinstance(value, bool):
        if op != "=":
            return "0", []
        return f"({kind_of} = ?)", ["true" if value else "false"]
    kinds = "('integer','real')" if isinstance(value, int | float) else "('text')"
    return f"({kind_of} IN {kinds} AND {column} {_OPS[op]} ?)", [value]


def _where(prefix: str, conditions: Sequence[Condition], now: float) -> tuple[list[str], list[Any]]:
    """SQL conditions over ``items i`` joined to ``search_docs d``."""
    where = ["(i.expires_at IS NULL OR i.expires_at > ?)"]
    args: list[Any] = [now]
    if prefix:
        where.append("(d.ns = ? OR (d.ns >= ? AND d.ns < ?))")
        args.extend(prefix_range(prefix))
    for cond in conditions:
        if cond.kind == "metadata":
            path = f'$."{cond.field}"'
            column = f"json_extract(CAST(i.metadata AS TEXT), '{path}')"
            kind_of = f"json_type(CAST(i.metadata AS TEXT), '{path}')"
            values = cond.value if cond.op == "in" else (cond.value,)
            op = "=" if cond.op == "in" else cond.op
            tests = [_typed_test(column, kind_of, op, v) for v in values]
            where.append("(" + " OR ".join(t for t, _ in tests) + ")")
            for _, targs in tests:
                args.extend(targs)
            continue
        column = "i.author" if cond.kind == "author" else "i.updated_at"
        if cond.op == "in":
            where.append(f"{column} IN ({','.join('?' * len(cond.value))})")
            args.extend(cond.value)
        else:
            where.append(f"{column} {_OPS[cond.op]} ?")
            args.append(cond.value)
    return where, args


def match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of ``terms`` (each quoted, so no term is syntax)."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


class SearchMixin:
    """The search primitives of :class:`SqliteBackend`."""

    _engine: SqliteEngine
    #: Appends a feed event in the transaction (``SqliteBackend._event``).
    _event: Callable[..., int]
    #: Lexical entries this process marked pending since its last background catch-up
    #: (counted by write jobs under the commit lock, read on the loop: a trigger only).
    _lexical_marks: int = 0
    _lexical_task: asyncio.Task[None] | None = None
    _lexical_closed: bool = False

    def _lexical_due(self) -> None:
        """On the loop: start a background catch-up of FTS5 when this process has marked
        :data:`LEXICAL_BATCH` entries pending since the last one and none runs."""
        if self._lexical_marks < LEXICAL_BATCH or self._lexical_closed:
            return
        if self._lexical_task is None or self._lexical_task.done():
            self._lexical_marks = 0
            self._lexical_task = asyncio.create_task(
                self._lexical_catch_up(), name="hivemem-lexical-catch-up"
            )

    async def _lexical_catch_up(self) -> None:
        try:
            while not self._lexical_closed:
                done = await self._engine.write(lambda c: lexical_catch_up(c, LEXICAL_CATCH_UP_MAX))
                if done < LEXICAL_CATCH_UP_MAX:
                    return
        except HivememError as exc:  # closing, or the store failing: a search catches up
            log.debug("lexical catch-up failed: %s", exc)
        except Exception:
            log.exception("lexical catch-up failed")

    async def _close_lexical(self) -> None:
        """Stop the background catch-up (the store is closing); pending entries stay
        pending, for the next search or catch-up."""
        self._lexical_closed = True
        task, self._lexical_task = self._lexical_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def search_lexical(
        self,
        prefix: str,
        terms: Sequence[str],
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        if not terms:
            return []
        where, args = _where(prefix, conditions, now)
        # Entries marked pending since the catch-up are left out: FTS5 may hold an
        # older text of theirs (their writes began after this search did).
        sql = (
            "SELECT d.ns, d.key, bm25(search_fts) AS rank FROM search_fts "
            "JOIN search_docs d ON d.id = search_fts.rowid "
            "JOIN items i ON i.ns = d.ns AND i.key = d.key "
            f"WHERE search_fts MATCH ? AND {' AND '.join(where)} "
            "AND d.id NOT IN (SELECT id FROM lexical_pending) ORDER BY rank LIMIT ?"
        )
        params = [match_expression(terms), *args, limit]

        def run(c: sqlite3.Connection, first: bool) -> list[tuple[str, str, float]] | None:
            if first and c.execute("SELECT 1 FROM lexical_pending LIMIT 1").fetchone():
                return None
            # bm25() is lower for better matches; hits report higher = better.
            return [(ns, key, -score) for ns, key, score in c.execute(sql, params)]

        found = await self._engine.read(lambda c: run(c, True))
        if found is None:  # FTS5 lags writes acknowledged before this search: catch up
            await self._engine.write(lexical_catch_up)
            found = await self._engine.read(lambda c: run(c, False))
        assert found is not None
        return found

    async def load_texts(self) -> list[tuple[str, str, str]]:
        sql = "SELECT ns, key, text FROM search_docs"
        return await self._engine.read(lambda c: [(r[0], r[1], r[2]) for r in c.execute(sql)])

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        def run(c: sqlite3.Connection) -> dict[tuple[str, str], str]:
            found: dict[tuple[str, str], str] = {}
            for ns, key in keys:
                row = c.execute(
                    "SELECT text FROM search_docs WHERE ns = ? AND key = ?", (ns, key)
                ).fetchone()
                if row is not None:
                    found[(ns, key)] = row[0]
            return found

        return await self._engine.read(run)

    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        where, args = _where(prefix, conditions, now)
        sql = (
            "SELECT d.ns, d.key FROM search_docs d JOIN items i ON i.ns = d.ns AND i.key = d.key "
            f"WHERE {' AND '.join(where)}"
        )
        return await self._engine.read(lambda c: [(r[0], r[1]) for r in c.execute(sql, args)])

    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        sql = "SELECT ns, key, vec FROM search_docs WHERE model = ? AND vec IS NOT NULL"
        return await self._engine.read(
            lambda c: [(r[0], r[1], r[2]) for r in c.execute(sql, (model,))]
        )

    async def load_vector_matrix(self, model: str, dim: int) -> tuple[list[tuple[str, str]], Any]:
        import numpy as np

        def run(c: sqlite3.Connection) -> tuple[list[tuple[str, str]], Any]:
            # Sized first, then filled row by row: each vector's bytes are freed once
            # copied, so the load never holds the vectors twice.
            where = "model = ? AND dim = ? AND vec IS NOT NULL"
            (count,) = c.execute(
                f"SELECT count(*) FROM search_docs WHERE {where}", (model, dim)
            ).fetchone()
            matrix = np.empty((count, dim), dtype=np.float32)
            keys: list[tuple[str, str]] = []
            for ns, key, vec in c.execute(
                f"SELECT ns, key, vec FROM search_docs WHERE {where}", (model, dim)
            ):
                if len(keys) == count:
                    break  # (a read sees one snapshot; this is only a bound)
                matrix[len(keys)] = np.frombuffer(vec, dtype=np.float32)
                keys.append((ns, key))
            return keys, matrix[: len(keys)]

        return await self._engine.read(run)

    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        def run(c: sqlite3.Connection) -> dict[tuple[str, str], bytes]:
            found: dict[tuple[str, str], bytes] = {}
            for ns, key in keys:
                row = c.execute(
                    "SELECT vec FROM search_docs WHERE ns = ? AND key = ? AND model = ? "
                    "AND vec IS NOT NULL",
                    (ns, key, model),
                ).fetchone()
                if row is not None:
                    found[(ns, key)] = row[0]
            return found

        return await self._engine.read(run)

    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        def run(c: sqlite3.Connection) -> list[ItemRow]:
            rows = []
            for ns, key in keys:
                row = c.execute(
                    f"SELECT {ITEM_COLS} FROM items WHERE ns = ? AND key = ? "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (ns, key, now),
                ).fetchone()
                if row is not None:
                    rows.append(item_row(row))
            return rows

        return await self._engine.read(run)

    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        cols = ", ".join(f"i.{c.strip()}" for c in ITEM_COLS.split(","))
        where = [
            "(i.expires_at IS NULL OR i.expires_at > ?)",
            "(d.id IS NULL OR d.version <> i.version OR (? IS NOT NULL AND "
            "(d.model IS NULL OR d.model <> ? OR d.vec IS NULL)))",
        ]
        args: list[Any] = [now, model, model]
        if after is not None:
            where.append("(i.ns, i.key) > (?, ?)")
            args.extend(after)
        sql = (
            f"SELECT {cols} FROM items i LEFT JOIN search_docs d ON d.ns = i.ns AND d.key = i.key "
            f"WHERE {' AND '.join(where)} ORDER BY i.ns, i.key LIMIT ?"
        )
        args.append(limit)
        return await self._engine.read(lambda c: [item_row(r) for r in c.execute(sql, args)])

    async def count_items(self, now: float) -> int:
        sql = "SELECT count(*) FROM items WHERE expires_at IS NULL OR expires_at > ?"
        return await self._engine.read(lambda c: int(c.execute(sql, (now,)).fetchone()[0]))

    async def set_index(self, entries: Sequence[IndexEntry], now: float) -> int:
        def run(c: sqlite3.Connection) -> int:
            stored = 0
            for e in entries:
                current = c.execute(
                    "SELECT version FROM items WHERE ns = ? AND key = ?", (e.namespace, e.key)
                ).fetchone()
                if current is None or current[0] != e.version:
                    continue
                if index_put(c, e.namespace, e.key, e.version, e.text, e.vector, e.model):
                    self._lexical_marks += 1
                self._event(c, INDEXED, e.namespace, e.key, e.version, SYSTEM, now)
                stored += 1
            return stored

        stored = await self._engine.write(run)
        self._lexical_due()
        return stored

    async def pending_vectors(
        self, model: str, part: int, parts: int, limit: int, now: float
    ) -> list[ItemRow]:
        cols = ", ".join(f"i.{c.strip()}" for c in ITEM_COLS.split(","))
        sql = (
            f"SELECT {cols} FROM search_docs d JOIN items i ON i.ns = d.ns AND i.key = d.key "
            "WHERE d.vec IS NULL AND d.model IS NOT NULL AND d.model = ? "
            "AND d.version = i.version AND d.id % ? = ? "
            "AND (i.expires_at IS NULL OR i.expires_at > ?) ORDER BY d.id LIMIT ?"
        )
        args = (model, parts, part, now, limit)
        return await self._engine.read(lambda c: [item_row(r) for r in c.execute(sql, args)])

    async def pending_count(self, model: str, now: float) -> tuple[int, float | None]:
        sql = (
            "SELECT count(*), min(i.updated_at) FROM search_docs d "
            "JOIN items i ON i.ns = d.ns AND i.key = d.key "
            "WHERE d.vec IS NULL AND d.model IS NOT NULL AND d.model = ? "
            "AND (i.expires_at IS NULL OR i.expires_at > ?)"
        )

        def run(c: sqlite3.Connection) -> tuple[int, float | None]:
            n, oldest = c.execute(sql, (model, now)).fetchone()
            return int(n), oldest

        return await self._engine.read(run)
