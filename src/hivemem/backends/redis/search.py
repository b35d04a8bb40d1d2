"""Search support of the Redis backend: index texts and vectors for the in-process
indexes, filters over the index, rows by key, the indexer's queue.

Stock Redis 7 has no full-text or vector search, so the core ranks in process (BM25
over :meth:`~RedisSearch.load_texts`, vectors over :meth:`~RedisSearch.load_vectors`).
Each item's index text (``xt``), vector (``xe``, float32) and model (``xm``) are
fields of its hash, written by its write script or by :meth:`~RedisSearch.set_index`
for the version they were made from (``xv``); the lexicographic set ``T:idx`` holds
the members of the items that have an index entry.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.redis.engine import RedisEngine
from hivemem.backends.redis.layout import (
    ITEM_FIELDS,
    PARTITIONS,
    item_from,
    item_from_hash,
    lex_ranges,
    member,
    meta_key,
    num,
    opt,
    partition_of,
    partitions_under,
    split_member,
    tag,
    unpack,
)
from hivemem.backends.rows import IndexEntry, ItemRow

__all__ = ["RedisSearch"]

#: Members per index page (load_texts, load_vectors, matching_keys).
_PAGE = 1000


class RedisSearch(RedisEngine):
    """The search primitives of :class:`~.backend.RedisBackend`."""

    async def search_lexical(
        self,
        prefix: str,
        terms: Sequence[str],
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        raise NotImplementedError("Redis has no full-text ranking here: the core ranks in process")

    def _by_partition(self, keys: Iterable[tuple[str, str]]) -> dict[int, list[bytes]]:
        groups: dict[int, list[bytes]] = defaultdict(list)
        for ns, key in keys:
            groups[partition_of(ns)].append(member(ns, key))
        return groups

    async def _fields(
        self, keys: Sequence[tuple[str, str]], fields: Sequence[str]
    ) -> list[tuple[bytes, list[Any]]]:
        """(member, values of ``fields``) of the existing items among ``keys``."""
        groups = self._by_partition(keys)
        replies = await asyncio.gather(
            *(
                self._script("fields", [meta_key(p)], [tag(p), str(len(fields)), *fields, *ms])
                for p, ms in groups.items()
                if ms
            )
        )
        return [(row[0], list(row[1:])) for reply in replies for row in reply]

    async def _scan_index(
        self,
        p: int,
        fields: Sequence[str],
        ranges: Sequence[tuple[bytes, bytes]] = ((b"-", b"+"),),
    ) -> list[tuple[bytes, list[Any]]]:
        """(member, values of ``fields``) of every indexed item of partition ``p`` in
        ``ranges``, page by page."""
        out: list[tuple[bytes, list[Any]]] = []
        for lo, hi in ranges:
            start = lo
            while True:
                reply = await self._script(
                    "scan",
                    [meta_key(p)],
                    [tag(p), "idx", start, hi, str(_PAGE), str(len(fields)), *fields],
                )
                out.extend((row[0], list(row[1:])) for row in reply)
                if len(reply) < _PAGE:
                    break
                start = b"(" + reply[-1][0]
        return out

    async def load_texts(self) -> list[tuple[str, str, str]]:
        pages = await asyncio.gather(*(self._scan_index(p, ["xt"]) for p in range(PARTITIONS)))
        out = []
        for page in pages:
            for m, (text,) in page:
                if text is not None:
                    ns, key = split_member(m)
                    out.append((ns, key, text.decode("utf-8")))
        return out

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        found = {}
        for m, (text,) in await self._fields(keys, ["xt"]):
            if text is not None:
                found[split_member(m)] = text.decode("utf-8")
        return found

    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        ranges = lex_ranges(prefix)
        pages = await asyncio.gather(
            *(self._scan_index(p, ["a", "u", "m", "e"], ranges) for p in partitions_under(prefix))
        )
        out = []
        for page in pages:
            for m, (author, updated, meta, expires) in page:
                if author is None or (expires is not None and float(expires) <= now):
                    continue
                ns, key = split_member(m)
                row = ItemRow(
                    ns,
                    key,
                    b"",
                    0,
                    author.decode("utf-8"),
                    0.0,
                    float(updated),
                    None if expires is None else float(expires),
                    None,
                    meta,
                )
                if row_matches(row, conditions):
                    out.append((ns, key))
        out.sort()
        return out

    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        pages = await asyncio.gather(
            *(self._scan_index(p, ["xm", "xe"]) for p in range(PARTITIONS))
        )
        wanted = model.encode("utf-8")
        out = []
        for page in pages:
            for m, (found_model, vec) in page:
                if found_model == wanted and vec is not None:
                    ns, key = split_member(m)
                    out.append((ns, key, bytes(vec)))
        return out

    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        wanted = model.encode("utf-8")
        found = {}
        for m, (found_model, vec) in await self._fields(keys, ["xm", "xe"]):
            if found_model == wanted and vec is not None:
                found[split_member(m)] = bytes(vec)
        return found

    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        rows = []
        for m, h in await self._fields(keys, ITEM_FIELDS):
            if h[1] is not None and (h[5] is None or float(h[5]) > now):
                rows.append(item_from_hash(m, h))
        return rows

    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        start = b"-" if after is None else b"(" + member(*after)

        async def part(p: int) -> list[ItemRow]:
            rows: list[ItemRow] = []
            lo: bytes | None = start
            while lo is not None and len(rows) < limit:
                reply = await self._script(
                    "unindexed",
                    [meta_key(p)],
                    [tag(p), num(now), opt(model), str(limit - len(rows)), lo],
                )
                rows.extend(item_from(unpack(rec)) for rec in reply[0])
                lo = reply[1] if len(reply) > 1 else None
            return rows

        parts = await asyncio.gather(*(part(p) for p in range(PARTITIONS)))
        rows = sorted((r for rows in parts for r in rows), key=lambda r: (r.namespace, r.key))
        return rows[:limit]

    async def count_items(self, now: float) -> int:
        replies = await asyncio.gather(
            *(self._script("count", [meta_key(p)], [tag(p), num(now)]) for p in range(PARTITIONS))
        )
        return sum(int(r) for r in replies)

    async def set_index(self, entries: Sequence[IndexEntry], now: float) -> int:
        groups: dict[int, list[Any]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for e in entries:
            p = partition_of(e.namespace)
            groups[p] += [
                member(e.namespace, e.key),
                str(e.version),
                opt(e.text),
                opt(e.vector),
                opt(e.model),
            ]
            counts[p] += 1
        replies = await asyncio.gather(
            *(
                self._script("set_index", [meta_key(p)], [tag(p), num(now), str(counts[p]), *args])
                for p, args in groups.items()
            )
        )
        return sum(int(r) for r in replies)

    async def pending_vectors(
        self, model: str, part: int, parts: int, limit: int, now: float
    ) -> list[ItemRow]:
        # The split: the store's own partitions (part k takes partitions p with
        # p % parts == k), so each script reads one slot.
        mine = [p for p in range(PARTITIONS) if p % parts == part]
        replies = await asyncio.gather(
            *(
                self._script("pending", [meta_key(p)], [tag(p), num(now), model, str(limit)])
                for p in mine
            )
        )
        rows = [item_from(unpack(rec)) for reply in replies for rec in reply]
        return sorted(rows, key=lambda r: r.updated_at)[:limit]

    async def pending_count(self, model: str, now: float) -> tuple[int, float | None]:
        replies = await asyncio.gather(
            *(
                self._script("pending_count", [meta_key(p)], [tag(p), num(now), model])
                for p in range(PARTITIONS)
            )
        )
        waiting = sum(int(r[0]) for r in replies)
        starts = [float(r[1]) for r in replies if r[1]]
        return waiting, min(starts) if starts else None
