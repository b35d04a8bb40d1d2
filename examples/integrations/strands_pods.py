#!/usr/bin/env python3
"""A Strands agent in two processes ("pods") sharing memory and a session through one
hivemem service.

The script starts ``hivemem serve`` on a free loopback port (a SQLite store in a temporary
directory), then:

* **pod A** runs the support agent on session ``support-7`` (its conversation and state
  kept by ``HivememSessionRepository``): the model stores the customer's issue in the
  shared memory with ``store_with_broadcast`` and answers; then pod A exits, as a pod
  that is rescheduled would;
* **pod B**, another process, opens the same session: the agent has pod A's messages and
  state, and the model reads the shared entry back with ``retrieve_shared_data``.

The model is scripted (``scripted.ScriptedModel``), so no key is needed. For a real one,
change the line marked ``MODEL`` in ``model()``, e.g.::

    from strands.models import BedrockModel
    return BedrockModel(model_id="us.anthropic.claude-sonnet-4-20250514-v1:0")

Usage: ``python examples/integrations/strands_pods.py`` (exit 0 when every check passed).
Needs ``pip install 'hivemem[strands]'``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from strands import Agent
from strands.session.repository_session_manager import RepositorySessionManager

import hivemem
from hivemem.integrations.strands import HivememSessionRepository, shared_memory_tools

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pods import run_pods
from scripted import ScriptedModel

SCRIPTS = {
    "pod-a": [
        (
            "tool",
            "store_with_broadcast",
            {"key": "customer-7", "value": {"issue": "refund for order 991"}, "note": "new"},
        ),
        ("text", "I noted your refund request for order 991."),
    ],
    "pod-b": [
        ("tool", "retrieve_shared_data", {"key": "customer-7"}),
        ("text", "Your refund for order 991 is being handled."),
    ],
}


def model(name: str) -> Any:
    """The agent's model in pod ``name``."""
    return ScriptedModel(SCRIPTS[name])  # MODEL


def pod(url: str, name: str) -> None:
    with hivemem.connect_sync(url, agent=name) as hive:
        sessions = RepositorySessionManager(
            session_id="support-7", session_repository=HivememSessionRepository(hive)
        )
        agent = Agent(
            model=model(name),
            tools=shared_memory_tools(hive),
            session_manager=sessions,
            agent_id="support",
            callback_handler=None,
        )
        if name == "pod-a":
            agent.state.set("customer", "customer-7")
            print(f"{name}: {agent('I want a refund for order 991')}".strip())
            return
        assert agent.state.get("customer") == "customer-7"
        assert len(agent.messages) == 4  # pod A's question, tool call, tool result, answer
        reply = agent("any news on my refund?")
        result = json.loads(agent.messages[-2]["content"][0]["toolResult"]["content"][0]["text"])
        assert result["value"] == {"issue": "refund for order 991"} and result["author"] == "pod-a"
        print(f"{name}: resumed {len(agent.messages) - 4} messages after pod A's 4")
        print(f"{name}: read pod A's entry {result['value']}; replied: {str(reply).strip()}")


def main() -> int:
    if len(sys.argv) == 3:
        pod(sys.argv[1], sys.argv[2])
        return 0
    return run_pods(__file__, ["pod-a", "pod-b"])


if __name__ == "__main__":
    sys.exit(main())
