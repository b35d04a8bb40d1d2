"""How a result waiter waits (core/taskwaits.py): for its task's event, not by polling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hivemem
from hivemem.config import Settings


async def test_a_result_waiter_reads_its_task_once_before_and_once_after_its_wait(
    tmp_path: Path,
) -> None:
    # A SQLite file: no notification names task events, so one follower reads them.
    async with hivemem.connect(
        f"sqlite:///{tmp_path / 'w.db'}", agent="boss", settings=Settings(embedder="none")
    ) as hive:
        task = await hive.submit("jobs", {"n": 1})
        backend: Any = hive._backend  # type: ignore[attr-defined]
        real = backend.get_task
        reads: list[str] = []

        async def counted(task_id: str) -> Any:
            reads.append(task_id)
            return await real(task_id)

        backend.get_task = counted
        # 2.5 s with the 1 s safety poll of the feed: one read a second until the
        # waiter's own safety net (30 s) replaced it.
        waited = await hive.result(task.id, wait=2.5)
        assert waited.state == "ready"
        assert reads == [task.id, task.id]  # the first look, and the look at the deadline
