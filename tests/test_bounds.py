"""Bounds on every input: each bad input gets its 4xx (status and ``field``) and nothing
is written.

- core (every store kind of the ``hive`` fixture): TTLs over ``max_ttl_seconds``, integers
  outside int64, NaN/Infinity anywhere in a JSON value, filters over ``max_filter_keys``
  / ``max_filter_values``, texts over ``max_text_terms`` distinct terms;
- the in-process BM25 index: dead terms leave the vocabulary at a rebuild (memory is
  returned) and the vocabulary is capped at ``max_vocabulary_terms``;
- the service: request bodies with NaN (strict JSON route), the ASGI guards (431 headers,
  422 non-UTF-8 path/query, 413 body, 408 slow body) through a real uvicorn server on a
  loopback port, talking raw HTTP/1.1 over sockets.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import random
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ValidationError

import hivemem
from hivemem import InvalidInput, PutOp, TooLarge, Unavailable
from hivemem import validation as check
from hivemem.backends.sqlite import SqliteBackend
from hivemem.config import Settings
from hivemem.core import lexical
from hivemem.core.lexical import LexicalIndex, check_terms, distinct_terms, tokens
from hivemem.core.search import parse_filter
from hivemem.models import MAX_MESSAGE_COST, MAX_MESSAGE_TOKENS, MessageIn
from hivemem.service import problems
from hivemem.service.app import create_app
from hivemem.service.guards import Guards
from hivemem.service.routing import JSONRoute, loads
from tests.conformance._feed import assert_nothing_written
from tests.conftest import free_port, selected_stores, store_url_of

#: The bounds are checked in core and in the service before any store is touched, so
#: one embedded kind and the service cover them (the conformance suite runs the rest).
_KINDS = [k for k in ("sqlite-memory", "remote") if k in selected_stores()] or selected_stores()[:1]


@pytest.fixture(params=_KINDS)
def hive_url(request: pytest.FixtureRequest) -> str:
    return store_url_of(request, request.param)


INT64_MAX = 2**63 - 1
NAN, INF = float("nan"), float("inf")

Call = Callable[[hivemem.Hive, str], Awaitable[Any]]


def many_terms(n: int) -> str:
    """A text of ``n`` distinct index terms (``t0 t1 ...``; digits are never stemmed)."""
    return " ".join(f"t{i}" for i in range(n))


# Core, on every store kind ---------------------------------------------------------------

CASES: list[tuple[str, Call, type[hivemem.HivememError], str]] = [
    ("ttl-over-max", lambda h, ns: h.put(ns, "k", 1, ttl=1e12), InvalidInput, "ttl"),
    (
        "ttl-over-max-batch",
        lambda h, ns: h.batch([PutOp(namespace=ns, key="k", value=1, ttl=1e12)]),
        InvalidInput,
        "ops.0.ttl",
    ),
    (
        "if-version-2**63",
        lambda h, ns: h.put(ns, "k", 1, if_version=2**63),
        InvalidInput,
        "if_version",
    ),
    (
        "delete-if-version-2**63",
        lambda h, ns: h.delete(ns, "k", if_version=2**63),
        InvalidInput,
        "if_version",
    ),
    ("list-limit-2**70", lambda h, ns: h.list(ns, limit=2**70), InvalidInput, "limit"),
    ("value-nan", lambda h, ns: h.put(ns, "k", NAN), InvalidInput, "value"),
    (
        "value-nested-inf",
        lambda h, ns: h.put(ns, "k", {"a": [1.0, -INF]}),
        InvalidInput,
        "value.a.1",
    ),
    ("value-int-2**63", lambda h, ns: h.put(ns, "k", {"a": [1, 2**63]}), InvalidInput, "value.a.1"),
    (
        "metadata-nan",
        lambda h, ns: h.put(ns, "k", 1, metadata={"score": NAN}),
        InvalidInput,
        "metadata.score",
    ),
    (
        "metadata-int-2**63",
        lambda h, ns: h.put(ns, "k", 1, metadata={"n": 2**63}),
        InvalidInput,
        "metadata.n",
    ),
    (
        "batch-value-nan",
        lambda h, ns: h.batch(
            [PutOp(namespace=ns, key="a", value=1), PutOp(namespace=ns, key="b", value=NAN)]
        ),
        InvalidInput,
        "ops.1.value",
    ),
    ("publish-int-2**63", lambda h, ns: h.publish(ns, [2**63]), InvalidInput, "payload.0"),
    ("publish-inf", lambda h, ns: h.publish(ns, {"x": INF}), InvalidInput, "payload.x"),
    (
        "filter-too-many-keys",
        lambda h, ns: h.search(ns, "q", filter={f"k{i}": i for i in range(17)}),
        InvalidInput,
        "filter",
    ),
    (
        "filter-in-too-long",
        lambda h, ns: h.search(ns, "q", filter={"k": {"$in": list(range(257))}}),
        InvalidInput,
        "filter.k.$in",
    ),
    (
        "filter-nan",
        lambda h, ns: h.search(ns, "q", filter={"k": {"$gt": NAN}}),
        InvalidInput,
        "filter.k.$gt",
    ),
    (
        "filter-int-2**63",
        lambda h, ns: h.search(ns, "q", filter={"k": 2**63}),
        InvalidInput,
        "filter.k",
    ),
    (
        "filter-in-int-2**63",
        lambda h, ns: h.search(ns, "q", filter={"k": {"$in": [1, 2**63]}}),
        InvalidInput,
        "filter.k.$in",
    ),
    (
        "updated-after-inf",
        lambda h, ns: h.search(ns, "q", updated_after=INF),
        InvalidInput,
        "updated_after",
    ),
    (
        "updated-before-2**63",
        lambda h, ns: h.search(ns, "q", updated_before=2**63),
        InvalidInput,
        "updated_before",
    ),
    (
        "text-too-many-terms",
        lambda h, ns: h.put(ns, "k", 1, text=many_terms(20_001)),
        TooLarge,
        "text",
    ),
    (
        "value-text-too-many-terms",
        lambda h, ns: h.put(ns, "k", many_terms(20_001)),
        TooLarge,
        "value",
    ),
    (
        "value-content-too-many-terms",
        lambda h, ns: h.put(ns, "k", {"content": many_terms(20_001)}),
        TooLarge,
        "value",
    ),
    (
        "batch-text-too-many-terms",
        lambda h, ns: h.batch([PutOp(namespace=ns, key="k", value=1, text=many_terms(20_001))]),
        TooLarge,
        "ops.0.text",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_number_or_size_raises_with_field_and_writes_nothing(
    hive: hivemem.Hive,
    ns: str,
    call: Call,
    error: type[hivemem.HivememError],
    field: str,
) -> None:
    head = await hive.head()
    with pytest.raises(error) as info:
        await call(hive, ns)
    assert type(info.value) is error
    assert info.value.field == field, info.value
    await assert_nothing_written(hive, head)
    assert (await hive.list(ns)).items == []


SESSION_CASES: list[tuple[str, Callable[[hivemem.Hive, str], Awaitable[Any]], str]] = [
    ("state-nan", lambda h, sid: h.save_state(sid, {"x": NAN}), "state.x"),
    (
        "state-if-version-2**63",
        lambda h, sid: h.save_state(sid, {}, if_version=2**63),
        "if_version",
    ),
    ("messages-after-2**63", lambda h, sid: h.get_messages(sid, after=2**63), "after"),
    (
        "message-content-nan",
        lambda h, sid: h.append_messages(sid, [{"role": "user", "content": {"x": NAN}}]),
        "messages.0.content.x",
    ),
    (
        "message-tokens-2**63",
        lambda h, sid: h.append_messages(
            sid, [{"role": "user", "content": "hi", "tokens_in": 2**63}]
        ),
        "messages.0.tokens_in",
    ),
    (
        "message-cost-inf",
        lambda h, sid: h.append_messages(sid, [{"role": "user", "content": "hi", "cost": INF}]),
        "messages.0.cost",
    ),
]


@pytest.mark.parametrize(
    ("call", "field"), [c[1:] for c in SESSION_CASES], ids=[c[0] for c in SESSION_CASES]
)
async def test_bad_session_input_raises_with_field_and_writes_nothing(
    hive: hivemem.Hive,
    ns: str,
    call: Callable[[hivemem.Hive, str], Awaitable[Any]],
    field: str,
) -> None:
    session = await hive.create_session(app="bounds", session_id=ns)
    head = await hive.head()
    with pytest.raises(InvalidInput) as info:
        await call(hive, session.id)
    assert info.value.field == field, info.value
    await assert_nothing_written(hive, head)
    after = await hive.get_session(session.id)
    assert (after.messages, after.state_version) == (0, 0)
    await hive.delete_session(session.id)


async def test_bounds_are_inclusive(hive: hivemem.Hive, ns: str) -> None:
    ten_years = Settings().max_ttl_seconds
    item = await hive.put(ns, "k", {"big": INT64_MAX, "small": -(2**63)}, ttl=ten_years)
    assert item.value == {"big": INT64_MAX, "small": -(2**63)}
    assert item.expires_at is not None
    got = await hive.get(ns, "k")  # the expiry is readable (no overflow)
    assert got is not None and got.value == item.value
    # JSON null, the string "null" and long digit strings are ordinary values.
    same = await hive.put(ns, "n", {"a": None, "b": "null", "c": "12345678901234567890123"})
    assert same.value == {"a": None, "b": "null", "c": "12345678901234567890123"}
    filters: dict[str, Any] = {f"k{i}": i for i in range(15)}
    filters["k15"] = {"$in": [*range(255), INT64_MAX]}
    assert await hive.search(ns, "nothing matches", filter=filters, mode="lexical") == []


async def test_text_terms_bound_counts_distinct_terms_inclusively(tmp_path: Path) -> None:
    settings = Settings(max_text_terms=10, embedder="none")
    async with hivemem.connect(f"sqlite:///{tmp_path / 'h.db'}", settings=settings) as hive:
        await hive.put("ns", "ok", 1, text=many_terms(10) + " " + many_terms(10))
        await hive.put("ns", "ok2", "Running runs run " + many_terms(9))  # one stem: run
        with pytest.raises(TooLarge) as info:
            await hive.put("ns", "bad", 1, text=many_terms(11))
        assert info.value.field == "text"
        assert await hive.get("ns", "bad") is None


async def test_a_search_over_its_time_budget_is_unavailable_and_the_hive_goes_on(
    tmp_path: Path,
) -> None:
    settings = Settings(search_timeout_seconds=1e-6, embedder="none", lexical_index="memory")
    async with hivemem.connect(f"sqlite:///{tmp_path / 'h.db'}", settings=settings) as hive:
        for i in range(50):
            await hive.put("ns", f"k{i}", i, text=f"budget words {many_terms(20)} item {i}")
        with pytest.raises(Unavailable, match="search_timeout_seconds"):
            await hive.search("ns", "budget words", mode="lexical")
        assert (await hive.get("ns", "k1")) is not None  # the hive still answers


# Validation helpers ---------------------------------------------------------------------


def test_to_json_names_the_position_of_a_bad_number() -> None:
    cases: list[tuple[Any, str]] = [
        (NAN, "value"),
        ({"a": {"b": [0, INF]}}, "value.a.b.1"),
        ([{"x": 2**63}], "value.0.x"),
        ((1, -INF), "value.1"),
        ({"a": 2**64}, "value.a"),  # beyond what orjson encodes, still named
        ({"a": -(2**63) - 1}, "value.a"),
        ({1, 2}, "value"),  # not JSON at all
    ]
    for value, field in cases:
        with pytest.raises(InvalidInput) as info:
            check.to_json(value, "value", 1 << 20)
        assert info.value.field == field, value
    assert check.to_json({"a": INT64_MAX, "b": -(2**63), "c": None}, "value") == (
        b'{"a":9223372036854775807,"b":-9223372036854775808,"c":null}'
    )
    assert check.to_json([1e308, -0.0, "NaN", True], "value") == b'[1e+308,-0.0,"NaN",true]'
    with pytest.raises(TooLarge):
        check.to_json("x" * 10, "value", 5)


def test_number_checks() -> None:
    assert check.int64(INT64_MAX, "n") == INT64_MAX
    assert check.int64(-(2**63), "n") == -(2**63)
    for bad in (2**63, -(2**63) - 1, True, 1.0, "1"):
        with pytest.raises(InvalidInput) as info:
            check.int64(bad, "n")
        assert info.value.field == "n"
    assert check.version(INT64_MAX) == INT64_MAX
    with pytest.raises(InvalidInput):
        check.version(2**63)
    with pytest.raises(InvalidInput):
        check.count(2**70, field="after")
    assert check.finite(1.5, "x") == 1.5
    for bad_number in (NAN, INF, -INF, 2**63):
        with pytest.raises(InvalidInput):
            check.finite(bad_number, "x")
    assert check.ttl(30) == 30.0
    assert check.ttl(5.0, max_seconds=5.0) == 5.0
    with pytest.raises(InvalidInput):
        check.ttl(5.5, max_seconds=5.0)
    with pytest.raises(InvalidInput):
        check.ttl(61, settings=Settings(max_ttl_seconds=60))
    for bad_ttl in (1e12, 10**400, INF, NAN, 0, -1, True):
        with pytest.raises(InvalidInput) as info:
            check.ttl(bad_ttl, field="ops.3.ttl")
        assert info.value.field == "ops.3.ttl"


def test_parse_filter_takes_its_limits_from_settings() -> None:
    small = Settings(max_filter_keys=2, max_filter_values=3)
    assert len(parse_filter({"a": 1, "b": {"$in": [1, 2, 3]}}, None, None, None, settings=small))
    with pytest.raises(InvalidInput) as info:
        parse_filter({"a": 1, "b": 2, "c": 3}, None, None, None, settings=small)
    assert info.value.field == "filter"
    with pytest.raises(InvalidInput) as info:
        parse_filter({"b": {"$in": [1, 2, 3, 4]}}, None, None, None, settings=small)
    assert info.value.field == "filter.b.$in"


def test_validation_module_does_not_import_numpy() -> None:
    source = Path(check.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "numpy" not in imported
    assert imported <= {
        "__future__",
        "collections",
        "dataclasses",
        "enum",
        "math",
        "re",
        "typing",
        "orjson",
        "pydantic",
        "hivemem",
    }


def test_message_in_bounds() -> None:
    """Per message: tokens 0..2**40 and cost 0..1e12, so a session's running totals
    (signed 64-bit integers, doubles) cannot overflow."""
    top = MessageIn(role="user", content="x", tokens_in=MAX_MESSAGE_TOKENS, cost=MAX_MESSAGE_COST)
    assert top.tokens_in == MAX_MESSAGE_TOKENS and top.cost == MAX_MESSAGE_COST
    assert MessageIn(role="user", content="x", tokens_out=3.0).tokens_out == 3  # JSON's 3.0
    for bad in (
        {"tokens_in": MAX_MESSAGE_TOKENS + 1},
        {"tokens_in": 2**63},
        {"tokens_out": -1},
        {"tokens_out": "3"},
        {"tokens_out": 2.5},
        {"cost": MAX_MESSAGE_COST * 2},
        {"cost": NAN},
        {"cost": INF},
    ):
        with pytest.raises(ValidationError):
            MessageIn(role="user", content="x", **bad)


# The in-process BM25 index ---------------------------------------------------------------


def make_index(max_terms: int | None = None) -> LexicalIndex:
    """An index whose documents are set by hand (its backend is never opened)."""
    return LexicalIndex(SqliteBackend(":memory:", Settings()), 1.0, max_terms=max_terms)


def random_text(rng: random.Random, n: int) -> str:
    """``n`` random 10-letter tokens: almost all distinct index terms."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=10)) for _ in range(n))


def test_distinct_terms_counts_index_terms_and_stops_early() -> None:
    text = "Running runs RUN ran; café cafe x2y x2y a b"
    assert distinct_terms(text, 100) == len(set(tokens(text)))
    big = many_terms(50_000)
    assert distinct_terms(big, 100_000) == 50_000
    assert distinct_terms(big, 10) == 11
    assert distinct_terms("", 5) == 0
    assert check_terms("short text", 3, "text") == "short text"
    with pytest.raises(TooLarge) as info:
        check_terms("one two three four", 3, "value")
    assert info.value.field == "value"
    # Non-ASCII text may have more words than characters: NFKD makes "½" the words 1 and 2.
    with pytest.raises(TooLarge):
        check_terms("½ ¼ ¾", 3, "text")


def test_deleting_large_texts_and_rebuilding_returns_their_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PyStemmer's word cache (bounded, process-wide) would hold the random words: measure
    # the index alone.
    monkeypatch.setattr(lexical._STEMMER, "maxCacheSize", 0)
    rng = random.Random(5)
    index = make_index()
    normal = [f"note {i} about the quarterly plan and its budget {i % 7}" for i in range(300)]
    for i, text in enumerate(normal):
        index.set(("ns", f"n{i}"), text)
    index._rebuild()
    queries = [["plan"], ["budget", "3"], ["note", "17"]]
    before = [index.search(q, "", None, 10) for q in queries]
    terms_before = index.stats()["terms"]

    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(5):
            index.set(("big", f"b{i}"), random_text(rng, 20_000))
        grown, _ = tracemalloc.get_traced_memory()
        assert index.stats()["terms"] > terms_before + 90_000
        for i in range(5):
            index.remove(("big", f"b{i}"))
        index._rebuild()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - base > 5_000_000, grown - base  # about 14 MB for five such texts
    assert after - base < 0.1 * (grown - base), (base, grown, after)
    assert index.stats()["terms"] == terms_before
    # The renumbered vocabulary ranks exactly as before.
    assert [index.search(q, "", None, 10) for q in queries] == before


def test_dead_postings_trigger_a_rebuild_without_many_documents() -> None:
    rng = random.Random(6)
    index = make_index()
    index.set(("ns", "keep"), "the one document that stays")
    index._rebuild()
    most = 0
    for i in range(15):  # 15 x 20k terms, added then deleted
        index.set(("big", str(i)), random_text(rng, 20_000))
        index.remove(("big", str(i)))
        index._synced()
        most = max(most, index.stats()["terms"])
    assert most < 160_000  # without rebuilds it would reach 300,000
    assert index.stats()["dead_postings"] < 300_000
    assert index.search(["document"], "", None, 5)[0][0] == ("ns", "keep")


def test_vocabulary_is_capped_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    index = make_index(max_terms=100)
    index.set(("ns", "a"), many_terms(80))
    with caplog.at_level(logging.WARNING, logger="hivemem.lexical"):
        index.set(("ns", "b"), "t0 " + " ".join(f"u{i}" for i in range(50)))
        index.set(("ns", "c"), " ".join(f"v{i}" for i in range(50)))
    assert index.stats()["terms"] == 100
    assert len(caplog.records) == 1 and "full" in caplog.records[0].message
    assert [k for k, _ in index.search(["u19"], "", None, 5)] == [("ns", "b")]
    assert index.search(["u20"], "", None, 5) == []  # found the vocabulary full
    assert index.search(["v0"], "", None, 5) == []
    assert {k for k, _ in index.search(["t0"], "", None, 5)} == {("ns", "a"), ("ns", "b")}
    # Deleting a text and rebuilding frees its terms' room for new texts.
    index.remove(("ns", "a"))
    index._rebuild()
    assert index.stats()["terms"] == 21  # t0 and u0..u19
    index.set(("ns", "c"), " ".join(f"v{i}" for i in range(50)))
    assert [k for k, _ in index.search(["v49"], "", None, 5)] == [("ns", "c")]


def test_bulk_load_respects_the_cap() -> None:
    index = make_index(max_terms=30)
    index._bulk([("ns", "a", many_terms(20)), ("ns", "b", " ".join(f"w{i}" for i in range(20)))])
    assert index.stats()["terms"] == 30
    assert [k for k, _ in index.search(["w9"], "", None, 5)] == [("ns", "b")]
    assert index.search(["w10"], "", None, 5) == []


# The strict JSON route --------------------------------------------------------------------


class _Body(BaseModel):
    value: Any


def _json_app() -> FastAPI:
    router = APIRouter(route_class=JSONRoute)

    @router.post("/echo")
    async def echo(body: _Body) -> dict[str, Any]:
        return {"value": body.value, "type": type(body.value).__name__}

    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    return app


async def asgi_call(
    app: Any, method: str, path: str, body: bytes = b"", query: bytes = b""
) -> tuple[int, dict[str, Any]]:
    """One request straight through an ASGI app: (status, decoded JSON body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    status, chunks = 0, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, json.loads(b"".join(chunks))


@pytest.mark.parametrize(
    "body",
    [
        b'{"value": NaN}',
        b'{"value": Infinity}',
        b'{"value": -Infinity}',
        b'{"value": 1e400}',
        b'{"value": "\\ud800"}',
        b'{"value": "\xff"}',
    ],
)
async def test_json_route_refuses_non_json_numbers_naming_body(body: bytes) -> None:
    status, problem = await asgi_call(_json_app(), "POST", "/echo", body)
    assert status == 422, problem
    assert problem["field"] == "body"


async def test_json_route_keeps_numbers_exact() -> None:
    app = _json_app()
    for raw, value, kind in (
        (b'{"value": 1.5}', 1.5, "float"),
        (b'{"value": 18446744073709551615}', 2**64 - 1, "int"),
        (b'{"value": 123456789012345678901234567890}', 123456789012345678901234567890, "int"),
        (b'{"value": "12345678901234567890123"}', "12345678901234567890123", "str"),
    ):
        status, echoed = await asgi_call(app, "POST", "/echo", raw)
        assert status == 200, echoed
        assert echoed == {"value": value, "type": kind}
    assert loads(b"[1, 2.5, null]") == [1, 2.5, None]


# The service, through a real uvicorn server ------------------------------------------------


class ThreadedServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread with its own loop."""

    def __init__(self, app: Any, http: str) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=http,
            lifespan="on",
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


GUARD_SETTINGS = dict(
    embedder="none",
    body_timeout_seconds=0.5,
    max_header_bytes=4096,
    max_request_bytes=64 * 1024,
)
#: The most a cut or refused request may take (s): the 0.5 s body deadline plus a busy
#: 2-core machine's scheduling; a cut per chunk instead of per body would go on for the
#: trickle's 3 s, a stalled server for the sockets' 5 s.
PROMPT_SECONDS = 2.0


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    """The service app (create_app) behind the guards, served by uvicorn with each HTTP
    implementation, over a fresh SQLite file."""
    store = f"sqlite:///{tmp_path_factory.mktemp('bounds') / 'svc.db'}"
    settings = Settings(store=store, **GUARD_SETTINGS)  # type: ignore[arg-type]
    srv = ThreadedServer(Guards(create_app(store, settings), settings), request.param)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed: float):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self) -> Any:
        return orjson.loads(self.body)


def read_reply(sock: socket.socket, started: float) -> Reply:
    """Read one HTTP/1.1 response (with Content-Length) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    elapsed = time.monotonic() - started
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Reply(status, headers, rest[:length], elapsed)


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> Reply:
    """Send ``raw`` (a whole request) and read the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(raw)
        return read_reply(sock, started)


def request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
    )
    return head.encode() + body


def feed_head(port: int) -> str:
    reply = exchange(port, request("GET", "/v1/events/head"))
    assert reply.status == 200, reply.body
    return str(reply.json()["cursor"])


def assert_problem(reply: Reply, status: int, field: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem = reply.json()
    assert (problem["status"], problem.get("field")) == (status, field), problem


def assert_absent(port: int, ns: str, key: str, head: str) -> None:
    assert exchange(port, request("GET", f"/v1/items/{ns}/{key}")).status == 404
    assert feed_head(port) == head


def test_slow_body_is_cut_with_408_and_health_answers_meanwhile(
    server: ThreadedServer, ns: str
) -> None:
    head = feed_head(server.port)
    body = orjson.dumps({"value": "x" * 100})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        started = time.monotonic()
        slow.sendall(request("PUT", f"/v1/items/{ns}/k", body)[: -len(body) + 10])
        time.sleep(0.1)
        # Three probes while the body is pending: a blocked event loop would make every
        # one slow; a single slow one is the scheduling of this in-process server thread,
        # which shares the test's GIL (tests/test_bad_inputs.py polls a real service).
        probes = [
            exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(3)
        ]
        assert all(p.status == 200 for p in probes)
        # Blocked until the 0.5 s deadline, each would take 0.4 s or more.
        assert min(p.elapsed for p in probes) < 0.3, [p.elapsed for p in probes]
        reply = read_reply(slow, started)
        assert 0.4 < reply.elapsed < PROMPT_SECONDS, reply.elapsed
        assert_problem(reply, 408, "body")
        assert reply.headers.get("connection") == "close"
        assert slow.recv(1) == b""  # the server closed the connection
    assert_absent(server.port, ns, "k", head)


def test_trickled_body_is_cut_at_the_deadline_not_per_chunk(
    server: ThreadedServer, ns: str
) -> None:
    head = feed_head(server.port)
    body = orjson.dumps({"value": "y" * 200})
    raw = request("PUT", f"/v1/items/{ns}/k", body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(raw[: -len(body)])
        sent = len(raw) - len(body)
        while not select.select([sock], [], [], 0.15)[0]:  # a byte every 0.15 s
            if time.monotonic() - started > 3:
                raise AssertionError("no response")
            sock.sendall(raw[sent : sent + 1])
            sent += 1
        reply = read_reply(sock, started)
    assert 0.4 < reply.elapsed < PROMPT_SECONDS, reply.elapsed
    assert_problem(reply, 408, "body")
    assert_absent(server.port, ns, "k", head)


def test_whole_body_in_time_is_served(server: ThreadedServer, ns: str) -> None:
    body = orjson.dumps({"value": 1})
    raw = request("PUT", f"/v1/items/{ns}/k", body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(raw[:-3])
        time.sleep(0.2)
        sock.sendall(raw[-3:])
        reply = read_reply(sock, started)
    assert reply.status in (200, 201), reply.body
    # A long-lived GET (no body to wait for) is not cut either.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 200"), data
        sock.settimeout(0.1)
        while time.monotonic() - started < 0.8:  # open past body_timeout_seconds
            try:
                assert sock.recv(4096) != b"", "the watch stream was closed"
            except TimeoutError:
                pass


def test_huge_headers_get_431(server: ThreadedServer, ns: str) -> None:
    head = feed_head(server.port)
    extra = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(5))
    reply = exchange(
        server.port, request("PUT", f"/v1/items/{ns}/k", b'{"value": 1}', headers=extra)
    )
    assert_problem(reply, 431, "headers")
    assert reply.elapsed < PROMPT_SECONDS
    assert_absent(server.port, ns, "k", head)
    # Under the limit the same request goes through.
    small = "".join(f"X-Pad-{i}: {'p' * 500}\r\n" for i in range(5))
    reply = exchange(
        server.port, request("PUT", f"/v1/items/{ns}/k", b'{"value": 1}', headers=small)
    )
    assert reply.status in (200, 201), reply.body


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/v1/items/{ns}/%FF", "path"),
        ("/v1/items/{ns}/a%C3", "path"),
        ("/v1/items/{ns}/k?x=%FF", "query"),
        ("/v1/items/{ns}/k?%ED%A0%80=1", "query"),  # an encoded surrogate is not UTF-8
    ],
)
def test_non_utf8_path_or_query_gets_422(
    server: ThreadedServer, ns: str, target: str, field: str
) -> None:
    head = feed_head(server.port)
    reply = exchange(server.port, request("PUT", target.format(ns=ns), b'{"value": 1}'))
    assert_problem(reply, 422, field)
    assert reply.elapsed < PROMPT_SECONDS
    assert feed_head(server.port) == head
    # Percent-encoded UTF-8 passes: caf%C3%A9 is the key "café".
    reply = exchange(
        server.port, request("PUT", f"/v1/items/{ns}/caf%C3%A9?x=%C3%A9", b'{"value": 2}')
    )
    assert reply.status in (200, 201), reply.body
    assert reply.json()["key"] == "café"


def test_oversized_body_gets_413_by_length_or_by_chunks(server: ThreadedServer, ns: str) -> None:
    head = feed_head(server.port)
    big = orjson.dumps({"value": "z" * (65 * 1024)})
    reply = exchange(server.port, request("PUT", f"/v1/items/{ns}/k", big))
    assert_problem(reply, 413, "body")
    # Chunked: no Content-Length, the guard counts the chunks as the route reads them
    # (FastAPI would answer 400 for an error while reading; the guard answers instead).
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i : i + 8192]), big[i : i + 8192])
        for i in range(0, len(big), 8192)
    )
    raw = (
        (
            f"PUT /v1/items/{ns}/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n"
    )
    reply = exchange(server.port, raw)
    assert_problem(reply, 413, "body")
    assert_absent(server.port, ns, "k", head)


@pytest.mark.parametrize(
    ("method", "target", "body", "field"),
    [
        ("PUT", "/v1/items/{ns}/k", b'{"value": 1, "ttl": 0}', "ttl"),
        ("PUT", "/v1/items/{ns}/k", b'{"value": 1, "ttl": 1e12}', "ttl"),
        (
            "PUT",
            "/v1/items/{ns}/k",
            b'{"value": 1, "if_version": 9223372036854775808}',
            "if_version",
        ),
        ("PUT", "/v1/items/{ns}/k", b'{"value": {"a": [9223372036854775808]}}', "value.a.0"),
        (
            "PUT",
            "/v1/items/{ns}/k",
            b'{"value": 1, "metadata": {"n": 99999999999999999999}}',
            "metadata.n",
        ),
        ("DELETE", "/v1/items/{ns}/k?if_version=9223372036854775808", b"", "if_version"),
        ("GET", "/v1/items?limit=99999999999999999999", b"", "limit"),
        (
            "POST",
            "/v1/search",
            b'{"query": "q", "filter": {"k": {"$in": [9223372036854775808]}}}',
            "filter.k.$in",
        ),
        (
            "POST",
            "/v1/search",
            b'{"query": "q", "updated_after": 9223372036854775808}',
            "updated_after",
        ),
        ("POST", "/v1/search", b'{"query": "q", "limit": 9223372036854775808}', "limit"),
        ("POST", "/v1/publish/{ns}", b'{"payload": [18446744073709551615]}', "payload.0"),
    ],
)
def test_out_of_range_numbers_over_http_get_422(
    server: ThreadedServer, ns: str, method: str, target: str, body: bytes, field: str
) -> None:
    head = feed_head(server.port)
    reply = exchange(server.port, request(method, target.format(ns=ns), body))
    assert_problem(reply, 422, field)
    assert_absent(server.port, ns, "k", head)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_json_number_in_a_body_gets_422(server: ThreadedServer, ns: str, value: bytes) -> None:
    head = feed_head(server.port)
    reply = exchange(server.port, request("PUT", f"/v1/items/{ns}/k", b'{"value": %s}' % value))
    assert reply.status == 422, reply.body
    # "body" once the strict JSON route is wired in; "value" from core validation before.
    assert reply.json()["field"] in ("body", "value")
    assert_absent(server.port, ns, "k", head)


def test_session_bounds_over_http(server: ThreadedServer, ns: str) -> None:
    created = exchange(
        server.port,
        request("POST", "/v1/sessions", orjson.dumps({"app": "bounds", "session_id": ns})),
    )
    assert created.status == 201, created.body
    head = feed_head(server.port)
    for method, target, body, field in (
        ("GET", f"/v1/sessions/{ns}/messages?after=9223372036854775808", b"", "after"),
        (
            "PUT",
            f"/v1/sessions/{ns}/state",
            b'{"state": {}, "if_version": 9223372036854775808}',
            "if_version",
        ),
        (
            "POST",
            f"/v1/sessions/{ns}/messages",
            b'{"messages": [{"role": "user", "content": "x", "tokens_in": 9223372036854775808}]}',
            "messages.0.tokens_in",
        ),
    ):
        reply = exchange(server.port, request(method, target, body))
        assert_problem(reply, 422, field)
    assert feed_head(server.port) == head
