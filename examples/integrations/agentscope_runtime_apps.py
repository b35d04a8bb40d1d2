"""Two AgentScope Runtime apps, three processes, one hive: the deployment the AgentScope
Runtime design describes (several ``AgentApp`` services, shared state in one store,
orchestration through ``/process``).

- ``researcher``: an ``AgentApp`` whose ReActAgent keeps its working memory per session
  in hivemem (:class:`~hivemem.integrations.agentscope_runtime.HivememSession`) and its
  long-term memory in hivemem search
  (:class:`~hivemem.integrations.agentscope_runtime.HivememLongTermMemory`, static
  control: it recalls before and records after each reply).
- ``planner``, two replicas: an ``AgentApp`` whose agent answers by calling the
  researcher's ``/process`` (a tool), its session also in hivemem.

The driver sends three requests: replica A, session s1, "Remember: my favourite tea is
oolong."; replica B, session s1 (continued: B's model is given A's turn); replica A, a
new session s2, "Which tea do I like?" (the researcher recalls it from long-term memory
in a session that never heard it). Then it checks what the hive holds, and that two
replicas that loaded one session cannot both save it.

The models are scripted (no network, no key). agentscope-runtime 1.1 needs agentscope
1.0 and ``mcp<2``, so this runs in a virtualenv of its own::

    python -m venv /tmp/asr && /tmp/asr/bin/pip install -e '.[agentscope-runtime]'
    /tmp/asr/bin/python examples/integrations/agentscope_runtime_apps.py

Exit 0 (printing ``ok``) when every check passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pods import free_port, service, wait_ready

APP = "agentscope-runtime-example"


# --- the apps (run as `python THIS app NAME PORT HIVE_URL [RESEARCHER_URL]`) --------------


def scripted_model(reply: Any) -> Any:
    """An agentscope 1.0 chat model whose answer is ``reply(messages, tools)``: a string
    (text) or a ``(tool name, input)`` pair (a tool call)."""
    from agentscope.message import TextBlock, ToolUseBlock
    from agentscope.model import ChatModelBase, ChatResponse

    class Scripted(ChatModelBase):
        def __init__(self) -> None:
            super().__init__("scripted", stream=False)

        async def __call__(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatResponse:
            out = reply(messages, kwargs.get("tools"))
            if isinstance(out, tuple):
                call = ToolUseBlock(type="tool_use", id=f"call-{len(messages)}", name=out[0])
                call["input"] = out[1]
                return ChatResponse(content=[call])
            return ChatResponse(content=[TextBlock(type="text", text=out)])

    return Scripted()


def chat_model(reply: Any) -> Any:
    """The apps' model: scripted here; the one line to change for a real one."""
    return scripted_model(reply)  # MODEL


def texts(messages: list[dict[str, Any]], role: str | None = None) -> list[str]:
    """The text of each formatted message (of ``role``)."""
    out = []
    for m in messages:
        if role is not None and m.get("role") != role:
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
        out.append(str(content or ""))
    return out


def researcher_reply(messages: list[dict[str, Any]], tools: Any) -> str:
    asked = [t for t in texts(messages, "user") if not t.startswith("<long_term_memory>")]
    question = asked[-1]
    facts = re.findall(r"favourite tea is (\w+)", " ".join(texts(messages)))
    if "?" not in question:
        return "Noted."
    return f"You like {facts[-1]}." if facts else "I do not know."


def planner_reply(messages: list[dict[str, Any]], tools: Any) -> Any:
    if messages[-1].get("role") == "tool":  # the researcher answered
        asked = sum(1 for t in texts(messages, "user") if t)
        return f"{texts(messages[-1:])[-1]} [planner saw {asked} user messages]"
    return ("ask_researcher", {"question": texts(messages, "user")[-1]})


async def ask_process(url: str, text: str, *, session_id: str, user_id: str) -> str:
    """POST one user message to an AgentApp's ``/process`` and return its final answer's
    text (the runtime answers with server-sent events; the last completed response holds
    the output)."""
    import aiohttp

    body = {
        "input": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "session_id": session_id,
        "user_id": user_id,
    }
    final: dict[str, Any] | None = None
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(f"{url}/process", json=body) as resp,
    ):
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("object") == "response" and event.get("status") in ("completed", "failed"):
                final = event
    if final is None or final.get("status") != "completed":
        raise RuntimeError(f"{url}/process did not complete: {final}")
    words = [
        c.get("text", "")
        for m in final.get("output") or []
        for c in m.get("content") or []
        if c.get("type") == "text"
    ]
    return words[-1] if words else ""


def build_app(name: str, hive_url: str, researcher_url: str | None) -> Any:
    from agentscope.agent import ReActAgent
    from agentscope.formatter import OpenAIChatFormatter
    from agentscope.memory import InMemoryMemory
    from agentscope.pipeline import stream_printing_messages
    from agentscope.tool import Toolkit, ToolResponse
    from agentscope_runtime.engine import AgentApp

    import hivemem
    from hivemem.integrations.agentscope_runtime import HivememLongTermMemory, HivememSession

    hive = hivemem.connect(hive_url, agent=name)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await hive.open()
        try:
            yield
        finally:
            await hive.close()

    app = AgentApp(app_name=name, lifespan=lifespan)
    sessions = HivememSession(hive, prefix=f"{APP}/sessions/{name}")

    @app.query(framework="agentscope")
    async def process(self: Any, msgs: Any, request: Any = None, **kwargs: Any) -> Any:
        session_id, user_id = request.session_id, request.user_id
        toolkit = Toolkit()
        memory = None
        if name == "researcher":
            model = chat_model(researcher_reply)
            memory = HivememLongTermMemory(hive, user_id=user_id, prefix=f"{APP}/memory")
        else:
            model = chat_model(planner_reply)

            async def ask_researcher(question: str) -> ToolResponse:
                """Ask the researcher agent.

                Args:
                    question (`str`): what to ask.
                """
                assert researcher_url is not None
                answer = await ask_process(
                    researcher_url, question, session_id=session_id, user_id=user_id
                )
                from agentscope.message import TextBlock

                return ToolResponse(content=[TextBlock(type="text", text=answer)])

            toolkit.register_tool_function(ask_researcher)
        agent = ReActAgent(
            name=name,
            sys_prompt=f"You are the {name}.",
            model=model,
            formatter=OpenAIChatFormatter(),
            toolkit=toolkit,
            memory=InMemoryMemory(),
            long_term_memory=memory,
            long_term_memory_mode="static_control",
        )
        agent.set_console_output_enabled(False)
        await sessions.load_session_state(session_id=session_id, user_id=user_id, agent=agent)
        async for msg, last in stream_printing_messages(agents=[agent], coroutine_task=agent(msgs)):
            yield msg, last
        await sessions.save_session_state(session_id=session_id, user_id=user_id, agent=agent)

    return app


def run_app(name: str, port: int, hive_url: str, researcher_url: str | None) -> None:
    import logging

    import uvicorn

    for noisy in ("agentscope_runtime", "agentscope"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    app = build_app(name, hive_url, researcher_url)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the driver -------------------------------------------------------------------------


async def check_hive(hive_url: str) -> None:
    """What the hive holds after the three requests, and compare-and-set on sessions."""
    from agentscope.memory import InMemoryMemory
    from agentscope.message import Msg

    import hivemem
    from hivemem.errors import Conflict
    from hivemem.integrations.agentscope_runtime import HivememSession

    async with hivemem.connect(hive_url, agent="driver") as hive:
        planner = await hive.list(f"{APP}/sessions/planner/ann")
        assert sorted(i.key for i in planner.items) == ["s1", "s2"], planner.items
        memory = await hive.list(f"{APP}/memory/ann")
        assert any("favourite tea is oolong" in i.value["text"] for i in memory.items)
        # Two replicas load s1; the first save wins, the second is refused.
        a, b = HivememSession(hive, prefix=f"{APP}/sessions/planner"), None
        b = HivememSession(hive, prefix=f"{APP}/sessions/planner")
        mem_a, mem_b = InMemoryMemory(), InMemoryMemory()
        await a.load_session_state("s1", "ann", memory=mem_a)
        await b.load_session_state("s1", "ann", memory=mem_b)
        await mem_a.add(Msg("ann", "a note from replica A", "user"))
        await a.save_session_state("s1", "ann", memory=mem_a)
        try:
            await b.save_session_state("s1", "ann", memory=mem_b)
        except Conflict as exc:
            print(f"replica B's save was refused: {exc}")
        else:
            raise AssertionError("a stale save went through")


async def drive(planner_a: str, planner_b: str, hive_url: str) -> None:
    first = await ask_process(
        planner_a, "Remember: my favourite tea is oolong.", session_id="s1", user_id="ann"
    )
    print(f"planner A, s1: {first}")
    assert first == "Noted. [planner saw 1 user messages]", first
    second = await ask_process(
        planner_b, "What is my favourite tea?", session_id="s1", user_id="ann"
    )
    print(f"planner B, s1: {second}")
    assert second == "You like oolong. [planner saw 2 user messages]", second
    third = await ask_process(planner_a, "Which tea do I like?", session_id="s2", user_id="ann")
    print(f"planner A, s2: {third}")
    assert third == "You like oolong. [planner saw 1 user messages]", third
    await check_hive(hive_url)


def main() -> int:
    if sys.argv[1:2] == ["app"]:
        name, port, hive_url = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        run_app(name, port, hive_url, sys.argv[5] if len(sys.argv) > 5 else None)
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "HIVEMEM_EMBEDDER": "none"}
    try:
        with service() as hive_url:
            urls = {}
            for name in ("researcher", "planner", "planner-b"):
                port = free_port()
                urls[name] = f"http://127.0.0.1:{port}"
                app = "researcher" if name == "researcher" else "planner"
                argv = [__file__, "app", app, str(port), hive_url]
                if app == "planner":
                    argv.append(urls["researcher"])
                procs.append(subprocess.Popen([sys.executable, *argv], env=env))
                wait_ready(f"{urls[name]}/health", procs[-1], timeout=60)
            asyncio.run(drive(urls["planner"], urls["planner-b"], hive_url))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
