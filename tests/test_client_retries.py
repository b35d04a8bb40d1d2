"""How RemoteHive tries a request again: which failures, on which replica, after which
pause, and what it raises when every try failed."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import hivemem
from hivemem.client.remote import RemoteHive
from hivemem.errors import Conflict, Unavailable
from tests.test_client_trust import ITEM, ThreadServer, json_response, problem_429, quick


def unavailable() -> web.Response:
    body = {"type": "/problems/unavailable", "status": 503, "detail": "store down"}
    return json_response(body, 503)


def item_app(answers: Callable[[int], web.Response | None]) -> web.Application:
    """Every item route answers ``answers(n)`` for its n-th request (1-based), or the
    item when that is None."""
    count = 0

    async def item(_: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return answers(count) or json_response(ITEM)

    app = web.Application()
    app.router.add_route("*", "/v1/items/{ns}/{key}", item)
    return app


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Records the pauses of the hives made in the test (which take ``asyncio.sleep`` when
    made) without waiting them; random draws are seeded."""
    pauses: list[float] = []
    real = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        task = asyncio.current_task()
        # aiohttp yields with sleep(0) now and then; the background loops of hives other
        # tests of this process left behind are not this test's pauses.
        if delay > 0 and not (task is not None and task.get_name().startswith("hivemem-")):
            pauses.append(delay)
        return await real(0, result)

    random.seed(20261130)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    yield pauses


async def test_a_read_answered_503_is_tried_on_the_other_replica() -> None:
    with (
        ThreadServer(item_app(lambda n: unavailable())) as down,
        ThreadServer(item_app(lambda n: None)) as up,
    ):
        settings = quick(client_backoff_seconds=0.01, client_circuit_failures=100)
        async with hivemem.connect(f"{down.url},{up.url}", settings=settings) as hive:
            for _ in range(6):
                item = await hive.get("ns", "k")
                assert item is not None and item.version == 1
        assert len(up.requests) == 6  # each read reached the healthy replica once
        assert 1 <= len(down.requests) <= 6  # the other one was tried, never twice in a row


async def test_a_write_carries_one_request_id_on_every_try() -> None:
    with ThreadServer(item_app(lambda n: unavailable() if n <= 2 else None)) as server:
        settings = quick(client_backoff_seconds=0.01, client_circuit_failures=100)
        async with hivemem.connect(server.url, settings=settings) as hive:
            await hive.put("ns", "k", 1)
    ids = {r.headers["X-Hivemem-Request-Id"] for r in server.requests}
    assert len(server.requests) == 3 and len(ids) == 1


async def test_every_try_answered_503_raises_the_services_error_after_client_attempts() -> None:
    with ThreadServer(item_app(lambda n: unavailable())) as server:
        settings = quick(client_attempts=3, client_backoff_seconds=0.01)
        async with hivemem.connect(server.url, settings=settings) as hive:
            with pytest.raises(Unavailable) as info:
                await hive.get("ns", "k")
    assert info.value.message == "store down"
    assert len(server.requests) == 3


async def test_no_replica_reached_is_unavailable_naming_the_tries_and_the_cause() -> None:
    with ThreadServer(web.Application()) as server:
        url = server.url
    settings = quick(client_attempts=2, client_backoff_seconds=0.01)
    async with hivemem.connect(url, settings=settings) as hive:
        with pytest.raises(Unavailable) as info:
            await hive.get("ns", "k")
    assert "after 2 tries" in info.value.message and url in info.value.message
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


async def test_an_answer_other_than_502_503_504_is_never_tried_again() -> None:
    conflict = {"type": "/problems/conflict", "status": 409, "detail": "stale"}
    missing = {"type": "/problems/not-found", "status": 404, "detail": "gone", "field": "key"}
    with ThreadServer(
        item_app(lambda n: json_response(conflict if n == 1 else missing, 409 if n == 1 else 404))
    ) as server:
        async with hivemem.connect(server.url, settings=quick()) as hive:
            with pytest.raises(Conflict):
                await hive.put("ns", "k", 1, if_version=1)
            assert await hive.get("ns", "k") is None
    assert len(server.requests) == 2


async def test_tries_pause_with_full_jitter_doubling_up_to_one_second(
    slept: list[float],
) -> None:
    with ThreadServer(item_app(lambda n: unavailable())) as server:
        settings = quick(client_attempts=5, client_backoff_seconds=0.4)
        async with hivemem.connect(server.url, settings=settings) as hive:
            with pytest.raises(Unavailable):
                await hive.get("ns", "k")
    caps = [0.4, 0.8, 1.0, 1.0]  # 0.4 * 2**(n-1), at most 1 s
    assert len(slept) == 4
    assert all(0 <= pause <= cap for pause, cap in zip(slept, caps, strict=True)), slept
    assert len(set(slept)) == 4  # drawn, not fixed


async def test_a_read_answered_429_waits_what_retry_after_asks_then_succeeds(
    slept: list[float],
) -> None:
    with ThreadServer(item_app(lambda n: problem_429(2) if n == 1 else None)) as server:
        async with hivemem.connect(server.url, settings=quick()) as hive:
            assert isinstance(hive, RemoteHive)
            assert await hive.get("ns", "k") is not None
            assert all(ep.closed and ep.failures == 0 for ep in hive._shared.endpoints.all)
    assert len(slept) == 1 and 2.0 <= slept[0] <= 2.2  # plus at most 10 % of jitter
    assert len(server.requests) == 2
