"""The backend contract: storage primitives, no rules.

A backend stores rows and applies each write, its version check and its feed
event in one atomic step. Validation, identities, TTL arithmetic, JSON encoding
and the public records live in :mod:`hivemem.core`; a backend sees already
checked arguments, JSON as ``bytes`` and times as UNIX seconds (float, UTC).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from hivemem.backends.filters import Condition
from hivemem.backends.rows import (
    CheckWrite,
    DeleteWrite,
    EventRow,
    IndexEntry,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
    TaskRow,
    TaskStats,
)
from hivemem.backends.signals import ChangeSignal

__all__ = ["Backend"]


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

    def get_item_here(self, namespace: str, key: str, now: float) -> tuple[bool, ItemRow | None]:
        """:meth:`get_item` run in the calling thread, which is not the event loop's:
        (True, the row or None), or (False, None) when this store cannot read there
        (the default), and the caller goes through the event loop."""
        return False, None

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

    def can_write_here(self) -> bool:
        """Whether :meth:`write_items_here` may write at all (so a caller skips
        preparing a write that would go through the event loop anyway)."""
        return False

    def write_items_here(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> tuple[bool, list[ItemRow | bool] | None]:
        """:meth:`write_items` run in the calling thread, which is not the event loop's:
        (True, its results), or (False, None) when this store cannot write there now
        (the default), having written nothing; the caller then goes through the event
        loop.

        Raises:
            as :meth:`write_items`.
        """
        return False, None

    @abstractmethod
    async def list_items(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        limit: int,
        now: float,
        *,
        key_prefix: str | None = None,
    ) -> list[ItemRow]:
        """Live items at or under ``prefix`` ("" = all) after (namespace, key), in order.

        With ``key_prefix`` (a string, possibly empty) only the items of namespace
        ``prefix`` itself (never ""; not the ones under it) whose key starts with
        ``key_prefix``: keys in :func:`~hivemem.backends.rows.key_range`, one index
        range on every engine."""

    @abstractmethod
    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        """Distinct namespaces at or under ``prefix`` holding a live item, sorted."""

    @abstractmethod
    async def namespace_counts(self, prefix: str, now: float) -> list[tuple[str, int]]:
        """(namespace, live items of it) for each namespace of :meth:`list_namespaces`,
        sorted by namespace."""

    @abstractmethod
    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        """Stored versions of a live item, newest first."""

    @abstractmethod
    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        """Delete items expired at ``now`` (with ``item.expired`` events), sessions
        expired at ``now`` (:func:`~hivemem.backends.rows.session_expired`; with their
        messages and a ``session.expired`` event, namespace ``_sessions/<id>``), events
        older than ``events_before`` and request-id results stored before
        ``requests_before``. Returns (items and sessions expired, events trimmed)."""

    # Sessions

    @abstractmethod
    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        """Insert a session (event ``session.created``). Raises Conflict on a duplicate id
        (an expired session not yet swept still holds its id).

        Session TTL: ``row.ttl`` (seconds, None = never) is stored with the session; the
        session expires ``ttl`` seconds after ``last_activity_at``, which every append
        and state save moves to its ``now`` (a sliding expiry). Once expired at a call's
        ``now``, :meth:`append_messages`, :meth:`read_messages`, :meth:`save_state` and
        :meth:`delete_session` treat it as absent (NotFound / False) and write nothing;
        :meth:`get_session` still returns the row (the core hides it, see
        :func:`~hivemem.backends.rows.session_expired`); :meth:`list_sessions` leaves it
        out; :meth:`sweep` deletes it."""

    @abstractmethod
    async def get_session(self, session_id: str) -> SessionRow | None:
        """The session, or None."""

    @abstractmethod
    async def list_sessions(
        self,
        app: str | None,
        user: str | None,
        agent: str | None,
        after: str | None,
        limit: int,
        now: float,
    ) -> list[SessionRow]:
        """Sessions matching every given identifier with id > ``after``, by id, leaving
        out those expired at ``now``."""

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
    async def read_messages(
        self, session_id: str, after: int, limit: int, now: float
    ) -> list[MessageRow]:
        """Messages with seq > ``after``, in order. Raises NotFound, also when the session
        has expired at ``now`` (UNIX seconds)."""

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

    async def load_vector_matrix(self, model: str, dim: int) -> tuple[list[tuple[str, str]], Any]:
        """Every stored vector of ``dim`` dimensions made by ``model``, as the items'
        keys and one float32 numpy matrix of shape (len(keys), ``dim``), row i the
        vector of keys[i]. The default builds it from :meth:`load_vectors`; an engine
        that can fill the matrix as it reads (SQLite) never holds every vector twice."""
        import numpy as np

        rows = [r for r in await self.load_vectors(model) if len(r[2]) == 4 * dim]
        matrix = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, _, vec) in enumerate(rows):
            matrix[i] = np.frombuffer(vec, dtype=np.float32)
        return [(ns, key) for ns, key, _ in rows], matrix

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
    async def set_index(self, entries: Sequence[IndexEntry], now: float) -> int:
        """Store index entries of items still at the entry's version (others are
        skipped: a newer write indexed them already), each with an
        :data:`~hivemem.backends.rows.INDEXED` feed event (author ``hivemem``, at
        ``now``) in the same atomic step, so every process's in-memory index learns of
        it. Returns how many were stored."""

    @abstractmethod
    async def pending_vectors(
        self, model: str, part: int, parts: int, limit: int, now: float
    ) -> list[ItemRow]:
        """Up to ``limit`` live items whose index entry waits for a vector by ``model``
        (written at their current version with the model named and no vector), among
        part ``part`` of ``parts`` (0 <= part < parts): each engine splits the items its
        own stable way, so indexers holding different parts never share an item."""

    @abstractmethod
    async def pending_count(self, model: str, now: float) -> tuple[int, float | None]:
        """How many index entries of live items wait for a vector by ``model``, and when
        the oldest of them was written (UNIX seconds; None when none wait). Redis looks
        at the longest-waiting 1,000 entries of each partition and counts any beyond
        without looking (so the count may include entries of another model there)."""

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
    # cases claimed_by and lease_until become None (claimed_at stays: the last claim's).
    # Settling is conditional on the task still being running with that lease, so a
    # claim, the sweeper and a late worker never both act on one expiry.
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
        + 1, claimed_by = worker, claimed_at = now, lease = lease, lease_until = now +
        lease (event ``task.claimed``). None when no task is due. Two concurrent claims never take
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
        stays: who completed it); claimed_at stays in every case (the attempt's claim,
        from which the core measures the task's duration).

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
        ``run_at``, finished_at, result, claimed_by and claimed_at None; its errors are
        kept (event ``task.requeued``).

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
    async def task_queues(self) -> list[str]:
        """The queues holding at least one task (in any state), sorted."""

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
