"""HivememSaver (LangGraph BaseCheckpointSaver): every test of
``langgraph-checkpoint-conformance`` (base and extended), embedded and through the
service, and a real graph run that one saver checkpoints and another resumes."""

from __future__ import annotations

import operator
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from typing_extensions import TypedDict

import hivemem
from hivemem.integrations.langgraph import HivememSaver
from tests.conftest import ServiceProcess


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path_factory.mktemp("lgsaver") / "svc.db", env={"HIVEMEM_EMBEDDER": "none"}
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.terminate()


async def _conformance(url: str) -> None:
    failures: list[str] = []

    def record(capability: str, name: str, passed: bool, error: Any = None) -> None:
        if not passed:
            failures.append(f"{capability}.{name}: {error}")

    @checkpointer_test(name=f"HivememSaver {url.split(':')[0]}")
    async def saver() -> AsyncIterator[HivememSaver]:
        async with hivemem.connect(url, agent="lg", settings=_settings(url)) as hive:
            yield HivememSaver(hive, prefix=f"cp{uuid.uuid4().hex[:8]}")

    report = await validate(saver, progress=ProgressCallbacks(on_test_result=record))
    assert failures == []
    for capability, result in report.results.items():
        assert result.detected, capability  # base and every extended capability
        assert result.passed, (capability, result.failures)
    assert report.passed_all()
    # langgraph-checkpoint-conformance 0.0.2: 58 base tests and 23 extended ones.
    assert sum(r.tests_passed for r in report.results.values()) >= 81


def _settings(url: str) -> hivemem.Settings | None:
    return None if url.startswith("http") else hivemem.Settings(embedder="none")


async def test_conformance_embedded(tmp_path: Path) -> None:
    await _conformance(f"sqlite:///{tmp_path}/cp.db")


async def test_conformance_through_the_service(service: ServiceProcess) -> None:
    await _conformance(service.url)


class State(TypedDict):
    steps: Annotated[list[str], operator.add]


def _graph() -> StateGraph:
    def plan(state: State) -> dict[str, Any]:
        return {"steps": ["plan"]}

    def approve(state: State) -> dict[str, Any]:
        answer = interrupt({"question": "ship it?"})
        return {"steps": [f"approved:{answer}"]}

    def ship(state: State) -> dict[str, Any]:
        return {"steps": ["ship"]}

    builder = StateGraph(State)
    builder.add_node("plan", plan)
    builder.add_node("approve", approve)
    builder.add_node("ship", ship)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "approve")
    builder.add_edge("approve", "ship")
    builder.add_edge("ship", END)
    return builder


async def test_a_run_interrupted_in_one_process_resumes_in_another(
    service: ServiceProcess,
) -> None:
    """Two savers on two clients of one service, as two pods: the first runs the graph to
    its interrupt; the second resumes the thread and finishes it; history is shared."""
    thread = {"configurable": {"thread_id": f"t-{uuid.uuid4().hex[:8]}"}}
    prefix = f"cp{uuid.uuid4().hex[:8]}"
    async with (
        hivemem.connect(service.url, agent="pod-a") as a,
        hivemem.connect(service.url, agent="pod-b") as b,
    ):
        first = _graph().compile(checkpointer=HivememSaver(a, prefix=prefix))
        out = await first.ainvoke({"steps": []}, thread)
        assert out["steps"] == ["plan"] and "__interrupt__" in out

        second = _graph().compile(checkpointer=HivememSaver(b, prefix=prefix))
        state = await second.aget_state(thread)
        assert state.next == ("approve",)
        out = await second.ainvoke(Command(resume="yes"), thread)
        assert out["steps"] == ["plan", "approved:yes", "ship"]

        history = [s async for s in first.aget_state_history(thread)]
        assert history[0].values["steps"] == ["plan", "approved:yes", "ship"]
        assert len(history) >= 4
        authors = {i.author async for i in _items(a, prefix)}
        assert authors == {"pod-a", "pod-b"}


async def _items(hive: hivemem.Hive, prefix: str) -> AsyncIterator[hivemem.Item]:
    cursor = None
    while True:
        page = await hive.list(prefix, limit=1000, cursor=cursor)
        for item in page.items:
            yield item
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def test_the_blocking_methods_run_a_graph_on_a_sync_hive(tmp_path: Path) -> None:
    with hivemem.connect_sync(
        f"sqlite:///{tmp_path}/s.db", agent="lg", settings=hivemem.Settings(embedder="none")
    ) as hive:
        graph = _graph().compile(checkpointer=HivememSaver(hive))
        thread = {"configurable": {"thread_id": "sync"}}
        graph.invoke({"steps": []}, thread)
        out = graph.invoke(Command(resume="ok"), thread)
        assert out["steps"] == ["plan", "approved:ok", "ship"]
        assert len(list(graph.get_state_history(thread))) >= 4
        saver = HivememSaver(hive)
        saver.delete_thread("sync")
        assert saver.get_tuple(thread) is None
