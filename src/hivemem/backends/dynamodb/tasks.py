"""The task queues of the DynamoDB backend.

Every state change is one transaction of :mod:`.engine` (serializable through the
head's generation), so a claim's read of the best ready task and its update are one
step and two claims never take the same task.

Rows (see :mod:`.layout` for the rest of the table):

=========================  =========================  ==================================
record                     pk                         sk
=========================  =========================  ==================================
task                       ``TQ#<queue>``             task id (ids sort by submission)
task id -> queue           ``TI``                     task id
ready (and delayed) tasks  ``TR#<queue>``             claim order: priority (descending),
                                                      run_at, id
running tasks' leases      ``TL``                     lease_until ``\\0`` task id
finished tasks             ``D#t``                    finished_at ``\\0`` task id
idempotency key            ``TK#<queue>``             the key
queue and its counts       ``TQS``                    queue
=========================  =========================  ==================================
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace as _replace
from typing import Any, TypeVar

from hivemem.backends.dynamodb.engine import DynamoEngine, Tx, run_tx
from hivemem.backends.dynamodb.layout import due_sk
from hivemem.backends.rows import (
    TASK_FINISHED,
    TaskRow,
    TaskStats,
    check_held,
    finished_task,
    settled_task,
    task_namespace,
)
from hivemem.errors import Conflict, NotFound

__all__ = ["DynamoTasks"]

T = TypeVar("T")

#: Expired leases a claim settles at most before it takes a task.
SETTLE_PER_CLAIM = 100
#: Ready tasks a claim looks through for a due one (the claim order puts priority
#: first, so delayed tasks of higher priority come before due ones of lower).
CLAIM_SCAN = 1000
#: Due ready tasks a claim reads with the head (in claim order): the first still ready
#: is taken; several, so that the claims of one process's group commit each find one.
CLAIM_CANDIDATES = 4
#: Times a claim looks again when every task it found was taken before it committed.
CLAIM_ROUNDS = 20
#: Added to the priority in the ready index's sort key, so that higher sorts first.
_PRIORITY_OFFSET = 10**12
#: Task ids whose queue a process remembers (the ``TI`` row never changes: ids are
#: not reused), so reading a task it has seen is one request, not two.
QUEUE_MEMORY = 50_000
#: Counters of stored states kept per queue.
_COUNTED = ("completed", "dead", "cancelled")

_FIELDS = (
    "queue",
    "state",
    "payload",
    "result",
    "priority",
    "run_at",
    "attempt",
    "max_attempts",
    "timeout",
    "backoff",
    "lease",
    "lease_until",
    "idempotency_key",
    "submitted_by",
    "claimed_by",
    "errors",
    "created_at",
    "updated_at",
    "finished_at",
    "claimed_at",
)


def _task_to(row: TaskRow) -> dict[str, Any]:
    out: dict[str, Any] = {"pk": f"TQ#{row.queue}", "sk": row.id}
    for name in _FIELDS:
        value = getattr(row, name)
        out[name] = float(value) if isinstance(value, float) else value
    return out


def _task_from(row: dict[str, Any]) -> TaskRow:
    def f(name: str) -> float | None:
        v = row.get(name)
        return None if v is None else float(v)

    return TaskRow(
        id=row["sk"],
        queue=row["queue"],
        state=row["state"],
        payload=row["payload"],
        result=row.get("result"),
        priority=int(row["priority"]),
        run_at=float(row["run_at"]),
        attempt=int(row["attempt"]),
        max_attempts=int(row["max_attempts"]),
        timeout=f("timeout"),
        backoff=float(row["backoff"]),
        lease=float(row["lease"]),
        lease_until=f("lease_until"),
        idempotency_key=row.get("idempotency_key"),
        submitted_by=row["submitted_by"],
        claimed_by=row.get("claimed_by"),
        errors=row["errors"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        finished_at=f("finished_at"),
        claimed_at=f("claimed_at"),  # absent on a task stored before it existed
    )


def _ready_sk(row: TaskRow) -> str:
    return f"{_PRIORITY_OFFSET - row.priority:013d}\0{row.run_at:020.6f}\0{row.id}"


class DynamoTasks:
    """The task primitives of :class:`~.backend.DynamoBackend` (contract in base.py)."""

    db: DynamoEngine
    _write: Callable[..., Awaitable[Any]]

    # Reading and storing ------------------------------------------------------------

    def _queue_of(self, task_id: str) -> str | None:
        """The queue of a task this process has seen (None: not known here)."""
        known: dict[str, str] | None = getattr(self, "_known_queues", None)
        return None if known is None else known.get(task_id)

    def _remember(self, task_id: str, queue: str) -> None:
        """Note the queue of a task whose ``TI`` row exists (read or committed)."""
        known: dict[str, str] | None = getattr(self, "_known_queues", None)
        if known is None:
            known = {}
            self._known_queues = known
        if task_id not in known:
            if len(known) >= QUEUE_MEMORY:
                del known[next(iter(known))]  # the oldest
            known[task_id] = queue

    async def _pointer(self, task_id: str, get: Callable[[str, str], Awaitable[Any]]) -> str | None:
        """The queue of ``task_id``: remembered, or read from its ``TI`` row with ``get``
        (None: no such task)."""
        queue = self._queue_of(task_id)
        if queue is None:
            pointer = await get("TI", task_id)
            if pointer is None:
                return None
            queue = str(pointer["q"])
            self._remember(task_id, queue)
        return queue

    def _reads(self, task_id: str) -> list[tuple[str, str]]:
        """The rows a change of ``task_id`` reads, to fetch with the head in one request
        (``reads`` of :func:`~.engine.run_tx`): its row and its queue's counters when the
        queue is known here, else its ``TI`` pointer."""
        queue = self._queue_of(task_id)
        return [("TI", task_id)] if queue is None else [(f"TQ#{queue}", task_id), ("TQS", queue)]

    async def _load(self, tx: Tx, task_id: str) -> tuple[TaskRow, dict[str, Any]]:
        queue = await self._pointer(task_id, tx.get)
        found = None if queue is None else await tx.get(f"TQ#{queue}", task_id)
        if found is None:
            raise NotFound(f"task {task_id!r} does not exist", field="task_id")
        full = await self.db.expand(found)
        if full is None:  # replaced while read: the transaction will run again
            raise NotFound(f"task {task_id!r} does not exist", field="task_id")
        return _task_from(full), found

    async def _count(self, tx: Tx, queue: str, changes: dict[str, int]) -> None:
        """Move the queue's counters (``n``: tasks stored; finished states by name)."""
        row = await tx.get("TQS", queue)
        new: dict[str, Any] = dict(row) if row is not None else {"pk": "TQS", "sk": queue, "n": 0}
        for name, delta in changes.items():
            new[name] = int(new.get(name, 0)) + delta
        if int(new["n"]) <= 0:
            tx.delete("TQS", queue)
        else:
            tx.put(new)

    async def _store(self, tx: Tx, old: TaskRow | None, new: TaskRow, stored: Any = None) -> None:
        """Write ``new`` in place of ``old`` (None: a new task) with its index rows."""
        if old is not None:
            if old.state == "ready":
                tx.delete(f"TR#{old.queue}", _ready_sk(old))
            if old.state == "running" and old.lease_until is not None:
                tx.delete("TL", due_sk(old.lease_until, old.id))
            if old.state in TASK_FINISHED and old.finished_at is not None:
                tx.delete("D#t", due_sk(old.finished_at, old.id))
        if new.state == "ready":
            tx.put(
                {"pk": f"TR#{new.queue}", "sk": _ready_sk(new), "id": new.id, "run_at": new.run_at}
            )
        if new.state == "running" and new.lease_until is not None:
            tx.put(
                {"pk": "TL", "sk": due_sk(new.lease_until, new.id), "q": new.queue, "id": new.id}
            )
        if new.state in TASK_FINISHED and new.finished_at is not None:
            tx.put(
                {"pk": "D#t", "sk": due_sk(new.finished_at, new.id), "q": new.queue, "id": new.id}
            )
        changes: dict[str, int] = {}
        if old is None:
            changes["n"] = 1
        elif old.state in _COUNTED:
            changes[old.state] = -1
        if new.state in _COUNTED:
            changes[new.state] = changes.get(new.state, 0) + 1
        if changes:
            await self._count(tx, new.queue, changes)
        tx.put(_task_to(new), old=stored)

    @staticmethod
    def _event(tx: Tx, type_: str, row: TaskRow, author: str) -> None:
        tx.event(type_, task_namespace(row.queue), row.id, row.attempt, author, row.updated_at)

    async def _settle(self, tx: Tx, row: TaskRow, stored: Any, now: float) -> TaskRow:
        """Settle one expired lease (see base.py): dead after the last attempt, else ready."""
        new, kind = settled_task(row, now)
        await self._store(tx, row, new, stored)
        self._event(tx, kind, new, "hivemem")
        return new

    async def _expired(self, queue: str | None, now: float, limit: int) -> list[dict[str, Any]]:
        """The lease rows (``TL``) ended by ``now``, of ``queue`` when given, at most
        ``limit``: read outside a transaction, settled by :meth:`_settle_expired` in one."""
        found: list[dict[str, Any]] = []
        async for lease in self.db.query("TL", high=due_sk(now, "\U0010ffff"), first_page=8):
            if queue is None or lease["q"] == queue:
                found.append(lease)
                if len(found) >= limit:
                    break
        return found

    async def _settle_expired(
        self, tx: Tx, leases: list[dict[str, Any]], now: float
    ) -> list[TaskRow]:
        """Settle the tasks of ``leases`` (from :meth:`_expired`) whose lease, read again
        in ``tx``, has still ended; returns the tasks as settled."""
        settled: list[TaskRow] = []
        for lease in leases:
            found = await tx.get(f"TQ#{lease['q']}", lease["id"])
            if found is None:
                continue
            row = _task_from(found)
            if row.state != "running" or row.lease_until is None or row.lease_until > now:
                continue
            settled.append(await self._settle(tx, row, found, now))
        return settled

    _held = staticmethod(check_held)

    # Primitives ---------------------------------------------------------------------

    async def submit_task(
        self, row: TaskRow, *, request_id: str | None = None
    ) -> tuple[TaskRow, bool]:
        async def job(tx: Tx) -> tuple[TaskRow, bool]:
            if row.idempotency_key is not None:
                taken = await tx.get(f"TK#{row.queue}", row.idempotency_key)
                if taken is not None:
                    found = await tx.get(f"TQ#{row.queue}", taken["id"])
                    if found is not None:
                        full = await self.db.expand(found)
                        if full is not None:
                            return _task_from(full), False
            if await tx.get("TI", row.id) is not None:
                raise Conflict(f"task id {row.id!r} is taken", field="task_id")
            tx.put({"pk": "TI", "sk": row.id, "q": row.queue})
            if row.idempotency_key is not None:
                tx.put({"pk": f"TK#{row.queue}", "sk": row.idempotency_key, "id": row.id})
            await self._store(tx, None, row)
            self._event(tx, "task.submitted", row, row.submitted_by)
            return row, True

        reads = [("TI", row.id), ("TQS", row.queue)]
        if row.idempotency_key is not None:
            reads.append((f"TK#{row.queue}", row.idempotency_key))
        result = await self._write(request_id, row.created_at, job, "submit_task", reads)
        self._remember(result[0].id, result[0].queue)
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
        started = time.monotonic()
        for _ in range(CLAIM_ROUNDS):
            # Look first, outside the transaction: which leases of the queue have
            # expired, and which ready tasks come first in claim order. The transaction
            # then reads those tasks with the head in one request and commits, so
            # another process's commit can cancel it only in that short window (a claim
            # that ran its queries inside it lost most races, and a slower process could
            # starve). What the queries found is checked again under the head: a task
            # taken or settled meanwhile is skipped.
            expired = await self._expired(queue, now, SETTLE_PER_CLAIM)
            ready: list[tuple[str, str]] = []
            async for r in self.db.query(
                f"TR#{queue}", limit=CLAIM_SCAN, first_page=CLAIM_CANDIDATES
            ):
                if float(r["run_at"]) <= now:
                    ready.append((r["sk"], r["id"]))
                    if len(ready) >= CLAIM_CANDIDATES:
                        break
            if not ready and not expired:
                return None
            reads = [(f"TQ#{queue}", tid) for _, tid in ready]
            reads += [(f"TQ#{queue}", gone["id"]) for gone in expired]

            async def job(
                tx: Tx,
                ready: list[tuple[str, str]] = ready,
                expired: list[dict[str, Any]] = expired,
            ) -> TaskRow | None:
                settled = await self._settle_expired(tx, expired, now)
                # The best due task: the first candidate still ready (another claim of
                # this group may have taken one), or one whose lease this claim just
                # settled (not in the index until it commits).
                best: tuple[str, str] | None = None
                for sk, tid in ready:
                    found = await tx.get(f"TQ#{queue}", tid)
                    if found is not None and found.get("state") == "ready":
                        best = (sk, tid)
                        break
                for row in settled:
                    if row.state == "ready" and row.run_at <= now:
                        best = min(best or (_ready_sk(row), row.id), (_ready_sk(row), row.id))
                if best is None:
                    if settled:
                        return None  # settled what expired; nothing due to take
                    raise _Stale
                found = await tx.get(f"TQ#{queue}", best[1])
                full = None if found is None else await self.db.expand(found)
                if full is None:
                    raise _Stale
                row = _task_from(full)
                if row.state != "ready":
                    raise _Stale
                new = _replace(
                    row,
                    state="running",
                    attempt=row.attempt + 1,
                    claimed_by=worker,
                    claimed_at=now,
                    lease=lease,
                    lease_until=now + _waited(started) + lease,
                    updated_at=now,
                )
                await self._store(tx, row, new, found)
                self._event(tx, "task.claimed", new, worker)
                return new

            try:
                result: TaskRow | None = await self._write(
                    request_id, now, job, "claim_task", reads
                )
            except _Stale:
                continue  # every task found was taken meanwhile: look again
            if result is not None:
                self._remember(result.id, result.queue)
            return result
        return None

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
        started = time.monotonic()

        async def job(tx: Tx) -> TaskRow:
            row, stored = await self._load(tx, task_id)
            self._held(row, worker, attempt)
            until = now + _waited(started) + lease
            new = _replace(row, lease=lease, lease_until=until, updated_at=now)
            await self._store(tx, row, new, stored)
            return new

        result: TaskRow = await self._write(
            request_id, now, job, "heartbeat_task", self._reads(task_id)
        )
        return result

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
        async def job(tx: Tx) -> TaskRow:
            row, stored = await self._load(tx, task_id)
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
            await self._store(tx, row, new, stored)
            self._event(tx, kind, new, worker)
            return new

        done: TaskRow = await self._write(request_id, now, job, "finish_task", self._reads(task_id))
        return done

    async def cancel_task(
        self, task_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> TaskRow:
        async def job(tx: Tx) -> TaskRow:
            row, stored = await self._load(tx, task_id)
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
            await self._store(tx, row, new, stored)
            self._event(tx, "task.cancelled", new, author)
            return new

        done: TaskRow = await self._write(request_id, now, job, "cancel_task", self._reads(task_id))
        return done

    async def requeue_task(
        self,
        task_id: str,
        *,
        author: str,
        now: float,
        run_at: float,
        request_id: str | None = None,
    ) -> TaskRow:
        async def job(tx: Tx) -> TaskRow:
            row, stored = await self._load(tx, task_id)
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
            await self._store(tx, row, new, stored)
            self._event(tx, "task.requeued", new, author)
            return new

        done: TaskRow = await self._write(
            request_id, now, job, "requeue_task", self._reads(task_id)
        )
        return done

    async def get_task(self, task_id: str) -> TaskRow | None:
        for _ in range(5):
            queue = await self._pointer(task_id, self.db.get)
            if queue is None:
                return None
            found = await self.db.get(f"TQ#{queue}", task_id)
            if found is None:
                return None
            full = await self.db.expand(found)
            if full is not None:
                return _task_from(full)
        return None

    async def list_tasks(
        self, queue: str, state: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        out: list[TaskRow] = []
        if limit <= 0:
            return out
        low = None if after is None else after + "\0"
        async for found in self.db.query(f"TQ#{queue}", low=low, first_page=limit + 1):
            if state is not None and found.get("state") != state:
                continue
            full = await self.db.expand(found)
            if full is not None:
                out.append(_task_from(full))
            if len(out) >= limit:
                break
        return out

    async def task_queues(self) -> list[str]:
        return [r["sk"] for r in await self.db.rows("TQS") if int(r.get("n", 0)) > 0]

    async def task_stats(self, queue: str, now: float) -> TaskStats:
        counts = await self.db.get("TQS", queue) or {}
        ready = delayed = 0
        oldest: float | None = None
        async for r in self.db.query(f"TR#{queue}", fields=["pk", "sk", "run_at"]):
            at = float(r["run_at"])
            if at <= now:
                ready += 1
                oldest = at if oldest is None else min(oldest, at)
            else:
                delayed += 1
        running = 0
        async for lease in self.db.query("TL", fields=["pk", "sk", "q"]):
            if lease["q"] == queue:
                running += 1
        return TaskStats(
            ready=ready,
            delayed=delayed,
            running=running,
            completed=int(counts.get("completed", 0)),
            dead=int(counts.get("dead", 0)),
            cancelled=int(counts.get("cancelled", 0)),
            oldest_ready_at=oldest,
        )

    async def expire_leases(self, now: float, limit: int) -> int:
        # A read first: every hive process runs this each second.
        leases = await self._expired(None, now, min(limit, 20))
        if not leases:
            return 0

        async def job(tx: Tx) -> int:
            return len(await self._settle_expired(tx, leases, now))

        reads = [(f"TQ#{lease['q']}", lease["id"]) for lease in leases]
        settled: int = await run_tx(self.db, job, what="expire_leases", reads=reads)
        if settled:
            self.changes_notify()
        return settled

    def changes_notify(self) -> None:
        """Wake this process's waiters (the backend's change signal)."""
        changes = getattr(self, "changes", None)
        if changes is not None:
            changes.notify()

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        done = await self.db.rows("D#t", high=due_sk(finished_before, "\0"), limit=min(limit, 20))
        if not done:
            return 0

        async def job(tx: Tx) -> int:
            n = 0
            for d in done:
                found = await tx.get(f"TQ#{d['q']}", d["id"])
                tx.delete(d["pk"], d["sk"])
                if found is None:
                    continue
                row = _task_from(found)
                tx.delete(f"TQ#{row.queue}", row.id, old=found)
                tx.delete("TI", row.id)
                if row.idempotency_key is not None:
                    tx.delete(f"TK#{row.queue}", row.idempotency_key)
                changes = {"n": -1}
                if row.state in _COUNTED:
                    changes[row.state] = -1
                await self._count(tx, row.queue, changes)
                n += 1
            return n

        swept: int = await run_tx(self.db, job, what="sweep_tasks")
        return swept


class _Stale(Exception):
    """A claim found every task it looked at taken when its transaction read them: it
    writes nothing and looks again."""


def _waited(started: float) -> float:
    """Seconds since ``started`` (``time.monotonic()``): how long a claim or heartbeat
    waited for its transaction (group commits queue, and a commit that loses the head row
    runs again), so that its lease runs from when the store took it, not from when it
    was asked (the caller's ``now``, which tests may set)."""
    return max(0.0, time.monotonic() - started)
