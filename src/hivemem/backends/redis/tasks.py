"""The task queues of the Redis backend (see base.py's ``# Tasks`` for the contract).

Every primitive that changes state is one Lua script of :mod:`.task_scripts` on the task
partition (:data:`~.layout.TASK_PARTITION`, one hash slot in a cluster): it checks the
task, moves it between its queue's sets, appends the event to the partition's feed and
stores the request-id result in one atomic step, so a claim or a finish is one round
trip. Two claims never take the same task: Redis runs one script at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hivemem.backends.redis.engine import RedisEngine
from hivemem.backends.redis.layout import (
    TASK_PARTITION,
    meta_key,
    num,
    opt,
    tag,
    task_args,
    task_from,
    unpack,
)
from hivemem.backends.redis.task_scripts import PROMOTE_PER_CLAIM, SETTLE_PER_CLAIM
from hivemem.backends.rows import TaskRow, TaskStats
from hivemem.errors import Conflict, NotFound

__all__ = ["RedisTasks"]

_P = TASK_PARTITION
_TAG = tag(_P)
_KEYS = [meta_key(_P)]
_OUTCOMES = ("completed", "failed", "released")


def _text(b: bytes | None) -> str:
    return "" if b is None else b.decode("utf-8")


def _not_found(task_id: str) -> NotFound:
    return NotFound(f"task {task_id!r} does not exist", field="task_id")


def _not_held(task_id: str, worker: str, attempt: int, reply: Sequence[Any]) -> Conflict:
    """The Conflict (field ``attempt``) of a ``{'conflict', state, attempt, worker}`` reply."""
    state, current, holder = _text(reply[1]), _text(reply[2]), _text(reply[3])
    if state != "running":
        why = f"it is {state}"
    elif holder != worker:
        why = f"attempt {current} is held by another worker"
    else:
        why = f"it runs attempt {current} now"
    return Conflict(
        f"task {task_id!r}: attempt {attempt} is no longer held by {worker!r} ({why})",
        field="attempt",
    )


class RedisTasks(RedisEngine):
    """The task primitives of :class:`~.backend.RedisBackend`."""

    async def _task_write(self, name: str, request_id: str | None, args: Sequence[Any]) -> Any:
        """Run task write script ``name`` with ``args`` (after the tag) followed by the
        request key and TTL; notify local watchers when it applied a change."""

        async def run(rk: str, ttl: str) -> Any:
            return await self._script(name, _KEYS, [_TAG, *args, rk, ttl])

        reply = await self._requested(_P, request_id, run)
        if reply[0] == b"ok":
            self.changes.notify()
        return reply

    def _task_reply(self, task_id: str, worker: str, attempt: int, reply: Any) -> TaskRow:
        if reply[0] == b"notfound":
            raise _not_found(task_id)
        if reply[0] == b"conflict":
            raise _not_held(task_id, worker, attempt, reply)
        return task_from(unpack(reply[1]))

    async def submit_task(
        self, row: TaskRow, *, request_id: str | None = None
    ) -> tuple[TaskRow, bool]:
        async def run(rk: str, ttl: str) -> Any:
            return await self._script("task_submit", _KEYS, [_TAG, rk, ttl, *task_args(row)])

        reply = await self._requested(_P, request_id, run)
        if reply[0] == b"conflict":
            raise Conflict(f"task id {row.id!r} is taken", field="task_id")
        if reply[0] == b"ok":
            self.changes.notify()
        rec, created = unpack(reply[1])
        assert rec is not None
        return task_from(unpack(rec)), created == b"1"

    async def claim_task(
        self,
        queue: str,
        *,
        worker: str,
        now: float,
        lease: float,
        request_id: str | None = None,
    ) -> TaskRow | None:
        async def run(rk: str, ttl: str) -> Any:
            return await self._script(
                "task_claim",
                _KEYS,
                [
                    _TAG,
                    queue,
                    worker,
                    num(now),
                    num(lease),
                    num(now + lease),
                    rk,
                    ttl,
                    str(SETTLE_PER_CLAIM),
                    str(PROMOTE_PER_CLAIM),
                ],
            )

        reply = await self._requested(_P, request_id, run)
        if reply[0] == b"ok":
            self.changes.notify()
        if not reply[1]:
            return None
        return task_from(unpack(reply[1]))

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
        args = [task_id, worker, str(attempt), num(now), num(lease), num(now + lease)]
        reply = await self._task_write("task_heartbeat", request_id, args)
        return self._task_reply(task_id, worker, attempt, reply)

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
        if outcome not in _OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        args = [
            task_id,
            worker,
            str(attempt),
            num(now),
            outcome,
            opt(result),
            error or "",
            "" if retry_at is None else num(retry_at),
        ]
        reply = await self._task_write("task_finish", request_id, args)
        return self._task_reply(task_id, worker, attempt, reply)

    async def cancel_task(
        self, task_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> TaskRow:
        reply = await self._task_write("task_cancel", request_id, [task_id, author, num(now)])
        if reply[0] == b"conflict":
            raise Conflict(
                f"task {task_id!r} is {_text(reply[1])}: only a ready or running task can be "
                "cancelled",
                field="task_id",
            )
        return self._task_reply(task_id, author, 0, reply)

    async def requeue_task(
        self,
        task_id: str,
        *,
        author: str,
        now: float,
        run_at: float,
        request_id: str | None = None,
    ) -> TaskRow:
        reply = await self._task_write(
            "task_requeue", request_id, [task_id, author, num(now), num(run_at)]
        )
        if reply[0] == b"conflict":
            raise Conflict(
                f"task {task_id!r} is {_text(reply[1])}: only a dead or cancelled task can be "
                "requeued",
                field="task_id",
            )
        return self._task_reply(task_id, author, 0, reply)

    async def get_task(self, task_id: str) -> TaskRow | None:
        rec = await self._script("task_get", _KEYS, [_TAG, task_id])
        return None if rec is None else task_from(unpack(rec))

    async def list_tasks(
        self, queue: str, state: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        if limit <= 0:
            return []
        reply = await self._script(
            "task_list", _KEYS, [_TAG, queue, state or "", after or "", str(limit)]
        )
        rows = [task_from(unpack(rec)) for rec in reply]
        if state == "running":  # every running task, in lease order: page here
            rows = sorted((r for r in rows if after is None or r.id > after), key=lambda r: r.id)
            rows = rows[:limit]
        return rows

    async def task_queues(self) -> list[str]:
        reply = await self._script("task_queues", _KEYS, [_TAG])
        return [q.decode("utf-8") for q in reply]

    async def task_stats(self, queue: str, now: float) -> TaskStats:
        r = await self._script("task_stats", _KEYS, [_TAG, queue, num(now)])
        return TaskStats(
            ready=int(r[0]),
            delayed=int(r[1]),
            running=int(r[2]),
            completed=int(r[3]),
            dead=int(r[4]),
            cancelled=int(r[5]),
            oldest_ready_at=None if len(r) < 7 or r[6] is None else float(r[6]),
        )

    async def expire_leases(self, now: float, limit: int) -> int:
        if limit <= 0:
            return 0
        settled = int(await self._script("task_expire", _KEYS, [_TAG, num(now), str(limit)]))
        if settled:
            self.changes.notify()
        return settled

    async def sweep_tasks(self, finished_before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        return int(
            await self._script("task_sweep", _KEYS, [_TAG, num(finished_before), str(limit)])
        )
