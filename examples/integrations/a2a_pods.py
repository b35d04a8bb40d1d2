#!/usr/bin/env python3
"""An A2A agent served by two replicas ("pods") over one hivemem service, found by a client
through hivemem's agent registry.

The script starts ``hivemem serve`` on a free loopback port, then two replica processes of
the ``greeter`` agent, each ``uvicorn`` running ``serve_agent(executor, card, hive)``: its
tasks live in hivemem (``HivememTaskStore``) and it registers itself in the registry while
it runs. The client finds the greeter with ``hive.agents(capability="greet")``, starts a
task on one replica (the agent asks for a name), answers on the other, and reads the
finished task back from the first: one task, two replicas, no turn lost.

The agent needs no model. Usage: ``python examples/integrations/a2a_pods.py`` (exit 0 when
every check passed). Needs ``pip install 'hivemem[a2a]' uvicorn``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

import uvicorn
from a2a.client.client_factory import create_client
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message
from a2a.server.agent_execution.agent_executor import AgentExecutor
from a2a.server.agent_execution.context import RequestContext
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import a2a_pb2 as pb

import hivemem
from hivemem.integrations.a2a import serve_agent


class Greeter(AgentExecutor):
    """Asks for a name on a new task, then greets it, naming the replica that answered."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def execute(self, context: RequestContext, event_queue: Any) -> None:
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        if context.current_task is None:
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        if context.current_task is None:
            await updater.requires_input(
                updater.new_agent_message([pb.Part(text=f"{self.replica}: your name?")])
            )
            return
        name = get_message_text(context.message)
        await updater.complete(
            updater.new_agent_message([pb.Part(text=f"{self.replica}: hello {name}")])
        )

    async def cancel(self, context: RequestContext, event_queue: Any) -> None:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replica(hive_url: str, port: int, name: str) -> None:
    url = f"http://127.0.0.1:{port}"
    app = serve_agent(Greeter(name), card(url), hivemem.connect(hive_url, agent=name), name=name)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def client(hive_url: str) -> None:
    async with hivemem.connect(hive_url, agent="client") as hive:
        for _ in range(300):
            found = await hive.agents(capability="greet")
            if len(found) == 2:
                break
            await asyncio.sleep(0.1)
        print("registry:", ", ".join(f"{a.name} at {a.endpoint}" for a in found))
        first, second = [await create_client(a.endpoint) for a in found]

        async def send(to: Any, text: str, task: pb.Task | None = None) -> pb.Task:
            message = pb.Message(
                role=pb.Role.ROLE_USER,
                message_id=uuid.uuid4().hex,
                task_id=task.id if task else "",
                context_id=task.context_id if task else "",
                parts=[pb.Part(text=text)],
            )
            last = None
            async for response in to.send_message(pb.SendMessageRequest(message=message)):
                last = response
            assert last is not None
            return last.task

        started = await send(first, "hi")
        print("turn 1:", get_message_text(started.status.message))
        done = await send(second, "Ada", started)
        print("turn 2:", get_message_text(done.status.message))
        stored = await first.get_task(pb.GetTaskRequest(id=started.id))
        assert stored.status.state == pb.TaskState.TASK_STATE_COMPLETED
        print("history:", [get_message_text(m) for m in stored.history])


def main() -> int:
    if len(sys.argv) == 4:
        replica(sys.argv[1], int(sys.argv[2]), sys.argv[3])
        return 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HIVEMEM_EMBEDDER": "none"}
        serve = [sys.executable, "-m", "hivemem", "serve", "--port", str(port)]
        procs = [
            subprocess.Popen(
                [*serve, "--store", f"sqlite:///{tmp}/hive.db", "--log-level", "warning"],
                env=env,
            )
        ]
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/readyz", timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print("the service did not start", file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            procs += [
                subprocess.Popen([sys.executable, __file__, url, str(free_port()), f"greeter-{i}"])
                for i in range(2)
            ]
            asyncio.run(client(url))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=10)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
