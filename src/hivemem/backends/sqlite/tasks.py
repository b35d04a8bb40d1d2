"""The task queue of the SQLite backend.

Every state change runs as a write job of :class:`SqliteEngine`, i.e. inside the
writer's ``BEGIN IMMEDIATE`` transaction: SQLite admits one writer at a time (across
processes too), so a claim's read of the best ready task and its update are one
step and two claims never take the same task. The partial index ``tasks_due``
serves the claim order of one queue (priority desc, run_at, id).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace as _replace
from typing import Any, TypeVar

from hivemem.backends.rows import (
    TASK_FINISHED,
    TaskRow,
    TaskStats,
    check_held,
    finished_task,
    settled_task,
    task_namespace,
)
from hivemem.backends.sqlite.engine import SqliteEngine
from hivemem.backends.sqlite.schema import TASK_COLS
from hivemem.errors import Conflict, NotFound

T = TypeVar("T")

#: Expired leases a claim settles at most before it takes a task.
SETTLE_PER_CLAIM = 100

_MARKS = ", ".join("?" * len(TASK_COLS.split(", ")))
_INSERT = f"INSERT INTO tasks ({TASK_COLS}) VALUES ({_MARKS})"
#: Whether a claim of a queue could take or settle anything at a time.
_CLAIMABLE = (
    "SELECT 1 FROM tasks WHERE queue = ? AND state = 'ready' AND run_at <= ? "
    "UNION ALL SELECT 1 FROM tasks WHERE state = 'running' AND lease_until <= ? AND queue = ? "
    "LIMIT 1"
)
_UPSERT = f"INSERT OR REPLACE INTO tasks ({TASK_COLS}) VALUES ({_MARKS})"
_SELECT = f"SELECT {TASK_COLS} FROM tasks"


def _row(values: Sequence[Any]) -> TaskRow:
    row = list(values)
    row[3] = bytes(row[3])
    if row[4] is not None:
        row[4] = bytes(row[4])
    row[16] = bytes(row[16])
    return TaskRow(*row)


def _params(row: TaskRow) -> tuple[Any, ...]:
    return (
        row.id,
        row.queue,
        row.state,
        row.payload,
        row.result,
        row.priority,
        row.run_at,
        row.attempt,
        row.max_attempts,
        row.timeout,
        row.backoff,
        row.lease,
        row.lease_until,
        row.idempotency_key,
        row.submitted_by,
        row.claimed_by,
        row.errors,
        row.created_at,
        row.updated_at,
        row.finished_at,
        row.claimed_at,
    )


_EventFn = Callable[..., int]


class TasksMixin:
    """The task primitives of :class:`SqliteBackend` (see base.py for the contract)."""

    _engine: SqliteEngine
    _event: _EventFn

    # One write job per primitive; ``once`` (backend.py) wraps them for request ids.
    def _job(
        self, request_id: str | None, now: float, run: Callable[[sqlite3.Connection], T]
    ) -> Callable[[sqlite3.Connection], T]:
        raise NotImplementedError

    def _task_event(self, c: sqlite3.Connection, type_: str, row: TaskRow, author: str) -> None:
        self._event(
            c, type_, task_namespace(row.queue), row.id, row.attempt, author, row.updated_at
        )

    @staticmethod
    def _load(c: sqlite3.Connection, task_id: str) -> TaskRow:
        found = c.execute(f"{_SELECT} WHERE id = ?", (task_id,)).fetchone()
        if found is None:
            raise NotFound(f"task {task_id!r} does not exist", field="task_id")
        return _row(found)

    @staticmethod
    def _store(c: sqlite3.Connection, row: TaskRow) -> None:
        c.execute(_UPSERT, _params(row))

    def _settle(self, c: sqlite3.Connection, row: TaskRow, now: float) -> None:
        """Settle one expired lease (see base.py): dead after the last attempt, else ready."""
        new, kind = settled_task(row, now)
        self._store(c, new)
        self._task_event(c, kind, new, "hivemem")

    def _settle_expired(
        self, c: sqlite3.Connection, queue: str | None, now: float, limit: int
    ) -> int:
        where, args = "state = 'running' AND lease_until <= ?", list[Any]([now])
        if queue is not None:
            where += " AND queue = ?"
            args.append(queue)
        rows = c.execute(
            f"{_SELECT} WHERE {where} ORDER BY lease_until LIMIT ?", (*args, limit)
        ).fetchall()
        for found in rows:
            self._settle(c, _row(found), now)
        return len(rows)

    _held = staticmethod(check_held)

    async def submit_task(
        self, row: TaskRow, *, request_id: str | None = None
    ) -> tuple[TaskRow, bool]:
        def run(c: sqlite3.Connection) -> tuple[TaskRow, bool]:
            if row.idempotency_key is not None:
                found = c.execute(
                    f"{_SELECT} WHERE queue = ? AND idempotency_key = ?",
                    (row.queue, row.idempotency_key),
                ).fetchone()
                if found is not None:
                    return _row(found), False
            try:
                c.execute(_INSERT, _params(row))
            except sqlite3.IntegrityError:
                raise Conflict(f"task id {row.id!r} is taken", field="task_id") from None
            self._task_event(c, "task.submitted", row, row.submitted_by)
            return row, True

        result = await self._engine.write(self._job(request_id, row.created_at, run))
        return result[0], bool(result[1])

    async def claim_task(
        self,
        queue: str,
        *,
        worker: str,
        now: float,
        lease: float,
        request_id: str | None = None,
    ) -> TaskRow | None:
        def run(c: sqlite3.Connection) -> TaskRow | None:
            self._settle_expired(c, queue, now, SETTLE_PER_CLAIM)
            found = c.execute(
                f"{_SELECT} WHERE queue = ? AND state = 'ready' AND run_at <= ? "
                "ORDER BY priority DESC, run_at, id LIMIT 1",
                (queue, now),
            ).fetchone()
            if found is None:
                return None
            row = _row(found)
            new = _replace(
                row,
                state="running",
                attempt=row.attempt + 1,
                claimed_by=worker,
                claimed_at=now,
                lease=lease,
                lease_until=now + lease,
                updated_at=now,
            )
            c.execute(
                "UPDATE tasks SET state = 'running', attempt = ?, claimed_by = ?, "
                "claimed_at = ?, lease = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                (new.attempt, worker, now, lease, new.lease_until, now, row.id),
            )
            self._task_event(c, "task.claimed", new, worker)
            return new

        if request_id is None and not await self._engine.read_point(
            lambda c: c.execute(_CLAIMABLE, (queue, now, now, queue)).fetchone() is not None
        ):
            # Nothing to take: answer from a read. Waiting workers claim again on every
            # commit they hear of, and a write transaction (an fsync) each time would
            # cost the whole store.
            return None
        return await self._engine.write(self._job(request_id, now, run))

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
        def run(c: sqlite3.Connection) -> TaskRow:
            row = self._load(c, task_id)
            self._held(row, worker, attempt)
            new = _replace(row, lease=lease, lease_until=now + lease, updated_at=now)
            c.execute(
                "UPDATE tasks SET lease = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                (lease, new.lease_until, now, task_id),
            )
            return new

        return await self._engine.write(self._job(request_id, now, run))

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
        def run(c: sqlite3.Connection) -> TaskRow:
            row = self._load(c, task_id)
            self._held(row, worker, attempt)
            new, kind = finished_task(
                row,
                worker=worker,
                attempt=attempt,
                now=now,
                outcome=outcome,
                result=result,
                error=error,
                retry_at=retry_at,
            )
            self._store(c, new)
            self._task_event(c, kind, new, worker)
            return new

        return await self._engine.write(self._job(request_id, now, run))

    async def cancel_task(
        self, task_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> TaskRow:
        def run(c: sqlite3.Connection) -> TaskRow:
            row = self._load(c, task_id)
            if row.state in TASK_FINISHED:
                raise Conflict(
                    f"task {task_id!r} is {row.state}: only a ready or running task can be "
                    "cancelled",
                    field="task_id",
                )
            new = _replace(
                row,
                state="cancelled",
                claimed_by=None,
                lease_until=None,
                updated_at=now,
                finished_at=now,
            )
            self._store(c, new)
            self._task_event(c, "task.cancelled", new, author)
            return new

        return await self._engine.write(self._job(request_id, now, run))

    async def requeue_task(
        self,
        task_id: str,
        *,
        author: str,
        now: float,
        run_at: float,
        request_id: str | None = None,
    ) -> TaskRow:
        def run(c: sqlite3.Connection) -> TaskRow:
            row = self._load(c, task_id)
            if row.state not in ("dead", "cancelled"):
                raise Conflict(
                    f"task {task_id!r} is {row.state}: only a dead or cancelled task can be "
                    "requeued",
                    field="task_id",
                )
            new = _replace(
                row,
                state="ready",
                attempt=0,
                run_at=run_at,
                result=None,
                claimed_by=None,
                claimed_at=None,
                lease_until=None,
                updated_at=now,
                finished_at=None,
            )
            self._store(c, new)
            self._task_event(c, "task.requeued", new, author)
            return new

        return await self._engine.write(self._job(request_id, now, run))

    async def get_task(self, task_id: str) -> TaskRow | None:
        def run(c: sqlite3.Connection) -> TaskRow | None:
            found = c.execute(f"{_SELECT} WHERE id = ?", (task_id,)).fetchone()
            return None if found is None else _row(found)

        return await self._engine.read_point(run)

    async def list_tasks(
        self, queue: str, state: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        where, args = ["queue = ?"], list[Any]([queue])
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        args.append(limit)
        return await self._engine.read(lambda c: [_row(r) for r in c.execute(sql, args)])

    async def task_queues(self) -> list[str]:
        sql = "SELECT DISTINCT queue FROM tasks ORDER BY queue"
        return await self._engine.read(lambda c: [r[0] for r in c.execute(sql)])

    async def task_stats(self, queue: str, now: float) -> TaskStats:
        def run(c: sqlite3.Connection) -> TaskStats:
            counts = dict(
                c.execute(
                    "SELECT CASE WHEN state = 'ready' AND run_at > ? THEN 'delayed' ELSE state "
                    "END AS s, COUNT(*) FROM tasks WHERE queue = ? GROUP BY s",
                    (now, queue),
                ).fetchall()
            )
            oldest = c.execute(
                "SELECT MIN(run_at) FROM tasks WHERE queue = ? AND state = 'ready' AND run_at <= ?",
                (queue, now),
            ).fetchone()[0]
            return TaskStats(
                ready=counts.get("ready", 0),
                delayed=counts.get("delayed", 0),
                running=counts.get("running", 0),
                completed=counts.get("completed", 0),
                dead=counts.get("dead", 0),
                cancelled=counts.get("cancelled", 0),
                oldest_ready_at=oldest,
            )

        return await self._engine.read(run)

    async def expire_leases(self, now: float, limit: int) -> int:
        # A read first: every hive process runs this each second, and a write
        # transaction (an fsync) when nothing expired would cost them all.
        expired = await self._engine.read_point(
            lambda c: c.execute(
                "SELECT 1 FROM tasks WHERE state = 'running' AND lease_until <= ? LIMIT 1", (now,)
            ).fetchone()
        )
        if expired is None:
            return 0
        return await self._engine.write(lambda c: self._settle_expired(c, None, now, limit))

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        def run(c: sqlite3.Connection) -> int:
            return c.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at < ? "
                "ORDER BY finished_at LIMIT ?)",
                (finished_before, limit),
            ).rowcount

        return await self._engine.write(run)
