"""OpenAI Agents SDK sessions on hivemem (``pip install 'hivemem[openai-agents]'``;
openai-agents 0.24).

``HivememSession`` implements the SDK's ``Session`` protocol, so
``Runner.run(agent, input, session=HivememSession("user-42", hive))`` keeps the
conversation in hivemem and a run in another process (or pod) continues it.

Layout: one namespace per session, ``<prefix>/<session id>`` (escaped as
:mod:`hivemem.integrations.labels` says), holding

- ``head``: ``{"next": n}``, the sequence number the next item gets;
- one item per conversation item, keyed ``i.<999999999999 - seq>`` (twelve digits), so
  hivemem's key order lists the newest first and "the latest N" is one page; the value
  is the SDK's item, kept as opaque JSON (and out of search).

``add_items`` writes its items and moves ``head`` in one hivemem batch, with
compare-and-set on ``head``'s version: two processes appending at once never take the
same numbers (the loser reads ``head`` again and retries), so every item is kept once
and in one order. ``pop_item`` deletes the newest item with compare-and-set on its
version (two pops never return the same item). ``clear_session`` deletes the items;
``head`` stays, so numbers keep growing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import tenacity

from hivemem import models
from hivemem.backoff import Backoff
from hivemem.errors import Conflict
from hivemem.integrations._common import PAGE, Bridge
from hivemem.integrations.labels import encode_label

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory.session_settings import SessionSettings

    from hivemem.hive import Hive
    from hivemem.sync import SyncHive

_TOP = 10**12 - 1
_BATCH = 100
#: Compare-and-set attempts before an append or pop gives up (raising Conflict).
ATTEMPTS = 50


class HivememSession:
    """An OpenAI Agents SDK ``Session`` kept in a hive.

    Args:
        session_id: the conversation's id (any string).
        hive: an async :class:`~hivemem.Hive` used on the caller's event loop
            (``Runner.run``), or a :class:`~hivemem.SyncHive`, which works from any loop
            (``Runner.run_sync`` runs one of its own).
        prefix: the hivemem namespace sessions are kept under.
        session_settings: the SDK's ``SessionSettings`` (e.g. a default ``limit``).

    Raises (from every method): :class:`~hivemem.errors.Unavailable` when the store or
    service cannot be reached; :class:`~hivemem.errors.TooLarge` for an item over the
    hive's ``max_value_bytes``; :class:`~hivemem.errors.Conflict` when
    :data:`ATTEMPTS` compare-and-set rounds in a row lost to other writers.
    """

    def __init__(
        self,
        session_id: str,
        hive: Hive | SyncHive,
        *,
        prefix: str = "openai-agents",
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.session_settings = session_settings
        self._bridge = Bridge(hive, "HivememSession")
        self._hive = self._bridge.hive
        self.namespace = f"{prefix}/{encode_label(session_id)}"

    @staticmethod
    def _key(seq: int) -> str:
        return f"i.{_TOP - seq:012d}"

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The conversation, oldest first: all of it, or its latest ``limit`` items
        (default: ``session_settings.limit``)."""
        if limit is None and self.session_settings is not None:
            limit = getattr(self.session_settings, "limit", None)

        async def run() -> list[Any]:
            newest_first: list[Any] = []
            cursor: str | None = None
            while limit is None or len(newest_first) < limit:
                size = PAGE if limit is None else min(PAGE, limit - len(newest_first))
                page = await self._hive.list(
                    self.namespace, key_prefix="i.", limit=size, cursor=cursor
                )
                newest_first += [i.value for i in page.items]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            return newest_first[::-1]

        if limit is not None and limit <= 0:
            return []
        return await self._bridge.on_hive(run)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` after every item already kept (see the module notes)."""
        if not items:
            return
        values = [dict(item) for item in items]

        async def run() -> None:
            backoff = Backoff(
                tenacity.wait_random(0.001, 0.005) + tenacity.wait_incrementing(0, 0.005)
            )
            for attempt in range(ATTEMPTS):
                head = await self._hive.get(self.namespace, "head")
                first = int(head.value["next"]) if head is not None else 0
                claim = models.PutOp(
                    namespace=self.namespace,
                    key="head",
                    value={"next": first + len(values)},
                    if_version=head.version if head is not None else 0,
                )
                puts = [
                    models.PutOp(
                        namespace=self.namespace, key=self._key(first + i), value=v, text=""
                    )
                    for i, v in enumerate(values)
                ]
                try:
                    if len(puts) < _BATCH:  # the numbers and the items in one batch
                        await self._hive.batch([claim, *puts])
                        return
                    await self._hive.batch([claim])  # the numbers first, then the items
                except Conflict:
                    if attempt == ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(backoff.next())
                    continue
                for start in range(0, len(puts), _BATCH):
                    await self._hive.batch(list(puts[start : start + _BATCH]))
                return

        await self._bridge.on_hive(run)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item, or None when the session is empty."""

        async def run() -> Any:
            for attempt in range(ATTEMPTS):
                page = await self._hive.list(self.namespace, key_prefix="i.", limit=1)
                if not page.items:
                    return None
                newest = page.items[0]
                try:
                    await self._hive.delete(self.namespace, newest.key, if_version=newest.version)
                except Conflict:  # popped or replaced meanwhile: look again
                    if attempt == ATTEMPTS - 1:
                        raise
                    continue
                return newest.value
            return None

        return await self._bridge.on_hive(run)

    async def clear_session(self) -> None:
        """Delete every item of the conversation."""

        async def run() -> None:
            while True:
                page = await self._hive.list(self.namespace, key_prefix="i.", limit=_BATCH)
                if not page.items:
                    return
                await self._hive.batch(
                    [models.DeleteOp(namespace=self.namespace, key=i.key) for i in page.items]
                )

        await self._bridge.on_hive(run)


__all__ = ["ATTEMPTS", "HivememSession"]
