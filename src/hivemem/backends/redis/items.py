"""Items of the Redis backend: reads, the write script, listings, history and the sweep.

An item is a hash ``T:i:<member>`` in the partition of its namespace's first segment
(see :mod:`.layout`); its member is in the lexicographic set ``T:keys``, so every
listing is a ZRANGEBYLEX range: a namespace tree is two ranges (the namespace itself,
then ``prefix/`` up to ``prefix0``, :func:`~hivemem.backends.rows.prefix_range`), the
keys of one namespace starting with a key prefix one range
(:func:`~hivemem.backends.rows.key_range`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hivemem.backends.redis.engine import RedisEngine
from hivemem.backends.redis.layout import (
    ITEM_FIELDS,
    PARTITIONS,
    item_from,
    item_from_hash,
    key_lex_ranges,
    lex_ranges,
    member,
    meta_key,
    num,
    opt,
    pack,
    partition_of,
    partitions_under,
    tag,
    unpack,
)
from hivemem.backends.redis.sessions import unindex_sessions
from hivemem.backends.rows import CheckWrite, DeleteWrite, ItemRow, PutWrite, version_conflict
from hivemem.errors import InvalidInput

__all__ = ["RedisItems"]

#: Most items expired per partition and sweep.
_SWEEP_ITEMS = 1000
#: Most sessions expired per partition and sweep.
_SWEEP_SESSIONS = 1000


class RedisItems(RedisEngine):
    """The item primitives of :class:`~.backend.RedisBackend`, and its sweep."""

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        m = member(namespace, key)
        ik = tag(partition_of(namespace)).encode() + b":i:" + m

        async def run() -> list[Any]:
            return list(await self.client.hmget(ik, list(ITEM_FIELDS)))

        h = await self._retrying(run, "get")
        if h[1] is None or (h[5] is not None and float(h[5]) <= now):
            return None
        return item_from_hash(m, h)

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        parts = [partition_of(w.namespace) for w in writes]
        involved = list(dict.fromkeys(parts))
        if self.is_cluster and len(involved) > 1:
            raise InvalidInput(
                "on a Redis Cluster one batch can only write namespaces that share their first "
                "segment's partition; these ops span "
                + ", ".join(sorted({w.namespace.split("/", 1)[0] for w in writes}))
                + " (split the batch, or keep batched namespaces under one top-level segment)",
                field="ops",
            )
        args: list[Any] = [num(now), author, str(history_limit), "", "", str(len(writes))]
        for w, p in zip(writes, parts, strict=True):
            if_version = "" if w.if_version is None else str(w.if_version)
            if isinstance(w, CheckWrite):
                args.append(pack(["C", tag(p), w.namespace, w.key, if_version, *[""] * 8]))
                continue
            if isinstance(w, DeleteWrite):
                fields = ["D", tag(p), w.namespace, w.key, if_version, *[""] * 7, w.event or ""]
                args.append(pack(fields))
                continue
            args.append(
                pack(
                    [
                        "P",
                        tag(p),
                        w.namespace,
                        w.key,
                        if_version,
                        w.value,
                        opt(w.text),
                        opt(w.metadata),
                        "" if w.expires_at is None else num(w.expires_at),
                        opt(w.index_text),
                        opt(w.vector),
                        opt(w.model),
                        w.event or "",
                    ]
                )
            )
        keys = [meta_key(p) for p in involved]

        async def run(rk: str, ttl: str) -> Any:
            args[3], args[4] = rk, ttl
            return await self._script("write_items", keys, args)

        reply = await self._requested(involved[0], request_id, run)
        status = reply[0]
        if status == b"conflict":
            i, current = int(reply[1]), int(reply[2])
            raise version_conflict(writes[i], current, i, len(writes))
        if status == b"ok":
            self.changes.notify()
        results: list[ItemRow | bool] = []
        for rec in unpack(reply[1]):
            assert rec is not None
            if rec in (b"0", b"1"):
                results.append(rec == b"1")
            else:
                results.append(item_from(unpack(rec)))
        return results

    async def list_items(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        limit: int,
        now: float,
        *,
        key_prefix: str | None = None,
    ) -> list[ItemRow]:
        start = None if after is None else member(*after)
        if key_prefix is not None:
            ranges = key_lex_ranges(prefix, key_prefix, start)
            parts = [partition_of(prefix)]
        else:
            ranges = lex_ranges(prefix, start)
            parts = partitions_under(prefix)
        if not ranges or limit <= 0:
            return []
        flat = [x for r in ranges for x in r]
        replies = await asyncio.gather(
            *(
                self._script("list_items", [meta_key(p)], [tag(p), num(now), str(limit), *flat])
                for p in parts
            )
        )
        rows = [item_from(unpack(rec)) for reply in replies for rec in reply]
        rows.sort(key=lambda r: (r.namespace, r.key))
        return rows[:limit]

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        flat = [x for r in lex_ranges(prefix) for x in r]
        replies = await asyncio.gather(
            *(
                self._script("namespaces", [meta_key(p)], [tag(p), num(now), *flat])
                for p in partitions_under(prefix)
            )
        )
        return sorted({ns.decode("utf-8") for reply in replies for ns in reply})

    async def namespace_counts(self, prefix: str, now: float) -> list[tuple[str, int]]:
        # The members of a namespace are one lexical range of its partition's key set:
        # one ZLEXCOUNT each (items past their TTL count until the sweeper removes them).
        names = await self.list_namespaces(prefix, now)
        by_partition: dict[int, list[str]] = {}
        for ns in names:
            by_partition.setdefault(partition_of(ns), []).append(ns)
        parts = list(by_partition.items())
        replies = await asyncio.gather(
            *(
                self._script("namespace_counts", [meta_key(p)], [tag(p), *group])
                for p, group in parts
            )
        )
        counts: dict[str, int] = {}
        for (_, group), reply in zip(parts, replies, strict=True):
            counts.update((ns, int(n)) for ns, n in zip(group, reply, strict=True))
        return [(ns, counts[ns]) for ns in names]

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        p = partition_of(namespace)
        reply = await self._script(
            "history", [meta_key(p)], [tag(p), member(namespace, key), num(now), str(limit)]
        )
        return [item_from(unpack(rec)) for rec in reply]

    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        # Request-id results expire natively (PX = request_retention_seconds), so
        # requests_before needs no work here.
        before = str(max(1, int(events_before * 1_000_000)))
        replies = await asyncio.gather(
            *(
                self._script(
                    "sweep",
                    [meta_key(p)],
                    [tag(p), num(now), before, str(_SWEEP_ITEMS), str(_SWEEP_SESSIONS)],
                )
                for p in range(PARTITIONS)
            )
        )
        expired = sum(int(r[0]) for r in replies)
        trimmed = sum(int(r[1]) for r in replies)
        gone = [rec for r in replies for rec in r[2]]
        if gone:
            await unindex_sessions(self, gone)
        if expired:
            self.changes.notify()
        return expired, trimmed
