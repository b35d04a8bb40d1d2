"""Tasks: the durable queue sub-agents take work from (submit, claim, heartbeat,
complete, fail with retry, dead-letter, results, cancel, requeue).

Rules live here; the backend applies each state change and its feed event in one
atomic step (backends/base.py, ``# Tasks``). A worker's ``attempt`` is its fencing
token: a heartbeat, complete, fail or release naming an attempt the task has moved
past (its lease ran out and another worker claimed it, or it was cancelled) is
refused with Conflict, so a task's outcome is written by the attempt that holds it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import orjson

from hivemem import validation as check
from hivemem.backends.rows import TASK_STATES, TaskRow, TaskStats
from hivemem.core import cursors
from hivemem.core.area import Area, timestamp
from hivemem.core.taskwaits import TaskWaits
from hivemem.errors import InvalidInput, NotFound, TooLarge
from hivemem.models import Page, QueueStats, Task, TaskError
from hivemem.tracing import current_traceparent, unwrap_payload, wrap_payload
from hivemem.validation import integer, optional_wait, seconds

#: Most characters of one attempt's error.
MAX_ERROR_CHARS = 4096
#: Bounds of a task's priority, attempts, lease and per-attempt timeout.
MAX_PRIORITY = 1000
MAX_ATTEMPTS = 1000
MAX_LEASE_SECONDS = 86400.0
MAX_TIMEOUT_SECONDS = 7 * 86400.0
MIN_LEASE_SECONDS = 0.1
#: Longest wait between two attempts of a failed task (the backoff doubles up to this).
MAX_BACKOFF_SECONDS = 3600.0
#: Settled expired leases per coordination round (the rest wait for the next round).
EXPIRE_PER_ROUND = 1000

_TASK_ID = re.compile(r"[0-9a-f]{1,64}")
_STATES = (*TASK_STATES, "delayed")


def new_task_id(now: float) -> str:
    """A 24-hex-digit id: the submit time in µs (14 digits, so ids sort in submission
    order) and 10 random digits."""
    return f"{int(now * 1_000_000):014x}{os.urandom(5).hex()}"


def to_task(row: TaskRow, now: float) -> Task:
    """The public record of a stored task at time ``now`` (a ready task not yet due is
    ``delayed``)."""
    state = "delayed" if row.state == "ready" and row.run_at > now else row.state
    payload, traceparent = unwrap_payload(orjson.loads(row.payload))
    return Task.model_construct(
        id=row.id,
        queue=row.queue,
        state=state,
        payload=payload,
        traceparent=traceparent,
        result=None if row.result is None else orjson.loads(row.result),
        priority=row.priority,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        timeout=row.timeout,
        backoff=row.backoff,
        idempotency_key=row.idempotency_key,
        submitted_by=row.submitted_by,
        claimed_by=row.claimed_by,
        lease_seconds=row.lease,
        lease_expires_at=None if row.lease_until is None else timestamp(row.lease_until),
        claimed_at=None if row.claimed_at is None else timestamp(row.claimed_at),
        run_at=timestamp(row.run_at),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        finished_at=None if row.finished_at is None else timestamp(row.finished_at),
        errors=[
            TaskError.model_construct(
                attempt=e["attempt"], error=e["error"], at=timestamp(e["at"]), worker=e["worker"]
            )
            for e in orjson.loads(row.errors)
        ],
    )


def to_stats(queue: str, stats: TaskStats, now: float) -> QueueStats:
    """The public record of a queue's counts at time ``now``."""
    return QueueStats(
        queue=queue,
        ready=stats.ready,
        delayed=stats.delayed,
        running=stats.running,
        completed=stats.completed,
        dead=stats.dead,
        cancelled=stats.cancelled,
        oldest_ready_seconds=None
        if stats.oldest_ready_at is None
        else max(0.0, now - stats.oldest_ready_at),
    )


def retry_delay(backoff: float, attempt: int) -> float:
    """Seconds before retrying after failed attempt ``attempt`` (1-based):
    ``backoff * 2**(attempt-1)``, capped at :data:`MAX_BACKOFF_SECONDS` (exponential
    backoff, as in AWS's "Exponential Backoff And Jitter", without the jitter: a queue
    spreads retries by itself)."""
    if backoff <= 0:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, backoff * 2.0 ** min(attempt - 1, 40))


def check_task_id(value: object, field: str = "task_id") -> str:
    """Check the form of a task id (hex digits, as :func:`new_task_id` makes them).

    Raises:
        InvalidInput: not a task id (naming ``field``).
    """
    if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
        raise InvalidInput(f"{field} is not a task id (1-64 hex digits)", field=field)
    return value


def held(task: Any, field: str = "task") -> tuple[str, int]:
    """(id, attempt) of a task a worker holds: a :class:`Task` or anything with ``id``
    and ``attempt``.

    Raises:
        InvalidInput: ``task`` has no task id or attempt (naming ``field``).
    """
    tid, attempt = getattr(task, "id", None), getattr(task, "attempt", None)
    if tid is None or attempt is None:
        raise InvalidInput(f"{field} must be a Task (from claim)", field=field)
    return check_task_id(tid), integer(attempt, "attempt", 1, MAX_ATTEMPTS)


class TasksMixin(Area):
    """The task operations of :class:`~hivemem.core.LocalHive`."""

    def _queue(self, queue: object) -> str:
        return check.namespace(queue, self._settings, field="queue")

    def _task_waits(self) -> TaskWaits:
        """The follower of task events that wakes this process's waiters."""
        raise NotImplementedError  # LocalHive shares one per process

    async def _visible_task(self, tid: str) -> TaskRow:
        """The task if this view may see its queue.

        Raises:
            NotFound: no such task, or one of a queue this principal may not use.
        """
        row = await self._backend.get_task(tid)
        if row is None or not self._may("tasks", row.queue):
            raise NotFound(f"task {tid!r} does not exist", field="task_id")
        return row

    async def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the per-attempt limit, not this call's)
        max_attempts: int = 3,
        backoff: float = 1.0,
        priority: int = 0,
        delay: float = 0,
    ) -> Task:
        s = self._settings
        q = self._queue(queue)
        data = check.to_json(payload, "payload", s.max_payload_bytes)
        key = (
            None
            if idempotency_key is None
            else check.key(idempotency_key, s, field="idempotency_key")
        )
        limit = (
            None
            if timeout is None
            else seconds(timeout, "timeout", low=MIN_LEASE_SECONDS, high=MAX_TIMEOUT_SECONDS)
        )
        attempts = integer(max_attempts, "max_attempts", 1, MAX_ATTEMPTS)
        pause = seconds(backoff, "backoff", low=0.0, high=MAX_BACKOFF_SECONDS, zero_ok=True)
        rank = integer(priority, "priority", -MAX_PRIORITY, MAX_PRIORITY)
        later = seconds(delay, "delay", low=0.0, high=s.max_ttl_seconds, zero_ok=True)
        self._must("tasks", q, "queue")
        request_id = self._scoped_request_id(
            "submit", q, data, key, limit, attempts, pause, rank, later
        )
        await self._ready()
        now = self._now()
        if self._settings.tracing:  # the submitter's trace goes with the task
            data = wrap_payload(data, current_traceparent())
        row = TaskRow(
            id=new_task_id(now),
            queue=q,
            state="ready",
            payload=data,
            result=None,
            priority=rank,
            run_at=now + later,
            attempt=0,
            max_attempts=attempts,
            timeout=limit,
            backoff=pause,
            lease=0.0,
            lease_until=None,
            idempotency_key=key,
            submitted_by=self.agent,
            claimed_by=None,
            errors=b"[]",
            created_at=now,
            updated_at=now,
            finished_at=None,
        )
        stored, _ = await self._once(self._backend.submit_task(row, request_id=request_id))
        return to_task(stored, self._now())

    async def claim(
        self, queue: str, *, lease: float = 30.0, wait: float | None = None
    ) -> Task | None:
        q = self._queue(queue)
        hold = seconds(lease, "lease", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        remaining = optional_wait(wait)
        self._must("tasks", q, "queue")
        await self._ready()
        # Claims carry no request id: a claim whose answer was lost is not repeated,
        # its task returns to the queue when the lease ends.
        deadline = self._now() + remaining
        started = time.monotonic()
        waits = self._task_waits()
        # The first look goes without registering: a busy worker finds a task at once
        # and never makes this process follow the feed.
        woken: asyncio.Future[None] | None = None
        while True:
            try:
                row = await self._backend.claim_task(
                    q, worker=self.agent, now=self._now(), lease=hold
                )
                if row is not None:
                    self._claimed(q, started)
                    return to_task(row, self._now())
                left = deadline - self._now()
                if left <= 0:
                    self._claimed(q, started)
                    return None
                if woken is not None:
                    await waits.sleep(woken, left)
            finally:
                if woken is not None:
                    waits.done(woken)
            woken = await waits.queue(q)  # registered before the next look

    def _claimed(self, queue: str, started: float) -> None:
        """Record a claim's wait."""
        metrics = self.metrics
        metrics.task_claim_wait.labels(metrics.queue_label(queue)).observe(
            time.monotonic() - started
        )

    def _finished(self, row: TaskRow, now: float, outcome: str) -> None:
        """Record the duration of the attempt this call ended at ``now``, whichever
        process claimed it: from the row the backend returned, whose ``claimed_at`` is
        the attempt's claim (complete and fail keep it, also when the task is ready
        again for a retry). Wall-clock times of possibly different hosts, so never
        below 0. Not recorded: an attempt claimed before the store kept claim times,
        and a repeated request id's stored answer (its ``updated_at`` is the first
        call's ``now``; that call recorded it)."""
        if row.claimed_at is None or row.updated_at != now:
            return
        ended = row.finished_at if row.finished_at is not None else now
        metrics = self.metrics
        metrics.task_seconds.labels(metrics.queue_label(row.queue), outcome).observe(
            max(0.0, ended - row.claimed_at)
        )

    async def _may_hold(self, tid: str) -> None:
        """With a policy in force, refuse (as absent) a task of a queue this principal
        may not use, so a worker's call says nothing about tasks it cannot see.

        Raises:
            NotFound: no such task, or one this principal may not see.
        """
        if self._access is not None:
            await self._visible_task(tid)

    async def heartbeat(self, task: Task, *, lease: float | None = None) -> Task:
        tid, attempt = held(task)
        if lease is None:  # the claim's lease: the task's (read it if the caller lacks it)
            lease = getattr(task, "lease_seconds", None)
            if lease is None:
                await self._ready()
                current = await self._backend.get_task(tid)
                lease = current.lease if current is not None and current.lease > 0 else 30.0
        hold = seconds(lease, "lease", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        request_id = self._scoped_request_id("heartbeat", tid, attempt, hold)
        await self._ready()
        await self._may_hold(tid)
        row = await self._once(
            self._backend.heartbeat_task(
                tid,
                worker=self.agent,
                attempt=attempt,
                now=self._now(),
                lease=hold,
                request_id=request_id,
            )
        )
        return to_task(row, self._now())

    async def complete(self, task: Task, result: Any = None) -> Task:
        tid, attempt = held(task)
        data = check.to_json(result, "result", self._settings.max_payload_bytes)
        request_id = self._scoped_request_id("complete", tid, attempt, data)
        await self._ready()
        await self._may_hold(tid)
        now = self._now()
        row = await self._once(
            self._backend.finish_task(
                tid,
                worker=self.agent,
                attempt=attempt,
                now=now,
                outcome="completed",
                result=data,
                request_id=request_id,
            )
        )
        self._finished(row, now, "completed")
        return to_task(row, self._now())

    async def fail(self, task: Task, error: str, *, retryable: bool = True) -> Task:
        tid, attempt = held(task)
        if not isinstance(error, str):
            raise InvalidInput("error must be a string", field="error")
        if len(error) > MAX_ERROR_CHARS:
            raise TooLarge(f"error is longer than {MAX_ERROR_CHARS} characters", field="error")
        if not isinstance(retryable, bool):
            raise InvalidInput("retryable must be true or false", field="retryable")
        request_id = self._scoped_request_id("fail", tid, attempt, error, retryable)
        await self._ready()
        await self._may_hold(tid)
        now = self._now()
        retry_at = None
        if retryable:
            current = await self._backend.get_task(tid)
            if current is not None and attempt < current.max_attempts:
                retry_at = now + retry_delay(current.backoff, attempt)
        row = await self._once(
            self._backend.finish_task(
                tid,
                worker=self.agent,
                attempt=attempt,
                now=now,
                outcome="failed",
                error=error,
                retry_at=retry_at,
                request_id=request_id,
            )
        )
        self._finished(row, now, "failed")
        return to_task(row, self._now())

    async def release_task(self, task: Task) -> Task:
        tid, attempt = held(task)
        request_id = self._scoped_request_id("release_task", tid, attempt)
        await self._ready()
        await self._may_hold(tid)
        row = await self._once(
            self._backend.finish_task(
                tid,
                worker=self.agent,
                attempt=attempt,
                now=self._now(),
                outcome="released",
                request_id=request_id,
            )
        )
        return to_task(row, self._now())

    async def result(self, task_id: str, *, wait: float | None = None) -> Task:
        tid = check_task_id(task_id)
        remaining = optional_wait(wait)
        await self._ready()
        deadline = self._now() + remaining
        waits = self._task_waits()
        while True:
            # Registered before the look (a submitter awaiting many results keeps the
            # follower running, so registering costs nothing).
            woken = await waits.task(tid) if remaining > 0 else None
            try:
                row = await self._visible_task(tid)
                left = deadline - self._now()
                if woken is None or row.finished_at is not None or left <= 0:
                    return to_task(row, self._now())
                await waits.sleep(woken, left)
            finally:
                if woken is not None:
                    waits.done(woken)

    async def cancel(self, task_id: str) -> Task:
        tid = check_task_id(task_id)
        request_id = self._scoped_request_id("cancel", tid)
        await self._ready()
        await self._visible_task(tid)
        row = await self._once(
            self._backend.cancel_task(
                tid, author=self.agent, now=self._now(), request_id=request_id
            )
        )
        return to_task(row, self._now())

    async def requeue(self, task_id: str, *, delay: float = 0) -> Task:
        tid = check_task_id(task_id)
        later = seconds(delay, "delay", low=0.0, high=self._settings.max_ttl_seconds, zero_ok=True)
        request_id = self._scoped_request_id("requeue", tid, later)
        await self._ready()
        await self._visible_task(tid)
        now = self._now()
        row = await self._once(
            self._backend.requeue_task(
                tid, author=self.agent, now=now, run_at=now + later, request_id=request_id
            )
        )
        return to_task(row, self._now())

    async def get_task(self, task_id: str) -> Task | None:
        tid = check_task_id(task_id)
        await self._ready()
        row = await self._backend.get_task(tid)
        if row is None or not self._may("tasks", row.queue):
            return None
        return to_task(row, self._now())

    async def list_tasks(
        self,
        queue: str,
        *,
        state: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Task]:
        q = self._queue(queue)
        if state is not None and state not in _STATES:
            raise InvalidInput(f"state must be one of {', '.join(_STATES)}", field="state")
        check.limit(limit, self._settings)
        after = cursors.decode(cursor)
        if after is not None and not (isinstance(after, str) and _TASK_ID.fullmatch(after)):
            raise InvalidInput("cursor was not made by list_tasks()", field="cursor")
        self._must("tasks", q, "queue")
        await self._ready()
        stored = "ready" if state == "delayed" else state
        now = self._now()
        rows = await self._backend.list_tasks(q, stored, after, limit)
        next_cursor = cursors.encode(rows[-1].id) if len(rows) == limit else None
        tasks = [to_task(r, now) for r in rows]
        if state == "delayed":
            tasks = [t for t in tasks if t.state == "delayed"]
        return Page[Task](items=tasks, next_cursor=next_cursor)

    async def queues(self) -> list[QueueStats]:
        await self._ready()
        names = [q for q in await self._backend.task_queues() if self._may("tasks", q)]
        names = names[: self._settings.max_page_size]
        now = self._now()
        stats = await asyncio.gather(*(self._backend.task_stats(q, now) for q in names))
        return [to_stats(q, s, now) for q, s in zip(names, stats, strict=True)]

    async def queue_stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        self._must("tasks", q, "queue")
        await self._ready()
        now = self._now()
        return to_stats(q, await self._backend.task_stats(q, now), now)
