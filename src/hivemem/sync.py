"""SyncHive: the blocking facade over an async Hive.

It owns an event loop in a background thread (an anyio blocking portal) and runs
the async Hive's own methods there, so there is one implementation of every
operation, not two.
"""

from __future__ import annotations

import asyncio
import builtins
import queue
import threading
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self, cast

import anyio
from anyio.from_thread import BlockingPortal

from hivemem.hive import Hive
from hivemem.models import (
    DeleteOp,
    Event,
    Item,
    Message,
    MessageIn,
    Page,
    PutOp,
    SearchHit,
    Session,
)

__all__ = ["SyncHive"]


class _LoopThread:
    """An event loop in a daemon thread, reached through a blocking portal.

    A daemon thread, so a SyncHive that is never closed does not keep the
    interpreter from exiting (anyio's ``start_blocking_portal`` uses a worker
    thread that the interpreter joins at exit).
    """

    def __init__(self) -> None:
        ready: queue.SimpleQueue[BlockingPortal | BaseException] = queue.SimpleQueue()

        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.put(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(serve)
            except BaseException as exc:  # surfaced to the constructor below
                ready.put(exc)

        self.thread = threading.Thread(target=run, name="hivemem-sync", daemon=True)
        self.thread.start()
        started = ready.get()
        if isinstance(started, BaseException):
            raise started
        self.portal = started

    def stop(self) -> None:
        self.portal.call(self.portal.stop)
        self.thread.join()


class SyncHive:
    """A blocking Hive: the same methods as :class:`~hivemem.Hive`, without ``await``.

    Methods, arguments, return values and exceptions are those of the async Hive
    it wraps (see :class:`~hivemem.Hive` for each). Use it as a context manager or
    call :meth:`close` to stop its background event loop.
    """

    def __init__(self, hive: Hive, *, _loop: _LoopThread | None = None) -> None:
        self._hive = hive
        self._owner = _loop is None
        self._loop: _LoopThread | None = _loop or _LoopThread()
        self._portal = self._loop.portal

    @property
    def agent(self) -> str:
        """The agent identity this hive acts for."""
        return self._hive.agent

    @property
    def hive(self) -> Hive:
        """The async Hive this facade drives."""
        return self._hive

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        self._portal.call(self._hive.open)

    def close(self) -> None:
        """Close the hive and, for the owner of the loop, stop the background loop."""
        if not self._owner or self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            self._portal.call(self._hive.close)
        finally:
            loop.stop()

    def as_agent(self, agent: str) -> SyncHive:
        """A view acting for ``agent``, sharing this hive's connection and loop."""
        assert self._loop is not None, "SyncHive is closed"
        return SyncHive(self._hive.as_agent(agent), _loop=self._loop)

    def ping(self) -> None:
        self._portal.call(self._hive.ping)

    # Items

    def put(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        if_version: int | None = None,
        ttl: float | None = None,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Item:
        async def run() -> Item:
            return await self._hive.put(
                namespace, key, value, if_version=if_version, ttl=ttl, text=text, metadata=metadata
            )

        return self._portal.call(run)

    def get(self, namespace: str, key: str) -> Item | None:
        return self._portal.call(self._hive.get, namespace, key)

    def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        async def run() -> bool:
            return await self._hive.delete(namespace, key, if_version=if_version)

        return self._portal.call(run)

    def list(self, prefix: str = "", *, limit: int = 100, cursor: str | None = None) -> Page[Item]:
        async def run() -> Page[Item]:
            return await self._hive.list(prefix, limit=limit, cursor=cursor)

        return self._portal.call(run)

    def list_namespaces(
        self,
        prefix: str = "",
        *,
        max_depth: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[str]:
        async def run() -> Page[str]:
            return await self._hive.list_namespaces(
                prefix, max_depth=max_depth, limit=limit, cursor=cursor
            )

        return self._portal.call(run)

    def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        return self._portal.call(self._hive.batch, ops)

    def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        async def run() -> builtins.list[Item]:
            return await self._hive.history(namespace, key, limit=limit)

        return self._portal.call(run)

    def search(
        self,
        prefix: str,
        query: str,
        *,
        filter: Mapping[str, Any] | None = None,
        author: str | None = None,
        updated_after: datetime | float | None = None,
        updated_before: datetime | float | None = None,
        mode: Literal["hybrid", "vector", "lexical"] = "hybrid",
        limit: int = 10,
    ) -> builtins.list[SearchHit]:
        async def run() -> builtins.list[SearchHit]:
            return await self._hive.search(
                prefix,
                query,
                filter=filter,
                author=author,
                updated_after=updated_after,
                updated_before=updated_before,
                mode=mode,
                limit=limit,
            )

        return self._portal.call(run)

    # Sessions

    def create_session(
        self,
        *,
        app: str,
        user: str | None = None,
        agent: str | None = None,
        session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
    ) -> Session:
        async def run() -> Session:
            return await self._hive.create_session(
                app=app,
                user=user,
                agent=agent,
                session_id=session_id,
                metadata=metadata,
                state=state,
            )

        return self._portal.call(run)

    def get_session(self, session_id: str) -> Session:
        return self._portal.call(self._hive.get_session, session_id)

    def list_sessions(
        self,
        *,
        app: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Session]:
        async def run() -> Page[Session]:
            return await self._hive.list_sessions(
                app=app, user=user, agent=agent, limit=limit, cursor=cursor
            )

        return self._portal.call(run)

    def delete_session(self, session_id: str) -> bool:
        return self._portal.call(self._hive.delete_session, session_id)

    def append_messages(
        self, session_id: str, messages: Sequence[MessageIn | dict[str, Any]]
    ) -> builtins.list[Message]:
        return self._portal.call(self._hive.append_messages, session_id, messages)

    def append_message(
        self,
        session_id: str,
        role: str,
        content: Any,
        *,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
        metadata: dict[str, Any] | None = None,
    ) -> Message:
        async def run() -> Message:
            return await self._hive.append_message(
                session_id,
                role,
                content,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost=cost,
                metadata=metadata,
            )

        return self._portal.call(run)

    def get_messages(
        self, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[Message]:
        async def run() -> builtins.list[Message]:
            return await self._hive.get_messages(session_id, after=after, limit=limit)

        return self._portal.call(run)

    def save_state(
        self, session_id: str, state: dict[str, Any], *, if_version: int | None = None
    ) -> Session:
        async def run() -> Session:
            return await self._hive.save_state(session_id, state, if_version=if_version)

        return self._portal.call(run)

    # Events

    def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        async def run() -> Page[Event]:
            return await self._hive.read_events(prefix, after=after, limit=limit)

        return self._portal.call(run)

    def head(self) -> str:
        return self._portal.call(self._hive.head)

    def watch(self, prefix: str = "", *, after: str | None = None) -> Generator[Event, None, None]:
        """Blocking iterator over :meth:`Hive.watch`; closing it ends the subscription.

        An exception in the calling thread while it waits (Ctrl-C) cancels the
        pending read on the event loop before the subscription is closed.
        """
        agen = cast(AsyncGenerator[Event, None], self._hive.watch(prefix, after=after))
        try:
            while True:
                pending = self._portal.start_task_soon(agen.__anext__)
                try:
                    event: Event = pending.result()
                except StopAsyncIteration:
                    return
                except BaseException:
                    pending.cancel()
                    raise
                yield event
        finally:
            if self._loop is not None:
                self._portal.call(_close_when_idle, agen)

    def publish(self, channel: str, payload: Any) -> Event:
        event: Event = self._portal.call(self._hive.publish, channel, payload)
        return event


async def _close_when_idle(agen: AsyncGenerator[Event, None]) -> None:
    """Close ``agen`` once a cancelled ``__anext__`` has finished unwinding."""
    for _ in range(1000):
        if not agen.ag_running:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.001)
    await agen.aclose()
