"""What the adapters share: reaching the hive from a framework's threads and loops, and
reading every page of a listing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from hivemem.hive import Hive
    from hivemem.models import Item
    from hivemem.sync import SyncHive

T = TypeVar("T")
#: Page size of the listings (hivemem's ``max_page_size`` default).
PAGE = 1000


class Bridge:
    """An adapter's way to its hive, given an async :class:`~hivemem.Hive` or a
    :class:`~hivemem.SyncHive` (whose background loop any thread may use).

    Attributes:
        hive: the async Hive (a SyncHive's own).
    """

    def __init__(self, hive: Hive | SyncHive, owner: str) -> None:
        from hivemem.sync import SyncHive

        self.owner = owner
        if isinstance(hive, SyncHive):
            self.hive: Hive = hive.hive
            self._portal: Any = hive._portal
        else:
            self.hive = hive
            self._portal = None
        self._loop: asyncio.AbstractEventLoop | None = None
        try:  # an async hive made on a running loop is used on that loop
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass

    def blocking(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the hive's loop and wait for it (from a thread
        that is not that loop's).

        Raises:
            RuntimeError: an async hive called from its own loop, or with no running loop
                to call it on.
        """
        if self._portal is not None:
            return self._portal.call(lambda: fn(*args, **kwargs))  # type: ignore[no-any-return]
        loop = self._loop
        try:
            asyncio.get_running_loop()
            here = True
        except RuntimeError:
            here = False
        if loop is None or here or not loop.is_running():
            raise RuntimeError(
                f"{self.owner}'s blocking methods need a SyncHive (hivemem.connect_sync), or "
                "use its async methods with an async hive"
            )
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), loop).result()  # type: ignore[arg-type]

    async def on_hive(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` on the hive's loop: the caller's for an async hive, the
        SyncHive's own otherwise (from any other loop)."""
        if self._portal is None:
            return await fn()
        return await asyncio.wrap_future(self._portal.start_task_soon(fn))


async def every_item(
    hive: Hive, namespace: str, *, key_prefix: str | None = None
) -> AsyncIterator[Item]:
    """Every item :meth:`Hive.list` gives for ``namespace`` (and ``key_prefix``), page
    after page, in its order."""
    cursor: str | None = None
    while True:
        page = await hive.list(namespace, key_prefix=key_prefix, limit=PAGE, cursor=cursor)
        for item in page.items:
            yield item
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


async def every_namespace(hive: Hive, prefix: str) -> AsyncIterator[str]:
    """Every namespace :meth:`Hive.list_namespaces` gives under ``prefix``, page after
    page."""
    cursor: str | None = None
    while True:
        page = await hive.list_namespaces(prefix, limit=PAGE, cursor=cursor)
        for namespace in page.items:
            yield namespace
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
