"""How a worker ends what it holds (in process, over an embedded SQLite file): on stop an
async handler is cancelled after ``grace`` and its task released unrun; a sync handler's
thread cannot be stopped, so its lease is held until it returns and its task ends as it
came out (never two runs at once); a sync handler past its timeout fails once it has
returned; ``Fatal`` fails without a retry; ``@hive.worker`` makes a worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import hivemem
from hivemem.worker import Fatal, Worker


@pytest.fixture
async def hive(tmp_path: Path) -> AsyncIterator[hivemem.Hive]:
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path}/w.db", agent="lead", settings=settings) as h:
        yield h


async def test_on_stop_an_async_handler_is_released_after_grace_unrun(hive: hivemem.Hive) -> None:
    task = await hive.submit("jobs", {"n": 1})
    started = asyncio.Event()

    async def slow(t: hivemem.Task) -> int:
        started.set()
        await asyncio.sleep(60)
        return 1

    worker = Worker(hive.as_agent("w"), "jobs", slow, grace=0.2)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(running, 10)
    after = await hive.get_task(task.id)
    assert after is not None and after.state == "ready" and worker.released == 1
    assert after.attempt == 0  # a release does not count the attempt


async def test_on_stop_a_sync_handler_keeps_its_lease_until_it_returns(hive: hivemem.Hive) -> None:
    task = await hive.submit("jobs", {"n": 2})
    started, finish = threading.Event(), threading.Event()

    def blocking(t: hivemem.Task) -> str:
        started.set()
        finish.wait(30)
        return "done"

    worker = Worker(hive.as_agent("w"), "jobs", blocking, grace=0.1)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await asyncio.to_thread(started.wait, 10)
    worker.stop()
    await asyncio.sleep(0.5)  # well past grace: the thread still runs, so it is not released
    held = await hive.get_task(task.id)
    assert held is not None and held.state == "running"
    assert await hive.as_agent("other").claim("jobs") is None  # nobody can run it twice
    finish.set()
    await asyncio.wait_for(running, 10)
    done = await hive.get_task(task.id)
    assert done is not None and done.state == "completed" and done.result == "done"
    assert worker.completed == 1 and worker.released == 0


async def test_a_sync_handler_past_its_timeout_fails_once_it_has_returned(
    hive: hivemem.Hive,
) -> None:
    task = await hive.submit("jobs", {"n": 3}, timeout=1, max_attempts=2, backoff=0)
    returned: list[float] = []

    def overlong(t: hivemem.Task) -> None:
        time.sleep(2.0)
        returned.append(time.monotonic())

    worker = Worker(hive.as_agent("w"), "jobs", overlong)
    running = asyncio.create_task(worker.run(handle_signals=False, max_tasks=1))
    await asyncio.sleep(1.5)  # past the timeout, before the thread returns
    mid = await hive.get_task(task.id)
    assert mid is not None and mid.state == "running" and not returned
    await asyncio.wait_for(running, 10)
    after = await hive.get_task(task.id)
    assert returned and after is not None and after.state == "ready" and worker.failed == 1
    assert "timed out" in after.errors[0].error


async def test_fatal_fails_without_a_retry_and_the_decorator_makes_a_worker(
    hive: hivemem.Hive,
) -> None:
    task = await hive.submit("jobs", {"n": 4}, max_attempts=5)

    @hive.as_agent("w").worker("jobs")
    async def refuse(t: hivemem.Task) -> None:
        raise Fatal("bad payload")

    assert isinstance(refuse, Worker)
    await asyncio.wait_for(refuse.run(handle_signals=False, max_tasks=1), 10)
    after = await hive.get_task(task.id)
    assert after is not None and after.state == "dead" and after.attempt == 1
    assert "bad payload" in after.errors[0].error
