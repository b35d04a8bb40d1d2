"""The coordination promises across processes, on every shared store kind (a SQLite
file, PostgreSQL, Redis, Redis Cluster, and the service over each of them): workers in
separate processes started with ``hivemem worker``, killed with SIGKILL where the
promise is about dying. The Redis Cluster and service cases are marked ``matrix``
(``.ci/run`` runs them after the default suite)."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import hivemem

from .conftest import store_url_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "_task_jobs.py"
#: Shared store kinds (an in-memory SQLite store cannot be shared by processes).
KINDS = [
    "sqlite-file",
    "postgres",
    "redis",
    pytest.param("redis-cluster", marks=pytest.mark.matrix),
    # moto's server answers one request at a time: the thousand tasks take minutes (over
    # 300 s in one CI rehearsal on a slow day, so 900 s for both DynamoDB cases)
    pytest.param("dynamodb", marks=[pytest.mark.matrix, pytest.mark.timeout(900)]),
    # the service over each store: its processes are the longest of these cases
    # (.ci/run's matrix pass)
    pytest.param("remote", marks=pytest.mark.matrix),
    pytest.param("remote-postgres", marks=pytest.mark.matrix),
    pytest.param("remote-redis", marks=pytest.mark.matrix),
    pytest.param("remote-redis-cluster", marks=pytest.mark.matrix),
    pytest.param("remote-dynamodb", marks=[pytest.mark.matrix, pytest.mark.timeout(900)]),
]


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest) -> str:
    return store_url_of(request, request.param)


@pytest.fixture
async def hive(url: str) -> AsyncIterator[hivemem.Hive]:
    async with hivemem.connect(url, agent="boss") as h:
        yield h


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def start_worker(
    url: str, queue: str, handler: str, runs: Path, concurrency: int, *, lease: float = 30
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hivemem",
            "worker",
            f"tests._task_jobs:{handler}",
            "--queue",
            queue,
            "--concurrency",
            str(concurrency),
            "--lease",
            str(lease),
            "--url",
            url,
            "--grace",
            "1",
        ],
        cwd=ROOT,
        env={**os.environ, "HIVEMEM_TEST_RUNS": str(runs)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def run_counts(runs: Path) -> collections.Counter[tuple[str, int]]:
    if not runs.exists():
        return collections.Counter()
    lines = runs.read_text().split()
    return collections.Counter(zip(lines[0::2], map(int, lines[1::2]), strict=True))


async def test_a_thousand_tasks_five_workers_three_processes_each_completes_once(
    hive: hivemem.Hive, url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    queue = f"q{uuid.uuid4().hex[:8]}/squares"
    runs = tmp_path / "runs.txt"
    for concurrency in (2, 2, 1):
        procs.append(start_worker(url, queue, "square", runs, concurrency))
    submitters = [hive.as_agent(f"boss{i}") for i in range(4)]
    tasks: list[hivemem.Task] = []

    async def submit(n: int) -> None:
        tasks.append(await submitters[n % 4].submit(queue, n))

    gate = asyncio.Semaphore(32)

    async def bounded(n: int) -> None:
        async with gate:
            await submit(n)

    await asyncio.gather(*(bounded(n) for n in range(1000)))

    async def outcome(task: hivemem.Task) -> hivemem.Task:
        async with gate:
            return await hive.result(task.id, wait=120)

    done = await asyncio.gather(*(outcome(t) for t in tasks))
    assert [t.state for t in done] == ["completed"] * 1000
    assert sorted(t.result for t in done) == sorted(int(t.payload) ** 2 for t in tasks)
    counts = run_counts(runs)
    assert set(counts) == {(t.id, 1) for t in tasks}  # every task ran, on its first attempt
    assert set(counts.values()) == {1}  # and exactly once
    workers = {t.claimed_by for t in done}
    assert len(workers) == 3, workers  # every process took part
    stats = await hive.queue_stats(queue)
    assert (stats.completed, stats.ready, stats.running, stats.dead) == (1000, 0, 0, 0)
    page = await hive.read_events(f"_tasks/{queue}", after="0", limit=1000)
    events = list(page.items)
    while page.next_cursor and len(page.items) == 1000:
        page = await hive.read_events(f"_tasks/{queue}", after=page.next_cursor, limit=1000)
        events.extend(page.items)
    completed = collections.Counter(e.key for e in events if e.type == "task.completed")
    assert len(completed) == 1000 and set(completed.values()) == {1}


async def test_kill_9_of_a_worker_holding_tasks_they_run_again_once_and_waiters_get_results(
    hive: hivemem.Hive, url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    queue = f"q{uuid.uuid4().hex[:8]}/fragile"
    runs = tmp_path / "runs.txt"
    tasks = [await hive.submit(queue, n) for n in range(3)]
    waiters = [asyncio.create_task(hive.result(t.id, wait=60)) for t in tasks]
    # heartbeats every lease/3 = 1 s: the worker's process may stall up to 2 s before a
    # lease runs out (the agent test's 1 s ttl, with 0.67 s, failed once in CI)
    lease = 3.0
    doomed = start_worker(url, queue, "hang_first", runs, 3, lease=lease)
    procs.append(doomed)
    deadline = time.monotonic() + 30
    while len(run_counts(runs)) < 3:
        assert time.monotonic() < deadline, "the worker did not claim the tasks"
        await asyncio.sleep(0.1)
    await asyncio.sleep(lease + 1.0)  # past one lease: heartbeats keep the tasks held
    assert all(not w.done() for w in waiters)
    states = [(await hive.get_task(t.id)) for t in tasks]
    assert [t.state for t in states if t is not None] == ["running"] * 3
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    killed_at = time.monotonic()
    procs.append(start_worker(url, queue, "hang_first", runs, 3, lease=lease))
    done = await asyncio.wait_for(asyncio.gather(*waiters), 60)
    assert [t.state for t in done] == ["completed"] * 3
    assert [t.result for t in done] == ["done on attempt 2"] * 3
    assert all([e.error for e in t.errors] == ["lease expired"] for t in done)
    assert time.monotonic() - killed_at < lease + 15  # lease + settle + worker start
    counts = run_counts(runs)
    assert counts == collections.Counter({(t.id, a): 1 for t in tasks for a in (1, 2)})


async def test_an_agent_killed_with_kill_9_is_down_within_its_ttl_plus_5_s_with_one_event(
    hive: hivemem.Hive, url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    # heartbeats every ttl/3 = 1 s: the agent's process may stall up to 2 s (a busy CI
    # machine's fsync or scheduling; ttl 1 s left 0.67 s and failed once) before it
    # counts as down, which would fail both the health check and the one-event count
    ttl = 3.0
    head = await hive.head()
    proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the agent runs apart)
        [sys.executable, str(JOBS), "agent", url, name, str(ttl)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    procs.append(proc)  # type: ignore[arg-type]
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert line.strip() == b"registered"
    await asyncio.sleep(ttl * 1.5)  # alive past its ttl: heartbeats work
    assert name in [a.name for a in await hive.agents(capability="test")]
    proc.kill()
    proc.wait(timeout=10)
    killed_at = time.monotonic()
    while name not in [a.name for a in await hive.agents(healthy=False)]:
        assert time.monotonic() - killed_at < ttl + 5, "not reported down within ttl + 5 s"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # more coordination rounds pass
    page = await hive.read_events("_agents", after=head, limit=1000)
    mine = [e.type for e in page.items if e.key == name]
    assert mine.count("agent.down") == 1 and mine[-1] == "agent.down"
