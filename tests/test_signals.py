"""ChangeSignal (backends/signals.py): how watchers of one process learn of changes."""

from __future__ import annotations

import asyncio

import pytest

from hivemem.backends.signals import ChangeSignal


async def test_a_notify_after_the_read_generation_returns_at_once() -> None:
    signal = ChangeSignal()
    generation = signal.generation
    signal.notify()
    async with asyncio.timeout(1):
        await signal.wait(generation, 30)


async def test_a_wait_ends_at_its_limit_without_a_change() -> None:
    signal = ChangeSignal()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await signal.wait(signal.generation, 0.05)
    assert loop.time() - started >= 0.05


async def test_a_cancellation_landing_as_the_change_is_signalled_is_not_lost() -> None:
    """On Python 3.11, asyncio.wait_for returns normally when the task is cancelled in
    the loop turn its future is set: a watcher cancelled then (Ctrl-C on ``hivemem
    watch`` as the sweeper commits) went on waiting."""
    signal = ChangeSignal()
    waiter = asyncio.create_task(signal.wait(signal.generation, 30))
    await asyncio.sleep(0.01)  # the waiter is parked
    signal.notify()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
