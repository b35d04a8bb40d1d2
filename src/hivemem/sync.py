"""SyncHive: the blocking facade over an async Hive.

It owns an event loop in a background thread (an anyio blocking portal) and runs
the async Hive's own methods there, so there is one implementation of every
operation, not two.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import inspect
import queue
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast

import anyio
from anyio.from_thread import BlockingPortal

from hivemem.errors import HivememError, InvalidInput, OnceFailed
from hivemem.hive import Hive
from hivemem.models import (
    AgentRecord,
    DeleteOp,
    Event,
    IndexStatus,
    Item,
    Lease,
    Message,
    MessageIn,
    NamespaceCount,
    OnceTicket,
    Page,
    PutOp,
    QueueStats,
    SearchHit,
    Session,
    Signal,
    Task,
)

__all__ = ["SyncHive"]

T = TypeVar("T")


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
        #: ``with hive.lease()`` blocks still open, of this hive and its views.
        self.blocks: set[_LeaseBlock] = set()
        self.closing = False
        self.lock = threading.Lock()

    def end_blocks(self) -> None:
        """End the lease blocks still open (their tasks would keep the portal from
        stopping: only their own ``__exit__`` ends them)."""
        with self.lock:
            self.closing = True
            blocks, self.blocks = list(self.blocks), set()
        for block in blocks:
            with contextlib.suppress(Exception):
                block.end()

    def stop(self) -> None:
        self.portal.call(self.portal.stop)
        self.thread.join()


class _LeaseBlock(AbstractContextManager[Lease]):
    """``with hive.lease(...)``: :meth:`Hive.lease` entered and exited in one task on
    the loop (anyio's ``wrap_async_context_manager``), so its renewals run there while
    the block runs; ended early, once, if the hive is closed meanwhile."""

    def __init__(self, loop: _LoopThread, cm: AbstractAsyncContextManager[Lease]) -> None:
        self._loop = loop
        self._inner = loop.portal.wrap_async_context_manager(cm)
        self._open = False
        self._lock = threading.Lock()

    def __enter__(self) -> Lease:
        lease = self._inner.__enter__()
        with self._lock, self._loop.lock:
            if not self._loop.closing:
                self._open = True
                self._loop.blocks.add(self)
                return lease
        self._inner.__exit__(None, None, None)  # closed while acquiring
        raise RuntimeError("SyncHive is closed")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with self._lock:
            if not self._open:
                return None  # ended by close()
            self._open = False
            with self._loop.lock:
                self._loop.blocks.discard(self)
            return self._inner.__exit__(exc_type, exc, tb)

    def end(self) -> None:
        """Leave the async context manager now (the hive is closing)."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._inner.__exit__(None, None, None)


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

    One SyncHive may be shared by threads: their calls run concurrently on its loop.
    A call that waits (``wait=`` or ``timeout=``, :meth:`wait_signal`, :meth:`wait_for`)
    is cancelled on the loop if the calling thread gets an exception (Ctrl-C) meanwhile.

    The coordination helpers keep their background work on the loop while the calling
    thread runs: :meth:`lease` is a ``with`` block whose renewals run on the loop;
    :meth:`once` and :meth:`idempotent` call a plain function in the calling thread while
    the loop renews its key; :meth:`register` heartbeats from the loop until
    :meth:`unregister` or :meth:`close`. Predicates given to :meth:`wait_signal` and
    :meth:`wait_for` run on the loop's thread: they must be quick and must not call the
    hive. :meth:`Hive.worker` has no blocking form: run workers on an async Hive (or with
    ``hivemem worker``); their handlers may be plain functions.
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
            loop.end_blocks()
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
        fence: tuple[str, int] | None = None,
    ) -> Item:
        """Create or replace the item at (``namespace``, ``key``).

        On an embedded SQLite file the write runs in the calling thread when the hive's
        writer thread is idle (its own transaction and fsync); when it is busy, the put
        joins its next group commit through the hive's event loop.

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
            fence: ``(lease name, token)`` from :meth:`acquire` or :meth:`lease`: the write
                is refused once a newer token of that lease was issued (another agent
                acquired it after this one's lease ran out).

        Returns:
            The stored :class:`Item`: version 1 on create, previous version + 1 otherwise,
            ``author`` set to this hive's agent.

        Raises:
            Conflict: ``if_version`` did not match (``current_version`` is the version found,
                0: absent), or the fence is stale (field ``fence``). Nothing was written.
            InvalidInput, TooLarge: a bad or oversized argument (``field`` names it).
        """

        done, item = self._hive._put_here(
            namespace,
            key,
            value,
            if_version=if_version,
            ttl=ttl,
            text=text,
            metadata=metadata,
            fence=fence,
        )
        if done:
            assert item is not None
            return item

        async def run() -> Item:
            return await self._hive.put(
                namespace,
                key,
                value,
                if_version=if_version,
                ttl=ttl,
                text=text,
                metadata=metadata,
                fence=fence,
            )

        return self._portal.call(run)

    def get(self, namespace: str, key: str) -> Item | None:
        """The item at (``namespace``, ``key``).

        On an embedded SQLite file the read runs in the calling thread (a primary-key
        lookup through that thread's own connection); elsewhere it goes through the
        hive's event loop.

        Returns:
            The current :class:`Item`, or ``None`` when it is absent or expired.

        Raises:
            InvalidInput: a malformed namespace or key (``field`` names it).
        """
        done, item = self._hive._get_here(namespace, key)
        if done:
            return item
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

    def list(
        self,
        prefix: str = "",
        *,
        key_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Item]:
        """One page of the items whose namespace is ``prefix`` or under it, by (namespace, key).

        Args:
            prefix: a namespace (matched by whole segments), or ``""`` for every namespace.
            key_prefix: list only namespace ``prefix`` itself, the items whose key starts
                with this string (``""``: all of its items).
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page; ``None`` for the first page.

        Returns:
            A :class:`Page` of :class:`Item`; its ``next_cursor`` is ``None`` on the last page.

        Raises:
            InvalidInput: a malformed prefix or key prefix, ``key_prefix`` with
                ``prefix=""``, a limit out of range, a foreign cursor.
        """

        async def run() -> Page[Item]:
            return await self._hive.list(prefix, key_prefix=key_prefix, limit=limit, cursor=cursor)

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

    def namespace_counts(
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[NamespaceCount]:
        """One page of the namespaces holding a live item at or under ``prefix``, sorted,
        each with its number of live items (see :meth:`Hive.namespace_counts`).

        Args:
            prefix: a namespace, or ``""`` for all.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Returns:
            A :class:`Page` of :class:`NamespaceCount` (``namespace``, ``items``).

        Raises:
            InvalidInput: a malformed prefix, a limit out of range, a foreign cursor.
        """

        async def run() -> Page[NamespaceCount]:
            return await self._hive.namespace_counts(prefix, limit=limit, cursor=cursor)

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
        consistency: Literal["eventual", "indexed"] = "eventual",
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
            consistency: ``"eventual"``: rank what is indexed now (a write's words at
                once, its vector moments later: the indexer embeds after the commit);
                ``"indexed"``: first wait for the vectors of every earlier write.

        Returns:
            A list of :class:`SearchHit`: the item, its fused score and per-mode rank and score.

        Raises:
            InvalidInput: a bad argument (``field`` names it), or ``mode="vector"`` without
                an embedder.
            Unavailable: the embedder cannot be reached, or (``"indexed"``) the vectors
                took longer than ``index_wait_seconds`` (30).
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
                consistency=consistency,
            )

        return self._portal.call(run)

    def wait_indexed(self, cursor: str | None = None, *, timeout: float | None = None) -> bool:
        """Wait until every write made before the call has its vector (see
        :meth:`hivemem.Hive.wait_indexed`).

        Args:
            cursor: a feed cursor the caller has seen (covered in any case).
            timeout: seconds to wait at most (default ``index_wait_seconds``, 30).

        Returns:
            True when indexed, False when ``timeout`` passed first.

        Raises:
            InvalidInput: ``cursor`` not a string or ``timeout`` not a number >= 0.
        """
        return self._portal.call(lambda: self._hive.wait_indexed(cursor, timeout=timeout))

    def index_status(self) -> IndexStatus:
        """How far the vectors lag behind the writes: an :class:`IndexStatus` (entries
        waiting, the oldest one's age in seconds, whether the answering process indexes)."""
        return self._portal.call(self._hive.index_status)

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
        ttl: float | None = None,
    ) -> Session:
        """Create a conversation session.

        Args:
            app: the application (one namespace segment); sessions are listed by it.
            user: the end user of the conversation (one segment), or ``None``.
            agent: the agent owning the conversation (one segment), or ``None``.
            session_id: your own id (one segment); a new one is made when ``None``.
            metadata: a JSON object stored with the session.
            state: an initial state document (saved as state version 1).
            ttl: seconds of inactivity after which the session expires with its
                messages (every append and state save restarts it); ``None`` = never.

        Returns:
            The new :class:`Session` (counters at 0).

        Raises:
            Conflict: a session with ``session_id`` exists.
            InvalidInput: a malformed identifier, document or ttl (named field).
        """

        async def run() -> Session:
            return await self._hive.create_session(
                app=app,
                user=user,
                agent=agent,
                session_id=session_id,
                metadata=metadata,
                state=state,
                ttl=ttl,
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

    # Tasks

    def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        max_attempts: int = 3,
        backoff: float = 1.0,
        priority: int = 0,
        delay: float = 0,
    ) -> Task:
        """Put a task on ``queue`` (a namespace-like name, e.g. ``research/summaries``).

        Args:
            payload: any JSON value, at most ``max_payload_bytes`` (64 KiB) as JSON.
            idempotency_key: 1-512 bytes; a submit with a key the queue already holds
                returns that task and adds nothing (until the task is swept,
                ``task_retention_seconds`` after it finished).
            timeout: seconds one attempt may run; a worker fails an attempt that runs
                longer (``None``: no limit).
            max_attempts: 1-1000 claims before the task is dead.
            backoff: seconds before the first retry of a failed attempt; each further
                retry waits twice as long (capped at one hour).
            priority: -1000 .. 1000; higher is claimed first, then oldest first.
            delay: seconds before the task may be claimed.

        Returns:
            The :class:`Task` (state ``ready`` or ``delayed``), or the queue's task with
            ``idempotency_key``.
        """

        async def run() -> Task:
            return await self._hive.submit(
                queue,
                payload,
                idempotency_key=idempotency_key,
                timeout=timeout,
                max_attempts=max_attempts,
                backoff=backoff,
                priority=priority,
                delay=delay,
            )

        return self._portal.call(run)

    def claim(self, queue: str, *, lease: float = 30.0, wait: float | None = None) -> Task | None:
        """Take the next due task of ``queue`` and hold it for ``lease`` seconds.

        A task whose lease runs out without a :meth:`heartbeat` goes back to ready (the
        attempt counts) or, after its last attempt, is dead.

        Args:
            lease: seconds (0.1 .. 86400) before the task returns to the queue unless
                renewed by :meth:`heartbeat`.
            wait: seconds to wait for a task when none is due (``None`` or 0: answer at
                once).

        Returns:
            The :class:`Task` (state ``running``, ``attempt`` = this claim's number), or
            ``None``.
        """

        async def run() -> Task | None:
            return await self._hive.claim(queue, lease=lease, wait=wait)

        return self._wait(run)

    def heartbeat(self, task: Task, *, lease: float | None = None) -> Task:
        """Extend the lease of a task this agent holds: ``lease`` seconds from now
        (default: the claim's lease).

        Raises:
            NotFound: no such task (field ``task_id``).
            Conflict: this agent no longer holds that attempt: its lease ran out and the
                task moved on, or it was cancelled (field ``attempt``).
        """

        async def run() -> Task:
            return await self._hive.heartbeat(task, lease=lease)

        return self._portal.call(run)

    def complete(self, task: Task, result: Any = None) -> Task:
        """Finish a task this agent holds with ``result`` (any JSON, at most
        ``max_payload_bytes``); :meth:`result` waiters get it.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`; nothing is stored.
        """
        done: Task = self._portal.call(self._hive.complete, task, result)
        return done

    def fail(self, task: Task, error: str, *, retryable: bool = True) -> Task:
        """Fail the attempt this agent holds.

        ``error`` (at most 4,096 characters) is kept with the attempt's number. A
        retryable failure before the last attempt makes the task ready again after its
        backoff; otherwise it is dead.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`.
        """

        async def run() -> Task:
            return await self._hive.fail(task, error, retryable=retryable)

        return self._portal.call(run)

    def release_task(self, task: Task) -> Task:
        """Give back a task this agent holds without running it (a worker shutting
        down): it is ready again at once and the attempt does not count.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`.
        """
        return self._portal.call(self._hive.release_task, task)

    def result(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task, once it is completed, dead or cancelled, or when ``wait`` seconds
        have passed (``None`` or 0: at once).

        Check ``task.done`` / ``task.state``: ``task.result`` is the worker's result,
        ``task.errors`` each failed attempt's error.

        Raises:
            NotFound: no such task (field ``task_id``).
        """

        async def run() -> Task:
            return await self._hive.result(task_id, wait=wait)

        return self._wait(run)

    def cancel(self, task_id: str) -> Task:
        """Cancel a ready, delayed or running task (a running one's worker is refused on
        its next heartbeat or finish).

        Raises:
            NotFound: no such task.
            Conflict: it is already completed, dead or cancelled (field ``task_id``).
        """
        return self._portal.call(self._hive.cancel, task_id)

    def requeue(self, task_id: str, *, delay: float = 0) -> Task:
        """Put a dead or cancelled task back on its queue with a fresh set of attempts
        (its past errors are kept), due after ``delay`` seconds.

        Raises:
            NotFound: no such task.
            Conflict: it is not dead or cancelled (field ``task_id``).
        """

        async def run() -> Task:
            return await self._hive.requeue(task_id, delay=delay)

        return self._portal.call(run)

    def get_task(self, task_id: str) -> Task | None:
        """The task, or ``None`` if there is none (or it was swept after retention)."""
        return self._portal.call(self._hive.get_task, task_id)

    def list_tasks(
        self,
        queue: str,
        *,
        state: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Task]:
        """The tasks of ``queue`` in submission order, one page at a time.

        Args:
            state: only tasks in this state (``ready`` includes ``delayed`` ones).
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Returns:
            A :class:`Page` of :class:`Task`.
        """

        async def run() -> Page[Task]:
            return await self._hive.list_tasks(queue, state=state, limit=limit, cursor=cursor)

        return self._portal.call(run)

    def queue_stats(self, queue: str) -> QueueStats:
        """How many tasks of ``queue`` are in each state."""
        return self._portal.call(self._hive.queue_stats, queue)

    def queues(self) -> builtins.list[QueueStats]:
        """The queues holding at least one task that this agent may use, by name, each
        with its :meth:`queue_stats` (at most ``max_page_size``, 1000)."""
        return self._portal.call(self._hive.queues)

    # Leases and signals

    def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease:
        """Acquire the lease ``name`` (a namespace-like name) for ``ttl`` seconds.

        Nothing renews it: call :meth:`renew`, or use :meth:`lease`, which does.

        Args:
            ttl: 0.1 .. 86400 seconds; the lease ends then unless renewed.
            wait: seconds to wait while another agent holds it (``None``: do not wait).

        Returns:
            The :class:`Lease`, with a fencing token larger than any issued before for
            ``name`` (pass ``fence=(name, token)`` to :meth:`put`).

        Raises:
            Conflict: another agent holds it and ``wait`` ran out (field ``name``).
        """

        async def run() -> Lease:
            return await self._hive.acquire(name, ttl, wait=wait)

        return self._wait(run)

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend a lease this agent holds by ``ttl`` seconds from now (default: its ttl).

        Returns:
            The renewed :class:`Lease` (pass it to the next renew or release).

        Raises:
            Conflict: the lease ended or was taken by someone else (field ``lease``).
        """

        async def run() -> Lease:
            return await self._hive.renew(lease, ttl=ttl)

        return self._portal.call(run)

    def release(self, lease: Lease) -> bool:
        """End a lease this agent holds. False if it had already ended or moved on."""
        return self._portal.call(self._hive.release, lease)

    def set_signal(self, name: str, value: Any, *, ttl: float | None = None) -> Signal:
        """Set the signal ``name`` to ``value`` (any JSON, at most ``max_payload_bytes``);
        it disappears after ``ttl`` seconds if given. Waiters are woken.

        Returns:
            The :class:`Signal`, its ``version`` one more than before (1 when first set).
        """

        async def run() -> Signal:
            return await self._hive.set_signal(name, value, ttl=ttl)

        return self._portal.call(run)

    def get_signal(
        self, name: str, *, changed_from: int | None = None, wait: float | None = None
    ) -> Signal | None:
        """The signal ``name`` (``None`` while unset).

        Args:
            changed_from: a version the caller has seen (0 = unset): wait until the
                signal is at another version.
            wait: most seconds to wait for that.
        """

        async def run() -> Signal | None:
            return await self._hive.get_signal(name, changed_from=changed_from, wait=wait)

        return self._wait(run)

    # Idempotent calls

    def begin_once(
        self,
        key: str,
        *,
        shared: bool = False,
        lease: float = 60.0,
        wait: float | None = None,
    ) -> OnceTicket:
        """Start an idempotent call with ``key`` (most callers want :meth:`once`).

        The first caller gets status ``run`` and a token, and holds the key for
        ``lease`` seconds (renew with :meth:`renew_once`); concurrent callers wait up to
        ``wait`` seconds and get ``done`` with its result (or ``failed`` with a kept
        error, or ``running`` if it did not finish in time). A key whose runner died is
        free again when its lease ends.

        Args:
            key: 1-512 bytes, e.g. ``session-42:turn-3:send_email``.
            shared: one result for every agent; otherwise keys are per agent.
        """

        async def run() -> OnceTicket:
            return await self._hive.begin_once(key, shared=shared, lease=lease, wait=wait)

        return self._wait(run)

    def renew_once(
        self, key: str, token: int, *, shared: bool = False, lease: float = 60.0
    ) -> None:
        """Keep holding a key begun with :meth:`begin_once` for ``lease`` more seconds.

        Raises:
            Conflict: the key is no longer held with ``token`` (field ``token``).
        """

        async def run() -> None:
            await self._hive.renew_once(key, token, shared=shared, lease=lease)

        self._portal.call(run)

    def end_once(
        self,
        key: str,
        token: int,
        *,
        shared: bool = False,
        result: Any = None,
        error: str | None = None,
        keep_error: bool = False,
        ttl: float = 86400.0,
    ) -> None:
        """Finish a call begun with :meth:`begin_once`: keep ``result`` for ``ttl``
        seconds, or on ``error`` free the key (the next caller runs again) unless
        ``keep_error`` keeps the error for repeats.

        Raises:
            Conflict: the key is no longer held with ``token`` (field ``token``).
            InvalidInput: ``result`` is not JSON (field ``result``); nothing changed.
        """

        async def run() -> None:
            await self._hive.end_once(
                key,
                token,
                shared=shared,
                result=result,
                error=error,
                keep_error=keep_error,
                ttl=ttl,
            )

        self._portal.call(run)

    # Agent registry

    def register(
        self,
        name: str,
        *,
        capabilities: Sequence[str] = (),
        endpoint: str | None = None,
        metadata: dict[str, Any] | None = None,
        ttl: float = 15.0,
        heartbeat: bool = True,
    ) -> AgentRecord:
        """Enter ``name`` in the agent registry (again: replaces its entry).

        Args:
            capabilities: up to 64 names others can find it by.
            endpoint: where to reach it (a URL), if anywhere.
            metadata: a JSON object stored with the entry.
            ttl: 1 .. 86400 seconds; without a heartbeat for that long it is down and an
                ``agent.down`` event is written.
            heartbeat: send heartbeats every ttl/3 seconds, from this hive's background
                loop (the calling thread is free), until :meth:`unregister` or
                :meth:`close`.

        Returns:
            The :class:`AgentRecord`.

        Raises:
            PermissionDenied: with identities on, ``name`` is another agent's and this
                one is not an admin (field ``name``).
        """

        async def run() -> AgentRecord:
            # Run on the background loop, so the heartbeat task is created there.
            return await self._hive.register(
                name,
                capabilities=capabilities,
                endpoint=endpoint,
                metadata=metadata,
                ttl=ttl,
                heartbeat=heartbeat,
            )

        return self._portal.call(run)

    def heartbeat_agent(self, name: str) -> AgentRecord:
        """Record that ``name`` is alive now (the registry's heartbeat).

        Raises:
            NotFound: ``name`` is not registered (field ``name``).
        """
        return self._portal.call(self._hive.heartbeat_agent, name)

    def unregister(self, name: str) -> bool:
        """Remove ``name`` from the registry (and stop its heartbeats). False if absent."""
        return self._portal.call(self._hive.unregister, name)

    def agents(
        self, *, capability: str | None = None, healthy: bool | None = True
    ) -> builtins.list[AgentRecord]:
        """Registered agents, by name.

        Args:
            capability: only agents listing it.
            healthy: only healthy ones (``True``), only down ones (``False``) or all
                (``None``).

        Returns:
            A list of :class:`AgentRecord`.
        """

        async def run() -> builtins.list[AgentRecord]:
            return await self._hive.agents(capability=capability, healthy=healthy)

        return self._portal.call(run)

    # Built on the above

    def lease(
        self, name: str, ttl: float, *, wait: float | None = None
    ) -> AbstractContextManager[Lease]:
        """``with hive.lease(name, ttl) as lease:`` — acquire, renew every ttl/3 seconds
        while the block runs, release at its end.

        It enters :meth:`Hive.lease` on the background loop, so the renewals go on
        there while the block runs in the calling thread (which may block). If a renewal
        is refused (the lease was lost: the process stalled past the ttl), renewing
        stops; writes fenced with ``lease.token`` (``put(..., fence=(name,
        lease.token))``) are then refused.

        Args:
            ttl: 0.1 .. 86400 seconds.
            wait: seconds to wait while another agent holds it (``None``: do not wait).

        Raises:
            Conflict: the lease is held by another agent and ``wait`` ran out (field
                ``name``), on entering the block.

        Closing the hive while a block runs (in another thread) ends the lease then:
        renewals stop and it is released; the block's end does nothing more.
        """
        assert self._loop is not None, "SyncHive is closed"
        return _LeaseBlock(self._loop, self._hive.lease(name, ttl, wait=wait))

    def wait_signal(
        self,
        name: str,
        predicate: Callable[[Any], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> Signal:
        """Wait until the signal ``name`` is set (and ``predicate(value)`` holds, if
        given). Woken by the change feed, not by polling.

        Args:
            predicate: a plain function of the signal's value. It runs on the background
                loop's thread: it must be quick and must not call this hive.
            timeout: most seconds to wait; ``None``: no limit.

        Returns:
            The :class:`Signal` that met the condition.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """

        async def run() -> Signal:
            return await self._hive.wait_signal(name, predicate, timeout=timeout)

        return self._wait(run)

    def wait_for(
        self,
        namespace: str,
        key: str,
        predicate: Callable[[Item], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> Item:
        """Wait until the item at (``namespace``, ``key``) exists and ``predicate(item)``
        holds (if given), following the change feed from before the first read so no
        change is missed.

        Args:
            predicate: a plain function of the :class:`Item`. It runs on the background
                loop's thread: it must be quick and must not call this hive.
            timeout: most seconds to wait; ``None``: no limit.

        Returns:
            The :class:`Item` that met the condition.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """

        async def run() -> Item:
            return await self._hive.wait_for(namespace, key, predicate, timeout=timeout)

        return self._wait(run)

    def once(
        self,
        key: str,
        fn: Callable[[], Any],
        *,
        ttl: float = 86400.0,
        shared: bool = False,
        keep_errors: bool = False,
        lease: float = 60.0,
    ) -> Any:
        """Run ``fn`` once for ``key``: the first caller runs it and its result (any
        JSON) is kept for ``ttl`` seconds; concurrent callers (other threads, processes
        or agents with ``shared``) wait and get that result; later callers get it at
        once.

        ``fn`` is a plain function, called in the calling thread (it may block as long
        as it needs); one returning an awaitable (an ``async def``) is awaited on the
        background loop. Keys are per agent unless ``shared``. The convention for tool
        calls is ``<session>:turn-<n>:<tool>``. Use it for calls with side effects;
        reads need none.

        A failure (an exception from ``fn``) is raised to its caller and not kept: the
        next caller runs ``fn`` again; with ``keep_errors`` it is kept and repeats raise
        :class:`~hivemem.errors.OnceFailed`. While ``fn`` runs its key is held for
        ``lease`` seconds at a time, renewed every lease/3 from the background loop; if
        the caller dies, the key is free when the lease ends.

        Returns:
            What ``fn`` returned, or for a repeat the first call's result as stored (JSON:
            a tuple comes back as a list).

        Raises:
            OnceFailed: ``keep_errors`` and the first call failed.
            InvalidInput: ``fn`` returned something that is not JSON (field ``result``;
                the key is freed).
        """
        while True:
            ticket = self.begin_once(key, shared=shared, lease=lease, wait=lease)
            if ticket.status == "done":
                return ticket.result
            if ticket.status == "failed":
                raise OnceFailed(ticket.error or "the first call failed", holder=ticket.holder)
            if ticket.status == "run":
                break
        assert ticket.token is not None
        token = ticket.token
        stop = asyncio.Event()  # bound to the background loop on first use there

        async def keep() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(lease / 3):
                        await stop.wait()
                    return  # stopped; never in the middle of a renewal
                with contextlib.suppress(HivememError):
                    await self._hive.renew_once(key, token, shared=shared, lease=lease)

        async def start() -> asyncio.Task[None]:
            # A task of the loop, not of the portal: close() does not wait for it.
            return asyncio.create_task(keep(), name=f"hivemem-once-{key[:40]}")

        async def finish(renewer: asyncio.Task[None]) -> None:
            stop.set()
            await renewer

        renewer = self._portal.call(start)
        try:
            try:
                outcome = fn()
                if inspect.isawaitable(outcome):
                    outcome = self._portal.call(_awaited, outcome)
            finally:
                self._portal.call(finish, renewer)
        except BaseException as exc:
            with contextlib.suppress(HivememError):
                self.end_once(
                    key,
                    token,
                    shared=shared,
                    error=f"{type(exc).__name__}: {exc}"[:4096],
                    keep_error=keep_errors,
                    ttl=ttl,
                )
            raise
        try:
            self.end_once(key, token, shared=shared, result=outcome, ttl=ttl)
        except InvalidInput:
            with contextlib.suppress(HivememError):
                self.end_once(key, token, shared=shared, error="result is not JSON")
            raise
        return outcome

    def idempotent(
        self,
        key: Callable[..., str],
        *,
        ttl: float = 86400.0,
        shared: bool = False,
        keep_errors: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a plain function so each call runs through :meth:`once` with
        ``key(*args, **kwargs)`` as its key::

            @hive.idempotent(key=lambda session, turn, to, body: f"{session}:turn-{turn}:email")
            def send_email(session, turn, to, body): ...
        """

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self.once(
                    key(*args, **kwargs),
                    lambda: fn(*args, **kwargs),
                    ttl=ttl,
                    shared=shared,
                    keep_errors=keep_errors,
                )

            return call

        return decorate

    def _wait(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` on the background loop and wait for its result; an exception in
        the calling thread while it waits (Ctrl-C) cancels it there."""
        pending = self._portal.start_task_soon(func)
        try:
            return pending.result()
        except BaseException:
            pending.cancel()
            raise


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _close_when_idle(agen: AsyncGenerator[Event, None]) -> None:
    """Close ``agen`` once a cancelled ``__anext__`` has finished unwinding."""
    for _ in range(1000):
        if not agen.ag_running:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.001)
    await agen.aclose()
