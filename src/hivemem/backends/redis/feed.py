"""The feed of the Redis backend: publishing, reading across partitions, the head.

The feed and its cursors
------------------------

Each partition's events are a stream whose ids ``<ts>-<seq>`` grow in commit order
(``ts`` = the server's clock in microseconds, forced past the partition's last id).
The feed's order is (ts, seq, partition) — commit order within a partition, so per
namespace tree — and an event's cursor is its place in that order, so a publish
returns the same cursor a reader later sees for it.

A reader must never pass an event that is not committed yet (no gaps). A partition
read at server time R (``READ_FEED`` returns R = max(clock, last ts + 1)) will only
ever get events with ts >= R. So a read takes the smallest R of all partitions, W,
and returns only events with ts < W: every event before them, in every partition, is
already visible. When fewer than ``limit`` events come back the next cursor is the
watermark ``w<W-1>`` (every event with ts < W considered). This assumes the masters'
clocks run forward; a master whose clock is ahead of the others delays visibility by
the difference (a few milliseconds with NTP), it never loses an event.

Retention: the sweep (:meth:`~.items.RedisItems.sweep`) trims each stream below the
retention time and records the newest trimmed id in the partition's meta hash
(``trim``); a read after a cursor older than that raises CursorExpired.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hivemem.backends.redis.engine import RedisEngine
from hivemem.backends.redis.layout import (
    PARTITIONS,
    START,
    Position,
    event_from,
    event_position,
    meta_key,
    num,
    parse_cursor,
    partition_of,
    partitions_under,
    tag,
    unpack,
    watermark,
)
from hivemem.backends.rows import EventRow
from hivemem.errors import CursorExpired

__all__ = ["RedisFeed"]

#: Most stream entries one feed read scans per partition and call.
_SCAN = 1000


@dataclass(slots=True)
class _PartRead:
    """What READ_FEED returned for one partition."""

    r: int
    last: bytes | None
    trim: bytes | None
    scanned: bytes | None
    n: int
    entries: list[Any]


def _part_read(raw: Sequence[Any]) -> _PartRead:
    return _PartRead(int(raw[0]), raw[1], raw[2], raw[3], int(raw[4]), list(raw[5]))


class RedisFeed(RedisEngine):
    """The feed primitives of :class:`~.backend.RedisBackend`."""

    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        p = partition_of(channel)

        async def run(rk: str, ttl: str) -> Any:
            return await self._script(
                "publish", [meta_key(p)], [tag(p), channel, payload, author, num(now), rk, ttl]
            )

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"ok":
            self.changes.notify()
        event_id, ch, who, at, data = unpack(reply[1])
        assert event_id is not None and ch is not None and who is not None and at is not None
        return EventRow(
            event_position(event_id, p).encode(),
            "publish",
            ch.decode("utf-8"),
            None,
            None,
            who.decode("utf-8"),
            float(at),
            data,
        )

    async def _read_parts(
        self, prefix: str, specs: dict[int, tuple[int, str, str]]
    ) -> dict[int, _PartRead]:
        """Run READ_FEED over the partitions of ``specs`` (p -> count, start, end): in one
        call on a standalone server, one call per partition on a cluster."""
        ps = sorted(specs)
        if not self.is_cluster:
            args: list[Any] = [prefix]
            for p in ps:
                args += [str(specs[p][0]), specs[p][1], specs[p][2]]
            reply = await self._script("read_feed", [meta_key(p) for p in ps], args)
            return {p: _part_read(raw) for p, raw in zip(ps, reply, strict=True)}
        replies = await asyncio.gather(
            *(
                self._script(
                    "read_feed",
                    [meta_key(p)],
                    [prefix, str(specs[p][0]), specs[p][1], specs[p][2]],
                )
                for p in ps
            )
        )
        return {p: _part_read(reply[0]) for p, reply in zip(ps, replies, strict=True)}

    @staticmethod
    def _check_trim(read: _PartRead, p: int, since: Position) -> None:
        if since.is_start or read.trim is None:
            return
        trimmed = event_position(read.trim, p)
        if trimmed > since:
            raise CursorExpired(
                f"events after cursor {since.encode()} were trimmed (retention); "
                "read from the feed's head or from '0' again",
                field="after",
            )

    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        pos = parse_cursor(after)
        relevant = set(partitions_under(prefix))
        scan = min(_SCAN, max(limit, 64))
        for attempt in range(4):
            specs = {
                p: (scan if p in relevant else 0, pos.start_id(p), "+") for p in range(PARTITIONS)
            }
            reads = await self._read_parts(prefix, specs)
            w = min(r.r for r in reads.values())
            found: list[tuple[Position, EventRow]] = []
            withheld = 0
            pending: dict[int, Position] = {}
            for p, r in reads.items():
                self._check_trim(r, p, pos)
                count = 0
                for entry in r.entries:
                    at = event_position(entry[0], p)
                    if at.ts >= w:
                        withheld = max(withheld, at.ts)
                        break
                    found.append((at, event_from(entry[0], entry[1], p)))
                    count += 1
                if (
                    p in relevant
                    and r.n >= scan
                    and r.scanned is not None
                    and count < limit
                    and event_position(r.scanned, p).ts < w
                ):
                    pending[p] = event_position(r.scanned, p)
            counts = defaultdict(int, {p: 0 for p in pending})
            for at, _ in found:
                counts[at.p] += 1
            while pending:
                specs = {p: (scan, f"({at.ts}-{at.seq}", f"({w}-0") for p, at in pending.items()}
                more = await self._read_parts(prefix, specs)
                nxt: dict[int, Position] = {}
                for p, r in more.items():
                    self._check_trim(r, p, pending[p])
                    for entry in r.entries:
                        at = event_position(entry[0], p)
                        found.append((at, event_from(entry[0], entry[1], p)))
                        counts[p] += 1
                    if r.n >= scan and r.scanned is not None and counts[p] < limit:
                        nxt[p] = event_position(r.scanned, p)
                pending = nxt
            found.sort(key=lambda f: f[0])
            rows = [row for _, row in found[:limit]]
            if len(rows) == limit:
                return rows, rows[-1].cursor
            if withheld and attempt < 3:
                # An event committed as we read: W will pass it in a moment.
                await asyncio.sleep(min(0.05, (withheld - w) / 1e6 + 0.0005))
                continue
            return rows, max(pos, watermark(w - 1)).encode()
        raise AssertionError("unreachable")

    async def head(self) -> str:
        w = 0
        for attempt in range(4):
            specs = {p: (0, "-", "+") for p in range(PARTITIONS)}
            reads = await self._read_parts("", specs)
            w = min(r.r for r in reads.values())
            lasts = [event_position(r.last, p) for p, r in reads.items() if r.last is not None]
            if all(last.ts < w for last in lasts):
                return max(lasts).encode() if lasts else START.encode()
            if attempt < 3:
                await asyncio.sleep(0.001)
        return watermark(w - 1).encode()
