"""The Hive API: one abstract class that every deployment implements.

:class:`~hivemem.core.LocalHive` (embedded, a store in this process) and
:class:`~hivemem.client.RemoteHive` (a service over HTTP) both subclass
:class:`Hive`; code written against it runs unchanged against either. The
conformance suite (tests/conformance/) checks that they behave the same.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

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

__all__ = ["Hive"]


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
    ) -> Item:
        """Create or replace the item at (namespace, key).

        Args:
            value: any JSON value, at most ``max_value_bytes`` (1 MiB) as JSON.
            if_version: ``None`` writes unconditionally; ``0`` writes only if the
                item is absent; ``n`` writes only if the item is at version ``n``.
            ttl: seconds until the item expires (> 0); ``None`` never expires.
                Each write sets the expiry anew.
            text: what search indexes; at most ``max_text_bytes``.
            metadata: a JSON object of filterable attributes.

        Returns:
            The stored item: version 1 on create, previous version + 1 otherwise,
            author set to this hive's agent.

        Raises:
            Conflict: ``if_version`` did not match (``current_version`` says what
                was found, 0 if absent); nothing was written.
        """

    @abstractmethod
    async def get(self, namespace: str, key: str) -> Item | None:
        """The item at (namespace, key), or ``None`` if absent or expired."""

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
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[Item]:
        """Items whose namespace is ``prefix`` or under it, ordered by (namespace, key).

        Args:
            prefix: a namespace, or ``""`` for every namespace.
            limit: page size, 1..``max_page_size`` (1000).
            cursor: ``next_cursor`` of the previous page.
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
    ) -> builtins.list[SearchHit]:
        """Find live items at or under ``prefix`` by meaning and by words.

        What is indexed: the item's ``text`` if given, otherwise its value when it is
        a string, otherwise the value's ``text`` or ``content`` field; items with
        none of these are not searchable.

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

        Returns:
            Hits, best first, each with its fused score and per-mode rank and score.

        Raises:
            InvalidInput: bad argument (field named, e.g. ``filter.tags.$near``), or
                ``mode="vector"`` without an embedder (field ``mode``).
            Unavailable: the embedder cannot be reached.
        """

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
    ) -> Session:
        """Create a session.

        Args:
            app, user, agent: identifiers (one namespace segment each) to list by.
            session_id: your own id (one segment); a new id is made if ``None``.
            state: an initial state document (saved as state version 1).

        Raises:
            Conflict: a session with ``session_id`` exists.
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
