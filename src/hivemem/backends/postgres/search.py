"""Search on PostgreSQL: full text (``tsvector``/``tsquery``, GIN) and pgvector vectors.

The index lives in ``hivemem_search``, one row per searchable item (its version,
its index text with a generated ``to_tsvector('english', text)``, the model and
its vector), written in the same transaction as the item, so search never sees an
item with stale text or a stale vector.

Lexical ranking (:meth:`SearchMixin.search_lexical`): the query matches documents
holding any of the terms (an OR of ``plainto_tsquery('english', term)``, one per
term passed as a parameter, so no term is ever read as tsquery syntax), ranked by
``ts_rank_cd`` (cover density, Clarke, Cormack and Tudhope, "Relevance ranking for
one to three term queries", 2000) with normalisation 1 (divided by 1 + log of the
document length); higher is better. Unlike BM25 it has no inverse document
frequency; ``Settings.lexical_index = "memory"`` gives BM25 over the same store.

Vectors are pgvector ``vector`` values exchanged in pgvector's binary format (a
16-bit dimension, 16 unused bits, big-endian float32s) and converted to and from the
contract's little-endian float32 bytes with numpy. Similarity itself is computed
by pgvector (:meth:`SearchMixin.search_vectors`: cosine distance over a partial HNSW
index per model and dimension, created on first search with ``CREATE INDEX
CONCURRENTLY``; iterative scans so a filter does not starve the result) unless
``Settings.vector_index`` asks for the in-process index (:mod:`hivemem.core.vectors`).

Filters (:func:`conditions_sql`) follow :func:`~hivemem.backends.filters.row_matches`
exactly: a ``CASE`` on ``jsonb_typeof`` compares booleans (``=`` only), numbers
(integers as ``numeric``, exact; floats as ``float8``, as Python compares them)
and strings (``COLLATE "C"``: code point order); a missing field, null, an array or
an object matches nothing.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from psycopg import sql
from psycopg.adapt import Buffer, Dumper, Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo

from hivemem.backends.filters import Condition
from hivemem.backends.postgres.engine import Conn, PostgresEngine, lock_keys
from hivemem.backends.postgres.schema import ITEM_COLS, index_text, item_row, under
from hivemem.backends.rows import INDEXED, SYSTEM, IndexEntry, ItemRow
from hivemem.errors import Unavailable

log = logging.getLogger("hivemem")

_OPS = {"=": "=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
_ITEM_COLS_I = ", ".join(f"i.{c}" for c in ITEM_COLS.split(", "))


class Vector:
    """float32 little-endian bytes, sent to PostgreSQL as a pgvector ``vector``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _vector_to_pg(data: bytes) -> bytes:
    values = np.frombuffer(data, dtype="<f4")
    return struct.pack(">HH", len(values), 0) + values.astype(">f4").tobytes()


def _vector_from_pg(data: Buffer) -> bytes:
    return np.frombuffer(data, dtype=">f4", offset=4).astype("<f4").tobytes()


def configure_vectors(conn: Conn, oid: int, array_oid: int) -> None:
    """Register the binary ``vector`` adapters (type oid ``oid``, its array type
    ``array_oid``: lists of :class:`Vector` are sent as ``vector[]``) on a connection."""

    class VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> Buffer | None:
            return _vector_to_pg(obj.data)

    class VectorLoader(Loader):
        format = Format.BINARY

        def load(self, data: Buffer) -> bytes:
            return _vector_from_pg(data)

    VectorDumper.oid = oid
    TypeInfo("vector", oid, array_oid).register(conn)
    conn.adapters.register_dumper(Vector, VectorDumper)
    conn.adapters.register_loader(oid, VectorLoader)


def index_put(
    text: str | None, vector: bytes | None, model: str | None
) -> tuple[str, dict[str, Any]]:
    """A CTE (named ``s``) storing the index entry of item ``%(ns)s``/``%(key)s`` at
    ``%(version)s``, or removing it when ``text`` is None, and its extra parameters."""
    if text is None:
        return "s AS (DELETE FROM hivemem_search WHERE ns = %(ns)s AND key = %(key)s)", {}
    sql = (
        "s AS (INSERT INTO hivemem_search (ns, key, version, text, model, dim, vec) "
        "VALUES (%(ns)s, %(key)s, %(version)s, %(itext)s, %(model)s, %(dim)s, %(vec)s) "
        "ON CONFLICT (ns, key) DO UPDATE SET version = EXCLUDED.version, "
        "text = EXCLUDED.text, model = EXCLUDED.model, dim = EXCLUDED.dim, vec = EXCLUDED.vec)"
    )
    return sql, {
        "itext": index_text(text),
        "model": model,
        "dim": None if vector is None else len(vector) // 4,
        "vec": None if vector is None else Vector(vector),
    }


def _typed_tests(
    expr: str, text_expr: str, op: str, values: Sequence[Any], args: dict[str, Any]
) -> str:
    """``CASE`` over the JSON kind of ``expr`` (jsonb): true when it equals (``op`` is
    ``=``) or compares ``op`` to one of ``values`` of its own kind."""
    n = len(args)
    bools = [v for v in values if isinstance(v, bool)]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    floats = [v for v in values if isinstance(v, float)]
    # As in the stored ``meta`` copy (schema.meta_jsonb), NUL characters are spaces.
    strs = [v.replace("\x00", " ") for v in values if isinstance(v, str)]
    branches = []
    if bools and op == "=":
        args[f"b{n}"] = bools
        branches.append(f"WHEN 'boolean' THEN ({expr})::boolean = ANY(%(b{n})s::boolean[])")
    number_tests = []
    if ints:
        args[f"i{n}"] = ints if op == "=" else ints[0]
        number_tests.append(
            f"({expr})::numeric = ANY(%(i{n})s::numeric[])"
            if op == "="
            else f"({expr})::numeric {_OPS[op]} %(i{n})s::numeric"
        )
    if floats:
        args[f"f{n}"] = floats if op == "=" else floats[0]
        number_tests.append(
            f"({expr})::float8 = ANY(%(f{n})s::float8[])"
            if op == "="
            else f"({expr})::float8 {_OPS[op]} %(f{n})s::float8"
        )
    if number_tests:
        branches.append(f"WHEN 'number' THEN ({' OR '.join(number_tests)})")
    if strs:
        args[f"s{n}"] = strs if op == "=" else strs[0]
        branches.append(
            f"WHEN 'string' THEN ({text_expr}) COLLATE \"C\" = ANY(%(s{n})s::text[])"
            if op == "="
            else f"WHEN 'string' THEN ({text_expr}) COLLATE \"C\" {_OPS[op]} %(s{n})s::text"
        )
    if not branches:
        return "false"
    return f"(CASE jsonb_typeof({expr}) {' '.join(branches)} ELSE false END)"


def conditions_sql(conditions: Sequence[Condition], args: dict[str, Any]) -> list[str]:
    """SQL tests over ``hivemem_items i`` for ``conditions`` (semantics of
    :func:`~hivemem.backends.filters.row_matches`); their parameters are added to ``args``."""
    where: list[str] = []
    for cond in conditions:
        values = tuple(cond.value) if cond.op == "in" else (cond.value,)
        op = "=" if cond.op == "in" else cond.op
        if cond.kind == "metadata":
            name = f"m{len(args)}"
            args[name] = cond.field
            where.append(
                _typed_tests(f"i.meta -> %({name})s", f"i.meta ->> %({name})s", op, values, args)
            )
            continue
        kept: list[Any]
        if cond.kind == "author":
            column, cast, kept = "i.author", "text", [v for v in values if isinstance(v, str)]
        else:
            column, cast = "i.updated_at", "float8"
            kept = [
                float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
            ]
        if not kept:
            where.append("false")
            continue
        name = f"c{len(args)}"
        if op == "=":
            args[name] = kept
            where.append(f"{column} = ANY(%({name})s::{cast}[])")
        else:
            args[name] = kept[0]
            where.append(f"{column} {_OPS[op]} %({name})s::{cast}")
    return where


def _live_under(prefix: str, now: float, args: dict[str, Any]) -> list[str]:
    where = ["(i.expires_at IS NULL OR i.expires_at > %(now)s)"]
    args["now"] = now
    if prefix:
        where.append("(d.ns = %(p)s OR (d.ns >= %(p_lo)s AND d.ns < %(p_hi)s))")
        args.update(under(prefix))
    return where


def _keys_args(keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"k_ns": [k[0] for k in keys], "k_key": [k[1] for k in keys]}


_KEYS = "unnest(%(k_ns)s::text[], %(k_key)s::text[]) AS k(ns, key)"


class SearchMixin:
    """The search primitives of :class:`PostgresBackend`."""

    _engine: PostgresEngine
    native_vectors: ClassVar[bool] = True

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
        args: dict[str, Any] = {"limit": limit}
        query = " || ".join(f"plainto_tsquery('english', %(t{n})s)" for n in range(len(terms)))
        args.update({f"t{n}": term.replace("\x00", " ") for n, term in enumerate(terms)})
        where = _live_under(prefix, now, args) + conditions_sql(conditions, args)
        sql = (
            f"WITH q AS (SELECT {query} AS q) "
            "SELECT d.ns, d.key, ts_rank_cd(d.tsv, q.q, 1) AS score "
            "FROM q, hivemem_search d JOIN hivemem_items i ON i.ns = d.ns AND i.key = d.key "
            f"WHERE d.tsv @@ q.q AND {' AND '.join(where)} "
            "ORDER BY score DESC, d.ns, d.key LIMIT %(limit)s"
        )

        async def run(c: Conn) -> list[tuple[str, str, float]]:
            cur = await c.execute(sql, args)
            return [(r[0], r[1], float(r[2])) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def load_texts(self) -> list[tuple[str, str, str]]:
        async def run(c: Conn) -> list[tuple[str, str, str]]:
            cur = await c.execute("SELECT ns, key, text FROM hivemem_search", binary=True)
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        if not keys:
            return {}
        sql = (
            f"SELECT d.ns, d.key, d.text FROM {_KEYS} "
            "JOIN hivemem_search d ON d.ns = k.ns AND d.key = k.key"
        )

        async def run(c: Conn) -> dict[tuple[str, str], str]:
            cur = await c.execute(sql, _keys_args(keys), binary=True)
            return {(r[0], r[1]): r[2] for r in await cur.fetchall()}

        return await self._engine.read(run)

    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        args: dict[str, Any] = {}
        where = _live_under(prefix, now, args) + conditions_sql(conditions, args)
        sql = (
            "SELECT d.ns, d.key FROM hivemem_search d "
            "JOIN hivemem_items i ON i.ns = d.ns AND i.key = d.key "
            f"WHERE {' AND '.join(where)}"
        )

        async def run(c: Conn) -> list[tuple[str, str]]:
            cur = await c.execute(sql, args, binary=True)
            return [(r[0], r[1]) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def search_vectors(
        self,
        prefix: str,
        vector: bytes,
        model: str,
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        dim = len(vector) // 4
        await self._ensure_hnsw(model, dim)
        args: dict[str, Any] = {"q": Vector(vector), "limit": limit, "ef": max(40, limit)}
        where = _live_under(prefix, now, args) + conditions_sql(conditions, args)
        # The model and dimension are literals so that the planner can match the
        # partial HNSW index's predicate; the cast gives the index's expression.
        distance = f"(d.vec::vector({dim}) <=> %(q)s::vector({dim}))"
        query = sql.SQL(
            f"SELECT d.ns, d.key, 1 - {distance} AS score FROM hivemem_search d "
            "JOIN hivemem_items i ON i.ns = d.ns AND i.key = d.key "
            "WHERE d.model = {model} AND d.dim = {dim} AND "
            f"{' AND '.join(where)} ORDER BY {distance} LIMIT %(limit)s"
        ).format(model=sql.Literal(model), dim=sql.Literal(dim))

        async def run(c: Conn) -> list[tuple[str, str, float]]:
            async with c.transaction():
                # pgvector >= 0.8: keep scanning the graph until enough rows pass the
                # filter (relaxed order: re-sorted below).
                await c.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                await c.execute(
                    sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(args["ef"]))
                )
                cur = await c.execute(query, args)
                rows = [(r[0], r[1], float(r[2])) for r in await cur.fetchall()]
            rows.sort(key=lambda r: -r[2])
            return rows

        return await self._engine.read(run)

    async def _ensure_hnsw(self, model: str, dim: int) -> None:
        """Create (once per process, concurrently with writes) the partial HNSW index of
        the vectors by ``model`` of dimension ``dim``. A failure is logged: search then
        works without the index, only slower."""
        done: set[tuple[str, int]] = self.__dict__.setdefault("_hnsw_ready", set())
        if (model, dim) in done:
            return
        name = "hivemem_search_hnsw_" + hashlib.sha1(f"{model}\0{dim}".encode()).hexdigest()[:12]
        statement = sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON hivemem_search USING hnsw "
            "((vec::vector({dim})) vector_cosine_ops) WHERE model = {model} AND dim = {dim}"
        ).format(name=sql.Identifier(name), dim=sql.Literal(dim), model=sql.Literal(model))

        async def run(c: Conn) -> None:
            await c.execute(statement)

        try:
            await self._engine.read(run)
        except Unavailable:
            raise
        except Exception:
            log.warning(
                "creating the HNSW index %s failed; searching without it", name, exc_info=True
            )
        done.add((model, dim))

    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        async def run(c: Conn) -> list[tuple[str, str, bytes]]:
            cur = await c.execute(
                "SELECT ns, key, vec FROM hivemem_search WHERE model = %s AND vec IS NOT NULL",
                (model,),
                binary=True,
            )
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        if not keys:
            return {}
        sql = (
            f"SELECT d.ns, d.key, d.vec FROM {_KEYS} "
            "JOIN hivemem_search d ON d.ns = k.ns AND d.key = k.key "
            "WHERE d.model = %(model)s AND d.vec IS NOT NULL"
        )

        async def run(c: Conn) -> dict[tuple[str, str], bytes]:
            cur = await c.execute(sql, {**_keys_args(keys), "model": model}, binary=True)
            return {(r[0], r[1]): r[2] for r in await cur.fetchall()}

        return await self._engine.read(run)

    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        if not keys:
            return []
        sql = (
            f"SELECT {_ITEM_COLS_I} FROM {_KEYS} "
            "JOIN hivemem_items i ON i.ns = k.ns AND i.key = k.key "
            "WHERE i.expires_at IS NULL OR i.expires_at > %(now)s"
        )

        async def run(c: Conn) -> list[ItemRow]:
            cur = await c.execute(sql, {**_keys_args(keys), "now": now}, binary=True)
            return [item_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        where = [
            "(i.expires_at IS NULL OR i.expires_at > %(now)s)",
            "(d.ns IS NULL OR d.version <> i.version OR (%(model)s::text IS NOT NULL AND "
            "(d.model IS NULL OR d.model <> %(model)s::text OR d.vec IS NULL)))",
        ]
        args: dict[str, Any] = {"now": now, "model": model, "limit": limit}
        if after is not None:
            where.append("(i.ns, i.key) > (%(a_ns)s, %(a_key)s)")
            args.update(a_ns=after[0], a_key=after[1])
        sql = (
            f"SELECT {_ITEM_COLS_I} FROM hivemem_items i "
            "LEFT JOIN hivemem_search d ON d.ns = i.ns AND d.key = i.key "
            f"WHERE {' AND '.join(where)} ORDER BY i.ns, i.key LIMIT %(limit)s"
        )

        async def run(c: Conn) -> list[ItemRow]:
            cur = await c.execute(sql, args, binary=True)
            return [item_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def count_items(self, now: float) -> int:
        async def run(c: Conn) -> int:
            cur = await c.execute(
                "SELECT count(*) FROM hivemem_items WHERE expires_at IS NULL OR expires_at > %s",
                (now,),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._engine.read(run)

    async def set_index(self, entries: Sequence[IndexEntry], now: float) -> int:
        if not entries:
            return 0
        # The feed's append lives with the write transactions (backend.py imports this).
        from hivemem.backends.postgres.backend import Events, append_events

        async def run(c: Conn) -> int:
            # The writers' key locks, then the rows (shared): a concurrent write or
            # expiry of an item finishes first, and then its version decides.
            keys = list(dict.fromkeys((e.namespace, e.key) for e in entries))
            await lock_keys(c, keys)
            cur = await c.execute(
                f"SELECT i.ns, i.key, i.version FROM hivemem_items i JOIN {_KEYS} "
                "ON i.ns = k.ns AND i.key = k.key FOR SHARE OF i",
                _keys_args(keys),
            )
            versions = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
            events = Events()
            for e in entries:
                if versions.get((e.namespace, e.key)) != e.version:
                    continue
                sql, extra = index_put(e.text, e.vector, e.model)
                await c.execute(
                    f"WITH {sql} SELECT 1",
                    {"ns": e.namespace, "key": e.key, "version": e.version, **extra},
                )
                events.add(INDEXED, e.namespace, e.key, e.version, SYSTEM, now)
            if events.rows:
                await append_events(c, events)
            return len(events.rows)

        return await self._engine.write(run)

    async def pending_vectors(
        self, model: str, part: int, parts: int, limit: int, now: float
    ) -> list[ItemRow]:
        # The split: a hash of the key (hashtext is PostgreSQL's own, stable across
        # sessions and servers of one major version).
        sql = (
            f"SELECT {_ITEM_COLS_I} FROM hivemem_search d "
            "JOIN hivemem_items i ON i.ns = d.ns AND i.key = d.key "
            "WHERE d.vec IS NULL AND d.model IS NOT NULL AND d.model = %(model)s "
            "AND d.version = i.version "
            "AND ((hashtext(d.ns || '/' || d.key) & 2147483647) %% %(parts)s) = %(part)s "
            "AND (i.expires_at IS NULL OR i.expires_at > %(now)s) LIMIT %(limit)s"
        )
        args = {"model": model, "parts": parts, "part": part, "now": now, "limit": limit}

        async def run(c: Conn) -> list[ItemRow]:
            cur = await c.execute(sql, args, binary=True)
            return [item_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def pending_count(self, model: str, now: float) -> tuple[int, float | None]:
        sql = (
            "SELECT count(*), min(i.updated_at) FROM hivemem_search d "
            "JOIN hivemem_items i ON i.ns = d.ns AND i.key = d.key "
            "WHERE d.vec IS NULL AND d.model IS NOT NULL AND d.model = %(model)s "
            "AND (i.expires_at IS NULL OR i.expires_at > %(now)s)"
        )

        async def run(c: Conn) -> tuple[int, float | None]:
            cur = await c.execute(sql, {"model": model, "now": now})
            row = await cur.fetchone()
            assert row is not None
            return int(row[0]), row[1]

        return await self._engine.read(run)
