"""Task handlers and agents that tests/test_coordination_processes.py runs in separate
processes (through ``hivemem worker tests._task_jobs:<handler>`` or
``python tests/_task_jobs.py agent URL NAME TTL``).

Each handler appends ``<task id> <attempt>`` to the file ``HIVEMEM_TEST_RUNS`` names
(one write per line, O_APPEND, so lines of several processes never interleave), so a
test can count how often each task ran.
"""

from __future__ import annotations

import asyncio
import os
import sys

import hivemem


def _record(task: hivemem.Task) -> None:
    path = os.environ["HIVEMEM_TEST_RUNS"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task.id} {task.attempt}\n".encode())
    finally:
        os.close(fd)


async def square(task: hivemem.Task) -> int:
    """Return the payload squared."""
    _record(task)
    return int(task.payload) ** 2


async def hang_first(task: hivemem.Task) -> str:
    """Hang on the first attempt (until the process is killed); complete later ones."""
    _record(task)
    if task.attempt == 1:
        await asyncio.sleep(3600)
    return f"done on attempt {task.attempt}"


def agent(url: str, name: str, ttl: float) -> None:
    """Register ``name`` with heartbeats and stay alive (until killed)."""

    async def main() -> None:
        async with hivemem.connect(url, agent=name) as hive:
            await hive.register(name, capabilities=["test"], ttl=ttl)
            print("registered", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())


if __name__ == "__main__":
    if sys.argv[1] == "agent":
        agent(sys.argv[2], sys.argv[3], float(sys.argv[4]))
