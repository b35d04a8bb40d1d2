#!/usr/bin/env python3
"""An AgentScope 2.x agent in two processes ("pods") sharing its session and long-term
memory through one hivemem service.

The script starts ``hivemem serve`` on a free loopback port (a SQLite store in a temporary
directory), then:

* **pod A** runs the concierge agent on session ``s1`` of user ann
  (``HivememStateStore.session``) with ``HivememMemoryMiddleware``: ann says her
  favourite tea is oolong; the agent's state and the exchange are kept in hivemem;
* **pod B**, another process, first continues ``s1`` (its model is given pod A's turn),
  then starts a new session ``s2``: the middleware recalls the tea from long-term memory
  and puts it in the model's context.

The model is scripted (``ScriptedModel`` below, which the project's tests use too), so no
key is needed. For a real one, change the line marked ``MODEL`` in ``model()``, e.g. to
``return OpenAIChatModel(model="gpt-4o-mini", credential=OpenAICredential(api_key=...))``
(with ``from agentscope.model import OpenAIChatModel`` and
``from agentscope.credential import OpenAICredential``).

Usage: ``python examples/integrations/agentscope_pods.py`` (exit 0 when every check
passed). Needs ``pip install 'hivemem[agentscope]'``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from agentscope.agent import Agent
from agentscope.credential import CredentialBase
from agentscope.formatter import OpenAIChatFormatter
from agentscope.message import TextBlock, ToolCallBlock, UserMsg
from agentscope.model import ChatModelBase, ChatResponse
from pydantic import BaseModel

import hivemem
from hivemem.integrations.agentscope import HivememMemoryMiddleware, HivememStateStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pods import run_pods


class ScriptedModel(ChatModelBase):
    """An AgentScope 2.x chat model that plays its steps in order: ``("call", name,
    args)`` (a tool call) or ``("text", words)``, then ``"done"``; it keeps every request
    as the OpenAI formatter formats it (``seen``)."""

    class Parameters(BaseModel):
        pass

    def __init__(self, steps: list[tuple[Any, ...]]) -> None:
        super().__init__(
            credential=CredentialBase(),
            model="scripted",
            parameters=self.Parameters(),
            stream=False,
            max_retries=0,
        )
        self.formatter = OpenAIChatFormatter()
        self.steps = list(steps)
        self.seen: list[list[dict[str, Any]]] = []

    async def _call_api(  # type: ignore[override]
        self, model_name: str, messages: list[Any], **_: Any
    ) -> ChatResponse:
        self.seen.append(await self.formatter.format(messages))
        step = self.steps.pop(0) if self.steps else ("text", "done")
        if step[0] == "call":
            block = ToolCallBlock(
                id=f"call-{len(self.seen)}", name=step[1], input=json.dumps(step[2])
            )
            return ChatResponse(content=[block], is_last=True)
        return ChatResponse(content=[TextBlock(text=step[1])], is_last=True)

    def sent(self, call: int = -1) -> str:
        """The ``call``-th request as JSON (everything the model could read)."""
        return json.dumps(self.seen[call])


SCRIPTS: dict[str, list[tuple[Any, ...]]] = {
    "pod-a": [("text", "Oolong, noted.")],
    "pod-b": [("text", "You told me: oolong."), ("text", "Oolong, as you like it.")],
}


def model(name: str) -> Any:
    """The agent's model in pod ``name``."""
    return ScriptedModel(SCRIPTS[name])  # MODEL


async def pod(url: str, name: str) -> None:
    async with hivemem.connect(url, agent=name) as hive:
        states = HivememStateStore(hive, app="concierge")
        memory = HivememMemoryMiddleware(hive, user_id="ann", app="concierge")
        brain = model(name)
        agent = Agent(
            name="concierge", system_prompt="Help ann.", model=brain, middlewares=[memory]
        )
        if name == "pod-a":
            async with states.session(agent, user_id="ann", session_id="s1"):
                reply = await agent.reply(
                    UserMsg(name="ann", content="My favourite tea is oolong.")
                )
            print(f"{name}: {reply.get_text_content()}")
            return
        async with states.session(agent, user_id="ann", session_id="s1"):
            reply = await agent.reply(UserMsg(name="ann", content="What did I just say?"))
        print(f"{name}, s1: {reply.get_text_content()}")
        if isinstance(brain, ScriptedModel):
            assert "My favourite tea is oolong." in brain.sent(0)
            print(f"{name}: the model was given pod A's turn of s1")
        async with states.session(agent, user_id="ann", session_id="s2"):
            reply = await agent.reply(UserMsg(name="ann", content="Which tea should I order?"))
        print(f"{name}, s2: {reply.get_text_content()}")
        if isinstance(brain, ScriptedModel):
            assert "Relevant memories" in brain.sent(1) and "oolong" in brain.sent(1)
            print(f"{name}: a new session recalled the tea from long-term memory")


def main() -> int:
    if len(sys.argv) == 3:
        asyncio.run(pod(sys.argv[1], sys.argv[2]))
        return 0
    return run_pods(__file__, ["pod-a", "pod-b"])


if __name__ == "__main__":
    sys.exit(main())
