"""The indexer of deferred vectors (core/indexer.py): a rewrite never ranks by an old
vector, a killed indexer loses nothing and repeats nothing, replicas share the parts,
the lag is visible, ``item.indexed`` stays hivemem's own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hivemem.backends.rows import INDEXED
from hivemem.backends.sqlite import SqliteBackend
from hivemem.config import Settings
from hivemem.core import LocalHive
from tests._indexer_jobs import settings as job_settings
from tests.test_vectors import FakeEmbedder

ROOT = Path(__file__).resolve().parent.parent


class HookEmbedder(FakeEmbedder):
    """:class:`FakeEmbedder` that runs ``hook`` (once) after computing its first batch
    and before returning it: the moment between the indexer's read and its store."""

    def __init__(self) -> None:
        self.hook: Callable[[], Awaitable[None]] | None = None
        self.calls: list[int] = []

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        vectors = await super().embed(texts)
        self.calls.append(len(texts))
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return vectors


def hive_on(path: Path, agent: str, embedder: FakeEmbedder, **extra: object) -> LocalHive:
    s = Settings(embedder="none", feed_poll_seconds=0.05, index_lease_seconds=1.0, **extra)  # type: ignore[arg-type]
    return LocalHive(SqliteBackend(str(path), s), agent=agent, settings=s, embedder=embedder)


async def indexed_events(hive: LocalHive) -> Counter[tuple[str, str]]:
    """How many ``item.indexed`` events the feed holds per item."""
    rows, _ = await hive.backend.read_events("", None, 100_000)
    return Counter((r.namespace, r.key or "") for r in rows if r.type == INDEXED)


async def test_a_rewrite_before_the_vector_is_stored_never_ranks_by_the_old_vector(
    tmp_path: Path,
) -> None:
    emb = HookEmbedder()
    hive = hive_on(tmp_path / "h.db", "writer", emb)
    try:
        await hive.put("kb", "doc", "old text about orchards")
        await hive.put("kb", "other", "something else entirely")

        async def rewrite() -> None:  # the indexer holds the old version's vector now
            await hive.put("kb", "doc", "new text about submarines")

        emb.hook = rewrite
        assert await hive.wait_indexed(timeout=30)
        assert emb.hook is None  # the rewrite ran (after this wait began: wait again)
        assert await hive.wait_indexed(timeout=30)
        old, new = emb.vector("old text about orchards"), emb.vector("new text about submarines")
        vectors = await hive.backend.vectors_of([("kb", "doc")], emb.name)
        stored = np.frombuffer(vectors[("kb", "doc")], dtype=np.float32)
        assert np.allclose(stored, new)
        # Searching with the old text's exact vector: the item scores by its new vector.
        index = hive._vector_index(emb.dim)
        await index.sync(force=True)
        scores = dict(index.search(old, "", None, 10))
        assert scores[("kb", "doc")] == np.float32(np.dot(old, new))
        assert scores[("kb", "doc")] < 0.9
        # The first batch's vector of version 1 was skipped: one event, for version 2.
        rows, _ = await hive.backend.read_events("kb", None, 1000)
        assert [(r.key, r.version) for r in rows if r.type == INDEXED and r.key == "doc"] == [
            ("doc", 2)
        ]
    finally:
        await hive.close()


async def test_killing_the_indexer_mid_batch_then_restarting_indexes_every_item_once(
    tmp_path: Path,
) -> None:
    path, marker = tmp_path / "k.db", tmp_path / "marker"
    s = job_settings()
    emb = FakeEmbedder()
    hive = LocalHive(SqliteBackend(str(path), s), agent="writer", settings=s, embedder=emb)
    try:
        for i in range(300):
            await hive.put("kb", f"k{i}", f"note number {i}")
        assert (await hive.index_status()).pending == 300
        child = subprocess.Popen(  # noqa: ASYNC220 (killed below, never awaited)
            [sys.executable, "-m", "tests._indexer_jobs", str(path), str(marker)], cwd=ROOT
        )
        try:
            deadline = time.monotonic() + 60
            while not marker.exists() or not marker.read_text():
                assert time.monotonic() < deadline, "the child never started a batch"
                assert child.poll() is None, "the child died"
                await asyncio.sleep(0.05)
            in_hand = int(marker.read_text())
            assert in_hand > 0
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert (await hive.index_status()).pending == 300  # the batch in hand was lost
        # Restart: this process indexes; the dead holder's parts free up within a lease.
        assert await hive.wait_indexed(timeout=60)
        status = await hive.index_status()
        assert status.pending == 0 and status.lag_seconds is None
        events = await indexed_events(hive)
        assert set(events) == {("kb", f"k{i}") for i in range(300)}
        assert set(events.values()) == {1}  # each item indexed once
        vectors = await hive.backend.vectors_of([("kb", f"k{i}") for i in range(300)], emb.name)
        assert all(
            np.allclose(
                np.frombuffer(vectors[("kb", f"k{i}")], np.float32), emb.vector(f"note number {i}")
            )
            for i in range(300)
        )
    finally:
        await hive.close()


async def test_replicas_share_the_parts_and_index_each_item_once(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    a, b = HookEmbedder(), HookEmbedder()
    one, two = hive_on(path, "one", a), hive_on(path, "two", b)
    try:
        for hive in (one, two):
            await hive.open()
            hive._start_indexer()
        deadline = time.monotonic() + 30
        while True:  # membership converges: two parts each, never both holding one
            held = [set(h.indexer.held) for h in (one, two) if h.indexer is not None]
            assert not (held[0] & held[1])
            if held[0] | held[1] == {0, 1, 2, 3} and len(held[0]) == len(held[1]) == 2:
                break
            assert time.monotonic() < deadline, held
            await asyncio.sleep(0.05)
        for i in range(400):
            await (one if i % 2 else two).put("kb", f"k{i}", f"note number {i}")
        assert await one.wait_indexed(timeout=30)
        events = await indexed_events(one)
        assert len(events) == 400 and set(events.values()) == {1}
        assert one.indexer is not None and two.indexer is not None
        deadline = time.monotonic() + 10  # each counts once its last store returns
        while one.indexer.indexed + two.indexer.indexed < 400:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert one.indexer.indexed > 0 and two.indexer.indexed > 0
        assert one.indexer.indexed + two.indexer.indexed == 400
        # One replica goes: the other takes over its parts and indexes everything.
        await two.close()
        deadline = time.monotonic() + 30
        while set(one.indexer.held) != {0, 1, 2, 3}:
            assert time.monotonic() < deadline, one.indexer.held
            await asyncio.sleep(0.05)
        for i in range(400, 500):
            await one.put("kb", f"k{i}", f"note number {i}")
        assert await one.wait_indexed(timeout=30)
        events = await indexed_events(one)
        assert len(events) == 500 and set(events.values()) == {1}
    finally:
        await one.close()
        await two.close()


async def test_the_lag_is_visible_and_item_indexed_stays_hivemems_own(tmp_path: Path) -> None:
    hive = hive_on(tmp_path / "s.db", "writer", FakeEmbedder())
    try:
        head = await hive.head()
        await hive.put("kb", "a", "alpha")
        await asyncio.sleep(0.2)
        status = await hive.index_status()  # nothing started the indexer: it waits
        assert (status.mode, status.pending, status.indexing, status.parts) == (
            "deferred",
            1,
            False,
            [],
        )
        assert status.lag_seconds is not None and status.lag_seconds >= 0.2
        assert await hive.wait_indexed(head, timeout=30)
        status = await hive.index_status()
        assert status.pending == 0 and status.indexing
        assert set(status.parts) <= {0, 1, 2, 3}
        assert (await indexed_events(hive))[("kb", "a")] == 1
        # Watchers see the write, not hivemem's bookkeeping (the indexed note, the
        # indexers' membership and leases).
        page = await hive.read_events("", after=head)
        assert [(e.type, e.namespace) for e in page.items] == [("item.put", "kb")]
        rows, _ = await hive.backend.read_events("", head, 1000)
        assert {r.namespace.split("/")[0] for r in rows} >= {"kb", "_hivemem", "_leases"}

        async def first_event() -> str:
            async for event in hive.watch("kb", after=head):
                return event.type
            raise AssertionError("the watch ended")

        assert await asyncio.wait_for(first_event(), 10) == "item.put"
    finally:
        await hive.close()


async def test_sync_mode_embeds_before_the_commit(tmp_path: Path) -> None:
    emb = HookEmbedder()
    hive = hive_on(tmp_path / "m.db", "writer", emb, index_mode="sync")
    try:
        await hive.put("kb", "a", "alpha beta")
        assert emb.calls == [1]
        assert (await hive.index_status()).pending == 0
        hits = await hive.search("kb", "alpha beta", mode="vector")
        assert [h.item.key for h in hits] == ["a"]
    finally:
        await hive.close()
