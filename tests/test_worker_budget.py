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


async def test_a_lease_with_less_left_than_a_third_of_it_is_renewed_before_it_ends(
    tmp_path: Path,
) -> None:
    """A claim the worker learns of late (a busy store answers after the lease started)
    is renewed within half of what is left of it, not after a third of its length."""
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path}/w.db", agent="w", settings=settings) as hive:
        await hive.submit("jobs", {"n": 1})
        claimed = await hive.claim("jobs", lease=30)
        assert claimed is not None
        # As if the answer came 28 s after the store took the claim: 2 s of 30 are left.
        late = await hive.heartbeat(claimed, lease=2)
        worker = Worker(hive, "jobs", lambda task: None, lease=30)
        keeping = asyncio.create_task(worker._keep(late.model_copy(update={"lease_seconds": 30.0})))
        try:
            await asyncio.sleep(1.6)
            now = await hive.get_task(claimed.id)
        finally:
            keeping.cancel()
    assert now is not None and now.state == "running"
    assert now.lease_expires_at is not None and late.lease_expires_at is not None
    assert now.lease_expires_at > late.lease_expires_at  # renewed, by 30 s
