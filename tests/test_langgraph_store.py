"""HivememStore (LangGraph BaseStore): agrees with LangGraph's InMemoryStore on generated
sequences of ops, works on every store kind (embedded and through the service), and is
the store of a compiled StateGraph whose nodes read and write ``runtime.store``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import (
    GetOp,
    InvalidNamespaceError,
    ListNamespacesOp,
    MatchCondition,
    PutOp,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore
from typing_extensions import TypedDict

import hivemem
from hivemem.integrations.labels import decode, encode_key, encode_label
from hivemem.integrations.langgraph import HivememStore
from tests.conftest import Clock

# Labels and keys with characters hivemem's names do not allow, to exercise the escaping.
LABELS = st.sampled_from(["a", "b", "users", "x y", "_p", "a/b", "ü", "+"])
NAMESPACES = st.lists(LABELS, min_size=1, max_size=3).map(tuple)
KEYS = st.sampled_from(["k1", "k2", "a/b", "", "_", "+x", "k\n"])
VALUES = st.fixed_dictionaries(
    {"n": st.integers(0, 5), "tag": st.sampled_from(["red", "blue"])},
    optional={"sub": st.fixed_dictionaries({"z": st.integers(0, 2)})},
)
FILTERS = st.one_of(
    st.none(),
    st.fixed_dictionaries({"tag": st.sampled_from(["red", "blue"])}),
    st.fixed_dictionaries({"n": st.fixed_dictionaries({"$gte": st.integers(0, 5)})}),
    st.fixed_dictionaries({"n": st.fixed_dictionaries({"$ne": st.integers(0, 5)})}),
    st.fixed_dictionaries({"sub": st.fixed_dictionaries({"z": st.integers(0, 2)})}),
)
CONDITIONS = st.lists(
    st.builds(
        MatchCondition,
        match_type=st.sampled_from(["prefix", "suffix"]),
        path=st.lists(st.one_of(LABELS, st.just("*")), min_size=1, max_size=2).map(tuple),
    ),
    max_size=2,
).map(tuple)
OPS = st.lists(
    st.one_of(
        st.builds(
            PutOp,
            namespace=NAMESPACES,
            key=KEYS,
            value=st.one_of(VALUES, st.none()),
            index=st.none(),
            ttl=st.none(),
        ),
        st.builds(GetOp, namespace=NAMESPACES, key=KEYS, refresh_ttl=st.just(False)),
        st.builds(
            SearchOp,
            namespace_prefix=st.lists(LABELS, max_size=2).map(tuple),
            filter=FILTERS,
            limit=st.integers(1, 6),
            offset=st.integers(0, 3),
            query=st.none(),  # ranking is the hive's own: compared in the tests below
            refresh_ttl=st.just(False),
        ),
        st.builds(
            ListNamespacesOp,
            match_conditions=CONDITIONS,
            max_depth=st.one_of(st.none(), st.integers(1, 3)),
            limit=st.integers(1, 8),
            offset=st.integers(0, 2),
        ),
    ),
    min_size=1,
    max_size=6,
)


@pytest.fixture(scope="module")
def sync_hive() -> Iterator[hivemem.SyncHive]:
    with hivemem.connect_sync(
        "sqlite://:memory:", agent="lg", settings=hivemem.Settings(embedder="none")
    ) as hive:
        yield hive


def _reference(ours: HivememStore, mem: InMemoryStore, op: Any) -> Any:
    """What InMemoryStore answers, in hivemem's documented order: listings by the hivemem
    names of (namespace, key); namespaces only while they hold an item."""
    if isinstance(op, GetOp):
        got = mem.batch([op])[0]
        return None if got is None else (got.namespace, got.key, got.value)
    if isinstance(op, SearchOp):
        every = mem.batch([op._replace(limit=10**6, offset=0)])[0]
        every.sort(key=lambda i: (ours.namespace_of(i.namespace), encode_key(i.key)))
        return [(i.namespace, i.key, i.value) for i in every[op.offset : op.offset + op.limit]]
    if isinstance(op, ListNamespacesOp):
        live = {i.namespace for i in mem.search((), limit=10**6)}
        fresh = InMemoryStore()
        for n in live:
            fresh.put(n, "k", {})
        return fresh.batch([op])[0]
    raise AssertionError(op)


def _shape(result: Any) -> Any:
    if result is None or (
        isinstance(result, list) and (not result or isinstance(result[0], tuple))
    ):
        return result
    if isinstance(result, list):
        return [(i.namespace, i.key, i.value) for i in result]
    return (result.namespace, result.key, result.value)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=st.lists(OPS, min_size=1, max_size=5))
def test_agrees_with_langgraphs_in_memory_store(
    sync_hive: hivemem.SyncHive, batches: list[list[Any]]
) -> None:
    """Each batch's reads see the state before its puts; the last put of a key wins."""
    ours = HivememStore(sync_hive, prefix=f"lg{uuid.uuid4().hex[:8]}")
    mem = InMemoryStore()
    for ops in batches:
        expected = [None if isinstance(op, PutOp) else _reference(ours, mem, op) for op in ops]
        got = [_shape(r) for r in ours.batch(ops)]
        assert got == expected, ops
        mem.batch(ops)


@given(st.text(min_size=1).filter(lambda s: "\x00" not in s))
@settings(max_examples=200, derandomize=True)
def test_labels_and_keys_round_trip_to_valid_hivemem_names(text: str) -> None:
    label, key = encode_label(text), encode_key(text)
    assert decode(label) == text and decode(key) == text
    hivemem_settings = hivemem.Settings()
    from hivemem import validation

    if len(label) <= 128:
        validation.namespace(label, hivemem_settings)
    if len(key.encode()) <= hivemem_settings.max_key_bytes:
        validation.key(key, hivemem_settings)


def test_bad_namespaces_are_refused_before_anything_is_written(
    sync_hive: hivemem.SyncHive,
) -> None:
    store = HivememStore(sync_hive, prefix=f"lg{uuid.uuid4().hex[:8]}")
    with pytest.raises(InvalidNamespaceError):
        store.batch([PutOp(("ok",), "k", {"v": 1}), PutOp(("a.b",), "k", {"v": 1})])
    with pytest.raises(InvalidNamespaceError):
        store.batch([PutOp((), "k", {"v": 1})])
    assert store.search(()) == []


async def test_every_op_on_each_store_kind(hive: hivemem.Hive, ns: str) -> None:
    store = HivememStore(hive, prefix=ns)
    await store.aput(("docs", "u/1"), "a", {"text": "the deploy failed on a timeout", "n": 1})
    await store.aput(("docs", "u/1"), "b", {"text": "refund asked after price change", "n": 2})
    await store.aput(("docs", "u2"), "c", {"text": "nightly build green", "n": 3}, index=False)
    await store.aput(("notes",), "d", {"n": 4})

    got = await store.aget(("docs", "u/1"), "a")
    assert got is not None and got.value["n"] == 1 and got.namespace == ("docs", "u/1")
    listed = await store.asearch(("docs",), filter={"n": {"$gt": 1}})
    assert [(i.namespace, i.key) for i in listed] == [(("docs", "u/1"), "b"), (("docs", "u2"), "c")]
    hits = await store.asearch(("docs",), query="why did the deploy fail")
    assert hits and hits[0].key == "a" and hits[0].score is not None
    assert "c" not in [h.key for h in await store.asearch((), query="nightly build green")]
    assert await store.alist_namespaces() == [("docs", "u/1"), ("docs", "u2"), ("notes",)]
    assert await store.alist_namespaces(prefix=("docs",), max_depth=1) == [("docs",)]
    assert await store.alist_namespaces(suffix=("u2",)) == [("docs", "u2")]
    await store.adelete(("notes",), "d")
    assert await store.aget(("notes",), "d") is None
    assert await store.alist_namespaces(prefix=("notes",)) == []


async def test_ttl_in_minutes_expires_and_a_read_refreshes_it(
    hive: hivemem.Hive, ns: str, clock: Clock
) -> None:
    store = HivememStore(hive, prefix=ns, ttl={"refresh_on_read": True})
    # Margins of a second either side: through the service on a busy machine a request
    # took over 0.4 s (the TTL was 1.2 s, the sleeps 0.8 s).
    await store.aput(("t",), "kept", {"v": 1}, ttl=0.05)  # 3 s
    await store.aput(("t",), "gone", {"v": 2}, ttl=0.05)
    await clock.sleep(2.0)
    assert await store.aget(("t",), "kept") is not None  # refreshed: 3 s from now
    assert await store.aget(("t",), "gone", refresh_ttl=False) is not None
    await clock.sleep(2.0)
    assert await store.aget(("t",), "gone", refresh_ttl=False) is None
    assert await store.aget(("t",), "kept", refresh_ttl=False) is not None
    await clock.sleep(3.5)
    assert await store.asearch(("t",)) == []


class State(TypedDict):
    user: str
    facts: list[str]


@dataclass
class Context:
    tenant: str


def _graph() -> Any:
    def remember(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
        assert runtime.store is not None
        space = (runtime.context.tenant, state["user"])
        seen = runtime.store.get(space, "visits")
        visits = (seen.value["n"] if seen else 0) + 1
        runtime.store.put(space, "visits", {"n": visits, "text": f"visit {visits}"})
        return {"facts": [f"visits={visits}"]}

    def recall(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
        assert runtime.store is not None
        space = (runtime.context.tenant, state["user"])
        items = runtime.store.search(space)
        return {"facts": state["facts"] + [f"{i.key}={i.value['n']}" for i in items]}

    builder = StateGraph(State, context_schema=Context)
    builder.add_node("remember", remember)
    builder.add_node("recall", recall)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "recall")
    builder.add_edge("recall", END)
    return builder


def test_a_compiled_state_graph_reads_and_writes_runtime_store(
    sync_hive: hivemem.SyncHive,
) -> None:
    """Two graph instances (as two pods would hold) share the memory through one hive."""
    prefix = f"lg{uuid.uuid4().hex[:8]}"
    first = _graph().compile(store=HivememStore(sync_hive, prefix=prefix))
    second = _graph().compile(store=HivememStore(sync_hive, prefix=prefix))
    out = first.invoke({"user": "ann", "facts": []}, context=Context(tenant="acme"))
    assert out["facts"] == ["visits=1", "visits=1"]
    out = second.invoke({"user": "ann", "facts": []}, context=Context(tenant="acme"))
    assert out["facts"] == ["visits=2", "visits=2"]
    got = sync_hive.get(f"{prefix}/acme/ann", "visits")
    assert got is not None and got.value["n"] == 2 and got.version == 2


async def test_a_graph_runs_asynchronously_on_an_async_hive(hive: hivemem.Hive, ns: str) -> None:
    graph = _graph().compile(store=HivememStore(hive, prefix=ns))
    out = await graph.ainvoke({"user": "bo", "facts": []}, context=Context(tenant="t"))
    assert out["facts"] == ["visits=1", "visits=1"]


async def test_blocking_calls_on_the_loop_of_an_async_hive_are_refused(
    hive: hivemem.Hive, ns: str
) -> None:
    store = HivememStore(hive, prefix=ns)
    with pytest.raises(RuntimeError, match="SyncHive"):
        store.get(("a",), "k")
    # From another thread, the blocking form runs on the hive's loop.
    await asyncio.to_thread(store.put, ("a",), "k", {"v": 1})
    got = await asyncio.to_thread(store.get, ("a",), "k")
    assert got is not None and got.value == {"v": 1}
