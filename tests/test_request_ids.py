"""Request ids: a write repeated with the same request id is applied once and the repeat
gets the first result; on every embedded store kind and over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

import hivemem
from hivemem import Conflict, InvalidInput
from hivemem.core import LocalHive
from tests.conformance._feed import events_after, mine
from tests.conftest import selected_stores, store_url_of


@pytest.fixture(params=[k for k in selected_stores() if not k.startswith("remote")])
async def local(request: pytest.FixtureRequest) -> AsyncIterator[LocalHive]:
    """A LocalHive on each embedded store kind (request ids are set on LocalHive views;
    over HTTP the header does it, see test_http_*)."""
    hive = hivemem.connect(store_url_of(request, request.param), agent="tester")
    assert isinstance(hive, LocalHive)
    async with hive:
        yield hive


async def test_item_writes_apply_once(local: LocalHive, ns: str) -> None:
    head = await local.head()
    once = local.with_request_id("put-1")
    first = await once.put(ns, "k", {"n": 1})
    again = await once.put(ns, "k", {"n": 1})
    assert again == first and first.version == 1
    item = await local.get(ns, "k")
    assert item is not None and item.version == 1
    other = local.as_agent("someone-else").with_request_id("put-1")
    assert (await other.put(ns, "k", {"n": 2})).version == 2  # another agent's id space
    batch = local.with_request_id("batch-1")
    ops = [hivemem.PutOp(namespace=ns, key="b", value=1), hivemem.DeleteOp(namespace=ns, key="k")]
    r1 = await batch.batch(ops)
    r2 = await batch.batch(ops)
    assert r1 == r2 and r1[1] is True
    deleted = local.with_request_id("del-1")
    assert await deleted.delete(ns, "b") is True
    assert await deleted.delete(ns, "b") is True  # the first answer, not "absent"
    events = mine(await events_after(local, head), ns)
    assert [(e.type, e.key, e.version) for e in events] == [
        ("item.put", "k", 1),
        ("item.put", "k", 2),
        ("item.put", "b", 1),
        ("item.deleted", "k", 2),
        ("item.deleted", "b", 1),
    ]


async def test_a_failed_write_stores_no_result(local: LocalHive, ns: str) -> None:
    await local.put(ns, "k", 0)
    view = local.with_request_id("cas-1")
    with pytest.raises(Conflict):
        await view.put(ns, "k", 1, if_version=2)
    await local.put(ns, "k", 0)  # now at version 2: the same request succeeds
    assert (await view.put(ns, "k", 1, if_version=2)).version == 3
    assert (await view.put(ns, "k", 1, if_version=2)).version == 3


async def test_session_writes_apply_once(local: LocalHive, ns: str) -> None:
    view = local.with_request_id(f"create-{ns}")
    s1 = await view.create_session(app=ns, session_id=f"s-{ns}")
    s2 = await view.create_session(app=ns, session_id=f"s-{ns}")  # no Conflict: a repeat
    assert s1 == s2
    append = local.with_request_id(f"append-{ns}")
    m1 = await append.append_messages(s1.id, [{"role": "user", "content": "hi"}])
    m2 = await append.append_messages(s1.id, [{"role": "user", "content": "hi"}])
    assert m1 == m2 and [m.seq for m in m1] == [1]
    state = local.with_request_id(f"state-{ns}")
    st1 = await state.save_state(s1.id, {"step": 1}, if_version=0)
    st2 = await state.save_state(s1.id, {"step": 1}, if_version=0)  # no Conflict
    assert st1.state_version == st2.state_version == 1
    session = await local.get_session(s1.id)
    assert session.messages == 1 and session.turns == 1 and session.state_version == 1
    pub = local.with_request_id(f"pub-{ns}")
    e1 = await pub.publish(f"{ns}/chan", {"x": 1})
    e2 = await pub.publish(f"{ns}/chan", {"x": 1})
    assert e1.cursor == e2.cursor


def test_request_id_is_checked() -> None:
    hive = hivemem.connect("sqlite://:memory:")
    assert isinstance(hive, LocalHive)
    for bad in ("", "x" * 129, "a b", "a/b"):
        with pytest.raises(InvalidInput) as err:
            hive.with_request_id(bad)
        assert err.value.field == "request_id"


async def test_http_repeat_with_the_same_request_id(service: object, ns: str) -> None:
    url = service.url  # type: ignore[attr-defined]
    headers = {"X-Hivemem-Agent": "writer", "X-Hivemem-Request-Id": f"r-{ns}"}
    async with aiohttp.ClientSession() as http:
        bodies = []
        for _ in range(3):
            async with http.put(
                f"{url}/v1/items/{ns}/k", json={"value": 1}, headers=headers
            ) as resp:
                assert resp.status in (200, 201)
                bodies.append(orjson.loads(await resp.read()))
        assert bodies[0] == bodies[1] == bodies[2]
        assert bodies[0]["version"] == 1
        async with http.get(f"{url}/v1/items/{ns}/k") as resp:
            assert orjson.loads(await resp.read())["version"] == 1
        bad = {**headers, "X-Hivemem-Request-Id": "no spaces allowed"}
        async with http.put(f"{url}/v1/items/{ns}/k", json={"value": 2}, headers=bad) as resp:
            assert resp.status == 422
            assert orjson.loads(await resp.read())["field"] == "X-Hivemem-Request-Id"
        async with http.get(f"{url}/v1/items/{ns}/k") as resp:
            assert orjson.loads(await resp.read())["version"] == 1
        # The same id with another request: refused, never answered with the first result.
        async with http.put(
            f"{url}/v1/items/{ns}/k", json={"value": "other"}, headers=headers
        ) as resp:
            assert resp.status == 422
            assert orjson.loads(await resp.read())["field"] == "X-Hivemem-Request-Id"
        same = {k: v for k, v in headers.items() if k != "X-Hivemem-Request-Id"}
        idem = {**same, "Idempotency-Key": f'"{headers["X-Hivemem-Request-Id"]}"'}
        async with http.put(f"{url}/v1/items/{ns}/k", json={"value": 1}, headers=idem) as resp:
            assert resp.status in (200, 201)
            assert orjson.loads(await resp.read()) == bodies[0]  # Idempotency-Key is the same id
        async with http.get(f"{url}/v1/items/{ns}/k") as resp:
            assert orjson.loads(await resp.read())["version"] == 1
