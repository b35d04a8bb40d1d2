"""Change signals: how feed watchers and task waiters of one process learn that the
feed may have grown, and what a notification says of task events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ChangeSignal", "TaskHint", "parse_task_hints", "task_hints"]


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
        ``max_wait`` seconds. A cancellation is never lost, even one that lands as the
        change is signalled (Python 3.11's ``asyncio.wait_for`` then returns normally
        instead: a watcher so cancelled, by Ctrl-C say, would go on waiting)."""
        if self.generation != generation:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            async with asyncio.timeout(max_wait):
                await fut
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)
