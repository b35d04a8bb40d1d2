#!/usr/bin/env python3
"""A Google ADK agent in two processes ("pods") sharing a session through one hivemem
service.

The script starts ``hivemem serve`` on a free loopback port (a SQLite store in a temporary
directory), then:

* **pod A** runs the agent with ``Runner(..., session_service=HivememSessionService(hive))``
  on session ``trip-3``: the model calls the ``remember`` tool, which writes ``user:home``
  (the user's state, shared by all their sessions) and ``temp:draft`` (never stored);
* **pod B**, another process, continues the session: the model is given pod A's turn,
  and a new session of the same user starts with ``user:home`` already set.

The model is scripted (a ``BaseLlm`` that plays its steps), so no key is needed. For a
real one, change the line marked ``MODEL`` in ``model()`` to ``return "gemini-2.5-flash"``
(with ``GOOGLE_API_KEY`` set).

Usage: ``python examples/integrations/adk_pods.py`` (exit 0 when every check passed).
Needs ``pip install 'hivemem[adk]'``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from google.adk.agents import LlmAgent
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import PrivateAttr

import hivemem
from hivemem.integrations.adk import HivememSessionService

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pods import run_pods

#: What the model was given, call by call.
SEEN: list[str] = []


class ScriptedLlm(BaseLlm):
    """Plays its steps in order: ``("call", name, args)`` or ``("text", words)``."""

    model: str = "scripted"
    _steps: list[tuple[Any, ...]] = PrivateAttr(default_factory=list)

    def __init__(self, steps: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self._steps = list(steps)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        SEEN.append(str([c.model_dump(mode="json") for c in llm_request.contents]))
        step = self._steps.pop(0) if self._steps else ("text", "done")
        if step[0] == "call":
            call = types.FunctionCall(name=step[1], args=step[2], id="call-1")
            part = types.Part(function_call=call)
        else:
            part = types.Part(text=step[1])
        yield LlmResponse(content=types.Content(role="model", parts=[part]))


SCRIPTS = {
    "pod-a": [("call", "remember", {"home": "Lisbon"}), ("text", "Noted: you live in Lisbon.")],
    "pod-b": [("text", "You told me you live in Lisbon.")],
}


def model(name: str) -> Any:
    """The agent's model in pod ``name``."""
    return ScriptedLlm(SCRIPTS[name])  # MODEL


def remember(home: str, tool_context: ToolContext) -> dict[str, Any]:
    """Remember where the user lives.

    Args:
        home: the user's home town.
    """
    tool_context.state["user:home"] = home
    tool_context.state["temp:draft"] = "not kept"
    return {"remembered": home}


async def pod(url: str, name: str) -> None:
    async with hivemem.connect(url, agent=name) as hive:
        sessions = HivememSessionService(hive)
        runner = Runner(
            agent=LlmAgent(name="travel", model=model(name), tools=[remember]),
            app_name="travel",
            session_service=sessions,
        )
        if name == "pod-a":
            await sessions.create_session(app_name="travel", user_id="ann", session_id="trip-3")
        text = "I live in Lisbon" if name == "pod-a" else "where do I live?"
        message = types.Content(role="user", parts=[types.Part(text=text)])
        async for event in runner.run_async(
            user_id="ann", session_id="trip-3", new_message=message
        ):
            if event.content and event.content.parts and event.content.parts[0].text:
                print(f"{name}: {event.content.parts[0].text}")
        if name == "pod-b":
            assert "I live in Lisbon" in SEEN[0], "pod A's turn was not given to the model"
            other = await sessions.create_session(app_name="travel", user_id="ann")
            assert other.state == {"user:home": "Lisbon"}, other.state
            print(f"{name}: a new session of ann starts with {other.state}")


def main() -> int:
    if len(sys.argv) == 3:
        asyncio.run(pod(sys.argv[1], sys.argv[2]))
        return 0
    return run_pods(__file__, ["pod-a", "pod-b"])


if __name__ == "__main__":
    sys.exit(main())
