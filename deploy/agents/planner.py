"""The compose topology's planner agent: stores a fact, asks the researcher about it
through the task queue, waits for the answer, and prints ``round trip ok`` (exit 0) when
the answer holds the fact.

    HIVEMEM_URL=http://proxy:8765 python planner.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import hivemem


async def main() -> int:
    async with hivemem.connect(os.environ["HIVEMEM_URL"], agent="planner") as hive:
        run = uuid.uuid4().hex[:8]
        fact = f"the launch code name of run {run} is heron"
        await hive.put("facts", f"launch-{run}", {"text": fact})
        task = await hive.submit("questions", {"question": f"launch code name run {run}"})
        done = await hive.result(task.id, wait=float(os.environ.get("WAIT_SECONDS", "60")))
        if done.state != "completed" or fact not in done.result["facts"]:
            print(f"no answer: {done.state} {done.result}", file=sys.stderr)
            return 1
        print(f"round trip ok: {done.result['facts'][0]}")
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
