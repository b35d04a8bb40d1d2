"""Search on SQLite: FTS5 (BM25) for text, float32 vectors as BLOBs beside the items.

The index lives in ``search_docs`` (one row per searchable item: its version, the
model and its vector) and ``search_fts`` (its text, rowid = ``search_docs.id``),
written in the same transaction as the item, so search never sees an item with
stale text or a stale vector. Vector similarity itself is computed in process
(see :mod:`hivemem.core.vectors`); this module only stores and loads vectors.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from hivemem.backends.filters import Condition
from hivemem.backends.rows import INDEXED, SYSTEM, IndexEntry, ItemRow, prefix_range
from hivemem.backends.sqlite.engine import SqliteEngine
from hivemem.backends.sqlite.schema import ITEM_COLS, item_row

_OPS = {"=": "=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}


def index_put(
    c: sqlite3.Connection,
    namespace: str,
    key: str,
    version: int,
    text: str | None,
    vector: bytes | None,
    model: str | None,
) -> None:
    """Store (or, when ``text`` is None, remove) the index entry of an item."""
    if text is None:
        index_remove(c, namespace, key)
        return
    doc_id = c.execute(
        "INSERT INTO search_docs (ns, key, version, model, dim, vec) VALUES (?,?,?,?,?,?) "
        "ON CONFLICT (ns, key) DO UPDATE SET version = excluded.version, "
        "model = excluded.model, dim = excluded.dim, vec = excluded.vec RETURNING id",
        (namespace, key, version, model, None if vector is None else len(vector) // 4, vector),
    ).fetchone()[0]
    # FTS5 takes REPLACE on the rowid: the old text's terms go, the new ones come.
    c.execute("INSERT OR REPLACE INTO search_fts (rowid, text) VALUES (?, ?)", (doc_id, text))


def index_remove(c: sqlite3.Connection, namespace: str, key: str) -> None:
    """Remove the index entry of an item, if any."""
    found = c.execute(
        "DELETE FROM search_docs WHERE ns = ? AND key = ? RETURNING id", (namespace, key)
    ).fetchone()
    if found is not None:
        c.execute("DELETE FROM search_fts WHERE rowid = ?", (found[0],))


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
        sql = (
            "SELECT d.ns, d.key, bm25(search_fts) AS rank FROM search_fts "
            "JOIN search_docs d ON d.id = search_fts.rowid "
            "JOIN items i ON i.ns = d.ns AND i.key = d.key "
            f"WHERE search_fts MATCH ? AND {' AND '.join(where)} ORDER BY rank LIMIT ?"
        )
        params = [match_expression(terms), *args, limit]
        # bm25() is lower for better matches; hits report higher = better.
        return await self._engine.read(
            lambda c: [(ns, key, -score) for ns, key, score in c.execute(sql, params)]
        )

    async def load_texts(self) -> list[tuple[str, str, str]]:
        sql = "SELECT d.ns, d.key, f.text FROM search_docs d JOIN search_fts f ON f.rowid = d.id"
        return await self._engine.read(lambda c: [(r[0], r[1], r[2]) for r in c.execute(sql)])

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        def run(c: sqlite3.Connection) -> dict[tuple[str, str], str]:
            found: dict[tuple[str, str], str] = {}
            for ns, key in keys:
                row = c.execute(
                    "SELECT f.text FROM search_docs d JOIN search_fts f ON f.rowid = d.id "
                    "WHERE d.ns = ? AND d.key = ?",
                    (ns, key),
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
                index_put(c, e.namespace, e.key, e.version, e.text, e.vector, e.model)
                self._event(c, INDEXED, e.namespace, e.key, e.version, SYSTEM, now)
                stored += 1
            return stored

        return await self._engine.write(run)

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
