"""Leases with fencing tokens, signals, wait_for, idempotent calls and the agent
registry: the same on every store kind, embedded and over HTTP."""

from __future__ import annotations

import asyncio

import pytest

import hivemem
from hivemem import Conflict, InvalidInput, OnceFailed
from tests.conftest import Clock


async def test_a_lease_has_one_holder_and_tokens_only_grow(hive: hivemem.Hive, ns: str) -> None:
    a, b = hive.as_agent("a"), hive.as_agent("b")
    first = await a.acquire(f"{ns}/lock", 5)
    assert (first.holder, first.token) == ("a", 1)
    with pytest.raises(Conflict) as err:
        await b.acquire(f"{ns}/lock", 5)
    assert err.value.field == "name"
    renewed = await a.renew(first, ttl=10)
    assert renewed.token == first.token and renewed.expires_at > first.expires_at
    assert await a.release(renewed) is True
    assert await a.release(renewed) is False
    second = await b.acquire(f"{ns}/lock", 5)
    assert second.token == 2
    with pytest.raises(Conflict) as lost:
        await a.renew(renewed)
    assert lost.value.field == "lease"


async def test_the_older_holders_fenced_write_is_refused(
    hive: hivemem.Hive, ns: str, clock: Clock
) -> None:
    a, b = hive.as_agent("a"), hive.as_agent("b")
    old = await a.acquire(f"{ns}/doc", 1.0)
    await a.put(ns, "report", "draft by a", fence=(f"{ns}/doc", old.token))
    await clock.sleep(1.2)  # a pauses past its ttl
    new = await b.acquire(f"{ns}/doc", 5)
    assert new.token > old.token
    await b.put(ns, "report", "final by b", fence=(f"{ns}/doc", new.token))
    with pytest.raises(Conflict) as err:
        await a.put(ns, "report", "stale by a", fence=(f"{ns}/doc", old.token))
    assert err.value.field == "fence"
    item = await hive.get(ns, "report")
    assert item is not None and item.value == "final by b" and item.version == 2
    with pytest.raises(Conflict) as both:  # the item's own precondition still applies
        await b.put(ns, "report", "x", if_version=1, fence=(f"{ns}/doc", new.token))
    assert both.value.field == "if_version"
    with pytest.raises(InvalidInput) as bad:
        await b.put(ns, "report", "x", fence=(f"{ns}/doc", 0))  # type: ignore[arg-type]
    assert bad.value.field == "fence"


async def test_a_waiting_acquire_gets_the_lease_when_it_is_released(
    hive: hivemem.Hive, ns: str
) -> None:
    a, b = hive.as_agent("a"), hive.as_agent("b")
    held = await a.acquire(f"{ns}/q", 30)
    waiter = asyncio.create_task(b.acquire(f"{ns}/q", 5, wait=10))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await a.release(held)
    got = await asyncio.wait_for(waiter, 5)
    assert (got.holder, got.token) == ("b", 2)


async def test_the_lease_context_manager_renews_and_releases(hive: hivemem.Hive, ns: str) -> None:
    # renewals every ttl/3 = 0.5 s: one may take up to 1 s (a ttl of 0.6 s was lost once
    # through the service over moto's DynamoDB, which answers one request at a time)
    async with hive.lease(f"{ns}/cm", 1.5) as lease:
        await asyncio.sleep(3.0)  # two ttls: kept alive by renewals
        with pytest.raises(Conflict):
            await hive.as_agent("other").acquire(f"{ns}/cm", 1)
    after = await hive.as_agent("other").acquire(f"{ns}/cm", 1)
    assert after.token == lease.token + 1


async def test_signals_wake_waiters_with_a_predicate(hive: hivemem.Hive, ns: str) -> None:
    assert await hive.get_signal(f"{ns}/phase") is None
    waiter = asyncio.create_task(hive.wait_signal(f"{ns}/phase", lambda v: v == "done", timeout=10))
    await asyncio.sleep(0.2)
    await hive.as_agent("planner").set_signal(f"{ns}/phase", "running")
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await hive.as_agent("planner").set_signal(f"{ns}/phase", "done")
    got = await asyncio.wait_for(waiter, 5)
    assert (got.value, got.version, got.set_by) == ("done", 2, "planner")
    with pytest.raises(TimeoutError):
        await hive.wait_signal(f"{ns}/phase", lambda v: v == "never", timeout=0.3)


async def test_wait_for_returns_when_an_item_meets_the_condition(
    hive: hivemem.Hive, ns: str
) -> None:
    waiter = asyncio.create_task(
        hive.wait_for(ns, "progress", lambda item: item.value >= 3, timeout=10)
    )
    for n in range(1, 4):
        await asyncio.sleep(0.1)
        await hive.put(ns, "progress", n)
    item = await asyncio.wait_for(waiter, 5)
    assert item.value == 3
    with pytest.raises(TimeoutError):
        await hive.wait_for(ns, "progress", lambda item: item.value > 100, timeout=0.3)


async def test_ten_concurrent_once_calls_run_the_function_once(hive: hivemem.Hive, ns: str) -> None:
    calls = 0

    async def send_email() -> dict[str, str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return {"message_id": "m-1"}

    key = f"{ns}:turn-3:send_email"
    results = await asyncio.gather(*(hive.once(key, send_email) for _ in range(10)))
    assert calls == 1 and results == [{"message_id": "m-1"}] * 10
    assert await hive.once(key, send_email) == {"message_id": "m-1"}
    assert calls == 1


async def test_a_failed_once_call_runs_again_unless_its_error_is_kept(
    hive: hivemem.Hive, ns: str
) -> None:
    attempts = 0

    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("smtp down")
        return "sent"

    with pytest.raises(RuntimeError):
        await hive.once(f"{ns}:k", flaky)
    assert await hive.once(f"{ns}:k", flaky) == "sent"
    assert attempts == 2

    def broken() -> None:
        raise ValueError("bad address")

    with pytest.raises(ValueError):
        await hive.once(f"{ns}:kept", broken, keep_errors=True)
    with pytest.raises(OnceFailed) as kept:
        await hive.once(f"{ns}:kept", broken, keep_errors=True)
    assert "bad address" in kept.value.message


async def test_once_results_are_per_agent_unless_shared(hive: hivemem.Hive, ns: str) -> None:
    a, b = hive.as_agent("a"), hive.as_agent("b")
    assert await a.once(f"{ns}:x", lambda: "a's") == "a's"
    assert await b.once(f"{ns}:x", lambda: "b's") == "b's"
    assert await a.once(f"{ns}:s", lambda: "first", shared=True) == "first"
    assert await b.once(f"{ns}:s", lambda: "second", shared=True) == "first"

    @a.idempotent(key=lambda to, turn: f"{ns}:turn-{turn}:mail:{to}")
    def mail(to: str, turn: int) -> str:
        return f"mailed {to} at turn {turn}"

    assert await mail("bob", 1) == "mailed bob at turn 1"
    assert await mail("bob", 1) == "mailed bob at turn 1"


async def test_registered_agents_are_found_by_capability_and_unregistered(
    hive: hivemem.Hive, ns: str
) -> None:
    name = f"{ns}-summariser"
    record = await hive.register(
        name, capabilities=["summarise", "translate"], endpoint="http://10.0.0.7:9000", ttl=5
    )
    assert record.healthy and record.capabilities == ["summarise", "translate"]
    found = await hive.agents(capability="translate")
    assert name in [r.name for r in found]
    assert name not in [r.name for r in await hive.agents(capability="nothing")]
    beat = await hive.heartbeat_agent(name)
    assert beat.last_seen >= record.last_seen
    assert await hive.unregister(name) is True
    assert name not in [r.name for r in await hive.agents(healthy=None)]
    page = await hive.read_events("_agents", after="0", limit=1000)
    mine = [e.type for e in page.items if e.key == name]
    assert mine[0] == "agent.registered" and mine[-1] == "agent.unregistered"


async def test_an_agent_without_heartbeats_is_down_once(hive: hivemem.Hive, ns: str) -> None:
    name = f"{ns}-silent"
    await hive.register(name, ttl=1, heartbeat=False)
    for _ in range(60):
        await asyncio.sleep(0.1)
        if name in [r.name for r in await hive.agents(healthy=False)]:
            break
    down = [r for r in await hive.agents(healthy=False) if r.name == name]
    assert down and not down[0].healthy
    await asyncio.sleep(2.5)  # later rounds write nothing more
    page = await hive.read_events("_agents", after="0", limit=1000)
    assert [e.type for e in page.items if e.key == name] == ["agent.registered", "agent.down"]
    back = await hive.heartbeat_agent(name)
    assert back.healthy
    await hive.unregister(name)
