"""Google ADK adapters: ADK's Runner, driven by a scripted model with a tool call, keeps in
HivememSessionService what it keeps in ADK's InMemorySessionService; a stale session copy
raises StaleSessionError; temp: state is never stored, user: and app: state are shared; a
second process resumes a session; the memory service finds what a session said."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from google.adk.agents import LlmAgent
from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.sessions.in_memory_session_service import InMemorySessionService
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import PrivateAttr

import hivemem
from hivemem.integrations.adk import HivememMemoryService, HivememSessionService

REPO = Path(__file__).resolve().parents[1]
SETTINGS = hivemem.Settings(embedder="none")


class ScriptedLlm(BaseLlm):
    """Plays its steps in order: ``("call", name, args)`` or ``("text", words)``; keeps
    the requests it was given."""

    model: str = "scripted"
    _steps: list[tuple[Any, ...]] = PrivateAttr(default_factory=list)
    _seen: list[LlmRequest] = PrivateAttr(default_factory=list)

    def __init__(self, steps: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self._steps = list(steps)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self._seen.append(llm_request)
        step = self._steps.pop(0) if self._steps else ("text", "done")
        if step[0] == "call":
            call = types.FunctionCall(name=step[1], args=step[2], id=f"call-{len(self._seen)}")
            part = types.Part(function_call=call)
        else:
            part = types.Part(text=step[1])
        yield LlmResponse(content=types.Content(role="model", parts=[part]))


def remember(fact: str, tool_context: ToolContext) -> dict[str, Any]:
    """Remember a fact about the user.

    Args:
        fact: what to remember.
    """
    tool_context.state["user:fact"] = fact
    tool_context.state["app:facts_seen"] = tool_context.state.get("app:facts_seen", 0) + 1
    tool_context.state["temp:scratch"] = "never stored"
    tool_context.state["turns"] = tool_context.state.get("turns", 0) + 1
    return {"remembered": fact}


def agent(steps: list[tuple[Any, ...]]) -> LlmAgent:
    return LlmAgent(name="helper", model=ScriptedLlm(steps), tools=[remember])


SCRIPT = [("call", "remember", {"fact": "likes tea"}), ("text", "Noted: you like tea.")]


async def run_turn(service: Any, session_id: str, steps: list[tuple[Any, ...]], text: str) -> None:
    runner = Runner(agent=agent(steps), app_name="app", session_service=service)
    message = types.Content(role="user", parts=[types.Part(text=text)])
    async for _ in runner.run_async(user_id="ann", session_id=session_id, new_message=message):
        pass


def shape(events: list[Event]) -> list[Any]:
    """What two services' events are compared on (ids and times differ by design)."""
    return [
        (
            e.author,
            e.content.model_dump(mode="json", exclude_none=True) if e.content else None,
            dict(e.actions.state_delta) if e.actions else {},
        )
        for e in events
    ]


async def test_the_runner_keeps_what_the_in_memory_service_keeps(
    hive: hivemem.Hive, ns: str
) -> None:
    ours, theirs = HivememSessionService(hive, prefix=ns), InMemorySessionService()
    for service in (ours, theirs):
        await service.create_session(app_name="app", user_id="ann", session_id="s1")
        await run_turn(service, "s1", SCRIPT, "I like tea")
    mine = await ours.get_session(app_name="app", user_id="ann", session_id="s1")
    other = await theirs.get_session(app_name="app", user_id="ann", session_id="s1")
    assert mine is not None and other is not None
    assert shape(mine.events) == shape(other.events)
    assert len(mine.events) == 4  # the question, the call, its response, the answer
    assert mine.state == other.state
    assert mine.state == {"user:fact": "likes tea", "app:facts_seen": 1, "turns": 1}
    for ask in ({"num_recent_events": 2}, {"num_recent_events": 0}, {"after_timestamp": 2}):
        configs = [
            GetSessionConfig(**ask)
            if "after_timestamp" not in ask
            else GetSessionConfig(after_timestamp=s.events[2].timestamp)
            for s in (mine, other)  # each service's own clock
        ]
        a = await ours.get_session(
            app_name="app", user_id="ann", session_id="s1", config=configs[0]
        )
        b = await theirs.get_session(
            app_name="app", user_id="ann", session_id="s1", config=configs[1]
        )
        assert a is not None and b is not None
        assert shape(a.events) == shape(b.events)
    listed = await ours.list_sessions(app_name="app", user_id="ann")
    assert [s.id for s in listed.sessions] == ["s1"] and listed.sessions[0].events == []


async def test_temp_state_is_never_stored_and_user_and_app_state_are_shared(
    hive: hivemem.Hive, ns: str
) -> None:
    service = HivememSessionService(hive, prefix=ns)
    await service.create_session(app_name="app", user_id="ann", session_id="s1")
    await run_turn(service, "s1", SCRIPT, "I like tea")
    raw = await hive.list(ns, limit=1000)
    assert "never stored" not in json.dumps([i.value for i in raw.items])
    second = await service.create_session(app_name="app", user_id="ann", session_id="s2")
    assert second.state == {"user:fact": "likes tea", "app:facts_seen": 1}
    other_user = await service.create_session(app_name="app", user_id="bob", session_id="s3")
    assert other_user.state == {"app:facts_seen": 1}
    assert await service.get_user_state(app_name="app", user_id="ann") == {"fact": "likes tea"}


async def test_a_stale_session_copy_appending_an_event_raises(hive: hivemem.Hive, ns: str) -> None:
    service = HivememSessionService(hive, prefix=ns)
    await service.create_session(app_name="app", user_id="ann", session_id="s1")
    first = await service.get_session(app_name="app", user_id="ann", session_id="s1")
    stale = await service.get_session(app_name="app", user_id="ann", session_id="s1")
    assert first is not None and stale is not None
    delta = EventActions(state_delta={"n": 1})
    await service.append_event(first, Event(author="user", invocation_id="i1", actions=delta))
    with pytest.raises(StaleSessionError):
        await service.append_event(
            stale,
            Event(author="user", invocation_id="i2", actions=EventActions(state_delta={"n": 2})),
        )
    stored = await service.get_session(app_name="app", user_id="ann", session_id="s1")
    assert stored is not None and stored.state == {"n": 1} and len(stored.events) == 1
    # The copy that appended is current: it appends again.
    await service.append_event(first, Event(author="user", invocation_id="i3"))


async def test_concurrent_appends_from_two_copies_keep_one_and_refuse_the_other(
    hive: hivemem.Hive, ns: str
) -> None:
    service = HivememSessionService(hive, prefix=ns)
    await service.create_session(app_name="app", user_id="ann", session_id="s1")
    copies = [
        await service.get_session(app_name="app", user_id="ann", session_id="s1") for _ in range(4)
    ]
    results = await asyncio.gather(
        *(
            service.append_event(c, Event(author="user", invocation_id=f"i{i}"))  # type: ignore[arg-type]
            for i, c in enumerate(copies)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, StaleSessionError) for r in results if isinstance(r, BaseException))
    stored = await service.get_session(app_name="app", user_id="ann", session_id="s1")
    assert stored is not None and len(stored.events) == 1


_TURN = """
import asyncio, sys
sys.path.insert(0, "tests")
import hivemem
from test_adk import SCRIPT, run_turn
from hivemem.integrations.adk import HivememSessionService

async def main():
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(sys.argv[1], agent="pod-a", settings=settings) as hive:
        service = HivememSessionService(hive)
        await service.create_session(app_name="app", user_id="ann", session_id="s9")
        await run_turn(service, "s9", SCRIPT, "I like tea")

asyncio.run(main())
"""


async def test_a_second_process_resumes_the_session(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/adk.db"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(_TURN), url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    async with hivemem.connect(url, agent="pod-b", settings=SETTINGS) as hive:
        service = HivememSessionService(hive)
        llm = ScriptedLlm([("text", "You like tea.")])
        runner = Runner(
            agent=LlmAgent(name="helper", model=llm, tools=[remember]),
            app_name="app",
            session_service=service,
        )
        message = types.Content(role="user", parts=[types.Part(text="what do I like?")])
        async for _ in runner.run_async(user_id="ann", session_id="s9", new_message=message):
            pass
        seen = json.dumps([c.model_dump(mode="json") for c in llm._seen[0].contents])
        assert "I like tea" in seen and "likes tea" in seen
        session = await service.get_session(app_name="app", user_id="ann", session_id="s9")
        assert session is not None and len(session.events) == 6


async def test_the_memory_service_finds_what_a_session_said(hive: hivemem.Hive, ns: str) -> None:
    sessions = HivememSessionService(hive, prefix=ns)
    memory = HivememMemoryService(hive, prefix=ns)
    await sessions.create_session(app_name="app", user_id="ann", session_id="s1")
    await run_turn(sessions, "s1", SCRIPT, "I like green tea in the morning")
    session = await sessions.get_session(app_name="app", user_id="ann", session_id="s1")
    assert session is not None
    await memory.add_session_to_memory(session)
    await memory.add_session_to_memory(session)  # again: nothing twice
    # Both memories ranked by vector and words: while the indexer has embedded one and
    # not the other, the ranking is by whichever has a vector (a CI run saw the reply
    # first on the session's shared store).
    assert await hive.wait_indexed(timeout=60)
    found = await memory.search_memory(app_name="app", user_id="ann", query="green tea morning")
    texts = [m.content.parts[0].text for m in found.memories if m.content.parts]
    assert texts and "green tea" in (texts[0] or "")
    assert len({m.id for m in found.memories}) == len(found.memories)
    other = await memory.search_memory(app_name="app", user_id="bob", query="green tea")
    assert other.memories == []


async def test_artifacts_behave_as_adks_in_memory_artifact_service(
    hive: hivemem.Hive, ns: str
) -> None:
    from google.adk.artifacts.in_memory_artifact_service import InMemoryArtifactService

    from hivemem.integrations.adk import HivememArtifactService

    ours, theirs = HivememArtifactService(hive, prefix=ns), InMemoryArtifactService()
    png = types.Part(inline_data=types.Blob(mime_type="image/png", data=b"\x89PNG\x00\x01"))
    where = {"app_name": "app", "user_id": "ann"}

    async def both(method: str, **kw: Any) -> tuple[Any, Any]:
        return await getattr(ours, method)(**where, **kw), await getattr(theirs, method)(
            **where, **kw
        )

    for kw in (
        {"filename": "report.txt", "session_id": "s1", "artifact": types.Part(text="v0")},
        {"filename": "report.txt", "session_id": "s1", "artifact": types.Part(text="v1")},
        {"filename": "user:avatar.png", "session_id": "s1", "artifact": png},
        {"filename": "notes/a b.md", "session_id": "s2", "artifact": {"text": "dict form"}},
    ):
        a, b = await both("save_artifact", **kw, custom_metadata={"by": "test"})
        assert a == b
    for kw in (
        {"filename": "report.txt", "session_id": "s1"},
        {"filename": "report.txt", "session_id": "s1", "version": 0},
        {"filename": "report.txt", "session_id": "s1", "version": 7},
        {"filename": "user:avatar.png", "session_id": "s9"},
        {"filename": "missing", "session_id": "s1"},
    ):
        a, b = await both("load_artifact", **kw)
        assert a == b, kw
    for session_id in ("s1", "s2", None):
        a, b = await both("list_artifact_keys", session_id=session_id)
        assert a == b, session_id
    a, b = await both("list_versions", filename="report.txt", session_id="s1")
    assert a == b == [0, 1]
    a, b = await both("list_artifact_versions", filename="report.txt", session_id="s1")
    assert [(v.version, v.mime_type, v.custom_metadata) for v in a] == [
        (v.version, v.mime_type, v.custom_metadata) for v in b
    ]
    a, b = await both("get_artifact_version", filename="user:avatar.png", session_id="s1")
    assert a is not None and b is not None and a.mime_type == b.mime_type == "image/png"
    await both("delete_artifact", filename="report.txt", session_id="s1")
    a, b = await both("list_artifact_keys", session_id="s1")
    assert a == b == ["user:avatar.png"]
    a, b = await both("save_artifact", filename="report.txt", session_id="s1", artifact=png)
    assert a == b == 0  # numbering starts again after a delete
