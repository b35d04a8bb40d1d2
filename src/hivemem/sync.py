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
    call :meth:`close` to stop its background event loop. Open one with
    :func:`hivemem.connect_sync`.

    Every method may also raise :class:`~hivemem.errors.InvalidInput` or
    :class:`~hivemem.errors.TooLarge` for a bad argument (nothing is written; ``field``
    names it) and :class:`~hivemem.errors.Unavailable` when the store or service cannot
    be reached. Methods of a closed hive raise ``RuntimeError``.
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
        """Connect to the store or service now; the first operation does it otherwise.

        Raises:
            Unavailable: the store or service cannot be reached.
        """
        self._portal.call(self._hive.open)

    def close(self) -> None:
        """Close the hive and, for the owner of the loop, stop the background loop.

        Views from :meth:`as_agent` share the connection: closing one of them does nothing,
        closing the hive they came from closes them all. Calls after closing raise
        ``RuntimeError``. Calling it twice is harmless.
        """
        if not self._owner or self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            self._portal.call(self._hive.close)
        finally:
            loop.stop()

    def as_agent(self, agent: str) -> SyncHive:
        """A view acting for ``agent``, sharing this hive's connection and loop.

        Args:
            agent: the identity stamped as author of the view's writes (one namespace
                segment: letters, digits, ``_ - . : @ +``).

        Returns:
            A :class:`SyncHive`; closing it does not close this one.

        Raises:
            InvalidInput: ``agent`` is not a valid identity (field ``agent``).
        """
        assert self._loop is not None, "SyncHive is closed"
        return SyncHive(self._hive.as_agent(agent), _loop=self._loop)

    def ping(self) -> None:
        """Check that the store (or the service and its store) answers.

        Raises:
            Unavailable: it does not.
        """
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
        """Create or replace the item at (``namespace``, ``key``).

        Args:
            namespace: 1-8 segments joined by ``/``, e.g. ``"team/research"``.
            key: 1-512 bytes of UTF-8, no ``/`` or control characters.
            value: any JSON value, at most ``max_value_bytes`` (1 MiB) as JSON.
            if_version: ``None`` writes unconditionally; ``0`` only if the item is absent;
                ``n`` only if the item is at version ``n`` (compare-and-set).
            ttl: seconds until the item expires (> 0); ``None``: never. Each write sets the
                expiry anew.
            text: what search indexes (at most ``max_text_bytes``, 256 KiB); by default a
                string value, or the value's ``text`` or ``content`` field.
            metadata: a JSON object of attributes that search can filter on (16 KiB).

        Returns:
            The stored :class:`Item`: version 1 on create, previous version + 1 otherwise,
            ``author`` set to this hive's agent.

        Raises:
            Conflict: ``if_version`` did not match; ``current_version`` is the version found
                (0: absent). Nothing was written.
            InvalidInput, TooLarge: a bad or oversized argument (``field`` names it).
        """

        async def run() -> Item:
            return await self._hive.put(
                namespace, key, value, if_version=if_version, ttl=ttl, text=text, metadata=metadata
            )

        return self._portal.call(run)

    def get(self, namespace: str, key: str) -> Item | None:
        """The item at (``namespace``, ``key``).

        Returns:
            The current :class:`Item`, or ``None`` when it is absent or expired.
        """
        return self._portal.call(self._hive.get, namespace, key)

    def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        """Delete the item at (``namespace``, ``key``) and its history.

        Args:
            if_version: delete only if the item is at this version.

        Returns:
            True if an item was deleted, False if there was none.

        Raises:
            Conflict: ``if_version`` was given and the item is absent or at another version
                (``current_version`` says which); nothing was deleted.
        """

        async def run() -> bool:
            return await self._hive.delete(namespace, key, if_version=if_version)

        return self._portal.call(run)

    def list(self, prefix: str = "", *, limit: int = 100, cursor: str | None = None) -> Page[Item]:
        """One page of the items whose namespace is ``prefix`` or under it, by (namespace, key).

        Args:
            prefix: a namespace (matched by whole segments), or ``""`` for every namespace.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page; ``None`` for the first page.

        Returns:
            A :class:`Page` of :class:`Item`; its ``next_cursor`` is ``None`` on the last page.
        """

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
        """One page of the namespaces holding a live item at or under ``prefix``, sorted.

        Args:
            prefix: a namespace, or ``""`` for all.
            max_depth: cut names to this many segments (duplicates removed); ``None``: whole.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Returns:
            A :class:`Page` of namespace strings.
        """

        async def run() -> Page[str]:
            return await self._hive.list_namespaces(
                prefix, max_depth=max_depth, limit=limit, cursor=cursor
            )

        return self._portal.call(run)

    def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        """Apply puts and deletes atomically: all of them, or none.

        Args:
            ops: 1..``max_batch_ops`` (100) :class:`PutOp` / :class:`DeleteOp`, with the
                arguments of :meth:`put` and :meth:`delete`.

        Returns:
            One result per op, in order: the stored :class:`Item` of a put, the boolean of
            :meth:`delete` for a delete.

        Raises:
            Conflict: an op's ``if_version`` did not match (``field`` names the op, e.g.
                ``ops.3.if_version``); nothing was written.
        """
        return self._portal.call(self._hive.batch, ops)

    def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        """Stored versions of an item, newest first, the current one included.

        At most ``history_limit`` (10) versions are kept per item; deleting or expiring the
        item deletes its history.

        Args:
            limit: most versions to return, 1..``max_page_size`` (1000).

        Returns:
            A list of :class:`Item`, empty when the item is absent.
        """

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
        """Find live items at or under ``prefix`` by meaning and by words, best first.

        Indexed: the item's ``text`` if given, else its value when it is a string, else the
        value's ``text`` or ``content`` field. The first call of an embedded hive loads the
        embedding model (about 1-1.5 s).

        Args:
            prefix: a namespace, or ``""`` for all.
            query: non-empty text, at most 4096 characters.
            filter: metadata conditions: ``{"key": value}`` for equality, or
                ``{"key": {"$in": [...]}}`` / ``{"$gt"|"$gte"|"$lt"|"$lte"|"$eq": v}``.
            author: only items whose current version this agent wrote.
            updated_after, updated_before: exclusive bounds on ``updated_at`` (an aware
                datetime or UNIX seconds).
            mode: ``"hybrid"`` (BM25 and vectors fused by rank; BM25 alone without an
                embedder), ``"vector"`` or ``"lexical"``.
            limit: most hits, 1..``max_search_limit`` (100).

        Returns:
            A list of :class:`SearchHit`: the item, its fused score and per-mode rank and score.

        Raises:
            InvalidInput: a bad argument (``field`` names it), or ``mode="vector"`` without
                an embedder.
            Unavailable: the embedder cannot be reached.
        """

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
        """Create a conversation session.

        Args:
            app: the application (one namespace segment); sessions are listed by it.
            user: the end user of the conversation (one segment), or ``None``.
            agent: the agent owning the conversation (one segment), or ``None``.
            session_id: your own id (one segment); a new one is made when ``None``.
            metadata: a JSON object stored with the session.
            state: an initial state document (saved as state version 1).

        Returns:
            The new :class:`Session` (counters at 0).

        Raises:
            Conflict: a session with ``session_id`` exists.
        """

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
        """The session with id ``session_id``: identity, state and counters.

        Raises:
            NotFound: no such session.
        """
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
        """One page of the sessions matching every given identifier, oldest first.

        Args:
            app, user, agent: filters; ``None`` matches any.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Returns:
            A :class:`Page` of :class:`Session`.
        """

        async def run() -> Page[Session]:
            return await self._hive.list_sessions(
                app=app, user=user, agent=agent, limit=limit, cursor=cursor
            )

        return self._portal.call(run)

    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages.

        Returns:
            True if a session was deleted, False if there was none.
        """
        return self._portal.call(self._hive.delete_session, session_id)

    def append_messages(
        self, session_id: str, messages: Sequence[MessageIn | dict[str, Any]]
    ) -> builtins.list[Message]:
        """Append messages to the session's log in one atomic step.

        Each message gets the next sequence number; the session's counters (messages,
        turns, tokens, cost, last activity) move with it.

        Args:
            messages: :class:`MessageIn` or dicts with its fields (``role``, ``content``,
                ``tokens_in``, ``tokens_out``, ``cost``, ``metadata``).

        Returns:
            The stored :class:`Message` list, in order, with ``seq`` and ``author`` set.

        Raises:
            NotFound: no such session.
        """
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
        """Append one message to the session's log; see :meth:`append_messages`.

        Args:
            role: ``"user"``, ``"assistant"``, ``"system"``, ``"tool"`` or your own.
            content: text or any JSON value.
            tokens_in, tokens_out: token counts of the turn (0 .. 2**40).
            cost: cost of the turn (>= 0, in your currency).
            metadata: a JSON object stored with the message.

        Returns:
            The stored :class:`Message` with its sequence number ``seq``.

        Raises:
            NotFound: no such session.
        """

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
        """Messages of a session with sequence number > ``after``, in order.

        Args:
            after: 0 for the first message on.
            limit: most messages to return, 1..``max_page_size`` (1000).

        Returns:
            A list of :class:`Message`, at most ``limit``.

        Raises:
            NotFound: no such session.
        """

        async def run() -> builtins.list[Message]:
            return await self._hive.get_messages(session_id, after=after, limit=limit)

        return self._portal.call(run)

    def save_state(
        self, session_id: str, state: dict[str, Any], *, if_version: int | None = None
    ) -> Session:
        """Replace the session's state document.

        Args:
            state: the new state, a JSON object.
            if_version: save only if ``state_version`` is this (compare-and-set; 0 before the
                first save); ``None`` saves unconditionally.

        Returns:
            The :class:`Session` with the new state and ``state_version`` + 1.

        Raises:
            NotFound: no such session.
            Conflict: ``if_version`` is not the current ``state_version``
                (``current_version`` says which).
        """

        async def run() -> Session:
            return await self._hive.save_state(session_id, state, if_version=if_version)

        return self._portal.call(run)

    # Events

    def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        """One page of the change feed: events under ``prefix`` after ``after``, oldest first.

        Args:
            prefix: a namespace, or ``""`` for every event.
            after: a cursor of an event or a ``next_cursor``; ``None`` or ``"0"`` starts at
                the oldest retained event.
            limit: page size, 1..``max_page_size`` (1000).

        Returns:
            A :class:`Page` of :class:`Event`; its ``next_cursor`` is where to continue
            (never ``None``: the feed has no last page).

        Raises:
            CursorExpired: events after ``after`` were already trimmed.
        """

        async def run() -> Page[Event]:
            return await self._hive.read_events(prefix, after=after, limit=limit)

        return self._portal.call(run)

    def head(self) -> str:
        """The cursor of the newest event in the feed (``"0"`` when it is empty).

        Pass it as ``after`` to :meth:`watch` or :meth:`read_events` to see only what
        happens from now on, without missing an event written in between.
        """
        return self._portal.call(self._hive.head)

    def watch(self, prefix: str = "", *, after: str | None = None) -> Generator[Event, None, None]:
        """Follow the change feed: events under ``prefix``, replayed from ``after``, then live.

        A blocking iterator over :meth:`Hive.watch`; closing it (``.close()``, or
        ``with contextlib.closing(hive.watch(...)) as events``) ends the subscription. An
        exception in the calling thread while it waits (Ctrl-C) cancels the pending read
        on the event loop before the subscription is closed.

        Args:
            prefix: a namespace, or ``""`` for every event.
            after: a cursor (of an event, ``next_cursor`` or :meth:`head`) to resume
                after; ``"0"`` replays from the oldest retained event; ``None``: only
                events after now.

        Yields:
            Each matching :class:`Event` exactly once, in feed order; it never ends by
            itself (each ``next()`` blocks until an event comes).

        Raises:
            CursorExpired: events after ``after`` were already trimmed.
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
        """Publish an event on ``channel`` for watchers; nothing is stored as an item.

        Args:
            channel: a namespace.
            payload: any JSON value, at most ``max_payload_bytes`` (64 KiB).

        Returns:
            The published :class:`Event` (type ``"publish"``) with its feed cursor.
        """
        event: Event = self._portal.call(self._hive.publish, channel, payload)
        return event


async def _close_when_idle(agen: AsyncGenerator[Event, None]) -> None:
    """Close ``agen`` once a cancelled ``__anext__`` has finished unwinding."""
    for _ in range(1000):
        if not agen.ag_running:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.001)
    await agen.aclose()
