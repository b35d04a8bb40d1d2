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

import numpy as np
import numpy.typing as npt

from hivemem.backends.base import Backend
from hivemem.backends.rows import INDEXED
from hivemem.errors import CursorExpired

Key = tuple[str, str]

_SYNC_BATCH = 1000
_PREFIX_CACHE = 1024


class Namespaces:
    """Small integer ids for the namespaces of an in-process index, and the rows of a
    prefix as a mask over the rows' namespace ids (segment-aware: ``a`` covers ``a``
    and ``a/b``, not ``ab``)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self._under: dict[str, npt.NDArray[np.int32]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, namespace: str) -> int:
        """The id of ``namespace``, given it a new one on first sight."""
        found = self.ids.get(namespace)
        if found is None:
            found = self.ids[namespace] = len(self.ids)
            self._under.clear()
        return found

    def mask(self, prefix: str, ns_ids: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_] | None:
        """Which rows (given their namespace ids) are at or under ``prefix``; None when
        all are."""
        if not prefix:
            return None
        ids = self._under.get(prefix)
        if ids is None:
            below = prefix + "/"
            ids = np.asarray(
                [i for ns, i in self.ids.items() if ns == prefix or ns.startswith(below)],
                dtype=np.int32,
            )
            if len(self._under) >= _PREFIX_CACHE:
                self._under.clear()
            self._under[prefix] = ids
        if len(ids) == 0:
            return np.zeros(len(ns_ids), dtype=bool)
        if len(ids) == 1:
            single: npt.NDArray[np.bool_] = ns_ids == ids[0]
            return single
        if len(ids) == len(self.ids):
            return None
        lookup = np.zeros(len(self.ids), dtype=bool)
        lookup[ids] = True
        return lookup[ns_ids]


class FeedMirror:
    """Base of the in-process indexes: the catch-up loop over the feed.

    Subclasses implement :meth:`_load_all` (rebuild from the store), :meth:`_apply`
    (reload the given changed items) and may implement :meth:`_synced` (called after
    each catch-up, with no lock held by a search).

    Args:
        backend: the store's backend.
        poll_seconds: catch up at least this often even without a change signal.
    """

    #: Whether ``item.indexed`` events (a vector stored after its write) change what
    #: this copy holds; only the vector index says yes.
    follows_indexed = False

    def __init__(self, backend: Backend, poll_seconds: float) -> None:
        self.backend = backend
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._cursor: str | None = None
        self._generation = -1
        self._synced_at = 0.0

    async def sync(self, *, force: bool = False) -> None:
        """Catch up with the store (see the module notes); with ``force``, read the feed
        even if no change was signalled (a change another process committed may not
        have been signalled yet)."""
        async with self._lock:
            changes = self.backend.changes
            if self._cursor is None:
                await self._reload()
                return
            if (
                not force
                and changes.generation == self._generation
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
                        if r.key is not None
                        and r.type.startswith("item.")
                        and (self.follows_indexed or r.type != INDEXED)
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
