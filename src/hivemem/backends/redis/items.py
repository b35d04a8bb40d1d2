"""Items of the Redis backend: reads, the write scripts, listings, history and the sweep.

An item is a hash ``T:i:<member>`` in the partition of its namespace's first segment
(see :mod:`.layout`); its member is in the lexicographic set ``T:keys``, so every
listing is a ZRANGEBYLEX range: a namespace tree is two ranges (the namespace itself,
then ``prefix/`` up to ``prefix0``, :func:`~hivemem.backends.rows.prefix_range`), the
keys of one namespace starting with a key prefix one range
(:func:`~hivemem.backends.rows.key_range`).

Single puts without a request id commit in groups (:meth:`RedisItems._put_one`): one
``put_group`` script for the puts a process has waiting, each decided alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hivemem.backends.groups import PutGroups
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
#: Most single puts one group commits together (see :meth:`RedisItems._put_one`).
GROUP_MAX = 64
#: A group stops growing once its packed puts reach this many bytes (a put larger than
#: that goes alone), so that one script never holds the server for long.
GROUP_BYTES = 1 << 20
#: Most groups of single puts in flight at once: while the server runs one, the
#: client packs the next (one group at a time would make them take turns).
GROUPS_IN_FLIGHT = 2


@dataclass(slots=True)
class _Put:
    """A single put waiting for its group: its partition and its packed script argument
    (the 13 fields of a put, then its author, time and history limit)."""

    partition: int
    packed: bytes


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
        if request_id is None and len(writes) == 1 and isinstance(writes[0], PutWrite):
            return [await self._put_one(writes[0], parts[0], author, now, history_limit)]
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
            args.append(pack(_put_fields(w, p)))
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

    async def _put_one(
        self, w: PutWrite, p: int, author: str, now: float, history_limit: int
    ) -> ItemRow:
        """A put of one item (without a request id) in a group commit
        (:class:`~hivemem.backends.groups.PutGroups`): the single puts this process has
        waiting meanwhile go to the server together as one ``put_group`` script
        (:mod:`.scripts`), each decided alone, in the order they were made; up to
        :data:`GROUPS_IN_FLIGHT` groups are in flight at once. The script runs with an
        internal request key, so a retried group never applies twice. A group that
        fails as a whole (Unavailable after its retries) fails each of its puts with
        that error: as for a put alone, the outcome is then unknown.

        Raises:
            Conflict: its ``if_version`` did not match; nothing was written.
            Unavailable: the store did not answer within the retry budget.
        """
        fields = _put_fields(w, p)
        fields += [author, num(now), str(history_limit)]
        groups = self._put_groups
        if groups is None:
            groups = self._put_groups = PutGroups(
                self._send_put_group,
                self._take_put_group,
                in_flight=GROUPS_IN_FLIGHT,
                name="hivemem-redis-puts",
            )
        rec = await groups.put(_Put(p, pack(fields)))
        if rec[:1] == b"!":
            raise version_conflict(w, int(rec[1:]), 0, 1)
        return item_from(unpack(rec))

    def _take_put_group(self, puts: list[_Put], share: int) -> list[int]:
        """The next group of waiting puts: ``share`` of them, at most :data:`GROUP_MAX`
        and :data:`GROUP_BYTES` (the first one always), and in a cluster only puts of
        the first one's partition (one script touches one hash slot there)."""
        want = min(GROUP_MAX, share)
        first = puts[0].partition
        chosen: list[int] = []
        size = 0
        for i, put in enumerate(puts):
            if len(chosen) >= want:
                break
            if chosen and size + len(put.packed) > GROUP_BYTES:
                break
            if self.is_cluster and put.partition != first:
                continue
            chosen.append(i)
            size += len(put.packed)
        return chosen

    async def _send_put_group(self, group: list[_Put]) -> list[bytes]:
        """Run the ``put_group`` script for ``group``: each put's record, or
        ``b"!<version>"`` for a put whose ``if_version`` did not match."""
        involved = list(dict.fromkeys(put.partition for put in group))
        keys = [meta_key(p) for p in involved]
        packed = [put.packed for put in group]

        async def run(rk: str, ttl: str) -> Any:
            return await self._script("put_group", keys, [rk, ttl, str(len(packed)), *packed])

        reply = await self._requested(involved[0], None, run)
        if reply[0] == b"ok":
            self.changes.notify()
        return [rec or b"" for rec in unpack(reply[1])]

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


def _put_fields(w: PutWrite, p: int) -> list[str | bytes]:
    """The 13 fields of a put as the write scripts read them (see WRITE_ITEMS)."""
    return [
        "P",
        tag(p),
        w.namespace,
        w.key,
        "" if w.if_version is None else str(w.if_version),
        w.value,
        opt(w.text),
        opt(w.metadata),
        "" if w.expires_at is None else num(w.expires_at),
        opt(w.index_text),
        opt(w.vector),
        opt(w.model),
        w.event or "",
    ]
