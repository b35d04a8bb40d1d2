"""Strands adapters through Strands' real agent loop with a scripted model: the six
shared-memory tools, the session repository (restored in a second process; two processes
appending to one session), and the memory store behind a MemoryManager."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from strands import Agent
from strands.memory.memory_manager import MemoryManager
from strands.memory.types import AddMessagesContext
from strands.session.repository_session_manager import RepositorySessionManager
from strands.types.exceptions import SessionException
from strands.types.session import SessionAgent, SessionMessage

import hivemem
from hivemem.integrations.strands import (
    HivememMemoryStore,
    HivememSessionRepository,
    shared_memory_tools,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "integrations"
sys.path.insert(0, str(EXAMPLES))
from scripted import ScriptedModel  # noqa: E402  (the examples' scripted model)

SETTINGS = hivemem.Settings(embedder="none")


@pytest.fixture
def hive(hive_url: str) -> Iterator[hivemem.SyncHive]:
    """A SyncHive acting as ``pod-a`` on each store kind (embedded and the service)."""
    remote = hive_url.startswith("http")
    with hivemem.connect_sync(hive_url, agent="pod-a", settings=None if remote else SETTINGS) as h:
        yield h


def _tool_results(agent: Agent) -> list[Any]:
    """The JSON each tool returned, in order, from the agent's conversation."""
    out = []
    for message in agent.messages:
        for block in message["content"]:
            if "toolResult" in block:
                out.append(json.loads(block["toolResult"]["content"][0]["text"]))
    return out


def test_the_agent_calls_each_of_the_six_tools(hive: hivemem.SyncHive, ns: str) -> None:
    model = ScriptedModel(
        [
            ("tool", "store_shared_data", {"key": "plan", "value": {"step": 1}, "area": "team"}),
            ("tool", "retrieve_shared_data", {"key": "plan", "area": "team"}),
            (
                "tool",
                "store_shared_data",
                {"key": "plan", "value": 2, "area": "team", "if_version": 7},
            ),
            ("tool", "list_memory_keys", {"prefix": "pl", "area": "team"}),
            ("tool", "store_fast_memory", {"key": "scratch", "value": "tmp", "ttl_seconds": 60}),
            ("tool", "get_fast_memory", {"key": "scratch"}),
            ("tool", "store_with_broadcast", {"key": "result", "value": [1, 2], "note": "ready"}),
            ("text", "all stored"),
        ]
    )
    head = hive.head()
    agent = Agent(model=model, tools=shared_memory_tools(hive, namespace=ns), callback_handler=None)
    reply = agent("remember the plan")
    assert "all stored" in str(reply)

    stored, read, refused, keys, fast, fast_read, broadcast = _tool_results(agent)
    assert stored == {"stored": "plan", "version": 1, "author": "pod-a"}
    assert read["found"] and read["value"] == {"step": 1} and read["author"] == "pod-a"
    assert "Conflict" in refused["error"] and refused["field"] == "if_version"
    assert keys == {"keys": ["plan"], "more": False}
    assert fast["stored"] == "scratch" and fast["expires_at"]
    assert fast_read["found"] and fast_read["value"] == "tmp"
    assert broadcast["stored"] == "result"

    item = hive.get(f"{ns}/team", "plan")
    assert item is not None and item.value == {"step": 1} and item.version == 1
    assert hive.get(ns, "result").value == [1, 2]  # type: ignore[union-attr]
    events = hive.read_events(f"{ns}/broadcast", after=head).items
    assert [e.data for e in events if e.type == "publish"] == [
        {"key": "result", "version": 1, "author": "pod-a", "note": "ready"}
    ]


_RESUME = """
import json, sys
import hivemem
from strands import Agent
from strands.session.repository_session_manager import RepositorySessionManager
from hivemem.integrations.strands import HivememSessionRepository
sys.path.insert(0, "examples/integrations")
from scripted import ScriptedModel

url, agent_name = sys.argv[1], sys.argv[2]
settings = hivemem.Settings(embedder="none")
with hivemem.connect_sync(url, agent=agent_name, settings=settings) as hive:
    manager = RepositorySessionManager(
        session_id="s-1", session_repository=HivememSessionRepository(hive)
    )
    model = ScriptedModel([("text", "noted: blue")])
    agent = Agent(model=model, session_manager=manager, agent_id="helper", callback_handler=None)
    agent.state.set("colour", "blue")
    agent("my favourite colour is blue")
    print(json.dumps({"messages": agent.messages, "state": agent.state.get()}))
"""


def test_a_session_restored_in_a_second_process_has_its_messages_and_state(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/sessions.db"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RESUME), url, "pod-a"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    first = json.loads(done.stdout.strip().splitlines()[-1])
    with hivemem.connect_sync(url, agent="pod-b", settings=SETTINGS) as hive:
        manager = RepositorySessionManager(
            session_id="s-1", session_repository=HivememSessionRepository(hive)
        )
        model = ScriptedModel([("text", "you said blue")])
        agent = Agent(
            model=model, session_manager=manager, agent_id="helper", callback_handler=None
        )
        assert json.loads(json.dumps(agent.messages)) == first["messages"]
        assert agent.state.get() == first["state"] == {"colour": "blue"}
        agent("what is my favourite colour?")
        # The model saw the first process's conversation before the new question.
        texts = [b.get("text") for m in model.seen[0] for b in m["content"]]
        assert "my favourite colour is blue" in texts and "noted: blue" in texts


_APPEND = """
import sys
import hivemem
from strands.types.session import SessionMessage
from hivemem.integrations.strands import HivememSessionRepository

url, writer = sys.argv[1], sys.argv[2]
with hivemem.connect_sync(url, agent=writer, settings=hivemem.Settings(embedder="none")) as hive:
    repo = HivememSessionRepository(hive)
    for i in range(20):
        message = SessionMessage(
            message={"role": "user", "content": [{"text": f"{writer} {i}"}]}, message_id=i
        )
        repo.create_message("s-2", "helper", message)
        if i % 5 == 0:  # a retry of the same write
            repo.create_message("s-2", "helper", message)
"""


def test_two_processes_appending_to_one_session_keep_every_message_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    with hivemem.connect_sync(url, agent="setup", settings=SETTINGS):
        pass  # the store exists before the writers race to create it
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
        messages = HivememSessionRepository(hive).list_messages("s-2", "helper")
    texts = [m.message["content"][0]["text"] for m in messages]
    assert sorted(texts) == sorted(f"{w} {i}" for w in ("pod-a", "pod-b") for i in range(20))
    assert [m.message_id for m in messages] == sorted(m.message_id for m in messages)
    page = HivememSessionRepository(hive := hivemem.connect_sync(url, agent="r", settings=SETTINGS))
    try:
        assert len(page.list_messages("s-2", "helper", limit=5, offset=38)) == 2
    finally:
        hive.close()


def test_a_stale_copy_of_an_agents_state_is_refused(hive: hivemem.SyncHive, ns: str) -> None:
    first = HivememSessionRepository(hive, prefix=ns)
    second = HivememSessionRepository(hive, prefix=ns)
    agent = SessionAgent(agent_id="helper", state={"n": 0}, conversation_manager_state={})
    first.create_agent("s-3", agent)
    assert second.read_agent("s-3", "helper") is not None
    first.update_agent("s-3", SessionAgent("helper", {"n": 1}, {}))
    with pytest.raises(SessionException, match="changed by another process"):
        second.update_agent("s-3", SessionAgent("helper", {"n": 2}, {}))
    found = first.read_agent("s-3", "helper")
    assert found is not None and found.state == {"n": 1}


def test_messages_are_read_updated_and_listed_by_id(hive: hivemem.SyncHive, ns: str) -> None:
    repo = HivememSessionRepository(hive, prefix=ns)
    for i in range(3):
        repo.create_message(
            "s-4", "a", SessionMessage({"role": "user", "content": [{"text": f"m{i}"}]}, i)
        )
    redacted = SessionMessage(
        {"role": "user", "content": [{"text": "m1"}]},
        1,
        redact_message={"role": "user", "content": [{"text": "[redacted]"}]},
    )
    repo.update_message("s-4", "a", redacted)
    got = repo.read_message("s-4", "a", 1)
    assert got is not None and got.redact_message is not None
    assert [m.message_id for m in repo.list_messages("s-4", "a", offset=1)] == [1, 2]
    assert repo.read_message("s-4", "a", 9) is None
    with pytest.raises(SessionException):
        repo.update_message("s-4", "a", SessionMessage({"role": "user", "content": []}, 9))


def test_a_message_redacted_by_another_process_is_replaced_not_copied(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/redact.db"
    with (
        hivemem.connect_sync(url, agent="pod-a", settings=SETTINGS) as a,
        hivemem.connect_sync(url, agent="pod-b", settings=SETTINGS) as b,
    ):
        writer, redactor = HivememSessionRepository(a), HivememSessionRepository(b)
        writer.create_message(
            "s-5", "x", SessionMessage({"role": "user", "content": [{"text": "secret"}]}, 0)
        )
        redactor.update_message(
            "s-5",
            "x",
            SessionMessage(
                {"role": "user", "content": [{"text": "secret"}]},
                0,
                redact_message={"role": "user", "content": [{"text": "[redacted]"}]},
            ),
        )
        listed = writer.list_messages("s-5", "x")
        assert len(listed) == 1
        assert listed[0].redact_message == {"role": "user", "content": [{"text": "[redacted]"}]}
        got = writer.read_message("s-5", "x", 0)
        assert got is not None and got.redact_message is not None


def test_the_memory_store_behind_a_memory_manager(hive: hivemem.SyncHive, ns: str) -> None:
    store = HivememMemoryStore(hive, namespace=f"{ns}/mem")
    import asyncio

    async def fill() -> None:
        await store.add("the staging database password rotates every monday")
        await store.add("the staging database password rotates every monday")  # once
        batch = [
            {"role": "user", "content": [{"text": "deploys freeze on fridays"}]},
            {"role": "assistant", "content": [{"text": "noted"}]},
        ]
        context = AddMessagesContext(sequence_numbers=[0, 1])
        assert await store.add_messages(batch, context) == 2  # type: ignore[arg-type]
        assert await store.add_messages(batch, context) == 0  # a retry: nothing twice
        other = [{"role": "user", "content": [{"text": "a new run starts again at 0"}]}]
        assert await store.add_messages(other, AddMessagesContext([0])) == 1  # type: ignore[arg-type]

    asyncio.run(fill())
    assert len(hive.list(f"{ns}/mem").items) == 4

    model = ScriptedModel(
        [("tool", "search_memory", {"query": "when do deploys freeze"}), ("text", "fridays")]
    )
    agent = Agent(
        model=model,
        memory_manager=MemoryManager(stores=[store], injection=False),
        callback_handler=None,
    )
    agent("when can I deploy?")
    (found,) = [
        block["toolResult"]
        for m in agent.messages
        for block in m["content"]
        if "toolResult" in block
    ]
    assert found["status"] == "success"
    assert "deploys freeze on fridays" in json.dumps(found["content"])


def test_a_multi_agent_graph_keeps_its_state_in_the_session(
    hive: hivemem.SyncHive, ns: str
) -> None:
    """A Strands Graph of two agents (scripted) persists its execution state through the
    repository's multi-agent methods: created, then updated as nodes complete."""
    import warnings

    from strands.multiagent.graph import GraphBuilder

    def build(repo: HivememSessionRepository) -> Any:
        builder = GraphBuilder()
        for name, answer in (("research", "facts"), ("write", "report")):
            node = Agent(name=name, model=ScriptedModel([("text", answer)]), callback_handler=None)
            builder.add_node(node, name)
        builder.add_edge("research", "write")
        builder.set_entry_point("research")
        builder.set_graph_id("g1")
        builder.set_session_manager(
            RepositorySessionManager(session_id="g-1", session_repository=repo)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unbounded execution: two scripted nodes
            return builder.build()

    result = build(HivememSessionRepository(hive, prefix=ns))("write the report")
    assert str(result.status).endswith("COMPLETED")
    state = HivememSessionRepository(hive, prefix=ns).read_multi_agent("g-1", "g1")
    assert state is not None and state["status"] == "completed"
    assert sorted(state["completed_nodes"]) == ["research", "write"]
    item = hive.get(f"{ns}/g-1", "multi.g1")
    assert item is not None and item.version >= 3  # created, then updated per node
