"""The group commit of single puts (hivemem.backends.groups.PutGroups) on its own: how
waiting puts are shared among the flushers, failures, the backend's choice of what may
share a group, and draining. The backends' use of it is tested with their servers
(tests/test_redis.py, the conformance suite over PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio

import pytest

from hivemem.backends.groups import PutGroups


def first(puts: list[int], share: int) -> list[int]:
    return list(range(min(share, len(puts))))


async def test_waiting_puts_are_shared_among_the_flushers_and_each_gets_its_outcome() -> None:
    groups_sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(group: list[int]) -> list[int]:
        groups_sent.append(group)
        await release.wait()
        return [p * 10 for p in group]

    groups: PutGroups[int, int] = PutGroups(send, first, in_flight=2, name="t")
    calls = [asyncio.ensure_future(groups.put(p)) for p in range(8)]
    await asyncio.sleep(0.01)
    assert groups_sent == [[0, 1, 2, 3], [4, 5, 6, 7]]  # two groups of 4 in flight
    later = asyncio.ensure_future(groups.put(8))
    await asyncio.sleep(0.01)
    assert len(groups_sent) == 2  # no third group while two are in flight
    release.set()
    assert await asyncio.gather(*calls, later) == [p * 10 for p in range(9)]
    assert groups_sent[2] == [8]


async def test_one_in_flight_sends_every_waiting_put_together() -> None:
    sizes: list[int] = []

    async def send(group: list[int]) -> list[int]:
        sizes.append(len(group))
        await asyncio.sleep(0)
        return group

    groups: PutGroups[int, int] = PutGroups(send, first, in_flight=1, name="t")
    assert await asyncio.gather(*(groups.put(p) for p in range(20))) == list(range(20))
    assert sizes == [20]


async def test_a_failed_group_fails_its_puts_alone() -> None:
    async def send(group: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if 3 in group:
            raise RuntimeError("boom")
        return group

    groups: PutGroups[int, int] = PutGroups(send, first, in_flight=2, name="t")
    outcomes = await asyncio.gather(*(groups.put(p) for p in range(6)), return_exceptions=True)
    # groups [0, 1, 2] and [3, 4, 5]: the second failed as a whole
    assert outcomes[:3] == [0, 1, 2]
    assert all(isinstance(o, RuntimeError) for o in outcomes[3:])
    assert await groups.put(7) == 7  # and the next group goes on


async def test_puts_the_backend_keeps_apart_wait_for_a_later_group_in_order() -> None:
    sent: list[list[tuple[str, int]]] = []

    def one_per_key(puts: list[tuple[str, int]], share: int) -> list[int]:
        chosen: list[int] = []
        keys: set[str] = set()
        for i, (key, _) in enumerate(puts):
            if len(chosen) < share and key not in keys:
                keys.add(key)
                chosen.append(i)
        return chosen

    async def send(group: list[tuple[str, int]]) -> list[int]:
        sent.append(group)
        await asyncio.sleep(0)
        return [n for _, n in group]

    groups: PutGroups[tuple[str, int], int] = PutGroups(send, one_per_key, in_flight=1, name="t")
    puts = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("c", 5)]
    assert await asyncio.gather(*(groups.put(p) for p in puts)) == [1, 2, 3, 4, 5]
    assert sent == [[("a", 1), ("b", 2), ("c", 5)], [("a", 3)], [("a", 4)]]


async def test_after_runs_once_per_group_that_did_not_raise() -> None:
    calls: list[int] = []

    async def send(group: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if group == [9]:
            raise ValueError("no")
        return group

    groups: PutGroups[int, int] = PutGroups(
        send, first, in_flight=1, name="t", after=lambda: calls.append(1)
    )
    await asyncio.gather(*(groups.put(p) for p in range(3)))
    with pytest.raises(ValueError):
        await groups.put(9)
    assert calls == [1]


async def test_drain_waits_for_the_puts_in_flight() -> None:
    done: list[int] = []

    async def send(group: list[int]) -> list[int]:
        await asyncio.sleep(0.05)
        done.extend(group)
        return group

    groups: PutGroups[int, int] = PutGroups(send, first, in_flight=2, name="t")
    calls = [asyncio.ensure_future(groups.put(p)) for p in range(10)]
    await asyncio.sleep(0)
    await groups.drain(5.0)
    assert sorted(done) == list(range(10))
    await asyncio.gather(*calls)


async def test_a_cancelled_flusher_cancels_the_puts_of_its_group() -> None:
    started = asyncio.Event()

    async def send(group: list[int]) -> list[int]:
        started.set()
        await asyncio.sleep(60)
        return group

    groups: PutGroups[int, int] = PutGroups(send, first, in_flight=1, name="flusher-t")
    call = asyncio.ensure_future(groups.put(1))
    await started.wait()
    (flusher,) = [t for t in asyncio.all_tasks() if t.get_name() == "flusher-t"]
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
