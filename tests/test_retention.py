"""Retention: the sweeper expires items (with their events) and trims the feed; a cursor
from before the trimmed point is refused with CursorExpired, embedded and over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

import hivemem
from hivemem import CursorExpired, Settings
from hivemem.core import LocalHive
from tests.conftest import ServiceProcess

SHORT = Settings(event_retention_seconds=1.0, sweep_interval_seconds=3600)


@pytest.fixture
async def short_hive(tmp_path: Path) -> LocalHive:
    hive = hivemem.connect(f"sqlite:///{tmp_path}/r.db", agent="sweeper-test", settings=SHORT)
    assert isinstance(hive, LocalHive)
    await hive.open()
    yield hive  # type: ignore[misc]
    await hive.close()


async def test_sweep_removes_expired_items_with_an_expired_event_and_their_history(
    short_hive: LocalHive,
) -> None:
    await short_hive.put("ttl", "gone", 1, ttl=0.2)
    await short_hive.put("ttl", "gone", 2, ttl=0.2)
    await short_hive.put("ttl", "kept", 3)
    head = await short_hive.head()
    await asyncio.sleep(0.3)

    expired, _ = await short_hive.sweep()

    assert expired == 1
    assert await short_hive.get("ttl", "gone") is None
    assert await short_hive.history("ttl", "gone") == []
    assert (await short_hive.get("ttl", "kept")) is not None
    page = await short_hive.read_events("ttl", after=head)
    assert [(e.type, e.key, e.version) for e in page.items] == [("item.expired", "gone", 2)]


async def test_recreating_a_swept_item_starts_again_at_version_one(short_hive: LocalHive) -> None:
    await short_hive.put("ttl", "again", "a", ttl=0.1)
    await asyncio.sleep(0.2)
    await short_hive.sweep()
    item = await short_hive.put("ttl", "again", "b", if_version=0)
    assert item.version == 1
    assert [i.value for i in await short_hive.history("ttl", "again")] == ["b"]


async def test_cursor_before_trimmed_events_raises_cursor_expired(short_hive: LocalHive) -> None:
    first = await short_hive.put("feed", "a", 1)
    await short_hive.put("feed", "b", 2)
    old = (await short_hive.read_events("feed", after="0")).items[0].cursor
    await asyncio.sleep(1.1)
    await short_hive.put("feed", "c", 3)  # inside the retention window

    _, trimmed = await short_hive.sweep()

    assert trimmed >= 2
    with pytest.raises(CursorExpired) as info:
        await short_hive.read_events("feed", after=old)
    assert info.value.field == "after"
    with pytest.raises(CursorExpired):
        await anext(aiter(short_hive.watch("feed", after=old)))
    # From the start of what is retained, the newest event is still there.
    retained = await short_hive.read_events("feed")
    assert [e.key for e in retained.items] == ["c"]
    assert first.version == 1


async def test_expired_cursor_over_http_is_410_problem_json(tmp_path: Path) -> None:
    svc = ServiceProcess(
        tmp_path / "svc.db",
        env={"HIVEMEM_EVENT_RETENTION_SECONDS": "0.2", "HIVEMEM_SWEEP_INTERVAL_SECONDS": "0.3"},
    )
    svc.start()
    try:
        remote = hivemem.connect(svc.url, agent="retention")
        await remote.put("feed", "a", 1)
        await remote.put("feed", "b", 2)
        old = (await remote.read_events("feed", after="0")).items[0].cursor
        await asyncio.sleep(1.0)  # past retention and at least one sweep: a and b trimmed
        with pytest.raises(CursorExpired):
            await remote.read_events("feed", after=old)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{svc.url}/v1/watch", params={"after": old}) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 410
                assert resp.content_type == "application/problem+json"
                assert body["field"] == "after"
        with pytest.raises(CursorExpired):
            await anext(aiter(remote.watch("feed", after=old)))
        await remote.close()
    finally:
        svc.terminate()
