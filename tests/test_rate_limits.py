"""RateLimiter: per-agent, per-action-class limits in process and shared through Redis.

Timing: the in-process storage counts in windows aligned to multiples of the period
(epoch seconds), so the tests that count against ``2/second`` first wait for the start
of a second (:func:`early_in_window`): their hits then land well inside one window and
no window edge can hand out an extra hit. The Redis storage's windows start at a key's
first hit, so the Redis tests need no alignment (and use ``/minute`` limits that cannot
roll over during a test).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from hivemem.config import Settings
from hivemem.errors import InvalidInput, RateLimited
from hivemem.policy import limits as limits_module
from hivemem.policy.limits import RateLimiter
from tests.conftest import free_port
from tests.servers.redis import RedisServer


def agent() -> str:
    """An agent name no other test uses (so counters in a shared Redis never collide)."""
    return f"a{uuid.uuid4().hex[:10]}"


async def early_in_window(period: float = 1.0, latest: float = 0.3) -> None:
    """Wait until at most ``latest`` seconds have passed in the current window."""
    into = time.time() % period
    if into > latest:
        await asyncio.sleep(period - into + 0.01)


@pytest.fixture
async def make_limiter() -> AsyncIterator[Callable[..., RateLimiter]]:
    """``make_limiter(**settings)``: RateLimiters that are closed after the test."""
    made: list[RateLimiter] = []

    def make(**settings: str) -> RateLimiter:
        limiter = RateLimiter(Settings(**settings))
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


# In-process storage --------------------------------------------------------------------


async def test_over_the_limit_is_refused_with_retry_after(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    limiter = make_limiter(rate_limit_read="2/second")
    assert limiter.enabled
    alice = agent()
    await early_in_window()
    await limiter.hit(alice, "read")
    await limiter.hit(alice, "read")
    with pytest.raises(RateLimited) as caught:
        await limiter.hit(alice, "read")
    err = caught.value
    assert 0 < err.retry_after <= 1.0
    assert "read" in err.message and "2 per 1 second" in err.message and alice in err.message
    assert err.status == 429
    # Refused hits are not counted, and keep being refused within the window.
    with pytest.raises(RateLimited):
        await limiter.hit(alice, "read")


async def test_limits_are_per_agent_and_per_action_class(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    limiter = make_limiter(
        rate_limit_read="2/second", rate_limit_search="2/second", rate_limit_tasks="2/second"
    )
    alice, bob = agent(), agent()
    await early_in_window()
    for _ in range(2):
        await limiter.hit(alice, "read")
    with pytest.raises(RateLimited):
        await limiter.hit(alice, "read")
    # Another agent has its own allowance.
    await limiter.hit(bob, "read")
    await limiter.hit(bob, "read")
    # Another limited class of the same agent is unaffected ...
    await limiter.hit(alice, "search")
    await limiter.hit(alice, "search")
    await limiter.hit(alice, "tasks")
    await limiter.hit(alice, "tasks")
    with pytest.raises(RateLimited):
        await limiter.hit(alice, "tasks")
    # ... and classes without a limit are never refused.
    for _ in range(100):
        await limiter.hit(alice, "write")
        await limiter.hit(alice, "publish")


async def test_window_frees_after_time_passes(make_limiter: Callable[..., RateLimiter]) -> None:
    """Hits land in the first 0.3 s of a second; 1.1 s later the window edge is at least
    0.1 s behind, so the previous window counts 2 * (1 - 0.1..0.4) -> floor 1: one hit
    fits (0.1 s of margin on the edge; a slow sleep only adds to it)."""
    limiter = make_limiter(rate_limit_read="2/second")
    alice = agent()
    await early_in_window()
    await limiter.hit(alice, "read")
    await limiter.hit(alice, "read")
    with pytest.raises(RateLimited):
        await limiter.hit(alice, "read")
    await asyncio.sleep(1.1)
    await limiter.hit(alice, "read")


async def test_waiting_retry_after_is_enough(make_limiter: Callable[..., RateLimiter]) -> None:
    limiter = make_limiter(rate_limit_read="2/second")
    alice = agent()
    await early_in_window()
    await limiter.hit(alice, "read")
    await limiter.hit(alice, "read")
    with pytest.raises(RateLimited) as caught:
        await limiter.hit(alice, "read")
    await asyncio.sleep(caught.value.retry_after + 0.05)
    await limiter.hit(alice, "read")


async def test_several_limits_shortest_window_first(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    """A burst refused by the per-second limit does not use up the per-minute one."""
    limiter = make_limiter(rate_limit_write="5/minute;1/second")
    minute, second = (str(item) for item in reversed(limiter.limits("write")))
    assert (minute, second) == ("5 per 1 minute", "1 per 1 second")
    alice = agent()
    await early_in_window()
    await limiter.hit(alice, "write")
    for _ in range(3):
        with pytest.raises(RateLimited) as caught:
            await limiter.hit(alice, "write")
        assert "1 per 1 second" in caught.value.message
    strategy = limiter._strategy
    assert strategy is not None
    stats = await strategy.get_window_stats(limiter.limits("write")[1], alice, "write")
    assert stats.remaining == 4


async def test_no_limits_means_no_storage(
    make_limiter: Callable[..., RateLimiter], caplog: pytest.LogCaptureFixture
) -> None:
    """All limits empty: nothing is counted, no storage is made or asked (the store
    points at a port nothing listens on, and nothing is logged)."""
    limiter = make_limiter(rate_limit_store=f"redis://127.0.0.1:{free_port()}/0")
    assert not limiter.enabled
    assert limiter._storage is None
    with caplog.at_level(logging.WARNING, logger="hivemem.limits"):
        for _ in range(1000):
            await limiter.hit("alice", "read")
    assert not caplog.records


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        RateLimiter(Settings(rate_limit_search="lots per second"))
    assert caught.value.field == "rate_limit_search"
    with pytest.raises(InvalidInput) as caught:
        RateLimiter(Settings(rate_limit_read="0/second"))
    assert caught.value.field == "rate_limit_read"
    for store in ("memcached://127.0.0.1:11211", "redis://", "redis+cluster://h1,h2:7000"):
        with pytest.raises(InvalidInput) as caught:
            RateLimiter(Settings(rate_limit_read="1/second", rate_limit_store=store))
        assert caught.value.field == "rate_limit_store"


async def test_unknown_action_class(make_limiter: Callable[..., RateLimiter]) -> None:
    limiter = make_limiter(rate_limit_read="1/second")
    with pytest.raises(ValueError, match="unknown action class"):
        await limiter.hit("alice", "dance")


# Redis storage ---------------------------------------------------------------------------


async def test_replicas_share_limits_through_redis(
    redis_url: str, make_limiter: Callable[..., RateLimiter]
) -> None:
    """Two RateLimiters (two service replicas) on one real Redis count together."""
    one = make_limiter(rate_limit_read="3/minute", rate_limit_store=redis_url)
    two = make_limiter(rate_limit_read="3/minute", rate_limit_store=redis_url)
    alice, bob = agent(), agent()
    await one.hit(alice, "read")
    await two.hit(alice, "read")
    await one.hit(alice, "read")
    for limiter in (two, one):
        with pytest.raises(RateLimited) as caught:
            await limiter.hit(alice, "read")
        # The window started at the first hit, a minute long: it frees in ~60 s.
        assert 50 < caught.value.retry_after <= 60.01
        assert "3 per 1 minute" in caught.value.message
    # Other agents and other classes are untouched.
    await two.hit(bob, "read")
    await two.hit(alice, "write")


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_unreachable_redis_fails_open_and_warns_once(
    scheme: str,
    make_limiter: Callable[..., RateLimiter],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens on the port: every request is let through, one warning is logged."""
    monkeypatch.setattr(limits_module, "OUTAGE_BYPASS_SECONDS", 0.0)  # ask Redis every time
    limiter = make_limiter(
        rate_limit_read="1/minute", rate_limit_store=f"{scheme}://127.0.0.1:{free_port()}"
    )
    alice = agent()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hivemem.limits"):
        for _ in range(5):
            await limiter.hit(alice, "read")
    assert time.monotonic() - started < 5.0  # a refused connection fails fast
    warnings = [r for r in caplog.records if r.name == "hivemem.limits"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "not enforced" in warnings[0].getMessage()


async def test_limits_apply_again_when_redis_comes_back(
    make_limiter: Callable[..., RateLimiter], tmp_path_factory: pytest.TempPathFactory
) -> None:
    port = free_port()
    limiter = make_limiter(
        rate_limit_read="1/minute", rate_limit_store=f"redis://127.0.0.1:{port}/0"
    )
    alice = agent()
    await limiter.hit(alice, "read")  # fails open; requests skip Redis for a second
    await limiter.hit(alice, "read")
    with RedisServer(tmp_path_factory.mktemp("redis-late"), port=port, appendfsync="no"):
        await asyncio.sleep(limits_module.OUTAGE_BYPASS_SECONDS + 0.1)
        await limiter.hit(alice, "read")
        with pytest.raises(RateLimited):
            await limiter.hit(alice, "read")
