"""The compose topology's researcher agent: a worker answering the planner's questions
(queue ``questions``) from the facts the hive holds, until stopped (or ``MAX_TASKS``).

    HIVEMEM_URL=http://proxy:8765 python researcher.py
"""

from __future__ import annotations

import asyncio
import os

import hivemem


async def main() -> None:
    async with hivemem.connect(os.environ["HIVEMEM_URL"], agent="researcher") as hive:

        @hive.worker("questions", concurrency=2)
        async def answer(task: hivemem.Task) -> dict[str, object]:
            hits = await hive.search("facts", task.payload["question"], mode="lexical", limit=3)
            return {"facts": [h.item.value["text"] for h in hits]}

        await answer.run(max_tasks=int(os.environ.get("MAX_TASKS", "0")) or None)


if __name__ == "__main__":
    asyncio.run(main())
