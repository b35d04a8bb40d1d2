#!/usr/bin/env python3
"""An OpenAI Agents SDK agent in two processes ("pods") sharing a conversation through
one hivemem service.

The script starts ``hivemem serve`` on a free loopback port (a SQLite store in a temporary
directory), then:

* **pod A** runs the support agent with ``Runner.run_sync(..., session=HivememSession(
  "customer-7", hive))``: the model calls the ``lookup_order`` tool and answers; the
  conversation (question, tool call, tool output, answer) is kept in hivemem;
* **pod B**, another process, runs the next turn on the same session: the model is given
  pod A's conversation before the new question.

The model is the SDK's ``agents.testing.ScriptedModel``, so no key is needed. For a real
one, change the line marked ``MODEL`` in ``model()`` to ``return "gpt-4o-mini"`` (with
``OPENAI_API_KEY`` set).

Usage: ``python examples/integrations/openai_agents_pods.py`` (exit 0 when every check
passed). Needs ``pip install 'hivemem[openai-agents]'``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

import hivemem
from hivemem.integrations.openai_agents import HivememSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pods import run_pods

SCRIPTS: dict[str, list[Any]] = {
    "pod-a": [
        [function_call("lookup_order", {"order_id": "991"}, call_id="call-1")],
        [assistant_message("Order 991 shipped on Monday.")],
    ],
    "pod-b": [[assistant_message("You asked about order 991, which shipped on Monday.")]],
}


def model(name: str) -> Any:
    """The agent's model in pod ``name``."""
    return ScriptedModel(SCRIPTS[name])  # MODEL


@function_tool
def lookup_order(order_id: str) -> str:
    """The shipping status of an order.

    Args:
        order_id: the order's number.
    """
    return f"order {order_id} shipped on monday"


def pod(url: str, name: str) -> None:
    set_tracing_disabled(True)
    with hivemem.connect_sync(url, agent=name) as hive:
        session = HivememSession("customer-7", hive)
        brain = model(name)
        agent = Agent(name="support", instructions="Help.", model=brain, tools=[lookup_order])
        question = "where is my order 991?" if name == "pod-a" else "what did I ask you?"
        result = Runner.run_sync(agent, question, session=session)
        print(f"{name}: {result.final_output}")
        if name == "pod-b":
            seen = json.dumps(brain.calls[0].input, default=str)
            assert "where is my order 991?" in seen and "shipped on monday" in seen
            print(f"{name}: the model was given pod A's conversation before the question")


def main() -> int:
    if len(sys.argv) == 3:
        pod(sys.argv[1], sys.argv[2])
        return 0
    return run_pods(__file__, ["pod-a", "pod-b"])


if __name__ == "__main__":
    sys.exit(main())
