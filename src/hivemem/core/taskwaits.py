"""Wake the task waiters of this process from the task events.

``claim(wait=)`` and ``result(wait=)`` sleep until something they care about may have
changed. Sleeping on the store's change signal would wake every waiter on every commit
in the store (each task makes three or more events, and every waiting worker and
result waiter would query again); instead one follower per process reads the task
events (``_tasks/...``) once per change and wakes only the waiters of the queue that
gained a claimable task or of the task that changed. So a process with a hundred
waiters makes one feed read per change, not a hundred queries. Where change
notifications name the task events themselves (PostgreSQL: the NOTIFY payload,
``Backend.task_hints``), no feed is read at all: the listener's hints wake the waiters.

No wake-up is lost: a waiter registers before it looks (claims or reads), and the
follower, started before that registration, reads every event committed after its
start, so an event between the look and the sleep finds the waiter registered. A
queue waiter also wakes after ``feed_poll_seconds`` at most: that is how a delayed
task coming due is noticed. A task waiter (``result(wait=)``) waits for its event
alone, with :data:`TASK_SAFETY_SECONDS` as its safety net: whenever events may have
been missed (a failed feed read, a cursor past the retention, a notification listener
that reconnected or a payload too long to name its events) every waiter is woken to
look, so a result waiter needs no poll of its own. (It had one of ``feed_poll_seconds``:
on DynamoDB, whose reads are requests, 32 outstanding results cost 32 task reads a
second, about half of the store's requests per task in the 1,000-task test.) The
follower stops when no waiter is left and starts again from the feed's head when one
comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hivemem.backends.base import Backend
from hivemem.backends.signals import TaskHint
from hivemem.errors import CursorExpired

log = logging.getLogger("hivemem")

#: Task events after which a queue may hold a task to claim.
CLAIMABLE = frozenset(
    {"task.submitted", "task.failed", "task.released", "task.expired", "task.requeued"}
)
#: Task events after which a task is finished (what result waiters wait for).
FINISHED = frozenset({"task.completed", "task.dead", "task.cancelled"})
#: Events read per feed query.
BATCH = 500
#: Longest a task waiter sleeps without its task's event (a safety net only: see the
#: module notes), seconds.
TASK_SAFETY_SECONDS = 30.0


class TaskWaits:
    """One follower of the task events per process, waking waiters by queue or task.

    Args:
        backend: the store whose feed to follow.
        poll_seconds: the longest a follower sleeps without a change notification.
    """

    def __init__(self, backend: Backend, poll_seconds: float) -> None:
        self._backend = backend
        self._poll = poll_seconds
        self._queues: dict[str, set[asyncio.Future[None]]] = {}
        self._tasks: dict[str, set[asyncio.Future[None]]] = {}
        self._follower: asyncio.Task[None] | None = None
        self._cursor: str | None = None
        self._starting = asyncio.Lock()
        self._hinted = False
        self._closed = False

    def _on_hint(self, hint: TaskHint | None) -> None:
        """A task event a change notification named (None: some may have been missed)."""
        if hint is None:
            self._wake_all()
            return
        if hint.type in FINISHED:
            self._wake(self._tasks, hint.task_id)
        if hint.type in CLAIMABLE:
            self._wake(self._queues, hint.queue)

    async def _start(self) -> None:
        """Make sure waiters will hear of task events: through the backend's
        notification hints when it has them, else by a follower of the feed (its
        cursor read before this returns)."""
        if self._backend.task_hints:
            if not self._hinted:
                self._backend.changes.listen_hints(self._on_hint)
                self._hinted = True
            return
        if self._follower is not None and not self._follower.done():
            return
        async with self._starting:
            if self._follower is not None and not self._follower.done():
                return
            self._cursor = await self._backend.head()
            self._follower = asyncio.create_task(self._follow(), name="hivemem-task-waits")

    async def queue(self, queue: str) -> asyncio.Future[None]:
        """A future set when ``queue`` may have gained a claimable task. Register it
        before looking; :meth:`done` it when finished."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(queue, set()).add(fut)
        await self._start()  # after registering: a follower about to stop sees the waiter
        return fut

    async def task(self, task_id: str) -> asyncio.Future[None]:
        """A future set when task ``task_id`` finished (completed, dead or cancelled).
        Register it before looking."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.setdefault(task_id, set()).add(fut)
        await self._start()
        return fut

    def done(self, fut: asyncio.Future[None]) -> None:
        """Forget a future (woken or not)."""
        for table in (self._queues, self._tasks):
            for name, futs in list(table.items()):
                if fut in futs:
                    futs.discard(fut)
                    if not futs:
                        del table[name]
                    return

    async def sleep(self, fut: asyncio.Future[None], seconds: float) -> None:
        """Wait until ``fut`` is set or ``seconds`` pass, at most the poll interval for a
        queue waiter and :data:`TASK_SAFETY_SECONDS` (or the poll interval, if longer)
        for a task waiter."""
        cap = self._poll
        if any(fut in futs for futs in self._tasks.values()):
            cap = max(cap, TASK_SAFETY_SECONDS)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
        # that lands as ``fut`` is set (see ChangeSignal.wait).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, cap)):
                await asyncio.shield(fut)

    def _wake(self, table: dict[str, set[asyncio.Future[None]]], name: str) -> None:
        for fut in table.pop(name, ()):
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self) -> None:
        for table in (self._queues, self._tasks):
            for name in list(table):
                self._wake(table, name)

    async def _follow(self) -> None:
        changes = self._backend.changes
        while (self._queues or self._tasks) and not self._closed:
            generation = changes.generation
            try:
                rows, cursor = await self._backend.read_events("_tasks", self._cursor, BATCH)
            except CursorExpired:  # fell behind the retention: wake everyone to look
                self._cursor = await self._backend.head()
                self._wake_all()
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is down: every waiter looks for itself
                log.warning("following task events failed; retrying", exc_info=True)
                self._wake_all()
                await asyncio.sleep(self._poll)
                continue
            self._cursor = cursor
            for row in rows:
                if row.type in FINISHED and row.key in self._tasks:
                    self._wake(self._tasks, row.key)
                if row.type in CLAIMABLE:
                    queue = row.namespace.removeprefix("_tasks/")
                    if queue in self._queues:
                        self._wake(self._queues, queue)
            if len(rows) < BATCH:
                await changes.wait(generation, self._poll)

    async def close(self) -> None:
        """Stop the follower (or stop listening to hints) and wake every waiter."""
        if self._hinted:
            self._backend.changes.unlisten_hints(self._on_hint)
            self._hinted = False
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=5.0)  # never forever
            self._follower = None
        self._wake_all()
