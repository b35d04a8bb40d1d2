"""One reader of the feed per process: every watcher of a hive shares its tail.

Without it each watcher (an in-process ``watch()`` or a service's SSE stream) runs its
own feed query after every commit, so a write costs one query per open watcher. The
:class:`FeedTail` of a hive reads the whole feed (prefix ``""``) once per change, in
order and without gaps (the backend's promise), and keeps the newest
:data:`TAIL_EVENTS` events in memory; watchers filter those by prefix and permission.

A watcher joins the tail at a cursor the tail has seen (one of its events' cursors, or
the cursor it started from). Until then it reads the feed on its own, as before, and
it joins at the first event it reads that the tail also holds — cursors are opaque
(each backend orders them its own way), so joining is by equality, never by comparing
them. A watcher that falls behind the oldest event kept reads on its own again from
its cursor, so nothing is lost or repeated: the tail is a cache of the feed, never its
source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from hivemem.backends.base import Backend
from hivemem.backends.rows import EventRow
from hivemem.backends.signals import ChangeSignal
from hivemem.errors import CursorExpired, HivememError

log = logging.getLogger("hivemem.feed")

#: Events the tail keeps at most: a watcher further behind reads on its own until it
#: catches up.
TAIL_EVENTS = 10_000
#: ... and bytes of event data (publish payloads may be 64 KiB each): 16 MiB.
TAIL_BYTES = 16 * 1024 * 1024
#: What an event costs besides its data (the row and its cursor's entry), in bytes.
_EVENT_OVERHEAD = 300
#: Events per feed query of the tail.
TAIL_BATCH = 500
#: Wait after a failed feed query before the next (seconds).
TAIL_RETRY_SECONDS = 0.5


def _size(row: EventRow) -> int:
    return _EVENT_OVERHEAD + (len(row.data) if row.data is not None else 0)


class FeedTail:
    """The newest events of the feed, read once per change for every watcher of a process.

    Positions are absolute: the event at position ``p`` is the ``p``-th the tail has read
    since it started (0 = the first); :attr:`end` is one past the newest. Cursors map to
    the position that follows them.
    """

    def __init__(
        self,
        backend: Backend,
        poll_seconds: float,
        on_rows: Callable[[float], None] | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self._backend = backend
        self._poll = poll_seconds
        #: Called with the commit time of the newest event of each batch read.
        self._on_rows = on_rows
        #: Called after each successful feed query (at least every ``poll_seconds`` while
        #: the reader runs), so a stalled reader shows even when no events come.
        self._on_read = on_read
        self._events: deque[EventRow] = deque()
        self._start = 0  # position of self._events[0]
        self._bytes = 0  # estimated size of self._events
        self.end = 0
        self._after: dict[str, int] = {}  # cursor -> position of the event after it
        self._cursor: str | None = None  # where the next query starts
        #: Signalled each time events were added (or the tail restarted).
        self.grown = ChangeSignal()
        #: Per watched prefix: signalled when events at or under it were added (or the
        #: tail restarted), so a write wakes only the watchers it concerns.
        self._prefixes: dict[str, tuple[ChangeSignal, int]] = {}
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.reads = 0  # feed queries made (tests and metrics)

    # Watchers -----------------------------------------------------------------------

    def subscribe(self, prefix: str) -> ChangeSignal:
        """Count a watcher of ``prefix`` in (the first one starts the reader); returns
        the signal raised when events at or under ``prefix`` arrive."""
        self._subscribers += 1
        signal, count = self._prefixes.get(prefix, (None, 0))
        if signal is None:
            signal = ChangeSignal()
        self._prefixes[prefix] = (signal, count + 1)
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._follow(), name="hivemem-feed-tail")
        return signal

    def unsubscribe(self, prefix: str) -> None:
        """Count a watcher of ``prefix`` out; the last one stops the reader."""
        signal, count = self._prefixes.get(prefix, (None, 0))
        if signal is not None:
            if count <= 1:
                del self._prefixes[prefix]
            else:
                self._prefixes[prefix] = (signal, count - 1)
        self._subscribers -= 1
        if self._subscribers <= 0 and self._task is not None:
            self._subscribers = 0
            self._task.cancel()
            self._task = None
            self._reset()

    def position(self, cursor: str) -> int | None:
        """The position after ``cursor`` if the tail still holds what follows it."""
        at = self._after.get(cursor)
        return at if at is not None and at >= self._start else None

    def events(self, position: int) -> list[EventRow]:
        """The events from ``position`` to :attr:`end` (empty when ``position`` is
        no longer held: the caller reads on its own)."""
        if position < self._start:
            return []
        first = position - self._start
        return [self._events[i] for i in range(first, len(self._events))]

    def held(self, position: int) -> bool:
        """Whether events from ``position`` on are still in memory."""
        return self._start <= position <= self.end

    async def close(self) -> None:
        """Stop the reader for good (the hive is closing): a watcher that subscribes
        meanwhile reads on its own instead of starting a reader over a closed store."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait({task}, timeout=5.0)
        self._subscribers = 0
        self._reset()

    # The reader ---------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget every event; positions go on from a hole no watcher can hold, so a
        watcher that was reading from the tail reads on its own from its cursor."""
        self._events.clear()
        self._bytes = 0
        self._after.clear()
        self.end += 1
        self._start = self.end
        self._cursor = None
        self.grown.notify()
        for signal, _ in self._prefixes.values():
            signal.notify()

    def _add(self, rows: list[EventRow], next_cursor: str) -> None:
        for row in rows:
            self._events.append(row)
            self._bytes += _size(row)
            self.end += 1
            self._after[row.cursor] = self.end
        self._after[next_cursor] = self.end
        while self._events and (len(self._events) > TAIL_EVENTS or self._bytes > TAIL_BYTES):
            self._bytes -= _size(self._events.popleft())
            self._start += 1
        if len(self._after) > 2 * TAIL_EVENTS:  # forget cursors of events no longer held
            self._after = {c: p for c, p in self._after.items() if p >= self._start}
        if rows:
            if self._on_rows is not None:
                self._on_rows(rows[-1].at)
            self.grown.notify()
            self._wake(rows)

    def _wake(self, rows: list[EventRow]) -> None:
        """Raise the signal of every watched prefix some event of ``rows`` is at or under
        (a namespace's ancestors: ``""``, ``a``, ``a/b`` for ``a/b``)."""
        if not self._prefixes:
            return
        woken: set[str] = set()
        for row in rows:
            parts = row.namespace.split("/")
            for depth in range(len(parts) + 1):
                prefix = "/".join(parts[:depth])
                if prefix not in woken and prefix in self._prefixes:
                    woken.add(prefix)
                    self._prefixes[prefix][0].notify()

    async def _follow(self) -> None:
        changes = self._backend.changes
        while True:
            try:
                if self._cursor is None:
                    self._cursor = await self._backend.head()
                    self._after[self._cursor] = self.end
                    self.grown.notify()  # watchers waiting to join at the head can
                generation = changes.generation
                rows, next_cursor = await self._backend.read_events("", self._cursor, TAIL_BATCH)
                self.reads += 1
                if self._on_read is not None:
                    self._on_read()
            except asyncio.CancelledError:
                raise
            except CursorExpired:
                log.warning("feed tail: its cursor was trimmed; starting again at the head")
                self._reset()
                continue
            except (HivememError, OSError) as exc:
                log.warning("feed tail: reading the feed failed (%s); retrying", exc)
                await asyncio.sleep(TAIL_RETRY_SECONDS)
                continue
            except Exception:
                # Whatever an engine's driver raises (a cluster client mid-failover
                # raises errors of its own): the tail must outlive it, or every watcher
                # joined to it would wait forever.
                log.warning("feed tail: reading the feed failed; retrying", exc_info=True)
                await asyncio.sleep(TAIL_RETRY_SECONDS)
                continue
            self._add(rows, next_cursor)
            self._cursor = next_cursor
            if len(rows) < TAIL_BATCH:
                await changes.wait(generation, self._poll)
