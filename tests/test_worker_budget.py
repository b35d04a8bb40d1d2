"""Worker.run(max_tasks=N) runs exactly N tasks and returns, whatever its concurrency
(a concurrency above N once made it stop before claiming anything)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import hivemem
from hivemem.worker import Worker


@pytest.mark.parametrize(("concurrency", "budget"), [(4, 2), (1, 2), (2, 1)])
async def test_max_tasks_runs_that_many_tasks(
    tmp_path: Path, concurrency: int, budget: int
) -> None:
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(
        f"sqlite:///{tmp_path}/w.db", agent="lead", settings=settings
    ) as hive:
        for i in range(3):
            await hive.submit("jobs", {"n": i})
        ran: list[int] = []

        async def handler(task: hivemem.Task) -> int:
            ran.append(task.payload["n"])
            return task.payload["n"]

        worker = Worker(hive.as_agent("w"), "jobs", handler, concurrency=concurrency)
        await asyncio.wait_for(worker.run(handle_signals=False, max_tasks=budget), 30)
        stats = await hive.queue_stats("jobs")
    assert len(ran) == budget and worker.completed == budget
    assert (stats.completed, stats.ready) == (budget, 3 - budget)
