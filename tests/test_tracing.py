"""OpenTelemetry tracing, collected with the SDK's in-memory exporter: a client call
through a real uvicorn server makes one trace whose service span is the client span's
child and whose store span is the service span's child; a task submitted in a span is
run by the worker in a span of the same trace; the trace context never shows in the
payload; with tracing off nothing is traced."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import hivemem
from hivemem.service.app import create_app
from hivemem.worker import Worker
from tests.test_bounds import ThreadedServer

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    """One SDK provider for this module's process (OpenTelemetry allows setting it once;
    the other tests' spans, if any, go to the same exporter and are cleared)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def traced() -> hivemem.Settings:
    return hivemem.Settings(embedder="none", tracing=True)


async def test_a_client_call_is_one_trace_client_then_service_then_store(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    server = ThreadedServer(create_app(f"sqlite:///{tmp_path}/t.db", traced()), "auto")
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        async with hivemem.connect(url, agent="planner", settings=traced()) as hive:
            with trace.get_tracer("test").start_as_current_span("agent turn") as root:
                await hive.put("notes", "k1", {"text": "hello"})
            root_id = root.get_span_context().trace_id
        await asyncio.sleep(0.2)  # the server thread ends its span after the response
    finally:
        server.stop()
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished if s.context.trace_id == root_id}
    client = by_name["hivemem PUT"]
    server = by_name["PUT /v1/items/{path:anypath}"]
    store = by_name["hivemem.store write_items"]
    assert client.kind == SpanKind.CLIENT and server.kind == SpanKind.SERVER
    assert client.parent is not None and client.parent.span_id == root.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert store.parent is not None and store.parent.span_id == server.context.span_id
    assert len({client.context.trace_id, server.context.trace_id, store.context.trace_id}) == 1
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 201
    assert server.attributes["hivemem.agent"] == "planner"
    assert store.attributes is not None and store.attributes["db.system"] == "sqlite"


async def test_a_task_runs_in_the_trace_that_submitted_it(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    store = f"sqlite:///{tmp_path}/w.db"
    async with hivemem.connect(store, agent="lead", settings=traced()) as hive:
        with trace.get_tracer("test").start_as_current_span("delegate") as root:
            submitted = await hive.submit("research", {"topic": "tea"})
        seen: list[Any] = []

        async def handler(task: hivemem.Task) -> str:
            seen.append((task.payload, trace.get_current_span().get_span_context().trace_id))
            return "done"

        worker = Worker(hive.as_agent("helper"), "research", handler, concurrency=1)
        await asyncio.wait_for(worker.run(handle_signals=False, max_tasks=1), 30)
        done = await hive.result(submitted.id, wait=20)
    assert done.state == "completed"
    assert submitted.payload == {"topic": "tea"} and submitted.traceparent is not None
    # The worker was given the payload as submitted, in a span of the submitter's trace.
    assert seen == [({"topic": "tea"}, root.get_span_context().trace_id)]
    task_spans = [s for s in spans.get_finished_spans() if s.name == "hivemem.task research"]
    assert len(task_spans) == 1 and task_spans[0].kind == SpanKind.CONSUMER
    assert task_spans[0].context.trace_id == root.get_span_context().trace_id


async def test_with_tracing_off_nothing_is_traced(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    settings = hivemem.Settings(embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path}/o.db", agent="a", settings=settings) as hive:
        with trace.get_tracer("test").start_as_current_span("turn"):
            await hive.put("ns", "k", 1)
            task = await hive.submit("q", [1, 2])
    assert [s.name for s in spans.get_finished_spans()] == ["turn"]
    assert task.traceparent is None and task.payload == [1, 2]


def test_the_sample_ratio_leaves_out_root_requests_only(
    tmp_path: Path, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tracing_sample_ratio: a request without trace context is handed to the SDK with
    # that probability, else it makes no span at all (nor do its store calls); a request
    # that brings a trace context is always handed over.
    from fastapi.testclient import TestClient

    import hivemem.service.telemetry as telemetry

    draws = iter([0.05, 0.5, 0.95] * 100)  # the ratio below keeps the first of each three
    monkeypatch.setattr(telemetry.random, "random", lambda: next(draws))
    settings = hivemem.Settings(embedder="none", tracing=True, tracing_sample_ratio=0.3)
    agent = {"X-Hivemem-Agent": "a"}
    with TestClient(create_app(f"sqlite:///{tmp_path}/r.db", settings)) as c:
        c.put("/v1/items/ns/k", json={"value": 1}, headers=agent)
        spans.clear()
        for _ in range(30):
            assert c.get("/v1/items/ns/k", headers=agent).status_code == 200
        roots = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        stores = [s for s in spans.get_finished_spans() if s.name == "hivemem.store get_item"]
        assert len(roots) == len(stores) == 10
        assert all(s.parent is None for s in roots)
        spans.clear()
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        for _ in range(6):
            got = c.get("/v1/items/ns/k", headers={**agent, "traceparent": parent})
            assert got.status_code == 200
        continued = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        assert len(continued) == 6
        assert {format(s.context.trace_id, "032x") for s in continued} == {"ab" * 16}


def test_the_sample_ratio_is_a_bounded_setting() -> None:
    with pytest.raises(ValueError, match="tracing_sample_ratio"):
        hivemem.Settings(tracing_sample_ratio=1.5)
