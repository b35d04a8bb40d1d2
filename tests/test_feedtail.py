"""One reader of the feed per process (core/feedtail.py): watchers share its tail."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import hivemem
from hivemem.config import Settings
from hivemem.core import LocalHive, feedtail
from hivemem.models import Event


@pytest.fixture
async def hive() -> AsyncIterator[LocalHive]:
    h = hivemem.connect("sqlite://:memory:", agent="w", settings=Settings(embedder="none"))
    assert isinstance(h, LocalHive)
    async with h:
        yield h


def count_reads(hive: LocalHive, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the backend's feed queries (by anyone: the tail or a watcher on its own)."""
    backend = hive._shared.backend
    calls = [0]
    real = backend.read_events

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(backend, "read_events", counted)
    return calls


async def collect(hive: LocalHive, prefix: str, n: int, out: list[Event]) -> None:
    async for event in hive.watch(prefix):
        out.append(event)
        if len(out) == n:
            return


async def until(condition: Any) -> None:
    """Poll ``condition`` every 10 ms for at most 20 s."""
    async with asyncio.timeout(20):
        while not condition():  # noqa: ASYNC110 (a condition over many tasks' lists)
            await asyncio.sleep(0.01)


async def test_a_write_costs_one_feed_query_however_many_watch(
    hive: LocalHive, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    calls = count_reads(hive, monkeypatch)
    watchers = 200
    writes = 10
    got: list[list[Event]] = [[] for _ in range(watchers)]
    tasks = [asyncio.create_task(collect(hive, ns, 1 + writes, got[i])) for i in range(watchers)]
    await asyncio.sleep(0.2)  # every watcher is waiting
    await hive.put(ns, "warm-up", 0)  # the last watchers on their own join the tail here
    await until(lambda: all(len(g) == 1 for g in got))
    before = calls[0]
    for n in range(writes):
        await hive.put(ns, f"k{n}", n)
        await until(lambda: all(len(g) == n + 2 for g in got))  # noqa: B023
    await asyncio.gather(*tasks)
    # Without the shared tail: one query per watcher per write (2,000 here).
    assert calls[0] - before <= 2 * writes, calls[0] - before
    keys = ["warm-up", *(f"k{n}" for n in range(writes))]
    assert all([e.key for e in g] == keys for g in got)
    tail = hive._shared.tail
    assert tail is not None and tail._subscribers == 0 and not tail._prefixes


async def test_a_watcher_further_behind_than_the_tail_keeps_reads_the_rest_on_its_own(
    hive: LocalHive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedtail, "TAIL_EVENTS", 5)
    ns = f"t{uuid.uuid4().hex[:8]}"
    slow = hive.watch(ns)
    fast: list[Event] = []
    first = asyncio.ensure_future(anext(slow))  # type: ignore[arg-type]
    follower = asyncio.create_task(collect(hive, ns, 30, fast))
    await asyncio.sleep(0.2)
    for n in range(30):
        await hive.put(ns, f"k{n}", n)
    await asyncio.wait_for(follower, 20)
    # The slow watcher took one event, then nothing while 29 more went by the tail's 5.
    events = [await asyncio.wait_for(first, 20)]
    while len(events) < 30:
        events.append(await asyncio.wait_for(anext(slow), 20))  # type: ignore[arg-type]
    await slow.aclose()  # type: ignore[attr-defined]
    assert [e.key for e in events] == [f"k{n}" for n in range(30)]
    assert [e.key for e in fast] == [f"k{n}" for n in range(30)]
    assert [e.cursor for e in events] == [e.cursor for e in fast]


async def test_the_tail_keeps_a_bounded_number_of_bytes(
    hive: LocalHive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedtail, "TAIL_BYTES", 20_000)
    ns = f"t{uuid.uuid4().hex[:8]}"
    got: list[Event] = []
    follower = asyncio.create_task(collect(hive, ns, 21, got))
    await asyncio.sleep(0.2)
    for _ in range(20):
        await hive.publish(ns, "x" * 5_000)  # about 5 KB each
    await until(lambda: len(got) == 20)
    tail = hive._shared.tail
    assert tail is not None and tail._subscribers == 1
    # 20 events went through; about 5.3 KB each, the tail holds the newest 3.
    assert tail.end - tail._start == len(tail._events) == 3, (tail._start, tail.end)
    assert tail._bytes <= 20_000
    await hive.publish(ns, "last")
    await asyncio.wait_for(follower, 20)
    assert len(got) == 21


async def test_watchers_of_other_prefixes_and_a_replay_share_the_tail(hive: LocalHive) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    await hive.put(f"{ns}/a", "old", 0)
    start = await hive.head()
    await hive.put(f"{ns}/b", "old", 0)
    mine: list[Event] = []
    theirs: list[Event] = []
    replay: list[Event] = []
    tasks = [
        asyncio.create_task(collect(hive, f"{ns}/a", 2, mine)),
        asyncio.create_task(collect(hive, f"{ns}/b", 2, theirs)),
    ]
    await asyncio.sleep(0.2)
    for key in ("x", "y"):
        await hive.put(f"{ns}/a", key, 1)
        await hive.put(f"{ns}/ab", key, 1)  # not under ns/a: whole segments
        await hive.put(f"{ns}/b", key, 1)

    async def replaying() -> None:  # from a cursor the tail never saw
        async for event in hive.watch(ns, after=start):
            replay.append(event)
            if len(replay) == 7:
                return

    await asyncio.wait_for(asyncio.gather(*tasks, replaying()), 20)
    assert [(e.namespace, e.key) for e in mine] == [(f"{ns}/a", "x"), (f"{ns}/a", "y")]
    assert [(e.namespace, e.key) for e in theirs] == [(f"{ns}/b", "x"), (f"{ns}/b", "y")]
    assert [(e.namespace, e.key) for e in replay] == [
        (f"{ns}/b", "old"),
        *((f"{ns}/{p}", k) for k in ("x", "y") for p in ("a", "ab", "b")),
    ]


async def test_a_write_wakes_only_the_watchers_of_prefixes_above_it(hive: LocalHive) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tail = hive._feed_tail()
    signals = {p: tail.subscribe(p) for p in ("", ns, f"{ns}/a", f"{ns}/a/b", f"{ns}/ab")}
    try:
        await asyncio.sleep(0.1)  # the reader has started at the head
        before = {p: s.generation for p, s in signals.items()}
        await hive.put(f"{ns}/a", "k", 1)
        await until(lambda: signals[""].generation > before[""])
        woken = {p for p, s in signals.items() if s.generation > before[p]}
        assert woken == {"", ns, f"{ns}/a"}
    finally:
        for p in signals:
            tail.unsubscribe(p)
    assert not tail._prefixes and tail._subscribers == 0


async def test_a_closed_tail_and_indexer_start_nothing_again(tmp_path: Any) -> None:
    """A watcher or a search racing a hive's close must not start a reader or an indexer
    over the store being closed (they would retry against it forever)."""
    settings = Settings(embedder="none")
    hive = hivemem.connect(f"sqlite:///{tmp_path}/c.db", agent="t", settings=settings)
    assert isinstance(hive, LocalHive)
    await hive.open()
    tail = hive._feed_tail()
    tail.subscribe("a")
    assert tail._task is not None
    await tail.close()
    tail.subscribe("b")  # late: reads on its own, starts no reader
    assert tail._task is None
    from tests.test_vectors import FakeEmbedder

    indexed = LocalHive(hive.backend, agent="t", settings=settings, embedder=FakeEmbedder())
    await indexed.open()
    indexed._start_indexer()
    indexer = indexed.indexer
    assert indexer is not None and indexer.running
    await indexer.close()
    indexer.start()
    assert not indexer.running
    await indexed.close()
    await hive.close()


async def test_the_tail_outlives_an_error_of_the_engine_driver(
    hive: LocalHive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver error that is not the store's own (as a cluster client raises during a
    failover) costs the joined watchers a retry, never their events."""
    monkeypatch.setattr(feedtail, "TAIL_RETRY_SECONDS", 0.01)
    ns = f"t{uuid.uuid4().hex[:8]}"
    got: list[Event] = []
    start = await hive.head()

    async def watch() -> None:
        async for event in hive.watch(ns, after=start):
            got.append(event)
            if len(got) == 4:
                return

    watcher = asyncio.create_task(watch())
    await hive.put(ns, "k0", 0)
    await until(lambda: len(got) == 1)
    backend = hive._shared.backend
    real = backend.read_events
    failures = [3]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("driver error")
        return await real(*args, **kwargs)

    monkeypatch.setattr(backend, "read_events", flaky)
    for n in range(1, 4):
        await hive.put(ns, f"k{n}", n)
    await asyncio.wait_for(watcher, 20)
    assert failures[0] == 0
    assert [e.key for e in got] == ["k0", "k1", "k2", "k3"]


async def test_the_reader_marks_each_read_even_when_no_event_comes(tmp_path: Any) -> None:
    # hivemem_feed_tail_read_timestamp_seconds moves while a watch is open and nothing is
    # written (what lets an alert tell a stalled reader from a quiet feed), and not
    # before any watch opens.
    settings = Settings(embedder="none", feed_poll_seconds=0.1)
    h = hivemem.connect(f"sqlite:///{tmp_path}/r.db", agent="w", settings=settings)
    assert isinstance(h, LocalHive)
    async with h:

        def read_at() -> float:
            value = h.metrics.registry.get_sample_value("hivemem_feed_tail_read_timestamp_seconds")
            assert value is not None
            return value

        await asyncio.sleep(0.3)
        assert read_at() == 0  # no watch, no reader
        watching = asyncio.create_task(collect(h, "quiet", 1, []))
        await until(lambda: read_at() > 0)
        first = read_at()
        await until(lambda: read_at() >= first + 0.2)
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
