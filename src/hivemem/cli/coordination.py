"""Commands for coordination: ``hivemem tasks`` (ls, show, stats, requeue, cancel),
``hivemem agents status`` and ``hivemem worker``. ``hivemem.cli`` registers them."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, cast

import typer

import hivemem
from hivemem.cli.common import (
    Limit,
    Run,
    UrlOpt,
    client,
    err,
    guard,
    preview,
    root_options,
    table,
    ts,
)
from hivemem.errors import InvalidInput, NotFound
from hivemem.models import Task

__all__ = [
    "agents_status",
    "tasks_cancel",
    "tasks_list",
    "tasks_requeue",
    "tasks_show",
    "tasks_stats",
    "worker",
]

Queue = Annotated[str, typer.Argument(help="Queue name, e.g. research/summaries.")]
TaskId = Annotated[str, typer.Argument(help="Task id (from submit, ls or the feed).")]


def _task_rows(tasks: list[Task]) -> list[list[Any]]:
    return [
        [
            t.id,
            t.state,
            t.attempt,
            t.max_attempts,
            t.priority,
            t.claimed_by or "",
            ts(t.created_at),
            preview(t.payload, 40),
        ]
        for t in tasks
    ]


def _show_task(t: Task) -> None:
    fields = t.model_dump(exclude={"id", "errors", "payload", "result"})
    rows = [[k, ts(v) if isinstance(v, datetime) else v] for k, v in fields.items()]
    rows.append(["payload", preview(t.payload, 200)])
    rows.append(["result", preview(t.result, 200)])
    table(["task", t.id], rows)
    if t.errors:
        table(
            ["attempt", "at", "worker", "error"],
            [[e.attempt, ts(e.at), e.worker, e.error] for e in t.errors],
            title="errors",
        )


@client
def tasks_list(
    run: Run,
    queue: Queue,
    state: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Only tasks in this state: ready, delayed, running, completed, dead, cancelled.",
        ),
    ] = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, typer.Option(show_default=False, help="Continue here.")] = None,
) -> None:
    """List a queue's tasks in submission order (one page; --cursor continues)."""
    page = run.hive.list_tasks(queue, state=state, limit=limit, cursor=cursor)

    def human() -> None:
        table(
            ["id", "state", "attempt", "max", "priority", "worker", "submitted", "payload"],
            _task_rows(list(page.items)),
        )
        if page.next_cursor:
            err.print(f"more: --cursor {page.next_cursor}")

    run.emit(page.model_dump(mode="json"), human)


@client
def tasks_show(run: Run, task_id: TaskId) -> None:
    """Show one task: its state, payload, result and each failed attempt's error."""
    task = run.hive.get_task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}", field="task_id")
    run.emit(task.model_dump(mode="json"), lambda: _show_task(task))


@client
def tasks_stats(run: Run, queue: Queue) -> None:
    """Count a queue's tasks by state and say how long the oldest due one has waited."""
    stats = run.hive.queue_stats(queue)
    oldest = stats.oldest_ready_seconds
    run.emit(
        stats.model_dump(mode="json"),
        lambda: table(
            ["ready", "delayed", "running", "completed", "dead", "cancelled", "oldest ready"],
            [
                [
                    stats.ready,
                    stats.delayed,
                    stats.running,
                    stats.completed,
                    stats.dead,
                    stats.cancelled,
                    "" if oldest is None else f"{oldest:.1f} s",
                ]
            ],
            title=f"queue {queue}",
        ),
    )


@client
def tasks_requeue(
    run: Run,
    task_id: TaskId,
    delay: Annotated[float, typer.Option(min=0, help="Seconds before it may be claimed.")] = 0,
) -> None:
    """Put a dead or cancelled task back on its queue with fresh attempts."""
    task = run.hive.requeue(task_id, delay=delay)
    run.emit(task.model_dump(mode="json"), lambda: err.print(f"task {task.id} is {task.state}"))


@client
def tasks_cancel(run: Run, task_id: TaskId) -> None:
    """Cancel a ready, delayed or running task (its worker is refused on its next heartbeat)."""
    task = run.hive.cancel(task_id)
    run.emit(task.model_dump(mode="json"), lambda: err.print(f"task {task.id} is {task.state}"))


@client
def agents_status(
    run: Run,
    capability: Annotated[
        str | None, typer.Option(show_default=False, help="Only agents with this capability.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Include agents that are down.")] = False,
) -> None:
    """Show registered agents: who is alive, their capabilities and last heartbeat."""
    records = run.hive.agents(capability=capability, healthy=None if every else True)
    run.emit(
        [r.model_dump(mode="json") for r in records],
        lambda: table(
            ["name", "status", "capabilities", "endpoint", "last seen", "ttl"],
            [
                [
                    r.name,
                    "up" if r.healthy else "down",
                    ", ".join(r.capabilities),
                    r.endpoint or "",
                    ts(r.last_seen),
                    f"{r.ttl:g} s",
                ]
                for r in records
            ],
        ),
    )


def _load_handler(target: str) -> Callable[..., Any]:
    """The function ``module:function`` names (a Worker's handler when it is one).

    Raises:
        InvalidInput: ``target`` is malformed, its module does not import, or what it names
            is missing or not callable (field ``target``).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"expected module:function, got {target!r}", field="target")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules of the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"cannot import {module_name!r}: {exc}", field="target") from exc
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise InvalidInput(f"{module_name!r} has no {attr!r}", field="target")
    from hivemem.worker import Worker

    if isinstance(found, Worker):
        found = found.fn
    if not callable(found):
        raise InvalidInput(f"{target!r} is not callable", field="target")
    return cast(Callable[..., Any], found)


def worker(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="The handler, module:function (sync or async; gets a Task).")
    ],
    queue: Annotated[str, typer.Option(help="Queue to take tasks from.")],
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="Tasks run at once.")] = 1,
    lease: Annotated[
        float, typer.Option(min=0.1, max=86400, help="Seconds a claim holds a task (renewed).")
    ] = 30.0,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds tasks in hand may finish after SIGTERM.")
    ] = 10.0,
    url: UrlOpt = None,
    agent: Annotated[
        str | None,
        typer.Option(show_default=False, help="Agent identity (default: worker-<host>-<pid>)."),
    ] = None,
) -> None:
    """Run a worker: claim tasks of --queue and run the handler on each, --concurrency at
    a time, with automatic heartbeats. The handler's return value completes the task, an
    exception fails the attempt (retried after the task's backoff). SIGTERM or Ctrl-C
    stops claiming; tasks in hand get --grace seconds, then go back to the queue. One log
    line per task on stderr.

    [cyan]hivemem worker myapp.jobs:summarise --queue summaries --concurrency 4 --url http://hive:8765[/]
    """
    import asyncio
    import logging
    import os
    import socket

    from hivemem.worker import Worker

    base = root_options(ctx)
    name = agent or (base.agent if base.agent != "cli" else None)
    if name is None:
        host = re.sub(r"[^A-Za-z0-9_.:@+-]", "-", socket.gethostname())[:80] or "host"
        name = f"worker-{host}-{os.getpid()}"
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        handler = _load_handler(target)
        async with hivemem.connect(url or base.url, agent=name) as hive:
            await Worker(
                hive, queue, handler, concurrency=concurrency, lease=lease, grace=grace
            ).run()

    with guard():
        asyncio.run(main())
