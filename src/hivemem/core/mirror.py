"""In-process copies of part of the store, kept current through the feed.

The vector index and the in-memory BM25 index each hold, in this process, data
derived from every searchable item. Before each search they catch up: if the
backend's change signal moved (a local commit, or another process's commit seen
through its notification) or ``poll_seconds`` passed, they read the feed from
their cursor, collect the items that changed and reload just those. A cursor that
fell out of the feed's retention makes them reload everything.
"""

from __future__ import annotations

import asyncio
import time

from hivemem.backends.base import Backend
from hivemem.errors import CursorExpired

Key = tuple[str, str]

_SYNC_BATCH = 1000


class FeedMirror:
    """Base of the in-process indexes: the catch-up loop over the feed.

    Subclasses implement :meth:`_load_all` (rebuild from the store), :meth:`_apply`
    (reload the given changed items) and may implement :meth:`_synced` (called after
    each catch-up, with no lock held by a search).

    Args:
        backend: the store's backend.
        poll_seconds: catch up at least this often even without a change signal.
    """

    def __init__(self, backend: Backend, poll_seconds: float) -> None:
        self.backend = backend
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._cursor: str | None = None
        self._generation = -1
        self._synced_at = 0.0

    async def sync(self) -> None:
        """Catch up with the store (see the module notes)."""
        async with self._lock:
            changes = self.backend.changes
            if self._cursor is None:
                await self._reload()
                return
            if (
                changes.generation == self._generation
                and time.monotonic() - self._synced_at < self.poll_seconds
            ):
                return
            generation = changes.generation
            changed: set[Key] = set()
            cursor = self._cursor
            try:
                while True:
                    rows, cursor = await self.backend.read_events("", cursor, _SYNC_BATCH)
                    changed.update(
                        (r.namespace, r.key)
                        for r in rows
                        if r.key is not None and r.type.startswith("item.")
                    )
                    if len(rows) < _SYNC_BATCH:
                        break
            except CursorExpired:
                await self._reload()
                return
            if changed:
                await self._apply(sorted(changed))
            self._cursor = cursor
            self._generation = generation
            self._synced_at = time.monotonic()
            self._synced()

    async def _reload(self) -> None:
        generation = self.backend.changes.generation
        cursor = await self.backend.head()  # before the load: later changes are replayed
        await self._load_all()
        self._cursor = cursor
        self._generation = generation
        self._synced_at = time.monotonic()
        self._synced()

    async def _load_all(self) -> None:
        raise NotImplementedError

    async def _apply(self, changed: list[Key]) -> None:
        raise NotImplementedError

    def _synced(self) -> None:
        """Hook run after every catch-up."""
