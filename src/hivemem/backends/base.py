"""The backend contract: storage primitives, no rules.

A backend stores rows and applies each write, its version check and its feed
event in one atomic step. Validation, identities, TTL arithmetic, JSON encoding
and the public records live in :mod:`hivemem.core`; a backend sees already
checked arguments, JSON as ``bytes`` and times as UNIX seconds (float, UTC).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import orjson

from hivemem.errors import InvalidInput

__all__ = [
    "LEASE_EXPIRED",
    "TASK_FINISHED",
    "TASK_STATES",
    "Backend",
    "ChangeSignal",
    "CheckWrite",
    "Condition",
    "DeleteWrite",
    "EventRow",
    "IndexEntry",
    "ItemRow",
    "MessageRow",
    "NewMessage",
    "PutWrite",
    "RequestIdReused",
    "SessionRow",
    "TaskHint",
    "TaskRow",
    "TaskStats",
    "WriteResult",
    "add_task_error",
    "decode_result",
    "decode_stored_result",
    "encode_result",
    "encode_stored_result",
    "parse_task_hints",
    "row_matches",
    "split_request_id",
    "task_hints",
    "task_namespace",
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
    ``vector`` its embedding as float32 bytes from model ``model`` (``None``: no
    vector, lexical search only).
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
class Condition:
    """One search filter condition, already checked.

    ``kind`` is ``"metadata"`` (``field`` = a top-level metadata key), ``"author"``
    or ``"updated_at"`` (value in UNIX seconds); ``op`` is one of
    ``= in > >= < <=``; for ``in``, ``value`` is a non-empty tuple.
    """

    kind: str
    field: str | None
    op: str
    value: Any


@dataclass(slots=True, frozen=True)
class IndexEntry:
    """A search-index row to store for (namespace, key) if the item is still at ``version``."""

    namespace: str
    key: str
    version: int
    text: str | None
    vector: bytes | None
    model: str | None


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
    ``lease_until`` when it ends (``None`` unless running).
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


#: What a write method returns; what a request id's stored result decodes to.
WriteResult = Any

_ROW_TYPES: dict[str, type] = {
    "item": ItemRow,
    "session": SessionRow,
    "message": MessageRow,
    "event": EventRow,
    "task": TaskRow,
}
_ROW_TAGS = {cls: tag for tag, cls in _ROW_TYPES.items()}


def _encode_value(value: Any) -> Any:
    tag = _ROW_TAGS.get(type(value))
    if tag is not None:
        fields = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if isinstance(v, bytes):
                v = {"b": base64.b64encode(v).decode("ascii")}
            fields[f.name] = v
        return {"t": tag, "f": fields}
    if isinstance(value, list | tuple):
        return {"t": "list", "v": [_encode_value(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"t": "plain", "v": value}
    raise TypeError(f"cannot encode a write result of type {type(value).__name__}")


def _decode_value(doc: Any) -> Any:
    tag = doc["t"]
    if tag == "list":
        return [_decode_value(v) for v in doc["v"]]
    if tag == "plain":
        return doc["v"]
    fields = {
        name: base64.b64decode(v["b"]) if isinstance(v, dict) else v for name, v in doc["f"].items()
    }
    return _ROW_TYPES[tag](**fields)


def encode_result(result: WriteResult) -> bytes:
    """Encode what a write method returned (rows of this module, bools, None, lists
    of these) as bytes, to store under a request id in the write's transaction."""
    return orjson.dumps(_encode_value(result))


def decode_result(data: bytes) -> WriteResult:
    """The write result :func:`encode_result` encoded."""
    return _decode_value(orjson.loads(data))


class RequestIdReused(InvalidInput):
    """Raised when a request id comes with a different request than the one it was first
    used for (another operation or other arguments): nothing was written (HTTP 422,
    field ``request_id``)."""

    def __init__(
        self,
        message: str = (
            "this request id was already used for a different request (another operation "
            "or other arguments); use a new request id for a new request"
        ),
        *,
        field: str | None = "request_id",
    ) -> None:
        super().__init__(message, field=field)


@overload
def split_request_id(request_id: str) -> tuple[str, str | None]: ...
@overload
def split_request_id(request_id: None) -> tuple[None, None]: ...
@overload
def split_request_id(request_id: str | None) -> tuple[str | None, str | None]: ...
def split_request_id(request_id: str | None) -> tuple[str | None, str | None]:
    """(id, fingerprint) of a ``request_id`` a backend primitive was given.

    The core may append ``#<fingerprint>`` (hex) to the id; the part before the last
    ``#`` is the id (what the stored result is kept under), the rest the fingerprint
    of the request (``None`` when absent or empty). ``None`` gives ``(None, None)``.
    """
    if request_id is None:
        return None, None
    rid, sep, fp = request_id.rpartition("#")
    if not sep:
        return request_id, None
    return rid, fp or None


def encode_stored_result(result: WriteResult, fingerprint: str | None) -> bytes:
    """What a SQL backend stores under a request id: :func:`encode_result` of ``result``,
    prefixed with ``#<fingerprint>\\n`` when there is a fingerprint (a plain encoded
    result starts with ``{``, so results stored without one still read back)."""
    encoded = encode_result(result)
    if not fingerprint:
        return encoded
    return b"#" + fingerprint.encode("utf-8") + b"\n" + encoded


def decode_stored_result(data: bytes, fingerprint: str | None) -> WriteResult:
    """The result :func:`encode_stored_result` stored, for a repeat with ``fingerprint``.

    Raises:
        RequestIdReused: both the stored result and the repeat have a fingerprint and
            they differ.
    """
    stored_fp: bytes | None = None
    if data[:1] == b"#":
        end = data.index(b"\n")
        stored_fp, data = data[1:end], data[end + 1 :]
    if stored_fp and fingerprint and stored_fp != fingerprint.encode("utf-8"):
        raise RequestIdReused()
    return decode_result(data)


def _typed(value: Any) -> tuple[int, Any] | None:
    """(kind, comparable) of a JSON scalar: kind 0 = boolean, 1 = number, 2 = string;
    None for null, arrays and objects (which no condition matches)."""
    if isinstance(value, bool):
        return 0, value
    if isinstance(value, int | float):
        return 1, value
    if isinstance(value, str):
        return 2, value
    return None


def _compare(actual: Any, op: str, wanted: Any) -> bool:
    a, w = _typed(actual), _typed(wanted)
    if a is None or w is None or a[0] != w[0]:
        return False
    x, y = a[1], w[1]
    if op == "=":
        return bool(x == y)
    if a[0] == 0:  # booleans are only equal or not
        return False
    if op == ">":
        return bool(x > y)
    if op == ">=":
        return bool(x >= y)
    if op == "<":
        return bool(x < y)
    return bool(x <= y)


def row_matches(row: ItemRow, conditions: Sequence[Condition]) -> bool:
    """Whether an item satisfies every condition, with the typed semantics every
    backend follows: a value matches only a filter value of the same JSON kind
    (boolean, number, string); booleans match only ``=``/``in``; a missing field,
    null, an array or an object matches nothing; ``in`` is equality with any member.
    """
    meta: Any = None
    for cond in conditions:
        if cond.kind == "metadata":
            if meta is None:
                meta = orjson.loads(row.metadata) if row.metadata else {}
            actual = meta.get(cond.field) if isinstance(meta, dict) else None
        elif cond.kind == "author":
            actual = row.author
        else:
            actual = row.updated_at
        if cond.op == "in":
            if not any(_compare(actual, "=", v) for v in cond.value):
                return False
        elif not _compare(actual, cond.op, cond.value):
            return False
    return True


@dataclass(slots=True, frozen=True)
class TaskHint:
    """What a change notification says of one task event: its type, queue and task id."""

    type: str
    queue: str
    task_id: str


def task_hints(events: Sequence[tuple[str, str, str | None]], limit: int) -> str:
    """The notification payload suffix naming the task events among ``events`` ((type,
    namespace, key) each): `` <type> <queue> <id>`` per task event, or `` *`` when it
    would be longer than ``limit`` bytes (the listener then wakes every waiter).
    Names and ids have no spaces (namespace segments and task ids cannot)."""
    parts = [
        f" {t} {ns.removeprefix('_tasks/')} {k}"
        for t, ns, k in events
        if ns.startswith("_tasks/") and k is not None
    ]
    text = "".join(parts)
    return " *" if len(text) > limit else text


def parse_task_hints(payload: str) -> list[TaskHint] | None:
    """The task hints of a payload made by :func:`task_hints` after a first word (the
    rest of the payload; None when it says ``*``: hints were left out)."""
    words = payload.split(" ")[1:]
    if words[:1] == ["*"]:
        return None
    return [TaskHint(*words[i : i + 3]) for i in range(0, len(words) - 2, 3)]


class ChangeSignal:
    """Wakes feed watchers of this process when the feed may have grown.

    Watchers read :attr:`generation`, query the feed, and if they found nothing
    call :meth:`wait` with the generation they read: a change signalled after the
    read (by a local commit or another process's notification) returns at once,
    so no wake-up is lost between the query and the wait.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._hint_listeners: list[Callable[[TaskHint | None], None]] = []

    def listen_hints(self, listener: Callable[[TaskHint | None], None]) -> None:
        """Call ``listener`` with each task hint a notification carries (see
        :meth:`hint`); on the event loop's thread."""
        self._hint_listeners.append(listener)

    def unlisten_hints(self, listener: Callable[[TaskHint | None], None]) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._hint_listeners.remove(listener)

    def hint(self, hint: TaskHint | None) -> None:
        """Pass on what a change notification said of a task event (event type, queue,
        task id), or ``None`` when notifications may have been missed (the listener
        reconnected, or one notification held too many events to list)."""
        for listener in list(self._hint_listeners):
            listener(hint)

    def notify(self) -> None:
        """Signal a change; must be called on the event loop's thread."""
        self.generation += 1
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, generation: int, max_wait: float) -> None:
        """Return when :attr:`generation` differs from ``generation`` or after
        ``max_wait`` seconds."""
        if self.generation != generation:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, max_wait)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)


class Backend(ABC):
    """Storage primitives for items, sessions and the feed.

    Every method that changes state appends the matching event to the feed in
    the same transaction. Errors: :class:`~hivemem.errors.Conflict` for a version
    mismatch or duplicate id, :class:`~hivemem.errors.NotFound` for an unknown
    session, :class:`~hivemem.errors.CursorExpired` for a trimmed cursor,
    :class:`~hivemem.errors.Unavailable` when the engine cannot be reached.

    Request ids: every method that changes state takes ``request_id`` (``None`` =
    none). When given, the write and its result (:func:`encode_result`) are stored
    in one atomic step with the request id; a later call with the same request id
    writes nothing and returns the stored result (:func:`decode_result`), even if
    the state has changed since. A write that fails (Conflict, NotFound) stores no
    result, so a retry is checked again. The core scopes request ids by agent;
    :meth:`sweep` forgets them after the retention the core passes.

    A ``request_id`` may end in ``#<fingerprint>`` (hex: a hash the core computes of
    the operation and its arguments; ids never contain ``#``, see
    :func:`split_request_id`). The part before the last ``#`` is the id; the
    fingerprint is stored with the result. A later call with the same id and a
    different fingerprint writes nothing and raises :class:`RequestIdReused` (an
    InvalidInput, field ``request_id``); with the same fingerprint, or when either
    side has none (a result stored before fingerprints, a call without one), the
    stored result is returned as above.
    """

    #: Wakes this process's watchers; set by the backend.
    changes: ChangeSignal

    #: Whether :meth:`search_lexical` ranks in the engine. When False the core
    #: keeps an in-process BM25 index built from :meth:`load_texts` and kept
    #: current through the feed with :meth:`texts_of`.
    native_lexical: ClassVar[bool] = True

    #: Whether change notifications carry task hints (:meth:`ChangeSignal.hint`) for
    #: every task event, so task waiters need not read the feed to know what changed.
    task_hints: ClassVar[bool] = False

    #: Whether :meth:`search_vectors` searches vectors in the engine (PostgreSQL:
    #: pgvector HNSW). When False, or with ``vector_index`` ``exact``/``hnsw``, the
    #: core searches its in-process vector index.
    native_vectors: ClassVar[bool] = False

    @abstractmethod
    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections, threads and notification handles."""

    @abstractmethod
    async def ping(self) -> None:
        """Round-trip to the engine; raise Unavailable if it does not answer."""

    # Items

    @abstractmethod
    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        """The live item, or None if absent or expired at ``now``."""

    @abstractmethod
    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        """Apply all writes atomically, checking each ``if_version`` in order
        (a :class:`CheckWrite` only checks, and gives ``True``).

        An item expired at ``now`` counts as absent. A put stores version
        current+1 (1 when absent) and keeps at most ``history_limit`` versions;
        a delete removes the item and its versions. Each applied write appends an
        ``item.put`` or ``item.deleted`` event. Returns the new row for a put and
        whether something was deleted for a delete.

        Raises:
            Conflict: with ``field="ops.<i>.if_version"``; nothing was written.
        """

    @abstractmethod
    async def list_items(
        self, prefix: str, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        """Live items at or under ``prefix`` ("" = all) after (namespace, key), in order."""

    @abstractmethod
    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        """Distinct namespaces at or under ``prefix`` holding a live item, sorted."""

    @abstractmethod
    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        """Stored versions of a live item, newest first."""

    @abstractmethod
    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        """Delete items expired at ``now`` (with ``item.expired`` events), events
        older than ``events_before`` and request-id results stored before
        ``requests_before``. Returns (items expired, events trimmed)."""

    # Sessions

    @abstractmethod
    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        """Insert a session (event ``session.created``). Raises Conflict on a duplicate id."""

    @abstractmethod
    async def get_session(self, session_id: str) -> SessionRow | None:
        """The session, or None."""

    @abstractmethod
    async def list_sessions(
        self, app: str | None, user: str | None, agent: str | None, after: str | None, limit: int
    ) -> list[SessionRow]:
        """Sessions matching every given identifier with id > ``after``, by id."""

    @abstractmethod
    async def delete_session(
        self, session_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> bool:
        """Delete a session and its messages (event ``session.deleted``)."""

    @abstractmethod
    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> list[MessageRow]:
        """Append with consecutive sequence numbers and move the counters, atomically
        (event ``session.messages``, version = last seq). Raises NotFound."""

    @abstractmethod
    async def read_messages(self, session_id: str, after: int, limit: int) -> list[MessageRow]:
        """Messages with seq > ``after``, in order. Raises NotFound."""

    @abstractmethod
    async def save_state(
        self,
        session_id: str,
        state: bytes,
        if_version: int | None,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> SessionRow:
        """Replace the state document (event ``session.state``). Raises NotFound, Conflict."""

    # Feed

    @abstractmethod
    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        """Append a ``publish`` event on ``channel``."""

    @abstractmethod
    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        """Events at or under ``prefix`` after cursor ``after`` (None = oldest), in order,
        and the cursor to continue from: the last row's when ``limit`` rows came back,
        otherwise the feed's head as of the same read (so a reader skips non-matching
        events once, not on every poll).

        Raises:
            InvalidInput: ``after`` is not a cursor of this backend (field ``after``).
            CursorExpired: events after ``after`` were trimmed.
        """

    @abstractmethod
    async def head(self) -> str:
        """The cursor of the newest event ever appended ("0" when none)."""

    # Search

    @abstractmethod
    async def search_lexical(
        self,
        prefix: str,
        terms: Sequence[str],
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        """Live items at or under ``prefix`` whose indexed text matches any of ``terms``
        and every condition, best first: (namespace, key, score; higher is better).

        Backends with ``native_lexical = False`` are never asked (raise
        NotImplementedError)."""

    @abstractmethod
    async def load_texts(self) -> list[tuple[str, str, str]]:
        """Every stored index text: (namespace, key, text), expired items included
        (searches drop them when they fetch the rows)."""

    @abstractmethod
    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The current index texts of these items (items without one are left out)."""

    async def search_vectors(
        self,
        prefix: str,
        vector: bytes,
        model: str,
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        """Live items at or under ``prefix`` matching every condition whose vector by
        ``model`` is most similar to ``vector`` (float32 bytes, unit length): (namespace,
        key, cosine similarity), best first. Only backends with ``native_vectors``
        implement it (approximate nearest neighbours are allowed)."""
        raise NotImplementedError

    @abstractmethod
    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        """(namespace, key) of live indexed items at or under ``prefix`` matching every
        condition (semantics of :func:`row_matches`)."""

    @abstractmethod
    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        """Every stored vector made by ``model``: (namespace, key, float32 bytes)."""

    @abstractmethod
    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        """The current vectors by ``model`` of these items (absent ones are left out)."""

    @abstractmethod
    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        """The live items among ``keys`` (any order)."""

    @abstractmethod
    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        """Live items, by (namespace, key) after ``after``, whose index entry is missing,
        at an older version, or (when ``model`` is given) has no vector by ``model``."""

    @abstractmethod
    async def count_items(self, now: float) -> int:
        """How many live items the store holds."""

    @abstractmethod
    async def set_index(self, entries: Sequence[IndexEntry]) -> int:
        """Store index entries of items still at the entry's version (others are
        skipped: a newer write indexed them already). Returns how many were stored."""

    # Tasks
    #
    # A queue's tasks, its claims and its leases. Every state change appends one event
    # in the same atomic step: namespace ``task_namespace(queue)``, key = task id,
    # version = the task's ``attempt`` after the change, data None. Types:
    # ``task.submitted`` (author: submitter), ``task.claimed`` (the worker),
    # ``task.completed`` (the worker), ``task.failed`` (the worker; failed, will be
    # retried), ``task.dead`` (the worker, or "hivemem" when the last lease expired),
    # ``task.expired`` (author "hivemem": a lease ran out, the task is ready again),
    # ``task.released`` (the worker), ``task.cancelled`` and ``task.requeued`` (who
    # asked). A heartbeat changes no state and writes no event.
    #
    # Settling an expired lease (a ``running`` task with ``lease_until <= now``):
    # append ``LEASE_EXPIRED`` to its errors (attempt, worker = claimed_by); if
    # ``attempt >= max_attempts`` it becomes ``dead`` (finished_at = now, event
    # ``task.dead``), else ``ready`` with run_at = now (event ``task.expired``); in both
    # cases claimed_by and lease_until become None. Settling is conditional on the
    # task still being running with that lease, so a claim, the sweeper and a late
    # worker never both act on one expiry.
    #
    # Errors: NotFound (field ``task_id``) for an unknown task; Conflict (field
    # ``attempt``) when a worker names an attempt it no longer holds (the task is not
    # running, runs another attempt, or was claimed by another worker); Conflict
    # (field ``task_id``) for cancel/requeue of a task in a state that does not allow it.

    @abstractmethod
    async def submit_task(
        self, row: TaskRow, *, request_id: str | None = None
    ) -> tuple[TaskRow, bool]:
        """Store a new task (state ``ready``, attempt 0) and its ``task.submitted`` event;
        returns (row, True). When ``row.idempotency_key`` is set and the queue already
        holds a task with that key (in any state, until :meth:`sweep_tasks` removes
        it), stores nothing and returns (that task, False)."""

    @abstractmethod
    async def claim_task(
        self,
        queue: str,
        *,
        worker: str,
        now: float,
        lease: float,
        request_id: str | None = None,
    ) -> TaskRow | None:
        """In one atomic step: settle up to 100 expired leases of ``queue``, then take
        the due ready task (``run_at <= now``) with the highest priority, then the
        earliest ``run_at``, then the smallest id; it becomes ``running`` with attempt
        + 1, claimed_by = worker, lease = lease, lease_until = now + lease (event
        ``task.claimed``). None when no task is due. Two concurrent claims never take
        the same task."""

    @abstractmethod
    async def heartbeat_task(
        self,
        task_id: str,
        *,
        worker: str,
        attempt: int,
        now: float,
        lease: float,
        request_id: str | None = None,
    ) -> TaskRow:
        """Extend the lease of a task ``worker`` holds at ``attempt``: lease_until = now
        + lease, lease = ``lease``, updated_at = now (accepted while the task is still
        running that attempt for that worker, even past lease_until if nothing settled
        it yet). No event.

        Raises:
            NotFound: unknown task. Conflict: the attempt is no longer held (``attempt``).
        """

    @abstractmethod
    async def finish_task(
        self,
        task_id: str,
        *,
        worker: str,
        attempt: int,
        now: float,
        outcome: str,
        result: bytes | None = None,
        error: str | None = None,
        retry_at: float | None = None,
        request_id: str | None = None,
    ) -> TaskRow:
        """End the attempt ``worker`` holds (same check as :meth:`heartbeat_task`):

        - ``completed``: state completed, result = ``result``, finished_at = now,
          lease_until None (event ``task.completed``).
        - ``failed``: ``error`` appended to errors; when ``retry_at`` is not None and
          attempt < max_attempts, state ready with run_at = retry_at (``task.failed``);
          otherwise state dead, finished_at = now (``task.dead``).
        - ``released``: given back unrun: state ready, attempt - 1, run_at = now
          (``task.released``).

        claimed_by and lease_until become None except for ``completed`` (claimed_by
        stays: who completed it).

        Raises:
            NotFound, Conflict: as for :meth:`heartbeat_task`.
        """

    @abstractmethod
    async def cancel_task(
        self, task_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> TaskRow:
        """A ready or running task becomes ``cancelled`` (finished_at = now, claimed_by
        and lease_until None; event ``task.cancelled``): its worker's next heartbeat or
        finish is refused.

        Raises:
            NotFound. Conflict (field ``task_id``): it is completed, dead or cancelled.
        """

    @abstractmethod
    async def requeue_task(
        self,
        task_id: str,
        *,
        author: str,
        now: float,
        run_at: float,
        request_id: str | None = None,
    ) -> TaskRow:
        """A dead or cancelled task becomes ``ready`` again with attempt 0, run_at =
        ``run_at``, finished_at None, result None; its errors are kept (event
        ``task.requeued``).

        Raises:
            NotFound. Conflict (field ``task_id``): it is not dead or cancelled.
        """

    @abstractmethod
    async def get_task(self, task_id: str) -> TaskRow | None:
        """The task, or None."""

    @abstractmethod
    async def list_tasks(
        self, queue: str, state: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        """Tasks of ``queue`` (in the stored ``state`` when given) with id > ``after``,
        by id (ids sort in submission order)."""

    @abstractmethod
    async def task_stats(self, queue: str, now: float) -> TaskStats:
        """How many tasks of ``queue`` are in each state (see :class:`TaskStats`)."""

    @abstractmethod
    async def expire_leases(self, now: float, limit: int) -> int:
        """Settle up to ``limit`` expired leases in any queue (as a claim does); the
        core's sweeper calls it so that a dead worker's tasks move on even when no one
        claims from that queue. Returns how many were settled."""

    @abstractmethod
    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` completed, dead or cancelled tasks with
        ``finished_at < finished_before`` (their idempotency keys go with them). No
        events. Returns how many were deleted."""
