"""What backends store and are asked to write: rows, write operations, task rows, and
the rules every engine applies alike (a namespace prefix's range, a version mismatch).

JSON travels as ``bytes`` and times as UNIX seconds (float, UTC); the public records
built from these rows live in :mod:`hivemem.models`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson

from hivemem.errors import Conflict

__all__ = [
    "LEASE_EXPIRED",
    "TASK_FINISHED",
    "TASK_STATES",
    "CheckWrite",
    "DeleteWrite",
    "EventRow",
    "IndexEntry",
    "ItemRow",
    "MessageRow",
    "NewMessage",
    "PutWrite",
    "SessionRow",
    "TaskRow",
    "TaskStats",
    "add_task_error",
    "at_or_under",
    "check_held",
    "finished_task",
    "key_range",
    "prefix_range",
    "session_expired",
    "settled_task",
    "state_conflict",
    "task_namespace",
    "version_conflict",
]


@dataclass(slots=True, frozen=True)
class ItemRow:
    """A stored item version. ``value`` and ``metadata`` are JSON bytes."""

    namespace: str
    key: str
    value: bytes
    version: int
    author: str
    created_at: float
    updated_at: float
    expires_at: float | None
    text: str | None
    metadata: bytes | None


@dataclass(slots=True, frozen=True)
class PutWrite:
    """Write ``value`` at (namespace, key) if the current version is ``if_version``
    (0 = absent; ``None`` = any).

    ``index_text`` is what search indexes (``None``: the item is not searchable);
    ``vector`` its embedding as float32 bytes from model ``model``. No vector with a
    model named: the vector is deferred, and the entry waits for the indexer
    (:meth:`~hivemem.backends.base.Backend.pending_vectors`); no vector and no model:
    lexical search only.
    """

    namespace: str
    key: str
    value: bytes
    text: str | None
    metadata: bytes | None
    expires_at: float | None
    if_version: int | None
    index_text: str | None = None
    vector: bytes | None = None
    model: str | None = None
    #: The type of the write's feed event (None: ``item.put``); the core names its own
    #: records' changes with it (e.g. ``agent.down`` in ``_agents``).
    event: str | None = None


@dataclass(slots=True, frozen=True)
class IndexEntry:
    """A search-index row to store for (namespace, key) if the item is still at ``version``."""

    namespace: str
    key: str
    version: int
    text: str | None
    vector: bytes | None
    model: str | None


#: The feed event of an index entry stored after its write (``set_index``): the item's
#: vector is searchable. The in-process indexes follow it; watchers never see it.
INDEXED = "item.indexed"

#: The author of the events hivemem writes on its own (expiry, indexing).
SYSTEM = "hivemem"


def own_event(type_: str, namespace: str) -> bool:
    """Whether a feed event is hivemem's own bookkeeping, which no watcher sees: an
    ``item.indexed`` note, or a change under ``_hivemem/`` (the indexers' membership)
    or to a lease of hivemem's own (``_leases/_hivemem/``)."""
    return (
        type_ == INDEXED
        or namespace.startswith("_hivemem/")
        or namespace.startswith("_leases/_hivemem/")
    )


@dataclass(slots=True, frozen=True)
class DeleteWrite:
    """Delete (namespace, key) if the current version is ``if_version`` (``None`` = any)."""

    namespace: str
    key: str
    if_version: int | None
    #: The type of the write's feed event (None: ``item.deleted``).
    event: str | None = None


@dataclass(slots=True, frozen=True)
class CheckWrite:
    """Check, inside a :meth:`Backend.write_items` batch, that (namespace, key) is live
    at ``if_version`` (0 = absent or expired), writing nothing there: a mismatch is a
    Conflict like any write's and the whole batch writes nothing. The result is
    ``True``; no event. (The core fences item writes with it: see core/leases.py.)"""

    namespace: str
    key: str
    if_version: int


@dataclass(slots=True, frozen=True)
class SessionRow:
    """A stored session. ``metadata`` and ``state`` are JSON bytes of objects."""

    id: str
    app: str
    user: str | None
    agent: str | None
    created_by: str
    metadata: bytes
    state: bytes
    state_version: int
    messages: int
    turns: int
    tokens_in: int
    tokens_out: int
    cost: float
    started_at: float
    last_activity_at: float
    #: Seconds of inactivity after which the session expires; None = never.
    ttl: float | None = None


@dataclass(slots=True, frozen=True)
class NewMessage:
    """A message to append; ``content`` and ``metadata`` are JSON bytes."""

    role: str
    content: bytes
    tokens_in: int
    tokens_out: int
    cost: float
    metadata: bytes


@dataclass(slots=True, frozen=True)
class MessageRow:
    """A stored message of a session's log."""

    session_id: str
    seq: int
    role: str
    content: bytes
    author: str
    created_at: float
    tokens_in: int
    tokens_out: int
    cost: float
    metadata: bytes


@dataclass(slots=True, frozen=True)
class EventRow:
    """A stored feed event; ``data`` is JSON bytes or ``None``."""

    cursor: str
    type: str
    namespace: str
    key: str | None
    version: int | None
    author: str
    at: float
    data: bytes | None


#: Task states as stored. A ``ready`` task whose ``run_at`` is still ahead is what the
#: public record calls ``delayed``.
TASK_STATES = ("ready", "running", "completed", "dead", "cancelled")
#: States a task never leaves on its own (only :meth:`Backend.requeue_task` revives
#: ``dead`` and ``cancelled`` ones).
TASK_FINISHED = ("completed", "dead", "cancelled")
#: The error recorded for an attempt whose lease ran out.
LEASE_EXPIRED = "lease expired"


@dataclass(slots=True, frozen=True)
class TaskRow:
    """A stored task of a queue (times in UNIX seconds).

    ``attempt`` counts claims: 0 until first claimed, n while the n-th claim runs; it
    is the fencing token of the worker that holds the task (a worker's heartbeat,
    complete, fail or release names the attempt it holds, and is refused once the
    task moved on). ``errors`` is a JSON array of ``{"attempt": int, "error": str,
    "at": float, "worker": str}``, one per failed or expired attempt, oldest first.
    ``lease`` is the length (seconds) of the current or last claim's lease;
    ``lease_until`` when it ends (``None`` unless running). ``claimed_at`` is when the
    current or last attempt was claimed (the claim's ``now``): kept when the attempt
    ends (completed, failed, released, expired or cancelled), ``None`` until the first
    claim and again after a requeue. It is last, with a default, so that rows stored
    (or request results encoded) before it existed still build.
    """

    id: str
    queue: str
    state: str
    payload: bytes
    result: bytes | None
    priority: int
    run_at: float
    attempt: int
    max_attempts: int
    timeout: float | None
    backoff: float
    lease: float
    lease_until: float | None
    idempotency_key: str | None
    submitted_by: str
    claimed_by: str | None
    errors: bytes
    created_at: float
    updated_at: float
    finished_at: float | None
    claimed_at: float | None = None


@dataclass(slots=True, frozen=True)
class TaskStats:
    """Counts of one queue's tasks by state at a time ``now``: ``ready`` are due
    (``run_at <= now``), ``delayed`` are ready but not yet due; ``oldest_ready_at`` is
    the smallest ``run_at`` of the due ones (None when there are none)."""

    ready: int
    delayed: int
    running: int
    completed: int
    dead: int
    cancelled: int
    oldest_ready_at: float | None


def task_namespace(queue: str) -> str:
    """The feed namespace of a queue's task events: ``_tasks/<queue>``."""
    return f"_tasks/{queue}"


def add_task_error(errors: bytes, attempt: int, error: str, at: float, worker: str | None) -> bytes:
    """``errors`` (a TaskRow's JSON array) with one more attempt's error appended."""
    entries = orjson.loads(errors) if errors else []
    entries.append({"attempt": attempt, "error": error, "at": at, "worker": worker or ""})
    return orjson.dumps(entries)


def check_held(row: TaskRow, worker: str, attempt: int) -> None:
    """Refuse a heartbeat or finish of an attempt ``worker`` no longer holds.

    Raises:
        Conflict: field ``attempt``; the message says whether the task is no longer
            running, runs another worker's attempt, or another attempt.
    """
    if row.state != "running" or row.attempt != attempt or row.claimed_by != worker:
        if row.state != "running":
            why = f"it is {row.state}"
        elif row.claimed_by != worker:
            why = f"attempt {row.attempt} is held by another worker"
        else:
            why = f"it runs attempt {row.attempt} now"
        raise Conflict(
            f"task {row.id!r}: attempt {attempt} is no longer held by {worker!r} ({why})",
            field="attempt",
        )


def settled_task(row: TaskRow, now: float) -> tuple[TaskRow, str]:
    """(the task, the event type) after its expired lease is settled (see base.py): dead
    after the last attempt, else ready at ``now``; the attempt's error is recorded."""
    errors = add_task_error(row.errors, row.attempt, LEASE_EXPIRED, now, row.claimed_by)
    if row.attempt >= row.max_attempts:
        return (
            replace(
                row,
                state="dead",
                errors=errors,
                claimed_by=None,
                lease_until=None,
                updated_at=now,
                finished_at=now,
            ),
            "task.dead",
        )
    return (
        replace(
            row,
            state="ready",
            errors=errors,
            claimed_by=None,
            lease_until=None,
            run_at=now,
            updated_at=now,
        ),
        "task.expired",
    )


def finished_task(
    row: TaskRow,
    *,
    worker: str,
    attempt: int,
    now: float,
    outcome: str,
    result: bytes | None,
    error: str | None,
    retry_at: float | None,
) -> tuple[TaskRow, str]:
    """(the task, the event type) after ``worker`` ends ``attempt`` with ``outcome``
    (``completed``, ``failed`` or ``released``; see ``Backend.finish_task``).

    Raises:
        ValueError: an unknown outcome.
    """
    if outcome == "completed":
        done = replace(
            row, state="completed", result=result, lease_until=None, updated_at=now, finished_at=now
        )
        return done, "task.completed"
    if outcome == "failed":
        errors = add_task_error(row.errors, attempt, error or "", now, worker)
        if retry_at is not None and attempt < row.max_attempts:
            again = replace(
                row,
                state="ready",
                errors=errors,
                run_at=retry_at,
                claimed_by=None,
                lease_until=None,
                updated_at=now,
            )
            return again, "task.failed"
        dead = replace(
            row,
            state="dead",
            errors=errors,
            claimed_by=None,
            lease_until=None,
            updated_at=now,
            finished_at=now,
        )
        return dead, "task.dead"
    if outcome == "released":
        back = replace(
            row,
            state="ready",
            attempt=attempt - 1,
            run_at=now,
            claimed_by=None,
            lease_until=None,
            updated_at=now,
        )
        return back, "task.released"
    raise ValueError(f"unknown outcome {outcome!r}")


def prefix_range(prefix: str) -> tuple[str, str, str]:
    """``(prefix, low, high)``: a namespace is at or under ``prefix`` when it equals
    ``prefix`` or lies in ``[low, high)`` (``prefix + "/"`` .. ``prefix + "0"``; ``"0"``
    follows ``"/"`` in code-point order, so this is one index range). Every engine's
    prefix condition uses it; their text comparisons are bytewise (SQLite BINARY,
    PostgreSQL ``COLLATE "C"``, Redis lexicographic ranges)."""
    return prefix, prefix + "/", prefix + "0"


def at_or_under(namespace: str, prefix: str) -> bool:
    """Whether ``namespace`` is at or under ``prefix`` (whole segments; ``""`` is every
    namespace): the test :func:`prefix_range` makes in an index, on one value."""
    return prefix == "" or namespace == prefix or namespace.startswith(prefix + "/")


def key_range(key_prefix: str) -> tuple[str, str | None]:
    """``(low, high)``: a key starts with ``key_prefix`` when it lies in ``[low, high)``;
    ``high`` is None when no string bounds it (an empty prefix, or one of U+10FFFF only).
    ``high`` is ``key_prefix`` with its last code point raised by one after dropping
    trailing U+10FFFF (bytewise UTF-8 order is code-point order); a raised code point
    that falls on a surrogate skips to U+E000."""
    stem = key_prefix.rstrip("\U0010ffff")
    if not stem:
        return key_prefix, None
    nxt = ord(stem[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:
        nxt = 0xE000
    return key_prefix, stem[:-1] + chr(nxt)


def version_conflict(
    w: PutWrite | DeleteWrite | CheckWrite, current: int, index: int, count: int
) -> Conflict:
    """The :class:`~hivemem.errors.Conflict` of write ``index`` (of ``count`` in one call)
    whose ``if_version`` is not ``current`` (0 = absent): field ``if_version`` for a
    single write, ``ops.<index>.if_version`` in a batch."""
    return Conflict(
        f"{w.namespace}/{w.key} is at version {current}, not {w.if_version}"
        if current
        else f"{w.namespace}/{w.key} does not exist (version 0); if_version was {w.if_version}",
        field=f"ops.{index}.if_version" if count > 1 else "if_version",
        current_version=current,
    )


def session_expired(row: SessionRow, now: float) -> bool:
    """Whether ``row`` has expired at ``now``: it has a ``ttl`` and ``last_activity_at +
    ttl <= now`` (the boundary is expired, as for items)."""
    return row.ttl is not None and row.last_activity_at + row.ttl <= now


def state_conflict(session_id: str, current: int, if_version: int | None) -> Conflict:
    """The Conflict of a session state save whose ``if_version`` is not ``current``."""
    return Conflict(
        f"session {session_id!r} state is at version {current}, not {if_version}",
        field="if_version",
        current_version=current,
    )
