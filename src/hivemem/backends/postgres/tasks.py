"""Task queues on PostgreSQL: ``hivemem_tasks`` and ``SELECT ... FOR UPDATE SKIP LOCKED``.

One row per task (columns :data:`~hivemem.backends.postgres.schema.TASK_COLS`, in
:class:`~hivemem.backends.rows.TaskRow` order). Every change of a task commits
together with its feed event (namespace ``_tasks/<queue>``, key = task id, version =
attempt after the change), its NOTIFY and, with a request id, its stored result.

Two ways to write
-----------------
- The hot operations without a request id (submit, claim, heartbeat, finish) are
  **one statement in autocommit** (:meth:`TaskMixin._commit_one`): one round trip,
  no BEGIN/COMMIT, no pipeline, about half the client CPU of a transaction. The
  statement (:func:`_with_event`) writes the task in a CTE ``u`` and, only if it
  wrote a row, moves the feed's ``head`` by one and inserts the event in further
  CTEs; the head row is the statement's last lock and the commit follows at once,
  which keeps the feed in commit order exactly as
  :func:`~hivemem.backends.postgres.backend.append_events` does.
- With a request id (its result must be stored in the same transaction), and for
  cancel, requeue and :meth:`TaskMixin.expire_leases`, the operation is a
  transaction of :meth:`PostgresBackend._write` like every other write of the backend.

Claims
------
Settling expired leases must come first (so a claim can take a task whose lease it
just settled) and needs its own statement (a new snapshot). So the one-statement
claim first checks, in the same statement, that the queue has no running task with
``lease_until <= now`` (an index-only probe of ``hivemem_tasks_running``); when it
has, the statement changes nothing and the claim runs as a transaction of two
statements sent in one flight:

1. Settle up to :data:`SETTLE_BATCH` expired leases of the queue: those running
   tasks are locked ``FOR UPDATE SKIP LOCKED`` and become ``ready`` (run_at = now)
   or, at their last attempt, ``dead``, with :data:`LEASE_EXPIRED` appended to their
   errors. A lease another transaction holds locked (a worker finishing, a concurrent
   claim or sweeper settling it) is skipped, never settled twice: the row lock and
   the ``state = 'running'`` recheck PostgreSQL applies to locked rows make the
   settlement conditional on the lease still being the one that expired.
2. Take the task, as the one-statement claim does: the first due ready task in
   ``priority DESC, run_at, id`` order, locked ``FOR UPDATE SKIP LOCKED`` from the
   partial index ``hivemem_tasks_ready``, which holds exactly that order for each
   queue (an index scan that stops at the first unlocked due row, never a scan of
   the queue). A concurrent claim skips the row this one locked and takes the next;
   PostgreSQL rechecks ``state = 'ready'`` on a row that changed since the
   statement's snapshot, so a task is never taken twice.

Errors are appended in SQL (:func:`_append_error`): the JSON array's closing bracket
is replaced by ``,<entry>]``, the entry being the same compact JSON
:func:`~hivemem.backends.rows.add_task_error` writes, so no round trip is spent
reading the row first.

Worker operations (heartbeat, finish) are one ``UPDATE ... WHERE id = ... AND state =
'running' AND attempt = ... AND claimed_by = ...``: no row means the attempt is no
longer held (nothing was written), and only then a read tells NotFound from Conflict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from psycopg import errors as pgerrors

from hivemem.backends.postgres.engine import CHANNEL, Conn, PostgresEngine
from hivemem.backends.postgres.schema import EVENT_COLS, TASK_COLS, task_row
from hivemem.backends.rows import (
    LEASE_EXPIRED,
    TASK_FINISHED,
    TASK_STATES,
    TaskRow,
    TaskStats,
    task_namespace,
)
from hivemem.backends.signals import ChangeSignal
from hivemem.errors import Conflict, HivememError, InvalidInput, NotFound

if TYPE_CHECKING:
    from hivemem.backends.postgres.backend import Events

__all__ = ["SETTLE_BATCH", "TaskMixin"]

T = TypeVar("T")

#: Most expired leases one claim settles.
SETTLE_BATCH = 100
#: The feed namespace of a queue is this followed by the queue's name.
_NS_PREFIX = task_namespace("")

#: The task columns qualified with the alias ``t``.
_COLS_T = ", ".join(f"t.{c}" for c in TASK_COLS.split(", "))
_PLACEHOLDERS = ", ".join(f"%({c})s" for c in TASK_COLS.split(", "))
_FINISHED = "(" + ", ".join(f"'{s}'" for s in TASK_FINISHED) + ")"


def _append_error() -> str:
    """SQL of ``t.errors`` with one entry appended: ``{"attempt": t.attempt, "error": ...,
    "at": ..., "worker": t.claimed_by}``. The middle part (``,"error":<json>,"at":<json>,
    "worker":``) comes from the parameter ``err_mid`` (see :func:`_err_mid`)."""
    entry = (
        """'{"attempt":' || t.attempt::text || %(err_mid)s::text || """
        """to_json(coalesce(t.claimed_by, ''))::text || '}'"""
    )
    return (
        f"CASE WHEN length(t.errors) <= 2 THEN convert_to('[' || {entry} || ']', 'UTF8') "
        "ELSE substring(t.errors FROM 1 FOR length(t.errors) - 1) || "
        f"convert_to(',' || {entry} || ']', 'UTF8') END"
    )


def _err_mid(error: str, at: float) -> str:
    """The ``err_mid`` parameter of :func:`_append_error` (compact JSON, as orjson writes)."""
    error_json, at_json = orjson.dumps(error).decode(), orjson.dumps(at).decode()
    return f',"error":{error_json},"at":{at_json},"worker":'


_APPEND_ERROR = _append_error()


def _settle_sql(one_queue: bool) -> str:
    """Settle expired leases (of the queue ``%(queue)s`` when ``one_queue``), at most
    ``%(settle)s`` of them, at ``%(now)s``; returns (queue, id, state, attempt,
    expired lease_until) of each settled task."""
    queue = "queue = %(queue)s AND " if one_queue else ""
    last = "t.attempt >= t.max_attempts"
    return (
        "WITH x AS MATERIALIZED (SELECT id, lease_until FROM hivemem_tasks "
        f"WHERE {queue}state = 'running' AND lease_until <= %(now)s "
        "ORDER BY lease_until LIMIT %(settle)s FOR UPDATE SKIP LOCKED) "
        f"UPDATE hivemem_tasks t SET errors = {_APPEND_ERROR}, "
        f"state = CASE WHEN {last} THEN 'dead' ELSE 'ready' END, "
        f"run_at = CASE WHEN {last} THEN t.run_at ELSE %(now)s END, "
        f"finished_at = CASE WHEN {last} THEN %(now)s::float8 END, "
        "claimed_by = NULL, lease_until = NULL, updated_at = %(now)s "
        "FROM x WHERE t.id = x.id AND t.state = 'running' "
        "RETURNING t.queue, t.id, t.state, t.attempt, x.lease_until"
    )


_SETTLE_QUEUE = _settle_sql(True)
_SETTLE_ALL = _settle_sql(False)

_CLAIM = (
    "WITH c AS MATERIALIZED (SELECT id FROM hivemem_tasks "
    "WHERE queue = %(queue)s AND state = 'ready' AND run_at <= %(now)s "
    "ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
    "UPDATE hivemem_tasks t SET state = 'running', attempt = t.attempt + 1, "
    "claimed_by = %(worker)s, claimed_at = %(now)s, lease = %(lease)s, lease_until = %(until)s, "
    "updated_at = %(now)s "
    f"FROM c WHERE t.id = c.id RETURNING {_COLS_T}"
)

_INSERT = f"INSERT INTO hivemem_tasks ({TASK_COLS}) VALUES ({_PLACEHOLDERS})"
_INSERT_UNIQUE = (
    f"{_INSERT} ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL "
    "DO NOTHING RETURNING 1"
)

#: The condition of a worker's operation: the task runs ``%(attempt)s`` for ``%(worker)s``.
_HELD = (
    "t.id = %(id)s AND t.state = 'running' AND t.attempt = %(attempt)s "
    "AND t.claimed_by = %(worker)s"
)

_HEARTBEAT = (
    "UPDATE hivemem_tasks t SET lease = %(lease)s, lease_until = %(until)s, updated_at = %(now)s "
    f"WHERE {_HELD} RETURNING {_COLS_T}"
)

_FINISH_SET = {
    "completed": (
        "state = 'completed', result = %(result)s, finished_at = %(now)s, lease_until = NULL, "
        "updated_at = %(now)s"
    ),
    "failed_dead": (
        f"errors = {_APPEND_ERROR}, state = 'dead', finished_at = %(now)s, claimed_by = NULL, "
        "lease_until = NULL, updated_at = %(now)s"
    ),
    "failed_retry": (
        f"errors = {_APPEND_ERROR}, "
        "state = CASE WHEN t.attempt < t.max_attempts THEN 'ready' ELSE 'dead' END, "
        "run_at = CASE WHEN t.attempt < t.max_attempts THEN %(retry_at)s ELSE t.run_at END, "
        "finished_at = CASE WHEN t.attempt < t.max_attempts THEN NULL ELSE %(now)s::float8 END, "
        "claimed_by = NULL, lease_until = NULL, updated_at = %(now)s"
    ),
    "released": (
        "state = 'ready', attempt = t.attempt - 1, run_at = %(now)s, claimed_by = NULL, "
        "lease_until = NULL, updated_at = %(now)s"
    ),
}
_FINISH = {
    kind: f"UPDATE hivemem_tasks t SET {sets} WHERE {_HELD} RETURNING {_COLS_T}"
    for kind, sets in _FINISH_SET.items()
}


def _with_event(
    ctes: str,
    dml: str,
    event_type: str,
    *,
    author: str = "%(worker)s",
    at: str = "%(now)s",
    expired: str = "false",
) -> str:
    """One statement that writes at most one task and appends its event.

    ``ctes`` are ``name AS (...), `` prefixes; the CTE ``u`` is ``dml`` (an INSERT or
    UPDATE ``... RETURNING`` :data:`_COLS_T`); only if it wrote a row, the feed's head
    moves by one and the event is inserted (type ``event_type``, ``author`` and ``at``:
    SQL expressions over ``u`` and the parameters; namespace ``%(ns_prefix)s || queue``,
    key = id, version = attempt, data NULL) and NOTIFY is called. As with
    :func:`~hivemem.backends.postgres.backend.append_events`, the head row is the
    statement's last lock and the commit follows at once (autocommit), so the feed's
    order is commit order.

    Returns one row: (``expired``, the new head or NULL, NULL, task columns or NULLs).
    """
    return (
        f"WITH {ctes}u AS ({dml}), "
        "h AS (UPDATE hivemem_feed SET value = value + 1 WHERE name = 'head' "
        "AND EXISTS (SELECT 1 FROM u) RETURNING value), "
        f"e AS (INSERT INTO hivemem_events ({EVENT_COLS}) "
        f"SELECT h.value, {event_type}, %(ns_prefix)s || u.queue, u.id, u.attempt, "
        f"{author}, {at}, NULL FROM h, u) "
        f"SELECT {expired}, h.value, (SELECT pg_notify('{CHANNEL}', hh.value::text || ' ' || "
        f"{event_type} || ' ' || u.queue || ' ' || u.id) FROM h AS hh)::text, "
        "u.* FROM (SELECT 1) AS one LEFT JOIN u ON true LEFT JOIN h ON true"
    )


_SUBMIT_ONE = {
    unique: _with_event(
        "",
        f"INSERT INTO hivemem_tasks AS t ({TASK_COLS}) VALUES ({_PLACEHOLDERS}) "
        + (
            "ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING "
            if unique
            else ""
        )
        + f"RETURNING {_COLS_T}",
        "'task.submitted'",
        author="u.submitted_by",
        at="u.created_at",
    )
    for unique in (False, True)
}
_BY_KEY = f"SELECT {TASK_COLS} FROM hivemem_tasks WHERE queue = %s AND idempotency_key = %s"

#: A claim in one statement when the queue has no expired lease to settle first (then
#: it changes nothing and says so: the first column is true).
_CLAIM_ONE = _with_event(
    "x AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM hivemem_tasks WHERE queue = %(queue)s "
    "AND state = 'running' AND lease_until <= %(now)s) AS expired), "
    "c AS MATERIALIZED (SELECT id FROM hivemem_tasks "
    "WHERE queue = %(queue)s AND state = 'ready' AND run_at <= %(now)s "
    "AND NOT (SELECT expired FROM x) "
    "ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED), ",
    "UPDATE hivemem_tasks t SET state = 'running', attempt = t.attempt + 1, "
    "claimed_by = %(worker)s, claimed_at = %(now)s, lease = %(lease)s, lease_until = %(until)s, "
    "updated_at = %(now)s "
    f"FROM c WHERE t.id = c.id RETURNING {_COLS_T}",
    "'task.claimed'",
    expired="(SELECT expired FROM x)",
)
_FINISH_TYPE = {
    "completed": "'task.completed'",
    "failed_dead": "'task.dead'",
    "failed_retry": "CASE WHEN u.state = 'ready' THEN 'task.failed' ELSE 'task.dead' END",
    "released": "'task.released'",
}
_FINISH_ONE = {kind: _with_event("", sql, _FINISH_TYPE[kind]) for kind, sql in _FINISH.items()}

_CANCEL = (
    "UPDATE hivemem_tasks t SET state = 'cancelled', finished_at = %(now)s, claimed_by = NULL, "
    "lease_until = NULL, updated_at = %(now)s "
    f"WHERE t.id = %(id)s AND t.state IN ('ready', 'running') RETURNING {_COLS_T}"
)
_REQUEUE = (
    "UPDATE hivemem_tasks t SET state = 'ready', attempt = 0, run_at = %(run_at)s, "
    "finished_at = NULL, result = NULL, claimed_by = NULL, claimed_at = NULL, "
    "lease_until = NULL, updated_at = %(now)s "
    f"WHERE t.id = %(id)s AND t.state IN ('dead', 'cancelled') RETURNING {_COLS_T}"
)

_SWEEP = (
    "WITH x AS MATERIALIZED (SELECT id FROM hivemem_tasks "
    f"WHERE finished_at < %(before)s AND state IN {_FINISHED} "
    "ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
    "d AS (DELETE FROM hivemem_tasks t USING x WHERE t.id = x.id RETURNING 1) "
    "SELECT count(*) FROM d"
)

_STATS = (
    "SELECT state, count(*), count(*) FILTER (WHERE run_at <= %(now)s), "
    "min(run_at) FILTER (WHERE run_at <= %(now)s) "
    "FROM hivemem_tasks WHERE queue = %(queue)s GROUP BY state"
)


def _no_task(task_id: str) -> NotFound:
    return NotFound(f"no task {task_id!r}", field="task_id")


async def _refusal(c: Conn, task_id: str, attempt: int, worker: str) -> HivememError:
    """Why a worker's operation on ``task_id`` at ``attempt`` matched no row:
    NotFound (field ``task_id``) or Conflict (field ``attempt``)."""
    cur = await c.execute(
        "SELECT state, attempt, claimed_by FROM hivemem_tasks WHERE id = %s", (task_id,)
    )
    found = await cur.fetchone()
    if found is None:
        return _no_task(task_id)
    state, current, holder = found[0], int(found[1]), found[2]
    if state != "running":
        why = f"it is {state}"
    elif current != attempt:
        why = f"it runs attempt {current}"
    else:
        why = f"attempt {current} is held by another worker ({holder!r})"
    return Conflict(
        f"worker {worker!r} no longer holds attempt {attempt} of task {task_id!r}: {why}",
        field="attempt",
    )


class TaskMixin:
    """The task-queue primitives of :class:`PostgresBackend` (contract:
    :class:`~hivemem.backends.base.Backend`, section Tasks)."""

    _engine: PostgresEngine
    changes: ChangeSignal

    if TYPE_CHECKING:

        async def _write(
            self,
            request_id: str | None,
            now: float,
            run: Callable[[Conn, Events], Awaitable[T]],
            finish: Callable[[T, int], T] | None = None,
        ) -> T: ...

    async def _commit_one(self, sql: str, args: dict[str, Any]) -> tuple[Any, ...] | None:
        """See :meth:`PostgresEngine.write_one`."""
        return await self._engine.write_one(sql, args)

    async def _one_with_event(self, sql: str, args: dict[str, Any]) -> tuple[bool, TaskRow | None]:
        """Run a statement of :func:`_with_event`: (expired flag, changed task or None);
        wakes this process's watchers when it appended an event."""
        found = await self._commit_one(sql, args)
        assert found is not None
        if found[1] is not None:
            self.changes.notify()
        return bool(found[0]), None if found[3] is None else task_row(found[3:])

    # Writes --------------------------------------------------------------------------

    async def submit_task(
        self, row: TaskRow, *, request_id: str | None = None
    ) -> tuple[TaskRow, bool]:
        params = {name: getattr(row, name) for name in TASK_COLS.split(", ")}
        if request_id is None:
            try:
                return await self._submit_one(row, params)
            except pgerrors.UniqueViolation as exc:
                raise self._duplicate(row, exc) from None

        async def run(c: Conn, events: Events) -> tuple[TaskRow, bool]:
            if row.idempotency_key is None:
                # Nothing to decide: the INSERT goes out with the event and the COMMIT.
                await c.execute(_INSERT, params)
            else:
                while True:
                    cur = await c.execute(_INSERT_UNIQUE, params)
                    if await cur.fetchone() is not None:
                        break
                    # The key is taken (by a committed task: ON CONFLICT waited for it).
                    cur = await c.execute(_BY_KEY, (row.queue, row.idempotency_key), binary=True)
                    found = await cur.fetchone()
                    if found is not None:
                        return task_row(found), False
                    # Swept in between: insert again.
            events.add(
                "task.submitted",
                task_namespace(row.queue),
                row.id,
                row.attempt,
                row.submitted_by,
                row.created_at,
            )
            return row, True

        try:
            result = await self._write(request_id, row.created_at, run)
        except pgerrors.UniqueViolation as exc:
            raise self._duplicate(row, exc) from None
        stored, created = result  # a repeated request id gives a list
        return stored, bool(created)

    async def _submit_one(self, row: TaskRow, params: dict[str, Any]) -> tuple[TaskRow, bool]:
        """:meth:`submit_task` without a request id: one statement, or (a taken
        idempotency key) the task holding the key."""
        params["ns_prefix"] = _NS_PREFIX
        while True:
            _, stored = await self._one_with_event(
                _SUBMIT_ONE[row.idempotency_key is not None], params
            )
            if stored is not None:
                return row, True

            async def by_key(c: Conn) -> TaskRow | None:
                cur = await c.execute(_BY_KEY, (row.queue, row.idempotency_key), binary=True)
                found = await cur.fetchone()
                return task_row(found) if found else None

            existing = await self._engine.read(by_key)
            if existing is not None:
                return existing, False
            # Swept in between: insert again.

    @staticmethod
    def _duplicate(row: TaskRow, exc: pgerrors.UniqueViolation) -> Exception:
        """Conflict (field ``task_id``) for a duplicate task id; ``exc`` otherwise."""
        if exc.diag.constraint_name != "hivemem_tasks_pkey":
            return exc
        return Conflict(f"task {row.id!r} already exists", field="task_id")

    async def claim_task(
        self,
        queue: str,
        *,
        worker: str,
        now: float,
        lease: float,
        request_id: str | None = None,
    ) -> TaskRow | None:
        args = {
            "queue": queue,
            "now": now,
            "settle": SETTLE_BATCH,
            "err_mid": _err_mid(LEASE_EXPIRED, now),
            "worker": worker,
            "lease": lease,
            "until": now + lease,
            "ns_prefix": _NS_PREFIX,
        }
        if request_id is None:
            # Usually nothing to settle: one statement, one round trip.
            expired, row = await self._one_with_event(_CLAIM_ONE, args)
            if not expired:
                return row

        async def run(c: Conn, events: Events) -> TaskRow | None:
            # Both statements go out in one flight; the claim sees what the first settled.
            settle = await c.execute(_SETTLE_QUEUE, args)
            claim = await c.execute(_CLAIM, args, binary=True)
            _settled(await settle.fetchall(), events, now)
            found = await claim.fetchone()
            if found is None:
                return None
            row = task_row(found)
            events.add("task.claimed", task_namespace(queue), row.id, row.attempt, worker, now)
            return row

        return await self._write(request_id, now, run)

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
        args = {
            "id": task_id,
            "attempt": attempt,
            "worker": worker,
            "now": now,
            "lease": lease,
            "until": now + lease,
        }
        if request_id is None:
            found = await self._commit_one(_HEARTBEAT, args)
            if found is None:
                raise await self._engine.read(lambda c: _refusal(c, task_id, attempt, worker))
            return task_row(found)

        async def run(c: Conn, events: Events) -> TaskRow:
            cur = await c.execute(_HEARTBEAT, args, binary=True)
            found = await cur.fetchone()
            if found is None:
                raise await _refusal(c, task_id, attempt, worker)
            return task_row(found)

        return await self._write(request_id, now, run)

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
        if outcome == "failed":
            kind = "failed_dead" if retry_at is None else "failed_retry"
        elif outcome in ("completed", "released"):
            kind = outcome
        else:
            raise InvalidInput(
                f"unknown outcome {outcome!r}: use completed, failed or released", field="outcome"
            )
        args = {
            "id": task_id,
            "attempt": attempt,
            "worker": worker,
            "now": now,
            "result": result,
            "retry_at": retry_at,
            "err_mid": _err_mid(error or "", now),
            "ns_prefix": _NS_PREFIX,
        }
        if request_id is None:
            _, row = await self._one_with_event(_FINISH_ONE[kind], args)
            if row is None:
                raise await self._engine.read(lambda c: _refusal(c, task_id, attempt, worker))
            return row

        async def run(c: Conn, events: Events) -> TaskRow:
            cur = await c.execute(_FINISH[kind], args, binary=True)
            found = await cur.fetchone()
            if found is None:
                raise await _refusal(c, task_id, attempt, worker)
            row = task_row(found)
            if outcome == "failed":
                type_ = "task.failed" if row.state == "ready" else "task.dead"
            else:
                type_ = f"task.{outcome}"
            events.add(type_, task_namespace(row.queue), row.id, row.attempt, worker, now)
            return row

        return await self._write(request_id, now, run)

    async def cancel_task(
        self, task_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> TaskRow:
        async def run(c: Conn, events: Events) -> TaskRow:
            cur = await c.execute(_CANCEL, {"id": task_id, "now": now}, binary=True)
            found = await cur.fetchone()
            if found is None:
                raise await self._wrong_state(c, task_id, "cancel", "ready or running")
            row = task_row(found)
            ns = task_namespace(row.queue)
            events.add("task.cancelled", ns, row.id, row.attempt, author, now)
            return row

        return await self._write(request_id, now, run)

    async def requeue_task(
        self,
        task_id: str,
        *,
        author: str,
        now: float,
        run_at: float,
        request_id: str | None = None,
    ) -> TaskRow:
        async def run(c: Conn, events: Events) -> TaskRow:
            cur = await c.execute(
                _REQUEUE, {"id": task_id, "now": now, "run_at": run_at}, binary=True
            )
            found = await cur.fetchone()
            if found is None:
                raise await self._wrong_state(c, task_id, "requeue", "dead or cancelled")
            row = task_row(found)
            ns = task_namespace(row.queue)
            events.add("task.requeued", ns, row.id, row.attempt, author, now)
            return row

        return await self._write(request_id, now, run)

    @staticmethod
    async def _wrong_state(c: Conn, task_id: str, action: str, allowed: str) -> HivememError:
        """NotFound, or Conflict (field ``task_id``) naming the state ``task_id`` is in."""
        cur = await c.execute("SELECT state FROM hivemem_tasks WHERE id = %s", (task_id,))
        found = await cur.fetchone()
        if found is None:
            return _no_task(task_id)
        return Conflict(
            f"cannot {action} task {task_id!r}: it is {found[0]}, not {allowed}", field="task_id"
        )

    async def expire_leases(self, now: float, limit: int) -> int:
        args = {"now": now, "settle": limit, "err_mid": _err_mid(LEASE_EXPIRED, now)}

        async def run(c: Conn, events: Events) -> int:
            cur = await c.execute(_SETTLE_ALL, args)
            rows = await cur.fetchall()
            _settled(rows, events, now)
            return len(rows)

        return await self._write(None, now, run)

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        async def job(c: Conn) -> int:
            cur = await c.execute(_SWEEP, {"before": finished_before, "limit": limit})
            found = await cur.fetchone()
            return int(found[0]) if found else 0

        return await self._engine.write(job, notify=False)

    # Reads ---------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRow | None:
        async def run(c: Conn) -> TaskRow | None:
            cur = await c.execute(
                f"SELECT {TASK_COLS} FROM hivemem_tasks WHERE id = %s", (task_id,), binary=True
            )
            found = await cur.fetchone()
            return task_row(found) if found else None

        return await self._engine.read(run)

    async def list_tasks(
        self, queue: str, state: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        args: dict[str, Any] = {"queue": queue, "after": after, "limit": limit}
        later = "" if after is None else " AND t.id > %(after)s"
        if state is not None:
            args["state"] = state
            sql = (
                f"SELECT {_COLS_T} FROM hivemem_tasks t WHERE t.queue = %(queue)s "
                f"AND t.state = %(state)s{later} ORDER BY t.id LIMIT %(limit)s"
            )
        else:
            # One range of the (queue, state, id) index per state, merged.
            args["states"] = list(TASK_STATES)
            sql = (
                f"SELECT {_COLS_T} FROM unnest(%(states)s::text[]) AS s(state) "
                f"CROSS JOIN LATERAL (SELECT {TASK_COLS} FROM hivemem_tasks t "
                f"WHERE t.queue = %(queue)s AND t.state = s.state{later} "
                "ORDER BY t.id LIMIT %(limit)s) t ORDER BY t.id LIMIT %(limit)s"
            )

        async def run(c: Conn) -> list[TaskRow]:
            cur = await c.execute(sql, args, binary=True)
            return [task_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def task_queues(self) -> list[str]:
        async def run(c: Conn) -> list[str]:
            cur = await c.execute("SELECT DISTINCT queue FROM hivemem_tasks ORDER BY queue")
            return [r[0] for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def task_stats(self, queue: str, now: float) -> TaskStats:
        async def run(c: Conn) -> TaskStats:
            cur = await c.execute(_STATS, {"queue": queue, "now": now})
            counts = dict.fromkeys(TASK_STATES, 0)
            ready = delayed = 0
            oldest: float | None = None
            for state, n, due, oldest_due in await cur.fetchall():
                counts[state] = int(n)
                if state == "ready":
                    ready, delayed, oldest = int(due), int(n) - int(due), oldest_due
            return TaskStats(
                ready=ready,
                delayed=delayed,
                running=counts["running"],
                completed=counts["completed"],
                dead=counts["dead"],
                cancelled=counts["cancelled"],
                oldest_ready_at=oldest,
            )

        return await self._engine.read(run)


def _settled(rows: Sequence[Sequence[Any]], events: Events, now: float) -> None:
    """Add the events of settled leases (rows of the settle statement), oldest lease first."""
    for queue, task_id, state, attempt, _ in sorted(rows, key=lambda r: (r[4], r[1])):
        type_ = "task.dead" if state == "dead" else "task.expired"
        events.add(type_, task_namespace(queue), task_id, int(attempt), "hivemem", now)
