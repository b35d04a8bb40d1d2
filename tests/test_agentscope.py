"""AgentScope 2.x adapters, through AgentScope's own agent loop (``Agent.reply``) with a
scripted model: an agent's state is kept per session and a second pod continues it (in
this process and in another), keeping what one Agent object kept in memory keeps on the
same script with tool calls; two pods that resumed one session cannot both save; the
memory middleware puts what one agent learnt into another agent's context, and its
tools store and find facts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from agentscope.agent import Agent
from agentscope.message import UserMsg
from agentscope.permission import PermissionBehavior, PermissionDecision
from agentscope.tool import FunctionTool, Toolkit

import hivemem
from hivemem.errors import Conflict
from hivemem.integrations.agentscope import HivememMemoryMiddleware, HivememStateStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "integrations"))
from agentscope_pods import ScriptedModel  # noqa: E402  (the example's scripted model)


def make_agent(steps: list[tuple[Any, ...]], **kwargs: Any) -> tuple[Agent, ScriptedModel]:
    model = ScriptedModel(steps)
    return Agent(name="helper", system_prompt="Help the user.", model=model, **kwargs), model


def ask(text: str) -> Any:
    return UserMsg(name="ann", content=text)


async def test_state_is_kept_per_session_and_another_pod_continues_it(
    hive: hivemem.Hive, ns: str
) -> None:
    states = HivememStateStore(hive, app="support", prefix=ns)
    first, _ = make_agent([("text", "Hello Ann, noted: order 991.")])
    async with states.session(first, user_id="ann", session_id="s1"):
        reply = await first.reply(ask("hi, my order is 991"))
    assert reply.get_text_content() == "Hello Ann, noted: order 991."
    stored = await hive.get(f"{ns}/support/state/ann/helper", "s1")
    assert stored is not None and stored.version == 1
    assert stored.value == first.state.model_dump(mode="json")
    assert first.state.session_id == "s1"

    # Another pod: a new store and agent; the model sees the first turn.
    other = HivememStateStore(hive, app="support", prefix=ns)
    second, model = make_agent([("text", "Order 991 shipped.")])
    async with other.session(second, user_id="ann", session_id="s1"):
        await second.reply(ask("where is it?"))
    assert "my order is 991" in model.sent() and "noted: order 991" in model.sent()
    texts = [m.get_text_content() for m in second.state.context if m.role in ("user", "assistant")]
    assert [t for t in texts if t] == [
        "hi, my order is 991",
        "Hello Ann, noted: order 991.",
        "where is it?",
        "Order 991 shipped.",
    ]
    assert other.version("ann", "helper", "s1") == 2
    assert await other.list_sessions("ann", "helper") == ["s1"]
    # Sessions are per (user, agent): the same id for another user is another session.
    assert await other.load("bob", "helper", "s1") is None


def lookup_order(order_id: str) -> str:
    """The shipping status of an order.

    Args:
        order_id: the order's number.
    """
    return f"order {order_id} shipped on monday"


def order_tools() -> Toolkit:
    allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="test")
    return Toolkit(tools=[FunctionTool(lookup_order, permission=allow)])  # type: ignore[arg-type]


TURNS = [
    ("where is order 991?", [("call", "lookup_order", {"order_id": "991"}), ("text", "Monday.")]),
    ("thanks, and 992?", [("call", "lookup_order", {"order_id": "992"}), ("text", "Monday too.")]),
]


def shape(state: Any) -> list[Any]:
    """What two runs' contexts are compared on (ids and times differ by design)."""
    out = []
    for msg in state.context:
        blocks: list[tuple[Any, ...]] = []
        for b in msg.content if isinstance(msg.content, list) else []:
            if b.type == "text":
                blocks.append(("text", b.text))
            elif b.type == "tool_call":
                blocks.append(("call", b.name, b.input))
            elif b.type == "tool_result":
                output = b.model_dump(mode="json")["output"]
                words = [o.get("text") for o in output] if isinstance(output, list) else output
                blocks.append(("result", b.name, words))
            else:
                blocks.append((b.type,))
        out.append((msg.role, msg.name, blocks))
    return out


async def test_two_pods_keep_what_one_agent_in_memory_keeps(hive: hivemem.Hive, ns: str) -> None:
    """The same two turns with tool calls: one Agent object kept in memory (AgentScope's
    own behaviour), and two pods with the state in hivemem between the turns."""
    alone, _ = make_agent([step for _, steps in TURNS for step in steps], toolkit=order_tools())
    for text, _ in TURNS:
        await alone.reply(ask(text))
    for i, (text, steps) in enumerate(TURNS):
        pod, model = make_agent(steps, toolkit=order_tools())
        async with HivememStateStore(hive, prefix=ns).session(pod, user_id="ann", session_id="s1"):
            await pod.reply(ask(text))
        if i == 1:  # the second pod's model was given the first pod's turn, tool call included
            assert "order 991 shipped on monday" in model.sent(0)
    kept = await HivememStateStore(hive, prefix=ns).load("ann", "helper", "s1")
    assert kept is not None
    assert shape(kept) == shape(alone.state)
    assert [b[0] for m in shape(kept) for b in m[2]].count("call") == 2


async def test_two_pods_that_resumed_one_session_cannot_both_save(
    hive: hivemem.Hive, ns: str
) -> None:
    seed = HivememStateStore(hive, prefix=ns)
    agent, _ = make_agent([("text", "first answer")])
    async with seed.session(agent, user_id="ann", session_id="s1"):
        await agent.reply(ask("first question"))
    pod_a, pod_b = HivememStateStore(hive, prefix=ns), HivememStateStore(hive, prefix=ns)
    a, _ = make_agent([("text", "answer from a")])
    b, _ = make_agent([("text", "answer from b")])
    async with pod_a.session(a, user_id="ann", session_id="s1"):
        await pod_b.load("ann", "helper", "s1")
        b.state = (await pod_b.load("ann", "helper", "s1")) or b.state
        await a.reply(ask("question to a"))
    await b.reply(ask("question to b"))
    with pytest.raises(Conflict) as info:
        await pod_b.save("ann", "helper", "s1", b.state)
    assert info.value.current_version == 2 and "load it again" in str(info.value)
    kept = await HivememStateStore(hive, prefix=ns).load("ann", "helper", "s1")
    assert kept is not None
    kept_texts = json.dumps(kept.model_dump(mode="json"))
    assert "answer from a" in kept_texts and "answer from b" not in kept_texts
    # A store that never read the session cannot overwrite it either.
    with pytest.raises(Conflict):
        await HivememStateStore(hive, prefix=ns).save("ann", "helper", "s1", b.state)
    # After loading again, pod b's save goes through.
    await pod_b.load("ann", "helper", "s1")
    assert await pod_b.save("ann", "helper", "s1", b.state) == 3
    assert await pod_b.delete("ann", "helper", "s1") is True
    assert await pod_b.load("ann", "helper", "s1") is None


async def test_a_failed_turn_leaves_the_stored_state_as_it_was(hive: hivemem.Hive, ns: str) -> None:
    states = HivememStateStore(hive, prefix=ns)
    agent, _ = make_agent([("text", "ok")])
    async with states.session(agent, user_id="ann", session_id="s1"):
        await agent.reply(ask("one"))
    with pytest.raises(RuntimeError, match="boom"):
        async with states.session(agent, user_id="ann", session_id="s1"):
            agent.state.summary = "changed"
            raise RuntimeError("boom")
    kept = await states.load("ann", "helper", "s1")
    assert kept is not None and kept.summary == ""


_POD = """
import asyncio, sys
sys.path.insert(0, "tests")
import hivemem
from test_agentscope import TURNS, ask, make_agent, order_tools
from hivemem.integrations.agentscope import HivememStateStore

async def main():
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(sys.argv[1], agent="pod-b", settings=settings) as hive:
        states = HivememStateStore(hive, prefix=sys.argv[2])
        text, steps = TURNS[1]
        agent, model = make_agent(steps, toolkit=order_tools())
        async with states.session(agent, user_id="ann", session_id="s1"):
            await agent.reply(ask(text))
        # the first pod's turn reached this model, its tool call and result included
        print("SAW-FIRST-TURN" if "order 991 shipped on monday" in model.sent(0) else "MISSING")

asyncio.run(main())
"""


async def test_a_second_process_continues_the_session(sqlite_file_url: str, ns: str) -> None:
    async with hivemem.connect(sqlite_file_url, agent="pod-a") as hive:
        states = HivememStateStore(hive, prefix=ns)
        text, steps = TURNS[0]
        agent, _ = make_agent(steps, toolkit=order_tools())
        async with states.session(agent, user_id="ann", session_id="s1"):
            await agent.reply(ask(text))
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(_POD), sqlite_file_url, ns],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "SAW-FIRST-TURN", out.stderr
    async with hivemem.connect(sqlite_file_url, agent="pod-a") as hive:
        kept = await HivememStateStore(hive, prefix=ns).load("ann", "helper", "s1")
    assert kept is not None and "Monday too." in json.dumps(kept.model_dump(mode="json"))
    # both pods' tool calls are in the one conversation, as one in-memory Agent keeps them
    assert [b[0] for m in shape(kept) for b in m[2]].count("call") == 2


async def test_what_one_agent_learnt_reaches_another_agents_context(
    hive: hivemem.Hive, ns: str
) -> None:
    mw = HivememMemoryMiddleware(hive, user_id="ann", prefix=ns, mode="static_control")
    first, _ = make_agent([("text", "Oolong it is, I will remember.")], middlewares=[mw])
    await first.reply(ask("my favourite tea is oolong"))
    stored = (await hive.list(mw.namespace)).items
    assert len(stored) == 1 and stored[0].key.startswith("x.")
    assert stored[0].value["user"] == "my favourite tea is oolong"
    assert stored[0].value["assistant"] == "Oolong it is, I will remember."

    # Another agent (another pod, a new session) with the same user's memory.
    other = HivememMemoryMiddleware(hive, user_id="ann", prefix=ns, mode="static_control")
    second, model = make_agent([("text", "You like oolong.")], middlewares=[other])
    await second.reply(ask("which tea do I like?"))
    assert "Relevant memories" in model.sent() and "favourite tea is oolong" in model.sent()
    assert "search_memory" not in model.sent()  # static control: no tools, no nudge
    # Another user's agent finds nothing of Ann's.
    bob = HivememMemoryMiddleware(hive, user_id="bob", prefix=ns, mode="static_control")
    third, bob_model = make_agent([("text", "I do not know.")], middlewares=[bob])
    await third.reply(ask("which tea do I like?"))
    assert "oolong" not in bob_model.sent()


async def test_the_memory_tools_store_facts_once_and_find_them(hive: hivemem.Hive, ns: str) -> None:
    mw = HivememMemoryMiddleware(hive, user_id="ann", agent_id="planner", prefix=ns)
    fact = "Ann is allergic to peanuts."
    steps = [
        ("call", "add_memory", {"thinking": "a health fact", "content": [fact]}),
        ("call", "add_memory", {"thinking": "again", "content": [fact]}),
        ("call", "search_memory", {"keywords": ["peanuts", "allergy"]}),
        ("text", "Noted your allergy."),
    ]
    agent, model = make_agent(steps, middlewares=[mw], toolkit=Toolkit(tools=await mw.list_tools()))
    await agent.reply(ask("remember that I am allergic to peanuts"))
    assert "search_memory" in model.sent(0) and "Long-term memory" in model.sent(0)
    facts = [i for i in (await hive.list(mw.namespace)).items if i.key.startswith("f.")]
    assert [f.value["text"] for f in facts] == [fact]  # added twice, kept once
    assert "Recorded 1 fact" in model.sent(1)
    assert f"- {fact}" in model.sent(3)  # the search's result reached the model
    # An agent with another agent_id but scope_search_by_agent=False finds it too.
    shared = HivememMemoryMiddleware(
        hive, user_id="ann", agent_id="writer", prefix=ns, scope_search_by_agent=False
    )
    assert fact in await shared.search("peanuts")
    own = HivememMemoryMiddleware(hive, user_id="ann", agent_id="writer", prefix=ns)
    assert await own.search("peanuts") == []


async def test_agent_control_mode_only_gives_tools(hive: hivemem.Hive, ns: str) -> None:
    mw = HivememMemoryMiddleware(hive, user_id="ann", prefix=ns, mode="agent_control")
    await mw.add("Ann lives in Lisbon.")
    agent, model = make_agent(
        [("text", "ok")], middlewares=[mw], toolkit=Toolkit(tools=await mw.list_tools())
    )
    await agent.reply(ask("where do I live? Lisbon?"))
    assert "Relevant memories" not in model.sent()
    assert "search_memory" in model.sent()
    assert len((await hive.list(mw.namespace)).items) == 1  # no exchange stored


async def test_bad_arguments_are_refused(hive: hivemem.Hive) -> None:
    with pytest.raises(ValueError, match="user_id"):
        HivememMemoryMiddleware(hive, user_id=" ")
    with pytest.raises(ValueError, match="mode"):
        HivememMemoryMiddleware(hive, user_id="ann", mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        HivememMemoryMiddleware(hive, user_id="ann", top_k=0)
    quiet = HivememMemoryMiddleware(hive, user_id="ann", mode="static_control")
    assert await quiet.list_tools() == []
