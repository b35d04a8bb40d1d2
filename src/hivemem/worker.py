"""Workers: claim tasks from a queue and run a handler on each.

::

    @hive.worker("summaries", concurrency=4)
    async def summarise(task: hivemem.Task) -> dict:
        return {"summary": await llm(task.payload["text"])}

    await summarise.run()          # until stop() or SIGTERM/SIGINT

or from a shell: ``hivemem worker myapp.jobs:summarise --queue summaries
--concurrency 4 --url http://hive:8765``.

The handler gets the :class:`~hivemem.Task` (``.payload``, ``.attempt``, ``.id``);
it may be sync (run in a thread, so heartbeats go on) or async. Its return value
(any JSON) completes the task; an exception fails the attempt (retried after the
task's backoff until ``max_attempts``; raise :class:`Fatal` to fail without retry);
an attempt running past the task's ``timeout`` is cancelled and failed (a sync
handler's thread cannot be stopped: its attempt fails once the thread returns, the lease
held meanwhile, so a task never runs twice at once). While a
handler runs, the worker renews the task's lease every lease/3 seconds. If the lease
is lost anyway (the task was cancelled, or the process stalled past the lease and
another worker took the task), the handler is cancelled and its result dropped.

:meth:`Worker.stop` (and SIGTERM/SIGINT under :meth:`Worker.run`) stops claiming;
tasks in hand get ``grace`` seconds to finish, then are cancelled and released back
to the queue unrun (their attempt does not count); a sync handler still running then
keeps its lease until it returns, and its task ends as it came out. One log line per task
(logger ``hivemem.worker``).

This module imports nothing of hivemem's core: it works with any Hive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hivemem.errors import Conflict, HivememError, InvalidInput, NotFound
from hivemem.models import Task
from hivemem.tracing import task_span

if TYPE_CHECKING:
    from hivemem.hive import Hive

__all__ = ["Fatal", "Worker"]

log = logging.getLogger("hivemem.worker")

#: Seconds one claim request waits for a task before the worker asks again.
CLAIM_WAIT_SECONDS = 5.0
#: Seconds between retries when the hive cannot be reached.
RETRY_SECONDS = 1.0


class Fatal(Exception):
    """Raise from a handler to fail the attempt without retry: the task is dead at once."""


class _Lost(Exception):
    """The task's lease was lost while its handler ran."""


class Worker:
    """Runs ``fn`` on tasks of ``queue``, ``concurrency`` at a time.

    Args:
        hive: any Hive (embedded or remote); tasks are claimed as its agent.
        queue: the queue to take tasks from.
        fn: the handler, ``fn(task) -> result`` (sync or async).
        concurrency: how many tasks run at once (1 .. 1000).
        lease: seconds each claim holds a task before it must be renewed.
        grace: seconds tasks in hand may still run after :meth:`stop`.

    Attributes:
        completed, failed, lost, released: counts of tasks that ended each way.

    Raises:
        InvalidInput: ``concurrency`` or ``lease`` out of range.
    """

    def __init__(
        self,
        hive: Hive,
        queue: str,
        fn: Callable[[Task], Any],
        *,
        concurrency: int = 1,
        lease: float = 30.0,
        grace: float = 10.0,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise InvalidInput("concurrency must be an integer", field="concurrency")
        if not 1 <= concurrency <= 1000:
            raise InvalidInput("concurrency must be between 1 and 1000", field="concurrency")
        if not isinstance(lease, int | float) or not 0.1 <= lease <= 86400:
            raise InvalidInput("lease must be between 0.1 and 86400 seconds", field="lease")
        self.hive = hive
        self.queue = queue
        self.fn = fn
        self.concurrency = concurrency
        self.lease = float(lease)
        self.grace = grace
        self.completed = self.failed = self.lost = self.released = 0
        self._stopping: asyncio.Event | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, task: Task) -> Any:
        """Call the handler directly (e.g. in a test)."""
        return self.fn(task)

    def stop(self) -> None:
        """Stop claiming; tasks in hand get ``grace`` seconds, then are released."""
        if self._stopping is not None:
            self._stopping.set()

    async def run(self, *, handle_signals: bool = True, max_tasks: int | None = None) -> None:
        """Claim and run tasks until :meth:`stop` (or SIGTERM/SIGINT when
        ``handle_signals`` and on the main thread), or until ``max_tasks`` tasks ended."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        budget = [max_tasks]
        log.info(
            "worker %s: queue %r, concurrency %d, lease %g s",
            self.hive.agent,
            self.queue,
            self.concurrency,
            self.lease,
        )
        try:
            await asyncio.gather(*(self._slot(budget) for _ in range(self.concurrency)))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            log.info(
                "worker %s stopped: %d completed, %d failed, %d lost, %d released",
                self.hive.agent,
                self.completed,
                self.failed,
                self.lost,
                self.released,
            )

    async def _slot(self, budget: list[int | None]) -> None:
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set():
            if budget[0] is not None:
                if budget[0] <= 0:  # the other slots hold (or ran) the last tasks
                    return
                budget[0] -= 1
            task = await self._claim(stopping)
            if task is None:
                if budget[0] is not None:
                    budget[0] += 1
                continue
            await self._handle(task, stopping)

    async def _claim(self, stopping: asyncio.Event) -> Task | None:
        claim = asyncio.ensure_future(
            self.hive.claim(self.queue, lease=self.lease, wait=CLAIM_WAIT_SECONDS)
        )
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not claim.done():
            claim.cancel()
            with contextlib.suppress(asyncio.CancelledError, HivememError):
                await claim
            return None
        try:
            return claim.result()
        except HivememError as exc:
            log.warning("claiming from %r failed: %s; retrying", self.queue, exc)
            await asyncio.sleep(RETRY_SECONDS)
            return None

    async def _handle(self, task: Task, stopping: asyncio.Event) -> None:
        started = time.perf_counter()
        run = asyncio.ensure_future(self._call(task))
        beat = asyncio.ensure_future(self._keep(task))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({run, beat, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done() and stop.done():  # shutting down: a grace period, then release
                await asyncio.wait(
                    {run, beat}, timeout=self.grace, return_when=asyncio.FIRST_COMPLETED
                )
                if not run.done() and not beat.done() and not self._is_async:
                    # A thread cannot be stopped: released now, the task could run twice
                    # at once. Hold the lease until the handler returns, then end it.
                    log.warning(
                        "task %s: its handler runs in a thread and cannot be interrupted; "
                        "holding the lease until it returns",
                        task.id,
                    )
                    await asyncio.wait({run, beat}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run
                if beat.done():  # the lease was lost
                    self._log(task, "lost", started, "the lease was lost; result dropped")
                    self.lost += 1
                else:
                    await self._end(task, started, "released")
                return
        finally:
            beat.cancel()
            stop.cancel()
        exc = run.exception()
        if exc is None:
            await self._end(task, started, "completed", result=run.result())
        elif isinstance(exc, TimeoutError) and task.timeout is not None:
            await self._end(task, started, "failed", error=f"timed out after {task.timeout:g} s")
        else:
            await self._end(
                task,
                started,
                "failed",
                error=f"{type(exc).__name__}: {exc}"[:4096],
                retryable=not isinstance(exc, Fatal),
            )

    async def _call(self, task: Task) -> Any:
        # A task submitted inside a span runs in a span of that trace (hivemem.tracing).
        with task_span(task) if task.traceparent else contextlib.nullcontext():
            return await self._run(task)

    @property
    def _is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    async def _run(self, task: Task) -> Any:
        if self._is_async:
            async with asyncio.timeout(task.timeout):
                return await self.fn(task)
        # A sync handler runs in a thread, which nothing can stop: past its timeout the
        # attempt fails only once the thread has returned (the lease is held meanwhile),
        # so the task never runs twice at once.
        thread = asyncio.ensure_future(asyncio.to_thread(self.fn, task))
        try:
            async with asyncio.timeout(task.timeout):
                outcome = await asyncio.shield(thread)
        except TimeoutError:
            log.warning(
                "task %s: past its timeout; its handler runs in a thread and cannot be "
                "interrupted, waiting for it to return",
                task.id,
            )
            with contextlib.suppress(BaseException):
                await thread
            raise
        if inspect.isawaitable(outcome):
            async with asyncio.timeout(task.timeout):
                outcome = await outcome
        return outcome

    async def _keep(self, task: Task) -> None:
        """Renew the lease every lease/3 seconds, sooner when less than two of those are
        left of it (a claim answered late by a busy store, a slow heartbeat: the lease
        runs from when the store took the claim); return when it is lost."""
        held = task
        while True:
            pause = held.lease_seconds / 3
            if held.lease_expires_at is not None:
                left = (held.lease_expires_at - datetime.now(UTC)).total_seconds()
                pause = max(0.1, min(pause, left / 2))
            await asyncio.sleep(pause)
            try:
                held = await self.hive.heartbeat(held)
            except (Conflict, NotFound):
                return
            except HivememError as exc:
                log.warning("heartbeat of task %s failed: %s; retrying", task.id, exc)

    async def _end(
        self,
        task: Task,
        started: float,
        outcome: str,
        *,
        result: Any = None,
        error: str | None = None,
        retryable: bool = True,
    ) -> None:
        try:
            if outcome == "completed":
                try:
                    await self.hive.complete(task, result)
                except InvalidInput as exc:  # not JSON, or too large: the attempt fails
                    outcome, error = "failed", f"result refused: {exc.message}"
                    await self.hive.fail(task, error, retryable=False)
            elif outcome == "failed":
                await self.hive.fail(task, error or "", retryable=retryable)
            else:
                await self.hive.release_task(task)
        except (Conflict, NotFound) as exc:
            self._log(task, "lost", started, exc.message)
            self.lost += 1
            return
        except HivememError as exc:
            self._log(task, "unreported", started, f"{outcome}, but telling the hive failed: {exc}")
            self.lost += 1
            return
        if outcome == "completed":
            self.completed += 1
        elif outcome == "failed":
            self.failed += 1
        else:
            self.released += 1
        self._log(task, outcome, started, error)

    def _log(self, task: Task, outcome: str, started: float, detail: str | None) -> None:
        ms = (time.perf_counter() - started) * 1000
        level = logging.INFO if outcome in ("completed", "released") else logging.WARNING
        log.log(
            level,
            "task %s queue=%s attempt=%d %s in %.1f ms%s",
            task.id,
            task.queue,
            task.attempt,
            outcome,
            ms,
            f": {detail}" if detail else "",
        )
