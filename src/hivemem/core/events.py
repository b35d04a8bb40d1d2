"""Events: the change feed (read, watch) and agents' own published events."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import orjson

from hivemem import validation as check
from hivemem.backends.rows import EventRow, at_or_under, own_event
from hivemem.backends.signals import ChangeSignal
from hivemem.core.area import Area, timestamp
from hivemem.core.feedtail import FeedTail
from hivemem.errors import InvalidInput
from hivemem.models import Event, Page
from hivemem.policy.rules import session_namespace

#: A filtered feed page reads at most this many pages of events the view may not see
#: before it answers (short) with the cursor it reached.
_SCAN_PAGES = 10
#: Session namespaces remembered per view (for checking session events).
_SESSION_MEMO = 4096

#: The longest a watcher on the shared tail sleeps without being woken (seconds).
_TAIL_WAIT_SECONDS = 60.0

#: Events fetched per feed query while replaying or following.
WATCH_BATCH = 500


def _join(tail: FeedTail, cursor: str, last: str) -> int | None:
    """The tail's position after ``cursor``, or else after ``last``, if it holds one."""
    position = tail.position(cursor)
    return tail.position(last) if position is None else position


async def _either(*waits: Coroutine[Any, Any, None]) -> None:
    """Return when the first of ``waits`` returns; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def to_event(row: EventRow) -> Event:
    """Build the public record from a stored row."""
    return Event.model_construct(
        cursor=row.cursor,
        type=row.type,
        namespace=row.namespace,
        key=row.key,
        version=row.version,
        author=row.author,
        at=timestamp(row.at),
        data=None if row.data is None else orjson.loads(row.data),
    )


class EventsMixin(Area):
    """The feed operations of :class:`~hivemem.core.LocalHive`."""

    _session_memo: dict[str, str | None] | None = None

    def _prefix(self, prefix: str) -> str:
        return check.namespace(prefix, self._settings, field="prefix", allow_empty=True)

    def _feed_prefix(self, prefix: str) -> str:
        """The prefix to read the feed under: narrowed to the one root where the
        principal may watch, when there is exactly one and no session or admin events
        can be visible besides."""
        if self._access is None:
            return prefix
        roots = self._access.roots("watch", prefix)
        others = any(self._access.anywhere(a) for a in ("sessions", "tasks", "admin"))
        return roots[0] if len(roots) == 1 and not others else prefix

    async def _visible_event(self, row: EventRow) -> bool:
        """Whether this view may see a feed event: ``watch`` on its namespace (or
        channel); for a session's events ``sessions`` on the session's namespace (a
        session deleted since is known only to principals who may see every one); for
        a queue's task events (``_tasks/<queue>``) ``tasks`` on the queue; for the
        registry's (``_agents``) ``tasks`` anywhere; for hivemem's other own events
        (``_auth``, ``_admin``, ``_leases``...), ``admin``. Nobody sees hivemem's own
        bookkeeping (:func:`~hivemem.backends.rows.own_event`: ``item.indexed`` notes for
        the in-process indexes, the indexers' membership and leases)."""
        if own_event(row.type, row.namespace):
            return False
        access = self._access
        if access is None:
            return True
        ns = row.namespace
        if ns.startswith("_sessions/"):
            session_id = ns.split("/", 2)[1]
            memo = self._session_memo
            if memo is None:
                memo = self._session_memo = {}
            if session_id not in memo:
                found = await self._backend.get_session(session_id)
                if len(memo) >= _SESSION_MEMO:
                    memo.clear()
                memo[session_id] = (
                    None if found is None else session_namespace(found.app, found.user)
                )
            target = memo[session_id]
            if target is None:
                return access.allows("admin", ns)
            return access.allows("sessions", target)
        if ns.startswith("_tasks/"):
            return access.allows("tasks", ns.removeprefix("_tasks/")) or access.allows("admin", ns)
        if ns == "_agents":
            return access.anywhere("tasks") or access.allows("admin", ns)
        if ns.startswith("_"):
            return access.allows("admin", ns)
        return access.allows("watch", ns)

    async def _read_visible(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[builtins.list[EventRow], str, bool]:
        """A feed page of events this view may see, the cursor to continue from, and
        whether more events may follow at once (the scan stopped before the head)."""
        if self._access is None:
            rows, next_cursor = await self._backend.read_events(prefix, after, limit)
            more = len(rows) == limit
            return [r for r in rows if not own_event(r.type, r.namespace)], next_cursor, more
        read_prefix = self._feed_prefix(prefix)
        out: builtins.list[EventRow] = []
        cursor = after
        for _ in range(_SCAN_PAGES):
            rows, next_cursor = await self._backend.read_events(read_prefix, cursor, limit)
            for row in rows:
                if await self._visible_event(row):
                    out.append(row)
                    if len(out) == limit:
                        return out, row.cursor, True
            cursor = next_cursor
            if len(rows) < limit:
                return out, cursor, False
        assert cursor is not None
        return out, cursor, True

    async def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        self._prefix(prefix)
        check.limit(limit, self._settings)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("after must be a cursor string", field="after")
        await self._ready()
        rows, next_cursor, _ = await self._read_visible(prefix, after, limit)
        return Page[Event](items=[to_event(r) for r in rows], next_cursor=next_cursor)

    async def head(self) -> str:
        await self._ready()
        return await self._backend.head()

    async def watch(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[Event]:
        async for rows in self.watch_batches(prefix, after=after):
            for row in rows:
                yield to_event(row)

    async def watch_batches(
        self, prefix: str = "", *, after: str | None = None
    ) -> AsyncIterator[builtins.list[EventRow]]:
        """:meth:`watch` as lists of the stored rows, each what was there to deliver at
        one wake-up, for callers that encode each event once for many watchers and send
        a wake-up's events together (the service's SSE streams): the same rows, in the
        same order, under the same rules."""
        self._prefix(prefix)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("after must be a cursor string", field="after")
        await self._ready()
        tail = self._feed_tail()
        mine = tail.subscribe(prefix)
        metrics = self.metrics
        metrics.feed_watchers.inc()
        lag = metrics.feed_lag.observe
        try:
            cursor = await self._backend.head() if after is None else after
            async for rows in self._follow(tail, mine, prefix, cursor):
                lag(max(0.0, time.time() - rows[-1].at))
                yield rows
        finally:
            metrics.feed_watchers.dec()
            tail.unsubscribe(prefix)

    def _feed_tail(self) -> FeedTail:
        """The process's shared reader of the feed (see core/feedtail.py)."""
        raise NotImplementedError

    async def _follow(
        self, tail: FeedTail, mine: ChangeSignal, prefix: str, cursor: str
    ) -> AsyncIterator[builtins.list[EventRow]]:
        """The events after ``cursor`` this view may see, at or under ``prefix``, a list
        per wake-up (never empty): from
        the shared tail once it holds what follows the cursor (woken by ``mine``, the
        tail's signal for the prefix), else read on our own (joining the tail at the
        first event it also holds)."""
        changes = self._backend.changes
        poll = self._settings.feed_poll_seconds
        position = tail.position(cursor)
        while True:
            if position is not None and tail.held(position):
                generation = mine.generation
                rows = tail.events(position)
                position += len(rows)
                mine_now = [
                    row
                    for row in rows
                    if at_or_under(row.namespace, prefix) and await self._visible_event(row)
                ]
                if rows:
                    cursor = rows[-1].cursor
                if mine_now:
                    yield mine_now
                if not rows:
                    # The tail raises ``mine`` for every event under the prefix and when
                    # it restarts; the limit is only a safety net.
                    await mine.wait(generation, _TAIL_WAIT_SECONDS)
                continue
            # On our own: a cursor older than the tail's oldest event, or one it has not
            # read yet. ``last`` is the cursor of the last event we passed on (past it
            # our reads skipped only what this view does not see): the tail joins there.
            last, position = cursor, None
            while position is None:
                generation, grown = changes.generation, tail.grown.generation
                rows, cursor, more = await self._read_visible(prefix, cursor, WATCH_BATCH)
                if rows:
                    yield rows
                last = rows[-1].cursor if rows else last
                position = _join(tail, cursor, last)
                if position is None and not rows and not more:
                    # Woken at once by a local commit, another process's notification
                    # or the tail's growth; the timeout is only a safety net.
                    await _either(changes.wait(generation, poll), tail.grown.wait(grown, poll))
                    position = _join(tail, cursor, last)

    async def publish(self, channel: str, payload: Any) -> Event:
        check.namespace(channel, self._settings, field="channel")
        data = check.to_json(payload, "payload", self._settings.max_payload_bytes)
        self._must("publish", channel, "channel")
        request_id = self._scoped_request_id("publish", channel, data)
        await self._ready()
        row = await self._once(
            self._backend.publish(
                channel, data, author=self.agent, now=self._now(), request_id=request_id
            )
        )
        return to_event(row)
