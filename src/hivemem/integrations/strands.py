"""Strands Agents on hivemem (``pip install 'hivemem[strands]'``; strands-agents 1.62).

- :func:`shared_memory_tools`: the six tools of the Strands shared-memory design, with
  those names (``store_shared_data``, ``retrieve_shared_data``, ``list_memory_keys``,
  ``store_fast_memory``, ``get_fast_memory``, ``store_with_broadcast``), bound to a hive
  and so to its agent identity: ``Agent(tools=shared_memory_tools(hive))``.
- :class:`HivememSessionRepository`: a Strands ``SessionRepository``, so
  ``RepositorySessionManager`` keeps agents' messages and state (and multi-agent state)
  in hivemem: a pod that dies, resumed in another, finds its conversation.
- :class:`HivememMemoryStore`: a Strands ``MemoryStore`` (long-term memory searched by
  hivemem's hybrid search), for ``Agent(memory_manager=MemoryManager(stores=[...]))``.

Strands calls its repository from whatever thread runs the agent and its tools from
worker threads, so each adapter takes a :class:`~hivemem.SyncHive`
(``hivemem.connect_sync``), which any thread may call; the memory store's async methods
run its calls in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import TYPE_CHECKING, Any

from strands import tool
from strands.session.session_repository import SessionRepository
from strands.types.exceptions import SessionException
from strands.types.session import Session, SessionAgent, SessionMessage

from hivemem.errors import Conflict, HivememError
from hivemem.integrations._common import PAGE
from hivemem.integrations.labels import encode_label, encode_part

if TYPE_CHECKING:
    from strands.memory.types import AddMessagesContext, MemoryEntry, SearchOptions
    from strands.multiagent.base import MultiAgentBase
    from strands.types.content import Message
    from strands.types.tools import AgentTool

    from hivemem.models import Item
    from hivemem.sync import SyncHive

#: Width of a message id in its key, so keys sort as the ids do.
_ID_WIDTH = 12


def _sync(hive: Any) -> SyncHive:
    from hivemem.sync import SyncHive

    if not isinstance(hive, SyncHive):
        raise TypeError(
            "the Strands adapters need a SyncHive (hivemem.connect_sync): Strands calls them "
            "from its own threads and event loops"
        )
    return hive


def _text_of(message: Message) -> str:
    """The text blocks of a Strands message, joined."""
    return "\n".join(
        block["text"] for block in message.get("content", []) if isinstance(block.get("text"), str)
    )


# Tools -----------------------------------------------------------------------------


def shared_memory_tools(
    hive: SyncHive,
    *,
    namespace: str = "shared",
    fast_ttl_seconds: float = 300.0,
) -> list[AgentTool]:
    """The six shared-memory tools, bound to ``hive`` (writes are stamped with its agent).

    Args:
        hive: a :class:`~hivemem.SyncHive`.
        namespace: where ``store_shared_data`` keeps items (the model may name a
            sub-namespace under it); fast memory lives under ``<namespace>/fast``, and
            ``store_with_broadcast`` publishes on ``<namespace>/broadcast``.
        fast_ttl_seconds: the expiry of fast memory when the model gives none.

    Returns:
        Strands ``AgentTool`` objects for ``Agent(tools=...)``. Each returns a JSON object
        the model reads; a refused call (a version conflict, a bad name) returns an error
        naming the field, and writes nothing.
    """
    h = _sync(hive)

    def where(sub: str | None) -> str:
        return f"{namespace}/{sub}" if sub else namespace

    def refused(exc: HivememError) -> dict[str, Any]:
        field = getattr(exc, "field", None)
        return {"error": f"{type(exc).__name__}: {exc}", "field": field}

    def shown(item: Item | None) -> dict[str, Any]:
        if item is None:
            return {"found": False}
        return {
            "found": True,
            "key": item.key,
            "value": item.value,
            "version": item.version,
            "author": item.author,
            "updated_at": item.updated_at.isoformat(),
            "expires_at": item.expires_at.isoformat() if item.expires_at else None,
        }

    @tool
    def store_shared_data(
        key: str, value: Any, area: str | None = None, if_version: int | None = None
    ) -> dict[str, Any]:
        """Store a value in the memory all agents of the system share, so others can read
        it (results, decisions, facts). Replaces what the key held.

        Args:
            key: name of the entry (no '/').
            value: any JSON value, at most 1 MiB.
            area: optional sub-area, e.g. "research" (letters, digits, _ - . : @ +).
            if_version: write only if the entry is still at this version (0: only if new);
                otherwise the answer names the version found, so nothing is overwritten
                by mistake.
        """
        try:
            item = h.put(where(area), key, value, if_version=if_version)
        except HivememError as exc:
            return refused(exc)
        return {"stored": key, "version": item.version, "author": item.author}

    @tool
    def retrieve_shared_data(key: str, area: str | None = None) -> dict[str, Any]:
        """Read an entry of the shared memory: its value, version, and which agent wrote it.

        Args:
            key: name of the entry.
            area: the sub-area it was stored in, if any.
        """
        try:
            return shown(h.get(where(area), key))
        except HivememError as exc:
            return refused(exc)

    @tool
    def list_memory_keys(
        prefix: str = "", area: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """List the keys of the shared memory that start with a prefix, in order.

        Args:
            prefix: the start of the keys to list ("" for all).
            area: the sub-area to list, if any.
            limit: at most this many keys (1-1000).
        """
        try:
            page = h.list(where(area), key_prefix=prefix, limit=limit)
        except HivememError as exc:
            return refused(exc)
        return {"keys": [i.key for i in page.items], "more": page.next_cursor is not None}

    @tool
    def store_fast_memory(key: str, value: Any, ttl_seconds: float | None = None) -> dict[str, Any]:
        """Keep a short-lived value (scratch notes, a lock-free hand-off, a cache) that
        disappears on its own.

        Args:
            key: name of the entry.
            value: any JSON value.
            ttl_seconds: seconds until it is forgotten (default a few minutes).
        """
        ttl = fast_ttl_seconds if ttl_seconds is None else ttl_seconds
        try:
            item = h.put(where("fast"), key, value, ttl=ttl)
        except HivememError as exc:
            return refused(exc)
        return {
            "stored": key,
            "version": item.version,
            "expires_at": item.expires_at.isoformat() if item.expires_at else None,
        }

    @tool
    def get_fast_memory(key: str) -> dict[str, Any]:
        """Read a short-lived value; found is false once it has expired.

        Args:
            key: name of the entry.
        """
        try:
            return shown(h.get(where("fast"), key))
        except HivememError as exc:
            return refused(exc)

    @tool
    def store_with_broadcast(key: str, value: Any, note: str | None = None) -> dict[str, Any]:
        """Store a value in the shared memory and tell every agent watching that it changed
        (for results others are waiting on).

        Args:
            key: name of the entry.
            value: any JSON value.
            note: a short message for the agents that receive the broadcast.
        """
        try:
            item = h.put(where(None), key, value)
            event = h.publish(
                where("broadcast"),
                {"key": key, "version": item.version, "author": item.author, "note": note},
            )
        except HivememError as exc:
            return refused(exc)
        return {"stored": key, "version": item.version, "broadcast": event.cursor}

    return [
        store_shared_data,
        retrieve_shared_data,
        list_memory_keys,
        store_fast_memory,
        get_fast_memory,
        store_with_broadcast,
    ]


# Sessions --------------------------------------------------------------------------


class HivememSessionRepository(SessionRepository):
    """Strands ``SessionRepository`` on a hive:
    ``RepositorySessionManager(session_id=..., session_repository=HivememSessionRepository(hive))``.

    Layout under ``prefix`` (names escaped as :mod:`hivemem.integrations.labels` says):
    ``<prefix>/<session>`` holds the item ``session``, one ``agent.<id>`` per agent and
    one ``multi.<id>`` per multi-agent state; ``<prefix>/<session>/<agent>`` holds the
    agent's messages, keyed ``<message id, 12 digits>.<writer>``, where the writer is this
    hive's agent identity.

    Two processes resuming one session: every message each appends is kept once (a
    retried write of the same message replaces itself; two processes' messages with the
    same id are both kept, ordered by id and writer), and an agent's or multi-agent's
    state is written with compare-and-set on the version this repository last read or
    wrote, so a process whose copy is stale gets ``SessionException`` (caused by
    :class:`~hivemem.errors.Conflict`) instead of overwriting the other's state.
    """

    def __init__(self, hive: SyncHive, *, prefix: str = "strands") -> None:
        self._hive = _sync(hive)
        self.prefix = prefix
        self._writer = encode_part(hive.agent)
        #: (session, kind.id) → (version, created_at) of the state items seen here.
        self._seen: dict[tuple[str, str], tuple[int, str]] = {}

    def _space(self, session_id: str) -> str:
        return f"{self.prefix}/{encode_label(session_id)}"

    def _messages(self, session_id: str, agent_id: str) -> str:
        return f"{self._space(session_id)}/{encode_label(agent_id)}"

    def _key(self, message_id: int, writer: str | None = None) -> str:
        return f"{message_id:0{_ID_WIDTH}d}.{writer or self._writer}"

    # Session and agents

    def create_session(self, session: Session, **kwargs: Any) -> Session:
        try:
            self._hive.put(
                self._space(session.session_id), "session", session.to_dict(), if_version=0
            )
        except Conflict as exc:
            raise SessionException(f"session {session.session_id!r} already exists") from exc
        return session

    def read_session(self, session_id: str, **kwargs: Any) -> Session | None:
        item = self._hive.get(self._space(session_id), "session")
        return None if item is None else Session.from_dict(item.value)

    def _create_state(self, session_id: str, key: str, value: dict[str, Any]) -> None:
        try:
            item = self._hive.put(self._space(session_id), key, value, if_version=0)
        except Conflict as exc:
            raise SessionException(f"{key} of session {session_id!r} already exists") from exc
        self._seen[(session_id, key)] = (item.version, str(value.get("created_at", "")))

    def _read_state(self, session_id: str, key: str) -> dict[str, Any] | None:
        item = self._hive.get(self._space(session_id), key)
        if item is None:
            return None
        self._seen[(session_id, key)] = (item.version, str(item.value.get("created_at", "")))
        return dict(item.value)

    def _update_state(self, session_id: str, key: str, value: dict[str, Any]) -> None:
        seen = self._seen.get((session_id, key))
        if seen is None:  # never read here: compare with what is stored now
            if self._read_state(session_id, key) is None:
                raise SessionException(f"{key} of session {session_id!r} does not exist")
            seen = self._seen[(session_id, key)]
        version, created_at = seen
        if created_at:
            value["created_at"] = created_at
        try:
            item = self._hive.put(self._space(session_id), key, value, if_version=version)
        except Conflict as exc:
            raise SessionException(
                f"{key} of session {session_id!r} was changed by another process "
                f"(this copy is from version {version}): read the session again"
            ) from exc
        self._seen[(session_id, key)] = (item.version, created_at)

    def create_agent(self, session_id: str, session_agent: SessionAgent, **kwargs: Any) -> None:
        key = f"agent.{encode_part(session_agent.agent_id)}"
        self._create_state(session_id, key, session_agent.to_dict())

    def read_agent(self, session_id: str, agent_id: str, **kwargs: Any) -> SessionAgent | None:
        found = self._read_state(session_id, f"agent.{encode_part(agent_id)}")
        return None if found is None else SessionAgent.from_dict(found)

    def update_agent(self, session_id: str, session_agent: SessionAgent, **kwargs: Any) -> None:
        key = f"agent.{encode_part(session_agent.agent_id)}"
        self._update_state(session_id, key, session_agent.to_dict())

    def create_multi_agent(
        self, session_id: str, multi_agent: MultiAgentBase, **kwargs: Any
    ) -> None:
        self._create_state(session_id, f"multi.{encode_part(multi_agent.id)}", _state(multi_agent))

    def read_multi_agent(
        self, session_id: str, multi_agent_id: str, **kwargs: Any
    ) -> dict[str, Any] | None:
        found = self._read_state(session_id, f"multi.{encode_part(multi_agent_id)}")
        if found is not None:
            found.pop("created_at", None)
        return found

    def update_multi_agent(
        self, session_id: str, multi_agent: MultiAgentBase, **kwargs: Any
    ) -> None:
        self._update_state(session_id, f"multi.{encode_part(multi_agent.id)}", _state(multi_agent))

    # Messages

    def create_message(
        self, session_id: str, agent_id: str, session_message: SessionMessage, **kwargs: Any
    ) -> None:
        self._hive.put(
            self._messages(session_id, agent_id),
            self._key(session_message.message_id),
            session_message.to_dict(),
            text=_text_of(session_message.message),
        )

    def _find_message(self, ns: str, message_id: int) -> Any:
        """The item holding message ``message_id`` in ``ns`` (written by this process or
        by another one), or None."""
        mine = self._hive.get(ns, self._key(message_id))
        if mine is not None:
            return mine
        page = self._hive.list(ns, key_prefix=f"{message_id:0{_ID_WIDTH}d}.", limit=1)
        return page.items[0] if page.items else None

    def read_message(
        self, session_id: str, agent_id: str, message_id: int, **kwargs: Any
    ) -> SessionMessage | None:
        item = self._find_message(self._messages(session_id, agent_id), message_id)
        return None if item is None else SessionMessage.from_dict(item.value)

    def update_message(
        self, session_id: str, agent_id: str, session_message: SessionMessage, **kwargs: Any
    ) -> None:
        """Replace a stored message (Strands redacts one this way) in the item that holds
        it, whichever process wrote it, by compare-and-set on the version read.

        Raises:
            SessionException: no such message, or it changed since it was read.
        """
        ns = self._messages(session_id, agent_id)
        item = self._find_message(ns, session_message.message_id)
        if item is None:
            raise SessionException(
                f"message {session_message.message_id} of agent {agent_id!r} does not exist"
            )
        session_message.created_at = SessionMessage.from_dict(item.value).created_at
        try:
            self._hive.put(
                ns,
                item.key,
                session_message.to_dict(),
                text=_text_of(session_message.redact_message or session_message.message),
                if_version=item.version,
            )
        except Conflict as exc:
            raise SessionException(
                f"message {session_message.message_id} of agent {agent_id!r} changed while "
                "it was updated"
            ) from exc

    def list_messages(
        self,
        session_id: str,
        agent_id: str,
        limit: int | None = None,
        offset: int = 0,
        **kwargs: Any,
    ) -> list[SessionMessage]:
        ns = self._messages(session_id, agent_id)
        out: list[SessionMessage] = []
        skipped = 0
        cursor: str | None = None
        while limit is None or len(out) < limit:
            page = self._hive.list(ns, key_prefix="", limit=PAGE, cursor=cursor)
            for item in page.items:
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(SessionMessage.from_dict(item.value))
                if limit is not None and len(out) >= limit:
                    break
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return out


def _state(multi_agent: MultiAgentBase) -> dict[str, Any]:
    return dict(multi_agent.serialize_state())


# Long-term memory --------------------------------------------------------------------


class HivememMemoryStore:
    """Strands ``MemoryStore`` on a hive: entries are items under ``namespace``, found by
    hivemem's hybrid search (BM25 and the hive's embedder).

    ``add(content)`` keys an entry by the SHA-256 of its content, so a retried (or
    repeated) write stores it once. ``add_messages`` stores each message under
    ``<run token>.<sequence number>``, created only if absent: a retried batch (the same
    numbers and messages) writes nothing twice. Sequence numbers restart at 0 with each
    agent run, so the token changes when a number comes back with another message.

    Args:
        hive: a :class:`~hivemem.SyncHive`.
        namespace: where entries are kept.
        name, description, max_search_results, writable: the store's identity for the
            ``MemoryManager`` and its tools.
    """

    extraction: Any = None

    def __init__(
        self,
        hive: SyncHive,
        *,
        namespace: str = "strands/memory",
        name: str = "hivemem",
        description: str | None = "Memory shared by every agent of the system.",
        max_search_results: int | None = 5,
        writable: bool = True,
    ) -> None:
        self._hive = _sync(hive)
        self.namespace = namespace
        self.name = name
        self.description = description
        self.max_search_results = max_search_results
        self.writable = writable
        self._run = uuid.uuid4().hex[:12]
        self._seen: dict[int, str] = {}  # sequence number → digest of its message

    async def search(self, query: str, options: SearchOptions | None = None) -> list[MemoryEntry]:
        """Entries matching ``query``, best first (at most ``max_search_results``)."""
        from strands.memory.types import MemoryEntry

        limit = (options or {}).get("max_search_results") or self.max_search_results or 5
        if not query.strip():
            return []
        hits = await asyncio.to_thread(
            self._hive.search, self.namespace, query, limit=max(1, min(int(limit), 100))
        )
        return [
            MemoryEntry(
                content=h.item.text if h.item.text is not None else str(h.item.value),
                metadata={
                    "key": h.item.key,
                    "score": h.score,
                    "author": h.item.author,
                    **h.item.metadata,
                },
            )
            for h in hits
        ]

    async def add(self, content: str, metadata: dict[str, Any] | None = None) -> Any:
        """Store ``content`` (once per distinct content); returns its key."""
        key = hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]
        await asyncio.to_thread(
            self._hive.put,
            self.namespace,
            key,
            {"content": content},
            text=content,
            metadata=dict(metadata or {}),
        )
        return key

    async def add_messages(
        self, messages: list[Message], context: AddMessagesContext | None = None
    ) -> Any:
        """Store each message with text (idempotent per sequence number, see above);
        returns how many were new."""
        numbers = context.sequence_numbers if context and context.sequence_numbers else None
        stored = 0
        for i, message in enumerate(messages):
            text = _text_of(message)
            if not text:
                continue
            digest = hashlib.sha256(f"{message.get('role')}\n{text}".encode()).hexdigest()
            if numbers is None:
                key = digest[:32]
            else:
                seq = numbers[i]
                if self._seen.get(seq, digest) != digest:  # numbers restarted: a new run
                    self._run, self._seen = uuid.uuid4().hex[:12], {}
                self._seen[seq] = digest
                key = f"{self._run}.{seq:08d}"
            try:
                await asyncio.to_thread(
                    self._hive.put,
                    self.namespace,
                    key,
                    {"role": message.get("role"), "content": text},
                    if_version=0,
                    text=text,
                    metadata={"role": str(message.get("role"))},
                )
                stored += 1
            except Conflict:
                pass  # stored by an earlier try of this batch
        return stored


__all__ = ["HivememMemoryStore", "HivememSessionRepository", "shared_memory_tools"]
