"""Group commit of single puts for the server backends (PostgreSQL, Redis).

A backend whose store is a server pays a round trip, and on PostgreSQL a WAL flush, per
statement or script. :class:`PutGroups` lets the single puts a process has waiting go to
the server together: each caller queues its put and awaits its own outcome; up to
``in_flight`` flusher tasks take the waiting puts group after group and send each group
as one statement or script. With two groups in flight the client prepares one while the
server runs the other; with one, the callers all wait for the same reply and client and
server take turns (measured on Redis: 8 callers reached 0.46x of redis-py SETs with one
group in flight, 0.49-0.53x with two).

Each flusher takes its share of the waiting puts (split evenly among the flushers not
sending a group), so 8 callers and two flushers make two groups of 4 rather than one of
8 and an empty one; the backend's ``take`` decides which puts may share a group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["PutGroups"]

P = TypeVar("P")
R = TypeVar("R")


class PutGroups(Generic[P, R]):
    """Queues single puts and sends them in groups.

    Args:
        send: sends one group and returns one outcome per put, in order. An exception
            fails every put of the group with it (the backend decides, before raising,
            what its callers may retry); a cancellation cancels them.
        take: ``take(waiting, share)`` picks the next group from the waiting puts (in
            the order they were made): the indices of at most ``share`` of them, in
            increasing order, the first one always among them. The others keep waiting,
            in their order.
        in_flight: most groups sent at once (flusher tasks).
        name: the flusher tasks' name.
        after: called on the event loop after each group that did not raise, before its
            callers get their outcomes (e.g. to wake this process's watchers).
    """

    def __init__(
        self,
        send: Callable[[list[P]], Awaitable[list[R]]],
        take: Callable[[list[P], int], list[int]],
        *,
        in_flight: int,
        name: str,
        after: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._take = take
        self._in_flight = in_flight
        self._name = name
        self._after = after
        self._waiting: list[tuple[P, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushers = 0
        self._busy = 0

    async def put(self, put: P) -> R:
        """Queue ``put`` and return its outcome once its group was sent.

        Raises:
            Exception: whatever ``send`` raised for the put's group.
        """
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((put, done))
        if self._flushers < self._in_flight:
            self._flushers += 1
            task = asyncio.create_task(self._flush(), name=self._name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await done

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the puts queued or in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)

    async def _flush(self) -> None:
        """Send the waiting puts, group after group, until none wait."""
        try:
            while self._waiting:
                entries = self._waiting
                share = -(-len(entries) // max(1, self._flushers - self._busy))
                chosen = self._take([p for p, _ in entries], share)
                if len(chosen) == len(entries):
                    self._waiting = []
                else:
                    picked = set(chosen)
                    self._waiting = [e for i, e in enumerate(entries) if i not in picked]
                group = [entries[i][0] for i in chosen]
                waiters = [entries[i][1] for i in chosen]
                self._busy += 1
                try:
                    outcomes = await self._send(group)
                except asyncio.CancelledError:
                    for fut in waiters:
                        fut.cancel()
                    raise
                except Exception as exc:
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                finally:
                    self._busy -= 1
                if self._after is not None:
                    self._after()
                for fut, outcome in zip(waiters, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result(outcome)
                # Let the callers just answered run first: those that put again at once
                # join the next group rather than wait for the one after it.
                await asyncio.sleep(0)
        finally:
            self._flushers -= 1
