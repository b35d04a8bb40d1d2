#!/usr/bin/env python3
"""A LangGraph graph in two processes ("pods") sharing memory and a thread through one
hivemem service.

The script starts ``hivemem serve`` on a free loopback port (a SQLite store in a temporary
directory), then:

* **pod A** runs the graph for thread ``release-42``: a model drafts release notes, the
  draft is remembered in the long-term store (``HivememStore``, namespace
  ``("releases",)``), and the graph stops at an ``interrupt`` for a human's approval; the
  checkpoint is in hivemem (``HivememSaver``), and pod A exits, as a pod that is
  rescheduled would;
* **pod B**, another process, resumes the same thread with the approval, finishes the
  graph (publishing the notes), and reads the draft pod A remembered.

The model is scripted (``GenericFakeChatModel``), so no key is needed. For a real one,
change the one line marked ``MODEL`` in ``model()``, e.g.::

    from langchain.chat_models import init_chat_model
    return init_chat_model("openai:gpt-4o-mini")

Usage: ``python examples/integrations/langgraph_pods.py`` (exit 0 when every check passed).
Needs ``pip install 'hivemem[langgraph]'``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from typing_extensions import TypedDict

import hivemem
from hivemem.integrations.langgraph import HivememSaver, HivememStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pods import run_pods

THREAD = {"configurable": {"thread_id": "release-42"}}


def model() -> Any:
    """The chat model of the draft step."""
    return GenericFakeChatModel(
        messages=iter([AIMessage("v42: faster writes, MCP tools")])
    )  # MODEL


class Release(TypedDict, total=False):
    version: str
    draft: str
    approved_by: str
    published: bool


def draft(state: Release, runtime: Runtime) -> Release:
    notes = model().invoke(f"Write release notes for {state['version']}").content
    assert runtime.store is not None
    runtime.store.put(("releases",), state["version"], {"text": notes, "by": os.getpid()})
    return {"draft": str(notes)}


def approve(state: Release) -> Release:
    return {"approved_by": interrupt({"draft": state["draft"], "question": "publish?"})}


def publish(state: Release) -> Release:
    return {"published": True}


def graph(hive: hivemem.SyncHive) -> Any:
    builder = StateGraph(Release)
    builder.add_node("draft", draft)
    builder.add_node("approve", approve)
    builder.add_node("publish", publish)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "approve")
    builder.add_edge("approve", "publish")
    builder.add_edge("publish", END)
    return builder.compile(store=HivememStore(hive), checkpointer=HivememSaver(hive))


def pod(url: str, name: str) -> None:
    with hivemem.connect_sync(url, agent=name) as hive:
        app = graph(hive)
        if name == "pod-a":
            out = app.invoke({"version": "v42"}, THREAD)
            assert "__interrupt__" in out, out
            print(f"{name}: drafted {out['draft']!r}; waiting for approval")
            return
        assert app.get_state(THREAD).next == ("approve",)
        out = app.invoke(Command(resume="ana"), THREAD)
        assert out["published"] and out["approved_by"] == "ana", out
        remembered = app.store.get(("releases",), "v42")
        assert remembered is not None and remembered.value["by"] != os.getpid()
        print(f"{name}: published {out['draft']!r}, approved by {out['approved_by']}")
        print(f"{name}: read pod A's memory: {remembered.value['text']!r}")


def main() -> int:
    if len(sys.argv) == 3:
        pod(sys.argv[1], sys.argv[2])
        return 0
    return run_pods(__file__, ["pod-a", "pod-b"])


if __name__ == "__main__":
    sys.exit(main())
