"""An A2A server replica for tests/test_a2a.py: ``python -m tests._a2a_server HIVE_URL PORT
NAME`` serves the greeter agent with :func:`hivemem.integrations.a2a.serve_agent` on
127.0.0.1:PORT, its tasks in the hive at HIVE_URL (a hivemem service).

The greeter asks for a name on a new task (input required), then completes the task with
a greeting that names the replica that finished it, so a test sees which replica served
each turn of one task."""

from __future__ import annotations

import sys

import uvicorn
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message
from a2a.server.agent_execution.agent_executor import AgentExecutor
from a2a.server.agent_execution.context import RequestContext
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import a2a_pb2 as pb

import hivemem
from hivemem.integrations.a2a import serve_agent


class Greeter(AgentExecutor):
    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def execute(self, context: RequestContext, event_queue: object) -> None:
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        if context.current_task is None:
            await event_queue.enqueue_event(task)  # type: ignore[attr-defined]
        updater = TaskUpdater(event_queue, task.id, task.context_id)  # type: ignore[arg-type]
        if context.current_task is None:
            ask = updater.new_agent_message([pb.Part(text=f"{self.replica}: your name?")])
            await updater.requires_input(ask)
            return
        name = get_message_text(context.message)
        done = updater.new_agent_message([pb.Part(text=f"{self.replica}: hello {name}")])
        await updater.complete(done)

    async def cancel(self, context: RequestContext, event_queue: object) -> None:
        raise NotImplementedError


def card(url: str) -> pb.AgentCard:
    return pb.AgentCard(
        name="greeter",
        description="Greets you by name.",
        version="1.0",
        supported_interfaces=[
            pb.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=pb.AgentCapabilities(streaming=False),
        skills=[pb.AgentSkill(id="greet", name="greet", description="greets", tags=["hello"])],
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
    )


def main() -> None:
    hive_url, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    url = f"http://127.0.0.1:{port}"
    app = serve_agent(Greeter(name), card(url), hivemem.connect(hive_url, agent=name), name=name)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
