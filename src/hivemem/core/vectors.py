"""An in-memory vector matrix per process, kept coherent with the store through the feed.

Vectors are stored durably beside their items (float32 BLOBs); each process
holds them in one numpy matrix and computes cosine similarity as a matrix-vector
product (rows are unit length). Before each search the index catches up: if the
backend's change signal moved (a local commit, or another process's commit seen
through its notification) or ``feed_poll_seconds`` passed, it reads the feed
from its cursor, collects the items that changed and reloads their vectors. A
cursor that fell out of the feed's retention makes it reload everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from hivemem.backends.base import Backend
from hivemem.errors import CursorExpired

Key = tuple[str, str]

_SYNC_BATCH = 1000


class VectorIndex:
    """The vectors of one model, for every searchable item of a store.

    Args:
        backend: the store's backend.
        model: the embedder's name; vectors by other models are ignored.
        dim: the embedder's dimension.
        poll_seconds: catch up at least this often even without a change signal.
    """

    def __init__(self, backend: Backend, model: str, dim: int, poll_seconds: float) -> None:
        self.backend = backend
        self.model = model
        self.dim = dim
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._cursor: str | None = None
        self._generation = -1
        self._synced_at = 0.0
        self._keys: list[Key] = []
        self._pos: dict[Key, int] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._ns_ids = np.zeros(0, dtype=np.int32)
        self._ns_index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    async def sync(self) -> None:
        """Catch up with the store (see the module notes)."""
        async with self._lock:
            changes = self.backend.changes
            if self._cursor is None:
                await self._load()
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
                await self._load()
                return
            if changed:
                found = await self.backend.vectors_of(sorted(changed), self.model)
                for key in changed:
                    vec = found.get(key)
                    if vec is None:
                        self._remove(key)
                    else:
                        self._set(key, vec)
            self._cursor = cursor
            self._generation = generation
            self._synced_at = time.monotonic()

    async def _load(self) -> None:
        generation = self.backend.changes.generation
        cursor = await self.backend.head()  # before the load: later changes are replayed
        rows = await self.backend.load_vectors(self.model)
        self._keys, self._pos, self._ns_index = [], {}, {}
        self._matrix = np.zeros((max(1024, len(rows)), self.dim), dtype=np.float32)
        self._ns_ids = np.zeros(self._matrix.shape[0], dtype=np.int32)
        for ns, key, vec in rows:
            self._set((ns, key), vec)
        self._cursor = cursor
        self._generation = generation
        self._synced_at = time.monotonic()

    def _set(self, key: Key, vec: bytes) -> None:
        row = np.frombuffer(vec, dtype=np.float32)
        if row.shape[0] != self.dim:
            self._remove(key)
            return
        pos = self._pos.get(key)
        if pos is None:
            pos = len(self._keys)
            if pos == self._matrix.shape[0]:
                grown = max(1024, 2 * pos)
                self._matrix = np.resize(self._matrix, (grown, self.dim))
                self._ns_ids = np.resize(self._ns_ids, grown)
            self._keys.append(key)
            self._pos[key] = pos
        self._matrix[pos] = row
        self._ns_ids[pos] = self._ns_index.setdefault(key[0], len(self._ns_index))

    def _remove(self, key: Key) -> None:
        pos = self._pos.pop(key, None)
        if pos is None:
            return
        last = len(self._keys) - 1
        if pos != last:  # move the last row into the hole
            moved = self._keys[last]
            self._keys[pos] = moved
            self._pos[moved] = pos
            self._matrix[pos] = self._matrix[last]
            self._ns_ids[pos] = self._ns_ids[last]
        self._keys.pop()

    def search(
        self,
        query: npt.NDArray[np.float32],
        prefix: str,
        allowed: Iterable[Key] | None,
        k: int,
    ) -> list[tuple[Key, float]]:
        """The ``k`` most similar items at or under ``prefix`` (and in ``allowed`` when
        given): ((namespace, key), cosine similarity), best first."""
        n = len(self._keys)
        if n == 0 or k <= 0:
            return []
        scores = self._matrix[:n] @ query
        mask: npt.NDArray[np.bool_] | None = None
        if prefix:
            ids = [
                i for ns, i in self._ns_index.items() if ns == prefix or ns.startswith(prefix + "/")
            ]
            mask = np.isin(self._ns_ids[:n], np.asarray(ids, dtype=np.int32))
        if allowed is not None:
            keep = np.zeros(n, dtype=bool)
            rows = [self._pos[key] for key in allowed if key in self._pos]
            keep[rows] = True
            mask = keep if mask is None else mask & keep
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self._keys[i], float(scores[i])) for i in top if np.isfinite(scores[i])]
