"""The records a Hive returns and accepts.

All times are timezone-aware UTC datetimes. All models are immutable pydantic
models, so they serialise to the same JSON embedded and over HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

__all__ = [
    "AgentRecord",
    "DeleteOp",
    "Event",
    "IndexStatus",
    "Item",
    "Lease",
    "Message",
    "MessageIn",
    "OnceTicket",
    "Page",
    "PutOp",
    "QueueStats",
    "SearchHit",
    "Session",
    "Signal",
    "Task",
    "TaskError",
]

T = TypeVar("T")
#: The largest integer the stores keep (a signed 64-bit integer).
_INT64_MAX = 2**63 - 1
#: Most tokens one message may count, and most cost: bounded well below what a
#: session's running totals (signed 64-bit integers, doubles) can hold.
MAX_MESSAGE_TOKENS = 2**40
MAX_MESSAGE_COST = 1e12


def _integral(value: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); 3.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer as JSON carries it: ``3`` or ``3.0``; never a string or a boolean.
JsonInt = Annotated[int, Strict(), BeforeValidator(_integral)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Item(_Record):
    """One entry of the shared memory bank, at (namespace, key)."""

    namespace: str = Field(description="Path of segments separated by '/', e.g. 'team/research'.")
    key: str = Field(description="Key inside the namespace.")
    value: Any = Field(description="Any JSON value.")
    version: int = Field(description="1 on create, +1 on every write.")
    author: str = Field(description="Agent that wrote this version (stamped by the hive).")
    created_at: datetime = Field(description="When the item was created (UTC).")
    updated_at: datetime = Field(description="When this version was written (UTC).")
    expires_at: datetime | None = Field(default=None, description="When the item expires (UTC).")
    text: str | None = Field(default=None, description="Text that search indexes, if given.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Filterable attributes.")


class Page(_Record, Generic[T]):
    """One page of a listing; pass ``next_cursor`` back to get the next page."""

    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="Opaque cursor of the next page; None on the last page."
    )


class NamespaceCount(_Record):
    """A namespace and its number of live items (:meth:`Hive.namespace_counts`)."""

    namespace: str
    items: int = Field(description="Live items of this namespace itself, not of those under it.")


class PutOp(_Record):
    """A put inside :meth:`Hive.batch`; fields mean what they mean for :meth:`Hive.put`."""

    op: Literal["put"] = "put"
    namespace: str
    key: str
    value: Any
    if_version: JsonInt | None = None
    ttl: Annotated[float, Strict()] | None = Field(
        default=None, description="Seconds until the item expires."
    )
    text: str | None = None
    metadata: dict[str, Any] | None = None


class DeleteOp(_Record):
    """A delete inside :meth:`Hive.batch`; fields mean what they mean for :meth:`Hive.delete`."""

    op: Literal["delete"] = "delete"
    namespace: str
    key: str
    if_version: JsonInt | None = None


class Session(_Record):
    """A conversation: its identity, running counters and versioned state document."""

    id: str
    app: str = Field(description="Application the session belongs to.")
    user: str | None = Field(default=None, description="End user of the conversation.")
    agent: str | None = Field(default=None, description="Agent that owns the conversation.")
    created_by: str = Field(description="Agent identity that created the session.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    state: dict[str, Any] = Field(default_factory=dict, description="Agent state document.")
    state_version: int = Field(description="0 before the first save, +1 on each save.")
    messages: int = Field(description="Messages appended so far (= last sequence number).")
    turns: int = Field(description="Messages with role 'user' appended so far.")
    tokens_in: int = Field(description="Sum of tokens_in over all messages.")
    tokens_out: int = Field(description="Sum of tokens_out over all messages.")
    cost: float = Field(description="Sum of cost over all messages (caller's currency).")
    started_at: datetime
    last_activity_at: datetime
    ttl: float | None = Field(
        default=None,
        description="Seconds of inactivity after which the session expires (sliding: every "
        "append and state save restarts it); null = never.",
    )
    expires_at: datetime | None = Field(
        default=None, description="last_activity_at + ttl; null without a ttl."
    )


class MessageIn(_Record):
    """A message to append to a session."""

    role: str = Field(description="'user', 'assistant', 'system', 'tool' or your own role.")
    content: Any = Field(description="Text or any JSON value (e.g. a list of content parts).")
    tokens_in: JsonInt = Field(default=0, ge=0, le=MAX_MESSAGE_TOKENS, description="0 .. 2**40.")
    tokens_out: JsonInt = Field(default=0, ge=0, le=MAX_MESSAGE_TOKENS, description="0 .. 2**40.")
    cost: Annotated[float, Strict()] = Field(
        default=0.0, ge=0, le=MAX_MESSAGE_COST, allow_inf_nan=False, description="0 .. 1e12."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)


class Message(_Record):
    """A message stored in a session's log."""

    session_id: str
    seq: int = Field(description="1 for the first message of the session, +1 per message.")
    role: str
    content: Any
    author: str = Field(description="Agent identity that appended the message.")
    created_at: datetime
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    metadata: dict[str, Any] = Field(default_factory=dict)


class Event(_Record):
    """One entry of the change feed.

    Types: ``item.put``, ``item.deleted``, ``item.expired`` (namespace, key,
    version); ``session.created``, ``session.messages`` (version = last sequence
    number), ``session.state`` (version = state version), ``session.deleted``
    (namespace ``_sessions/<id>``); ``publish`` (namespace = channel, ``data`` =
    payload).
    """

    cursor: str = Field(description="Opaque position in the feed; resume with after=cursor.")
    type: str
    namespace: str
    key: str | None = None
    version: int | None = None
    author: str
    at: datetime
    data: Any = None


class SearchHit(_Record):
    """One search result: the item, its fused score and where each mode ranked it."""

    item: Item
    score: float = Field(description="Fused score (reciprocal rank fusion); higher is better.")
    lexical_rank: int | None = Field(default=None, description="1-based BM25 rank, if matched.")
    vector_rank: int | None = Field(default=None, description="1-based similarity rank.")
    lexical_score: float | None = Field(default=None, description="BM25 score (higher better).")
    vector_score: float | None = Field(default=None, description="Cosine similarity.")


class IndexStatus(_Record):
    """How far the vectors of search lag behind the writes (``index_mode=deferred``)."""

    mode: str = Field(description="deferred or sync (the index_mode setting).")
    model: str | None = Field(description="The embedder's model; None: lexical search only.")
    pending: int = Field(description="Index entries waiting for their vector.")
    lag_seconds: float | None = Field(
        description="Age of the oldest waiting entry in seconds; None when none wait."
    )
    indexing: bool = Field(
        default=False, description="Whether the answering process runs an indexer."
    )
    parts: list[int] = Field(
        default_factory=list, description="The parts of the work that process holds now."
    )


class TaskError(_Record):
    """The error of one failed (or expired) attempt of a task."""

    attempt: int = Field(description="Which attempt failed (1 = the first claim).")
    error: str = Field(description="What the worker reported, or 'lease expired'.")
    at: datetime = Field(description="When the attempt failed (UTC).")
    worker: str = Field(description="The agent that held the attempt.")


class Task(_Record):
    """A unit of work on a queue: submitted by one agent, claimed and run by another.

    States: ``ready`` (waiting to be claimed), ``delayed`` (ready once ``run_at``
    comes: a ``delay`` or a retry's backoff), ``running`` (claimed; the worker holds a
    lease until ``lease_expires_at`` and renews it with heartbeats), ``completed``
    (``result`` holds the return value), ``dead`` (out of attempts or failed without
    retry; ``errors`` holds each attempt's error; ``requeue`` revives it),
    ``cancelled``.
    """

    id: str
    queue: str
    state: Literal["ready", "delayed", "running", "completed", "dead", "cancelled"]
    payload: Any = Field(description="What the submitter passed (any JSON).")
    result: Any = Field(default=None, description="The worker's result, once completed.")
    priority: int = Field(description="Higher is claimed first (-1000 .. 1000).")
    attempt: int = Field(description="Claims so far; while running, the attempt held.")
    max_attempts: int = Field(description="Attempts before the task is dead.")
    timeout: float | None = Field(
        default=None, description="Seconds one attempt may run before the worker fails it."
    )
    backoff: float = Field(
        description="Seconds before the first retry; doubles with each further attempt."
    )
    idempotency_key: str | None = Field(
        default=None, description="Submits with the same key on this queue return this task."
    )
    submitted_by: str = Field(description="The agent that submitted it.")
    claimed_by: str | None = Field(
        default=None, description="The agent running it (or that completed it)."
    )
    lease_seconds: float = Field(description="Length of the current or last lease (seconds).")
    lease_expires_at: datetime | None = Field(
        default=None, description="When the running attempt's lease ends unless renewed."
    )
    claimed_at: datetime | None = Field(
        default=None, description="When the current or last attempt was claimed."
    )
    run_at: datetime = Field(description="When it is (or was) due to be claimed.")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    errors: list[TaskError] = Field(default_factory=list)
    traceparent: str | None = Field(
        default=None,
        description="W3C trace context of the span that submitted it (tracing on), so the "
        "worker's span joins that trace.",
    )

    @property
    def done(self) -> bool:
        """Whether the task is completed, dead or cancelled (it will not run again
        unless requeued)."""
        return self.state in ("completed", "dead", "cancelled")


class QueueStats(_Record):
    """How many tasks of a queue are in each state, and how long the oldest due one waits."""

    queue: str
    ready: int = Field(description="Due and waiting for a worker.")
    delayed: int = Field(description="Waiting for their run_at (a delay or a retry's backoff).")
    running: int
    completed: int
    dead: int
    cancelled: int
    oldest_ready_seconds: float | None = Field(
        default=None, description="How long the oldest due task has waited (seconds)."
    )


class Lease(_Record):
    """A named lease (a lock that ends by itself) held by one agent.

    ``token`` is the fencing token: every acquisition of the name gets a larger one,
    so a store can refuse a write fenced with an older token (``put(...,
    fence=(name, token))``) once someone else has acquired the lease.
    """

    name: str
    token: int = Field(description="Fencing token: grows with every acquisition of the name.")
    holder: str = Field(description="The agent holding it.")
    ttl: float = Field(description="Seconds the lease lasts from its last acquire or renew.")
    expires_at: datetime = Field(description="When it ends unless renewed (UTC).")
    version: int = Field(description="Version of the holder record (renew and release check it).")


class Signal(_Record):
    """A named value agents set and wait on (``set_signal`` / ``wait_signal``)."""

    name: str
    value: Any
    version: int = Field(description="1 when first set, +1 on every set.")
    set_by: str
    updated_at: datetime
    expires_at: datetime | None = None


class OnceTicket(_Record):
    """What :meth:`Hive.begin_once` found for an idempotency key.

    ``status``: ``run`` (the caller must run the call and then end it with ``token``),
    ``done`` (``result`` is the first call's result), ``failed`` (the first call
    failed and its error was kept: ``error``), ``running`` (another caller runs it and
    did not finish within the wait).
    """

    key: str
    status: Literal["run", "done", "failed", "running"]
    token: int | None = Field(default=None, description="For status run: pass to end_once.")
    result: Any = None
    error: str | None = None
    holder: str | None = Field(default=None, description="Who ran (or runs) the call.")


class AgentRecord(_Record):
    """An agent's entry in the registry."""

    name: str
    capabilities: list[str] = Field(default_factory=list)
    endpoint: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl: float = Field(description="Seconds without a heartbeat after which it is down.")
    registered_by: str = Field(description="The agent identity that registered it.")
    registered_at: datetime
    last_seen: datetime = Field(description="Its last heartbeat (UTC).")
    healthy: bool = Field(description="Whether its last heartbeat is within its ttl.")
