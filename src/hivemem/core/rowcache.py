"""What search filters look at, for every live item, kept in process through the feed.

A filtered search ranks candidates in process (vectors, in-memory BM25) and must
then drop those that fail the filter or have expired. Asking the store for each
candidate's row costs about 20 microseconds a row on SQLite (a network round trip
on Redis); this cache answers from memory: each item's author, update time, expiry
and metadata (not its value), loaded with ``list_items`` on first use and kept
current like the indexes (:mod:`hivemem.core.mirror`) with ``get_items``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hivemem.backends.base import Backend
from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.rows import ItemRow
from hivemem.core.mirror import FeedMirror, Key

__all__ = ["RowCache"]

_PAGE = 1000


def _slim(row: ItemRow) -> ItemRow:
    """The row without its value and text (filters never look at them)."""
    return ItemRow(
        row.namespace,
        row.key,
        b"",
        row.version,
        row.author,
        row.created_at,
        row.updated_at,
        row.expires_at,
        None,
        row.metadata,
    )


class RowCache(FeedMirror):
    """Filter fields of every live item of a store.

    Args:
        backend: the store's backend.
        poll_seconds: catch up at least this often even without a change signal.
    """

    def __init__(self, backend: Backend, poll_seconds: float) -> None:
        super().__init__(backend, poll_seconds)
        self._rows: dict[Key, ItemRow] = {}

    def __len__(self) -> int:
        return len(self._rows)

    async def _load_all(self) -> None:
        rows: dict[Key, ItemRow] = {}
        after: tuple[str, str] | None = None
        now = time.time()
        while True:
            page = await self.backend.list_items("", after, _PAGE, now)
            for row in page:
                rows[(row.namespace, row.key)] = _slim(row)
            if len(page) < _PAGE:
                break
            after = (page[-1].namespace, page[-1].key)
        self._rows = rows

    async def _apply(self, changed: list[Key]) -> None:
        found = {
            (r.namespace, r.key): r for r in await self.backend.get_items(changed, time.time())
        }
        for key in changed:
            row = found.get(key)
            if row is None:
                self._rows.pop(key, None)
            else:
                self._rows[key] = _slim(row)

    def check(
        self, keys: Sequence[Key], conditions: Sequence[Condition], now: float
    ) -> tuple[set[Key], list[Key]]:
        """Which of ``keys`` are live at ``now`` and match every condition, and which
        this cache does not know (written after its last catch-up; ask the store)."""
        passing: set[Key] = set()
        unknown: list[Key] = []
        rows = self._rows
        for key in keys:
            row = rows.get(key)
            if row is None:
                unknown.append(key)
            elif (row.expires_at is None or row.expires_at > now) and row_matches(row, conditions):
                passing.add(key)
        return passing, unknown
