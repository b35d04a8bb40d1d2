"""The Hive API: one abstract class that every deployment implements.

:class:`~hivemem.core.LocalHive` (embedded, a store in this process) and
:class:`~hivemem.client.RemoteHive` (a service over HTTP) both subclass
:class:`Hive`; code written against it runs unchanged against either. The
conformance suite (tests/conformance/) checks that they behave the same.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from hivemem.errors import Conflict, HivememError, InvalidInput, NotFound, OnceFailed
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

if TYPE_CHECKING:
    from hivemem.worker import Worker

__all__ = ["Heartbeats", "Hive"]

log = logging.getLogger("hivemem")

#: What "no timeout" means to a wait loop (seconds): each round waits this long.
_WAIT_FOREVER = 3600.0


async def _repeat(
    period: float, stop: asyncio.Event, action: Callable[[], Awaitable[bool]]
) -> None:
    """Await ``action()`` every ``period`` seconds until ``stop`` is set or it returns
    False. Setting ``stop`` ends the loop between calls, never inside one (so the
    caller can rely on the last call's effect being known)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period):
                await stop.wait()
        if stop.is_set() or not await action():
            return


class Heartbeats:
    """The registry heartbeats a hive sends for agents it registered: one task per
    name calling ``heartbeat_agent`` every ttl/3 seconds until stopped."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def start(self, hive: Hive, name: str, ttl: float) -> None:
        """(Re)start the heartbeats of ``name`` through ``hive`` (on the running loop)."""
        self.stop(name)
        self._closed = False
        self._tasks[name] = asyncio.create_task(
            self._beat(hive, name, ttl), name=f"hivemem-heartbeat-{name}"
        )

    async def _beat(self, hive: Hive, name: str, ttl: float) -> None:
        while not self._closed:
            await asyncio.sleep(ttl / 3)
            try:
                await hive.heartbeat_agent(name)
            except NotFound:
                log.warning("agent %r is no longer registered; heartbeats stop", name)
                return
            except HivememError:
                log.warning("heartbeat of agent %r failed; retrying", name, exc_info=True)

    def stop(self, name: str) -> None:
        """Stop the heartbeats of ``name`` (if any)."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Stop every heartbeat and wait for the tasks to end."""
        self._closed = True  # ends a loop whose cancellation was swallowed
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


class Hive(ABC):
    """Shared memory, sessions and a change feed for agents (async).

    A Hive acts for one agent identity (:attr:`agent`), which it stamps as the
    author of every write. Use :meth:`as_agent` for a view acting for another
    agent over the same connection.

    Namespaces are paths of 1 to 8 segments separated by ``/`` (``team/research/q4``);
    a segment is 1 to 128 characters from letters, digits and ``_ - . : @ +``, and may
    not start with ``_`` (reserved for hivemem). Keys are 1 to 512 bytes of UTF-8
    without ``/`` or control characters. Prefix arguments match whole segments:
    prefix ``team/re`` matches ``team/re`` and ``team/re/x``, not ``team/research``.

    Every method may raise :class:`~hivemem.errors.InvalidInput` or
    :class:`~hivemem.errors.TooLarge` for bad arguments (nothing is written) and
    :class:`~hivemem.errors.Unavailable` when the store cannot be reached.
    """

    #: The agent identity this hive acts for.
    agent: str

    # Lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Connect to the store or service. Called by the first operation if not called."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks. Views from as_agent() share them."""

    @abstractmethod
    def as_agent(self, agent: str) -> Hive:
        """A view of this hive acting for ``agent``, sharing its connection.

        Raises:
            InvalidInput: ``agent`` is not a valid identity (field ``agent``).
        """

    @abstractmethod
    async def ping(self) -> None:
        """Check that the store (or service and its store) answers.

        Raises:
            Unavailable: it does not.
        """

    # Items -----------------------------------------------------------------------

    @abstractmethod
    async def put(
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
        """Create or replace the item at (namespace, key).

        Args:
            value: any JSON value, at most ``max_value_bytes`` (1 MiB) as JSON.
            if_version: ``None`` writes unconditionally; ``0`` writes only if the
                item is absent; ``n`` writes only if the item is at version ``n``.
            ttl: seconds until the item expires (> 0); ``None`` never expires.
                Each write sets the expiry anew.
            text: what search indexes; at most ``max_text_bytes``. ``""`` keeps the
                item out of search (without it, a string value or the value's
                ``text``/``content`` field is indexed).
            metadata: a JSON object of filterable attributes.
            fence: ``(lease name, token)`` from :meth:`acquire`: the write is refused
                once a newer token of that lease was issued (another agent acquired it
                after this one's lease ran out).

        Returns:
            The stored item: version 1 on create, previous version + 1 otherwise,
            author set to this hive's agent.

        Raises:
            Conflict: ``if_version`` did not match (``current_version`` says what
                was found, 0 if absent), or the fence is stale (field ``fence``);
                nothing was written.
        """

    @abstractmethod
    async def get(self, namespace: str, key: str) -> Item | None:
        """The item at (namespace, key), or ``None`` if absent or expired."""

    def _put_here(
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
    ) -> tuple[bool, Item | None]:
        """:meth:`put` in the calling thread, for :class:`~hivemem.SyncHive`: (True, the
        item), or (False, None) having written nothing when this hive cannot write
        outside its event loop (the default; SyncHive then goes through the loop)."""
        return False, None

    def _get_here(self, namespace: str, key: str) -> tuple[bool, Item | None]:
        """:meth:`get` in the calling thread, for :class:`~hivemem.SyncHive`: (True, the
        item or None), or (False, None) when this hive cannot read outside its event
        loop (the default; SyncHive then goes through the loop)."""
        return False, None

    @abstractmethod
    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        """Delete the item and its history.

        Returns:
            True if an item was deleted, False if there was none.

        Raises:
            Conflict: ``if_version`` was given and the item is absent or at
                another version; nothing was deleted.
        """

    @abstractmethod
    async def list(
        self,
        prefix: str = "",
        *,
        key_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Item]:
        """Items whose namespace is ``prefix`` or under it, ordered by (namespace, key).

        Args:
            prefix: a namespace, or ``""`` for every namespace.
            key_prefix: list only the items of namespace ``prefix`` itself (not the
                namespaces under it) whose key starts with this string (``""``: all of
                that namespace's items). One index range on every store.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Raises:
            InvalidInput: a malformed prefix or key prefix (a key prefix has a key's
                rules but may be empty), ``key_prefix`` with ``prefix=""`` (field
                ``prefix``), a limit out of range, a cursor made by another call.
        """

    @abstractmethod
    async def list_namespaces(
        self,
        prefix: str = "",
        *,
        max_depth: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[str]:
        """Namespaces holding at least one live item, at or under ``prefix``, sorted.

        Args:
            max_depth: truncate namespaces to this many segments (deduplicated).
        """

    @abstractmethod
    async def namespace_counts(
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[NamespaceCount]:
        """One page of the namespaces holding a live item at or under ``prefix``, sorted,
        each with its number of live items (of the namespace itself, not of those under
        it): what :meth:`list_namespaces` lists, counted.

        On SQLite and PostgreSQL one ``GROUP BY`` of the items' index under the prefix; on
        Redis one ``ZLEXCOUNT`` per namespace, which also counts items whose TTL has
        passed until the sweeper removes them (every ``sweep_interval`` seconds).

        Args:
            prefix: a namespace, or ``""`` for all.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.

        Raises:
            InvalidInput: a malformed prefix, a limit out of range, a cursor made by
                another call.
        """

    @abstractmethod
    async def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        """Apply puts and deletes atomically: all of them, or none.

        Args:
            ops: 1..``max_batch_ops`` (100) operations.

        Returns:
            One result per op, in order: the stored :class:`Item` for a put, the
            boolean of :meth:`delete` for a delete.

        Raises:
            Conflict: an op's ``if_version`` did not match; nothing was written
                (``field`` names the op, e.g. ``ops.3.if_version``).
        """

    @abstractmethod
    async def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        """Stored versions of an item, newest first, the current one included.

        At most ``history_limit`` (10) versions are kept per item; deleting or
        expiring an item deletes its history.
        """

    @abstractmethod
    async def search(
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
        """Find live items at or under ``prefix`` by meaning and by words.

        What is indexed: the item's ``text`` if given, otherwise its value when it is
        a string, otherwise the value's ``text`` or ``content`` field; items with
        none of these, or with ``text=""``, are not searchable.

        Args:
            query: non-empty text (at most 4096 characters).
            filter: metadata conditions: ``{"key": value}`` for equality, or
                ``{"key": {"$in": [..]}}`` / ``{"$gt"|"$gte"|"$lt"|"$lte"|"$eq": v}``.
            author: only items whose current version this agent wrote.
            updated_after, updated_before: bounds on ``updated_at`` (aware datetime
                or UNIX seconds), exclusive.
            mode: ``"hybrid"`` (BM25 and vectors fused, by reciprocal rank by default;
                BM25 alone when the hive has no embedder), ``"vector"`` or ``"lexical"``.
                Items with integer ``session``/``turn`` metadata also lift their
                neighbouring turns (context expansion); see :mod:`hivemem.core.search`
                and the ``search_*`` settings.
            limit: 1..``max_search_limit`` (100).
            consistency: ``"eventual"``: rank what is indexed now. A write's words are
                searchable at once; with ``index_mode=deferred`` (the default) its vector
                follows within moments (the indexer embeds in batches after the
                commit), so until then only its words can find it. ``"indexed"``: first
                wait (up to ``index_wait_seconds``) for the vectors of every write made
                before the call.

        Returns:
            Hits, best first, each with its fused score and per-mode rank and score.

        Raises:
            InvalidInput: bad argument (field named, e.g. ``filter.tags.$near``), or
                ``mode="vector"`` without an embedder (field ``mode``).
            Unavailable: the embedder cannot be reached, or (``consistency="indexed"``)
                the vectors were not all stored within ``index_wait_seconds``.
        """

    @abstractmethod
    async def wait_indexed(
        self,
        cursor: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bool:
        """Wait until every write made before this call has its vector stored (so a
        vector search finds it); with ``index_mode=sync`` or no embedder, at once.

        Args:
            cursor: a feed cursor the caller has seen; its writes are covered (they
                committed before the call).
            timeout: seconds to wait at most (default ``index_wait_seconds``, 30).

        Returns:
            True when indexed, False when ``timeout`` passed first.

        Raises:
            InvalidInput: ``cursor`` not a string or ``timeout`` not a number >= 0.
        """

    @abstractmethod
    async def index_status(self) -> IndexStatus:
        """How far the vectors lag behind the writes: an
        :class:`~hivemem.models.IndexStatus` (entries waiting, the oldest one's age in
        seconds, whether the answering process indexes and which parts it holds)."""

    # Sessions --------------------------------------------------------------------

    @abstractmethod
    async def create_session(
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
        """Create a session.

        Args:
            app, user, agent: identifiers (one namespace segment each) to list by.
            session_id: your own id (one segment); a new id is made if ``None``.
            state: an initial state document (saved as state version 1).
            ttl: seconds of inactivity after which the session expires, with its
                messages (sliding: every append and state save restarts it; at most
                ``max_ttl_seconds``); ``None`` = never. An expired session is absent
                to every call (NotFound); the sweeper deletes it with a
                ``session.expired`` event.

        Raises:
            Conflict: a session with ``session_id`` exists (an expired one not yet
                swept still holds its id).
            InvalidInput: a malformed identifier, document or ttl (named field).
        """

    @abstractmethod
    async def get_session(self, session_id: str) -> Session:
        """The session.

        Raises:
            NotFound: no such session.
        """

    @abstractmethod
    async def list_sessions(
        self,
        *,
        app: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Session]:
        """Sessions matching every given identifier, oldest first."""

    @abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages. Returns False if there was none."""

    @abstractmethod
    async def append_messages(
        self, session_id: str, messages: Sequence[MessageIn | dict[str, Any]]
    ) -> builtins.list[Message]:
        """Append messages to the session's log in one atomic step.

        Each message gets the next sequence number; the session's counters
        (messages, turns, tokens, cost, last_activity_at) move with it.

        Raises:
            NotFound: no such session.
        """

    async def append_message(
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
        """Append one message; see :meth:`append_messages`."""
        msg = MessageIn(
            role=role,
            content=content,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost,
            metadata=metadata or {},
        )
        (stored,) = await self.append_messages(session_id, [msg])
        return stored

    @abstractmethod
    async def get_messages(
        self, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[Message]:
        """Messages with sequence number > ``after``, in order, at most ``limit``.

        Raises:
            NotFound: no such session.
        """

    @abstractmethod
    async def save_state(
        self, session_id: str, state: dict[str, Any], *, if_version: int | None = None
    ) -> Session:
        """Replace the session's state document (compare-and-set with ``if_version``).

        Raises:
            NotFound: no such session.
            Conflict: ``if_version`` is not the current ``state_version``.
        """

    # Events ----------------------------------------------------------------------

    @abstractmethod
    async def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        """One page of the feed: events under ``prefix`` after ``after``, oldest first.

        Args:
            after: a cursor from an event or ``next_cursor``; ``None`` or ``"0"``
                starts at the oldest retained event.

        Returns:
            A page whose ``next_cursor`` is where to continue (never ``None``:
            the feed has no last page).

        Raises:
            CursorExpired: events after ``after`` were already trimmed.
        """

    @abstractmethod
    async def head(self) -> str:
        """The cursor of the newest event in the feed (``"0"`` when empty)."""

    @abstractmethod
    def watch(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[Event]:
        """Follow the feed: events under ``prefix``, replayed from ``after``, then live.

        Args:
            after: a cursor to resume from; ``None`` means only events after now.

        Yields:
            Each matching event exactly once, in feed order; never ends by itself.

        Raises:
            CursorExpired: events after ``after`` were already trimmed.
        """

    @abstractmethod
    async def publish(self, channel: str, payload: Any) -> Event:
        """Publish an agent's own event on ``channel`` (a namespace).

        Args:
            payload: any JSON value, at most ``max_payload_bytes`` (64 KiB).
        """

    # Tasks -----------------------------------------------------------------------

    @abstractmethod
    async def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
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
            The task (state ``ready`` or ``delayed``), or the queue's task with
            ``idempotency_key``.
        """

    @abstractmethod
    async def claim(
        self, queue: str, *, lease: float = 30.0, wait: float | None = None
    ) -> Task | None:
        """Take the next due task of ``queue`` and hold it for ``lease`` seconds.

        A task whose lease runs out without a heartbeat goes back to ready (the attempt
        counts) or, after its last attempt, is dead.

        Args:
            lease: seconds (0.1 .. 86400) before the task returns to the queue unless
                renewed by :meth:`heartbeat`.
            wait: seconds to wait for a task when none is due (``None`` or 0: answer at
                once). Over HTTP each request waits at most ``max_wait_seconds``; the
                client repeats until ``wait`` ends.

        Returns:
            The task (state ``running``, ``attempt`` = this claim's number), or None.
        """

    @abstractmethod
    async def heartbeat(self, task: Task, *, lease: float | None = None) -> Task:
        """Extend the lease of a task this agent holds: ``lease`` seconds from now
        (default: the claim's lease).

        Raises:
            NotFound: no such task (field ``task_id``).
            Conflict: this agent no longer holds that attempt: its lease ran out and
                the task moved on, or it was cancelled (field ``attempt``).
        """

    @abstractmethod
    async def complete(self, task: Task, result: Any = None) -> Task:
        """Finish a task this agent holds with ``result`` (any JSON, at most
        ``max_payload_bytes``); :meth:`result` waiters get it.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`; nothing is stored.
        """

    @abstractmethod
    async def fail(self, task: Task, error: str, *, retryable: bool = True) -> Task:
        """Fail the attempt this agent holds. ``error`` (at most 4,096 characters) is
        kept with the attempt's number. A retryable failure before the last attempt
        makes the task ready again after its backoff; otherwise it is dead.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`.
        """

    @abstractmethod
    async def release_task(self, task: Task) -> Task:
        """Give back a task this agent holds without running it (a worker shutting
        down): it is ready again at once and the attempt does not count.

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat`.
        """

    @abstractmethod
    async def result(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task, once it is completed, dead or cancelled, or when ``wait`` seconds
        have passed (``None`` or 0: at once). Check ``task.done`` / ``task.state``:
        ``task.result`` is the worker's result, ``task.errors`` each failed attempt's
        error.

        Raises:
            NotFound: no such task (field ``task_id``).
        """

    @abstractmethod
    async def cancel(self, task_id: str) -> Task:
        """Cancel a ready, delayed or running task (a running one's worker is refused
        on its next heartbeat or finish).

        Raises:
            NotFound: no such task. Conflict: it is already completed, dead or
                cancelled (field ``task_id``).
        """

    @abstractmethod
    async def requeue(self, task_id: str, *, delay: float = 0) -> Task:
        """Put a dead or cancelled task back on its queue with a fresh set of attempts
        (its past errors are kept), due after ``delay`` seconds.

        Raises:
            NotFound: no such task. Conflict: it is not dead or cancelled (field
                ``task_id``).
        """

    @abstractmethod
    async def get_task(self, task_id: str) -> Task | None:
        """The task, or None if there is none (or it was swept after retention)."""

    @abstractmethod
    async def list_tasks(
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
        """

    @abstractmethod
    async def queue_stats(self, queue: str) -> QueueStats:
        """How many tasks of ``queue`` are in each state."""

    @abstractmethod
    async def queues(self) -> builtins.list[QueueStats]:
        """The queues holding at least one task (in any state) that this agent may use
        (action ``tasks``), by name, each with its :meth:`queue_stats`; at most
        ``max_page_size`` (1000) of them. One store read for the names, one per queue
        for its figures."""

    # Leases and signals -------------------------------------------------------------

    @abstractmethod
    async def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease:
        """Acquire the lease ``name`` (a namespace-like name) for ``ttl`` seconds.

        Args:
            ttl: 0.1 .. 86400 seconds; the lease ends then unless renewed.
            wait: seconds to wait while another agent holds it (``None``: do not wait).

        Returns:
            The lease, with a fencing token larger than any issued before for ``name``.

        Raises:
            Conflict: another agent holds it and ``wait`` ran out (field ``name``).
        """

    @abstractmethod
    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend a lease this agent holds by ``ttl`` seconds from now (default: its ttl).

        Raises:
            Conflict: the lease ended or was taken by someone else (field ``lease``).
        """

    @abstractmethod
    async def release(self, lease: Lease) -> bool:
        """End a lease this agent holds. False if it had already ended or moved on."""

    @abstractmethod
    async def set_signal(self, name: str, value: Any, *, ttl: float | None = None) -> Signal:
        """Set the signal ``name`` to ``value`` (any JSON, at most ``max_payload_bytes``);
        it disappears after ``ttl`` seconds if given. Waiters are woken."""

    @abstractmethod
    async def get_signal(
        self, name: str, *, changed_from: int | None = None, wait: float | None = None
    ) -> Signal | None:
        """The signal ``name`` (None while unset).

        Args:
            changed_from: a version the caller has seen (0 = unset): wait until the
                signal is at another version.
            wait: most seconds to wait for that (over HTTP at most
                ``max_wait_seconds`` per request).
        """

    # Idempotent calls ---------------------------------------------------------------

    @abstractmethod
    async def begin_once(
        self,
        key: str,
        *,
        shared: bool = False,
        lease: float = 60.0,
        wait: float | None = None,
    ) -> OnceTicket:
        """Start an idempotent call with ``key`` (most callers want :meth:`once`).

        The first caller gets status ``run`` and a token, and holds the key for
        ``lease`` seconds (renew with :meth:`renew_once`); concurrent callers wait up
        to ``wait`` seconds and get ``done`` with its result (or ``failed`` with a kept
        error). A key whose runner died is free again when its lease ends.

        Args:
            key: 1-512 bytes, e.g. ``session-42:turn-3:send_email``.
            shared: one result for every agent; otherwise keys are per agent.
        """

    @abstractmethod
    async def renew_once(
        self, key: str, token: int, *, shared: bool = False, lease: float = 60.0
    ) -> None:
        """Keep holding a key begun with :meth:`begin_once` for ``lease`` more seconds.

        Raises:
            Conflict: the key is no longer held with ``token`` (field ``token``).
        """

    @abstractmethod
    async def end_once(
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
        """

    # Agent registry -----------------------------------------------------------------

    @abstractmethod
    async def register(
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
            ttl: 1 .. 86400 seconds; without a heartbeat for that long it is down and
                an ``agent.down`` event is written.
            heartbeat: send heartbeats every ttl/3 seconds from this hive until
                :meth:`unregister` or :meth:`close`.

        Raises:
            PermissionDenied: with identities on, ``name`` is another agent's and this
                one is not an admin (field ``name``).
        """

    @abstractmethod
    async def heartbeat_agent(self, name: str) -> AgentRecord:
        """Record that ``name`` is alive now (the registry's heartbeat).

        Raises:
            NotFound: ``name`` is not registered (field ``name``).
        """

    @abstractmethod
    async def unregister(self, name: str) -> bool:
        """Remove ``name`` from the registry (and stop its heartbeats). False if absent."""

    @abstractmethod
    async def agents(
        self, *, capability: str | None = None, healthy: bool | None = True
    ) -> builtins.list[AgentRecord]:
        """Registered agents, by name: with ``capability`` if given; only healthy ones
        (``True``), only down ones (``False``) or all (``None``)."""

    # Built on the above (the same for every Hive) -----------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, ttl: float, *, wait: float | None = None
    ) -> AsyncIterator[Lease]:
        """``async with hive.lease(name, ttl) as lease:`` — acquire, renew every ttl/3
        seconds while the block runs, release at its end.

        If a renewal is refused (the lease was lost: the process stalled past the ttl),
        renewing stops; writes fenced with ``lease.token`` are then refused.

        Raises:
            Conflict: the lease is held by another agent and ``wait`` ran out.
        """
        first = await self.acquire(name, ttl, wait=wait)
        latest = first

        async def renew() -> bool:
            nonlocal latest
            try:
                latest = await self.renew(latest)
            except Conflict:
                log.warning("lease %r was lost; no longer renewing it", name)
                return False
            except HivememError:
                log.warning("renewing lease %r failed; retrying", name, exc_info=True)
            return True

        stop = asyncio.Event()
        renewer = asyncio.create_task(_repeat(ttl / 3, stop, renew), name=f"hivemem-lease-{name}")
        try:
            yield first
        finally:
            stop.set()  # never cancelled mid-renewal: release needs the renewed version
            await renewer
            with contextlib.suppress(HivememError):
                await self.release(latest)

    async def wait_signal(
        self,
        name: str,
        predicate: Callable[[Any], bool] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Signal:
        """Wait until the signal ``name`` is set (and ``predicate(value)`` holds, if
        given). Woken by the change feed, not by polling.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        seen: int | None = None
        while True:
            remaining = _WAIT_FOREVER if deadline is None else deadline - loop.time()
            if seen is not None and remaining <= 0:
                raise TimeoutError(f"signal {name!r} did not meet the condition in {timeout} s")
            signal = await self.get_signal(
                name, changed_from=seen, wait=None if seen is None else remaining
            )
            if signal is not None and (predicate is None or predicate(signal.value)):
                return signal
            seen = 0 if signal is None else signal.version

    async def wait_for(
        self,
        namespace: str,
        key: str,
        predicate: Callable[[Item], bool] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Item:
        """Wait until the item at (namespace, key) exists and ``predicate(item)`` holds
        (if given), following the change feed from before the first read so no change
        is missed.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """

        async def follow() -> Item:
            cursor = await self.head()
            item = await self.get(namespace, key)
            if item is not None and (predicate is None or predicate(item)):
                return item
            events = self.watch(namespace, after=cursor)
            try:
                async for event in events:
                    if event.namespace != namespace or event.key != key:
                        continue
                    item = await self.get(namespace, key)
                    if item is not None and (predicate is None or predicate(item)):
                        return item
            finally:
                await events.aclose()  # type: ignore[attr-defined]
            raise AssertionError("the feed never ends")

        async with asyncio.timeout(timeout):
            return await follow()

    async def once(
        self,
        key: str,
        fn: Callable[[], Any],
        *,
        ttl: float = 86400.0,
        shared: bool = False,
        keep_errors: bool = False,
        lease: float = 60.0,
    ) -> Any:
        """Run ``fn`` once for ``key``: the first caller runs it (sync or async) and its
        result (any JSON) is kept for ``ttl`` seconds; concurrent callers wait and get
        that result; later callers get it at once.

        Keys are per agent unless ``shared``. The convention for tool calls is
        ``<session>:turn-<n>:<tool>`` — a retried turn repeats its keys, a new turn gets
        new ones. Use it for calls with side effects (sending, paying, writing
        elsewhere); reads need none.

        A failure (an exception from ``fn``) is raised to its caller and not kept: the
        next caller runs ``fn`` again; with ``keep_errors`` it is kept and repeats
        raise :class:`~hivemem.errors.OnceFailed`. While ``fn`` runs its key is held
        for ``lease`` seconds at a time (renewed every lease/3); if the caller dies,
        the key is free when the lease ends.

        Raises:
            OnceFailed: ``keep_errors`` and the first call failed.
            InvalidInput: ``fn`` returned something that is not JSON (field ``result``;
                the key is freed).
        """
        while True:
            ticket = await self.begin_once(key, shared=shared, lease=lease, wait=lease)
            if ticket.status == "done":
                return ticket.result
            if ticket.status == "failed":
                raise OnceFailed(ticket.error or "the first call failed", holder=ticket.holder)
            if ticket.status == "run":
                break
        assert ticket.token is not None
        token = ticket.token

        async def renew() -> bool:
            with contextlib.suppress(HivememError):
                await self.renew_once(key, token, shared=shared, lease=lease)
            return True

        stop = asyncio.Event()
        renewer = asyncio.create_task(_repeat(lease / 3, stop, renew), name="hivemem-once")
        try:
            try:
                outcome = fn()
                if inspect.isawaitable(outcome):
                    outcome = await outcome
            finally:
                stop.set()  # never cancelled mid-renewal: end_once must see its write
                await renewer
        except BaseException as exc:
            with contextlib.suppress(HivememError):
                await self.end_once(
                    key,
                    token,
                    shared=shared,
                    error=f"{type(exc).__name__}: {exc}"[:4096],
                    keep_error=keep_errors,
                    ttl=ttl,
                )
            raise
        try:
            await self.end_once(key, token, shared=shared, result=outcome, ttl=ttl)
        except InvalidInput:
            with contextlib.suppress(HivememError):
                await self.end_once(key, token, shared=shared, error="result is not JSON")
            raise
        return outcome

    def idempotent(
        self,
        key: Callable[..., str],
        *,
        ttl: float = 86400.0,
        shared: bool = False,
        keep_errors: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]:
        """Decorate a (sync or async) function so each call runs through :meth:`once`
        with ``key(*args, **kwargs)`` as its key::

            @hive.idempotent(key=lambda session, turn, to, body: f"{session}:turn-{turn}:email")
            async def send_email(session, turn, to, body): ...
        """

        def decorate(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(fn)
            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self.once(
                    key(*args, **kwargs),
                    lambda: fn(*args, **kwargs),
                    ttl=ttl,
                    shared=shared,
                    keep_errors=keep_errors,
                )

            return call

        return decorate

    def worker(
        self,
        queue: str,
        *,
        concurrency: int = 1,
        lease: float = 30.0,
    ) -> Callable[[Callable[..., Any]], Worker]:
        """Decorate a task handler: ``@hive.worker("queue", concurrency=4)`` gives a
        :class:`~hivemem.worker.Worker`; ``await worker.run()`` claims and runs tasks
        until stopped (see :mod:`hivemem.worker`)."""
        from hivemem.worker import Worker

        def decorate(fn: Callable[..., Any]) -> Worker:
            return Worker(self, queue, fn, concurrency=concurrency, lease=lease)

        return decorate
