"""HivememSession (OpenAI Agents SDK ``Session``): the SDK's Runner, driven by its
ScriptedModel with a tool call, keeps the same conversation as the SDK's own
SQLiteSession; a second process resumes it; two processes appending at once keep every
item once; limit, pop and clear behave as SQLiteSession's do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, SQLiteSession, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

import hivemem
from hivemem.integrations.openai_agents import HivememSession

REPO = Path(__file__).resolve().parents[1]
SETTINGS = hivemem.Settings(embedder="none")
set_tracing_disabled(True)


@function_tool
def lookup_order(order_id: str) -> str:
    """The status of an order.

    Args:
        order_id: the order's number.
    """
    return f"order {order_id} shipped on monday"


def _agent() -> Agent:
    model = ScriptedModel(
        [
            [function_call("lookup_order", {"order_id": "991"}, call_id="call-1")],
            [assistant_message("Your order 991 shipped on Monday.")],
        ]
    )
    return Agent(name="support", instructions="Help.", model=model, tools=[lookup_order])


def _json(items: list[Any]) -> list[Any]:
    return json.loads(json.dumps(items, default=str))


async def test_the_runner_keeps_what_sqlite_session_keeps(hive: hivemem.Hive, ns: str) -> None:
    ours = HivememSession("s-1", hive, prefix=ns)
    theirs = SQLiteSession("s-1")
    for session in (ours, theirs):
        result = await Runner.run(_agent(), "where is my order 991?", session=session)
        assert result.final_output == "Your order 991 shipped on Monday."
    kept = _json(await ours.get_items())
    assert kept == _json(await theirs.get_items())
    assert [i.get("type", "message") for i in kept] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert _json(await ours.get_items(limit=2)) == _json(await theirs.get_items(limit=2))
    assert _json([await ours.pop_item()]) == _json([await theirs.pop_item()])
    assert _json(await ours.get_items()) == _json(await theirs.get_items())
    await ours.clear_session()
    await theirs.clear_session()
    assert await ours.get_items() == [] == await theirs.get_items()
    assert await ours.pop_item() is None
    await ours.add_items([{"role": "user", "content": "again"}])
    assert await ours.get_items() == [{"role": "user", "content": "again"}]


_TURN = """
import sys
sys.path.insert(0, "tests")
import hivemem
from agents import Runner
from test_openai_agents import _agent
from hivemem.integrations.openai_agents import HivememSession

settings = hivemem.Settings(embedder="none")
with hivemem.connect_sync(sys.argv[1], agent="pod-a", settings=settings) as hive:
    session = HivememSession("s-2", hive)
    out = Runner.run_sync(_agent(), "where is my order 991?", session=session)
    print(out.final_output)
"""


async def test_a_second_process_resumes_the_conversation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/oa.db"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(_TURN), url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "shipped on Monday" in done.stdout
    model = ScriptedModel([[assistant_message("You asked about order 991.")]])
    agent = Agent(name="support", model=model)
    async with hivemem.connect(url, agent="pod-b", settings=SETTINGS) as hive:
        session = HivememSession("s-2", hive)
        result = await Runner.run(agent, "what did I ask?", session=session)
        assert result.final_output == "You asked about order 991."
        seen = json.dumps(model.calls[0].input, default=str)
        assert "where is my order 991?" in seen and "shipped on monday" in seen
        assert len(await session.get_items()) == 6


_APPEND = """
import asyncio, sys
import hivemem
from hivemem.integrations.openai_agents import HivememSession

async def main():
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(sys.argv[1], agent=sys.argv[2], settings=settings) as hive:
        session = HivememSession("s-3", hive)
        for i in range(25):
            await session.add_items([{"role": "user", "content": f"{sys.argv[2]} {i}"}])

asyncio.run(main())
"""


@pytest.mark.slow
def test_two_processes_appending_at_once_keep_every_item_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    with hivemem.connect_sync(url, agent="setup", settings=SETTINGS):
        pass
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_APPEND), url, name],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("pod-a", "pod-b")
    ]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with hivemem.connect_sync(url, agent="reader", settings=SETTINGS) as hive:
        items = asyncio.run(HivememSession("s-3", hive).get_items())
        contents = [i["content"] for i in items]
        assert sorted(contents) == sorted(f"{w} {i}" for w in ("pod-a", "pod-b") for i in range(25))
        for writer in ("pod-a", "pod-b"):  # each writer's items keep their order
            mine = [c for c in contents if c.startswith(writer)]
            assert mine == [f"{writer} {i}" for i in range(25)]
        head = hive.get(HivememSession("s-3", hive).namespace, "head")
        assert head is not None and head.value == {"next": 50}
