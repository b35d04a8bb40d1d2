"""Events: the change feed (read, watch) and agents' own published events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from hivemem.backends.base import EventRow
from hivemem.core import validation as check
from hivemem.core.area import Area, timestamp
from hivemem.errors import InvalidInput
from hivemem.models import Event, Page

#: Events fetched per feed query while replaying or following.
WATCH_BATCH = 500


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

    def _prefix(self, prefix: str) -> str:
        return check.namespace(prefix, self._settings, field="prefix", allow_empty=True)

    async def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        self._prefix(prefix)
        check.limit(limit, self._settings)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("after must be a cursor string", field="after")
        await self._ready()
        rows, next_cursor = await self._backend.read_events(prefix, after, limit)
        return Page[Event](items=[to_event(r) for r in rows], next_cursor=next_cursor)

    async def head(self) -> str:
        await self._ready()
        return await self._backend.head()

    async def watch(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[Event]:
        self._prefix(prefix)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("after must be a cursor string", field="after")
        await self._ready()
        cursor = await self._backend.head() if after is None else after
        changes = self._backend.changes
        while True:
            generation = changes.generation
            rows, cursor = await self._backend.read_events(prefix, cursor, WATCH_BATCH)
            for row in rows:
                yield to_event(row)
            if not rows:
                # Woken at once by a local commit or another process's notification;
                # the timeout is only a safety net.
                await changes.wait(generation, self._settings.feed_poll_seconds)

    async def publish(self, channel: str, payload: Any) -> Event:
        check.namespace(channel, self._settings, field="channel")
        data = check.to_json(payload, "payload", self._settings.max_payload_bytes)
        await self._ready()
        row = await self._backend.publish(
            channel, data, author=self.agent, now=self._now(), request_id=self._scoped_request_id()
        )
        return to_event(row)
