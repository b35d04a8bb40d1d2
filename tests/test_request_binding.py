"""Request ids bound to their request: a backend primitive given ``<id>#<fingerprint>``
returns the stored result for a repeat with the same fingerprint (or when either side
has none), and refuses a repeat with another fingerprint (RequestIdReused, nothing
written); on every embedded store kind, at the backend level."""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

import hivemem
from hivemem import InvalidInput, Settings
from hivemem.backends.base import Backend
from hivemem.backends.redis import RedisBackend
from hivemem.backends.redis.layout import PARTITIONS, partition_of, session_partition
from hivemem.backends.results import (
    RequestIdReused,
    decode_stored_result,
    encode_result,
    encode_stored_result,
    split_request_id,
)
from hivemem.backends.rows import NewMessage, PutWrite, SessionRow
from hivemem.errors import Conflict, NotFound
from tests.conftest import selected_stores, store_url_of

SETTINGS = Settings(embedder="none")
KINDS = [k for k in selected_stores() if not k.startswith("remote")]
FP_A = "a" * 32
FP_B = "b" * 32


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """An opened backend of each embedded store kind."""
    b = hivemem.open_backend(store_url_of(request, request.param), SETTINGS)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


async def events_since(b: Backend, prefix: str, cursor: str) -> list[tuple[Any, ...]]:
    """(type, namespace, key, version, data) of every event under ``prefix`` after ``cursor``,
    item.expired left out (the sweeper of a shared store may add some)."""
    out: list[tuple[Any, ...]] = []
    after: str | None = cursor
    for _ in range(1000):
        rows, after = await b.read_events(prefix, after, 100)
        out += [(e.type, e.namespace, e.key, e.version, e.data) for e in rows]
        if len(rows) < 100:
            return [e for e in out if e[0] != "item.expired"]
    raise AssertionError("feed did not end")


def rid() -> str:
    return f"tester/{uuid.uuid4().hex}"


def other_partition(name: str, partition: Callable[[str], int]) -> str:
    """``name`` plus a suffix that puts it in another Redis partition than ``name``'s (a
    request id reused for another namespace tree or session must be refused too)."""
    for i in range(1000):
        other = f"{name}o{i}"
        if partition(other) != partition(name):
            return other
    raise AssertionError("no other partition")


@dataclass
class Case:
    """A state-changing primitive: ``call(request_id, variant)`` runs it with the first
    arguments (variant 0) or other ones (1); ``state()`` is what it changes, events
    included."""

    call: Callable[[str | None, int], Awaitable[Any]]
    state: Callable[[], Awaitable[Any]]


def session_row(sid: str, app: str) -> SessionRow:
    now = time.time()
    return SessionRow(sid, app, None, None, "tester", b"{}", b"{}", 0, 0, 0, 0, 0, 0.0, now, now)


async def make_case(b: Backend, kind: str, ns: str) -> Case:
    head = await b.head()
    if kind == "write_items":
        spaces = [ns, other_partition(ns, partition_of)]

        async def put(r: str | None, variant: int) -> Any:
            w = PutWrite(spaces[variant], "k", orjson.dumps({"v": variant}), *[None] * 4)
            return await b.write_items(
                [w], author="tester", now=time.time(), history_limit=10, request_id=r
            )

        async def items() -> Any:
            return [
                (await b.get_item(space, "k", time.time()), await events_since(b, space, head))
                for space in spaces
            ]

        return Case(put, items)

    sids = [f"{ns}-s0", other_partition(f"{ns}-s", session_partition)]
    if kind == "create_session":

        async def create(r: str | None, variant: int) -> Any:
            return await b.create_session(session_row(sids[variant], ns), request_id=r)

        async def created() -> Any:
            return (
                [await b.get_session(s) for s in sids],
                [await events_since(b, f"_sessions/{s}", head) for s in sids],
            )

        return Case(create, created)

    for s in sids:
        await b.create_session(session_row(s, ns))
    head = await b.head()

    async def messages(sid: str) -> Any:
        try:
            return await b.read_messages(sid, 0, 100, time.time())
        except NotFound:
            return None

    async def sessions() -> Any:
        return (
            [await b.get_session(s) for s in sids],
            [await messages(s) for s in sids],
            [await events_since(b, f"_sessions/{s}", head) for s in sids],
        )

    if kind == "append_messages":

        async def append(r: str | None, variant: int) -> Any:
            m = NewMessage("user", orjson.dumps(f"hi {variant}"), 1, 2, 0.5, b"{}")
            return await b.append_messages(
                sids[0], [m], author="tester", now=time.time(), request_id=r
            )

        return Case(append, sessions)

    if kind == "save_state":

        async def save(r: str | None, variant: int) -> Any:
            state = orjson.dumps({"step": variant})
            return await b.save_state(
                sids[0], state, None, author="tester", now=time.time(), request_id=r
            )

        return Case(save, sessions)

    if kind == "delete_session":

        async def delete(r: str | None, variant: int) -> Any:
            return await b.delete_session(
                sids[variant], author="tester", now=time.time(), request_id=r
            )

        return Case(delete, sessions)

    assert kind == "publish"
    channel = f"{ns}/chan"

    async def publish(r: str | None, variant: int) -> Any:
        payload = orjson.dumps({"x": variant})
        return await b.publish(channel, payload, author="tester", now=time.time(), request_id=r)

    async def published() -> Any:
        return await events_since(b, channel, head)

    return Case(publish, published)


PRIMITIVES = [
    "write_items",
    "create_session",
    "append_messages",
    "save_state",
    "delete_session",
    "publish",
]


def same(a: Any, b: Any) -> None:
    """The repeat's result is the first one's (rows, cursors and all)."""
    assert a == b


@pytest.mark.parametrize("kind", PRIMITIVES)
async def test_same_fingerprint_repeats_other_is_refused(
    backend: Backend, kind: str, ns: str
) -> None:
    case = await make_case(backend, kind, ns)
    r = rid()
    first = await case.call(f"{r}#{FP_A}", 0)
    after_first = await case.state()
    same(await case.call(f"{r}#{FP_A}", 0), first)
    assert await case.state() == after_first  # nothing written twice
    for variant in (1, 0):  # other arguments, or the same under another fingerprint
        with pytest.raises(RequestIdReused) as err:
            await case.call(f"{r}#{FP_B}", variant)
        assert isinstance(err.value, InvalidInput)
        assert err.value.field == "request_id" and err.value.status == 422
        assert await case.state() == after_first  # nothing written
    # Without a fingerprint: the stored result, as before fingerprints.
    same(await case.call(r, 0), first)
    if not isinstance(backend, RedisBackend):
        same(await case.call(r, 1), first)  # Redis: ids without fp are per partition
    assert await case.state() == after_first
    same(await case.call(f"{r}#{FP_A}", 0), first)  # still bound to the first request


@pytest.mark.parametrize("kind", PRIMITIVES)
async def test_results_stored_without_fingerprint_still_answer(
    backend: Backend, kind: str, ns: str
) -> None:
    case = await make_case(backend, kind, ns)
    r = rid()
    first = await case.call(r, 0)  # stored without fingerprint (as before this change)
    after_first = await case.state()
    same(await case.call(f"{r}#{FP_B}", 0), first)
    same(await case.call(f"{r}#{FP_A}", 0), first)
    if not isinstance(backend, RedisBackend):
        # Redis keeps results per partition: one stored without fingerprint (hence not
        # bound) answers only calls on its own partition.
        same(await case.call(f"{r}#{FP_B}", 1), first)
    assert await case.state() == after_first


@pytest.mark.parametrize("kind", PRIMITIVES)
async def test_concurrent_calls_with_one_id_apply_one(backend: Backend, kind: str, ns: str) -> None:
    case = await make_case(backend, kind, ns)
    r = rid()
    outcomes = await asyncio.gather(
        case.call(f"{r}#{FP_A}", 0), case.call(f"{r}#{FP_B}", 1), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, RequestIdReused)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(refused) == 1 and len(done) == 1, outcomes
    winner = 0 if isinstance(outcomes[1], RequestIdReused) else 1
    fp = (FP_A, FP_B)[winner]
    after = await case.state()
    same(await case.call(f"{r}#{fp}", winner), done[0])
    assert await case.state() == after


async def test_a_refused_write_stores_no_binding(backend: Backend, ns: str) -> None:
    """A write that fails (Conflict) stores nothing: the id is free for another request."""
    now = time.time()
    r = rid()
    cas = PutWrite(ns, "k", b"1", None, None, None, 3)
    with pytest.raises(Conflict):
        await backend.write_items(
            [cas], author="tester", now=now, history_limit=10, request_id=f"{r}#{FP_A}"
        )
    put = PutWrite(ns, "k", b"2", None, None, None, None)
    [row] = await backend.write_items(
        [put], author="tester", now=now, history_limit=10, request_id=f"{r}#{FP_B}"
    )
    assert not isinstance(row, bool) and row.version == 1 and row.value == b"2"


async def test_ids_are_scoped_without_the_fingerprint(backend: Backend, ns: str) -> None:
    """The fingerprint is not part of the id: another agent's id is another id, the same
    id with another fingerprint is the same id."""
    now = time.time()
    r = uuid.uuid4().hex
    w = PutWrite(ns, "k", b"1", None, None, None, None)
    for agent in ("a1", "a2"):
        [row] = await backend.write_items(
            [w], author=agent, now=now, history_limit=10, request_id=f"{agent}/{r}#{FP_A}"
        )
        assert not isinstance(row, bool) and row.author == agent
    with pytest.raises(RequestIdReused):
        await backend.write_items(
            [w], author="a1", now=now, history_limit=10, request_id=f"a1/{r}#{FP_B}"
        )
    item = await backend.get_item(ns, "k", now)
    assert item is not None and item.version == 2


def test_split_request_id() -> None:
    assert split_request_id(None) == (None, None)
    assert split_request_id("agent/id") == ("agent/id", None)
    assert split_request_id(f"agent/id#{FP_A}") == ("agent/id", FP_A)
    assert split_request_id("agent/id#") == ("agent/id", None)
    assert split_request_id("a#b#c") == ("a#b", "c")


def test_stored_results() -> None:
    plain = encode_result([True, None])
    assert plain.startswith(b"{")
    assert encode_stored_result([True, None], None) == plain
    bound = encode_stored_result([True, None], FP_A)
    assert bound == b"#" + FP_A.encode() + b"\n" + plain
    for data in (plain, bound):
        assert decode_stored_result(data, None) == [True, None]
        assert decode_stored_result(data, FP_A) == [True, None]
    assert decode_stored_result(plain, FP_B) == [True, None]
    with pytest.raises(RequestIdReused) as err:
        decode_stored_result(bound, FP_B)
    assert err.value.to_problem()["status"] == 422
    assert err.value.to_problem()["field"] == "request_id"


@pytest.fixture(params=[k for k in KINDS if k.startswith("redis")])
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """An opened Redis backend, standalone and Cluster."""
    b = hivemem.open_backend(store_url_of(request, request.param), SETTINGS)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@pytest.mark.parametrize("same_slot", [True, False])
async def test_redis_binding_in_and_out_of_the_written_slot(
    redis_backend: Backend, ns: str, same_slot: bool
) -> None:
    """On Redis the id is bound in the partition of the id: checked by the write script
    when that is the written partition (or any partition of a standalone server), else
    bound first (cluster) and freed again when the write is refused."""
    backend = redis_backend
    assert isinstance(backend, RedisBackend)
    p = partition_of(ns)
    for _ in range(10_000):
        r = rid()
        if (zlib.crc32(r.encode()) % PARTITIONS == p) == same_slot:
            break
    now = time.time()
    other = other_partition(ns, partition_of)

    async def put(space: str, fp: str, if_version: int | None = None) -> Any:
        w = PutWrite(space, "k", b"1", None, None, None, if_version)
        return await backend.write_items(
            [w], author="tester", now=now, history_limit=10, request_id=f"{r}#{fp}"
        )

    with pytest.raises(Conflict):  # refused: nothing stored, the id stays free
        await put(other, FP_A, if_version=5)
    first = await put(ns, FP_B)
    assert await put(ns, FP_B) == first
    for space, fp in ((other, FP_A), (ns, FP_A), (other, FP_B + "0")):
        with pytest.raises(RequestIdReused):
            await put(space, fp)
    assert await backend.get_item(other, "k", now) is None
    item = await backend.get_item(ns, "k", now)
    assert item is not None and item.version == 1
