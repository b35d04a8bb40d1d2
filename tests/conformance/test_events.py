"""The change feed: one event per committed change, pagination, watch, publish and resume."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio

import hivemem
from hivemem import DeleteOp, Event, PutOp

from ._feed import events_after, mine, summary

LIVE_TIMEOUT_SECONDS = 5.0


async def take(
    events: AsyncIterator[Event], n: int, within: float = LIVE_TIMEOUT_SECONDS
) -> list[Event]:
    """The next ``n`` events of a watch, or fail after ``within`` seconds."""
    out: list[Event] = []
    with anyio.fail_after(within):
        while len(out) < n:
            out.append(await anext(events))
    return out


async def test_every_item_change_yields_exactly_one_event_in_order(
    hive: hivemem.Hive, ns: str
) -> None:
    head = await hive.head()
    await hive.put(ns, "a", 1)
    await hive.put(ns, "a", 2)
    await hive.put(f"{ns}/sub", "b", 3, if_version=0)
    await hive.delete(ns, "a")
    assert await hive.delete(ns, "absent") is False
    await hive.batch(
        [PutOp(namespace=ns, key="c", value=1), DeleteOp(namespace=f"{ns}/sub", key="b")]
    )

    events = mine(await events_after(hive, head), ns)
    assert [(e.type, e.namespace, e.key, e.author) for e in events] == [
        ("item.put", ns, "a", "tester"),
        ("item.put", ns, "a", "tester"),
        ("item.put", f"{ns}/sub", "b", "tester"),
        ("item.deleted", ns, "a", "tester"),
        ("item.put", ns, "c", "tester"),
        ("item.deleted", f"{ns}/sub", "b", "tester"),
    ]
    assert [events[i].version for i in (0, 1, 2, 4)] == [1, 2, 1, 1]
    assert len({e.cursor for e in events}) == len(events)


async def test_every_session_change_yields_exactly_one_event_in_order(
    hive: hivemem.Hive,
) -> None:
    sid = f"s{uuid.uuid4().hex[:12]}"
    head = await hive.head()
    await hive.create_session(app="events-app", session_id=sid)
    await hive.append_messages(
        sid, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    await hive.append_message(sid, "user", "c")
    await hive.save_state(sid, {"x": 1})
    await hive.save_state(sid, {"x": 2}, if_version=1)
    await hive.delete_session(sid)

    events = mine(await events_after(hive, head), f"_sessions/{sid}")
    assert [(e.type, e.namespace, e.author) for e in events] == [
        ("session.created", f"_sessions/{sid}", "tester"),
        ("session.messages", f"_sessions/{sid}", "tester"),
        ("session.messages", f"_sessions/{sid}", "tester"),
        ("session.state", f"_sessions/{sid}", "tester"),
        ("session.state", f"_sessions/{sid}", "tester"),
        ("session.deleted", f"_sessions/{sid}", "tester"),
    ]
    assert [e.version for e in events[1:5]] == [2, 3, 1, 2]


async def test_head_is_the_cursor_of_the_newest_event(hive: hivemem.Hive, ns: str) -> None:
    before = await hive.head()
    await hive.put(ns, "k", 1)
    after = await hive.head()
    assert after != before
    (event,) = mine(await events_after(hive, before), ns)
    # On a store shared with earlier tests the sweeper may expire their items between the
    # put and the head read (see assert_nothing_written), and a service may note its own
    # bookkeeping (a renewal of its own lease: own_event, which no reader is shown): the
    # head is then the cursor of one of those, after this put's event.
    past_head = await events_after(hive, after)
    newer = await events_after(hive, event.cursor)
    assert all(e.type in ("item.expired", "session.expired") for e in newer), newer
    visible = [event.cursor, *(e.cursor for e in newer)]
    if after not in visible:  # a bookkeeping event's cursor: no visible event is skipped
        assert {e.cursor for e in past_head} <= set(visible[1:]), (after, past_head)
    assert event.cursor not in {e.cursor for e in past_head}
    assert mine(await events_after(hive, after), ns) == []


async def test_read_events_pages_continue_at_next_cursor(hive: hivemem.Hive, ns: str) -> None:
    head = await hive.head()
    for i in range(7):
        await hive.put(ns, f"k{i}", i)

    keys: list[str | None] = []
    cursor = head
    sizes = []
    for _ in range(10):
        page = await hive.read_events(ns, after=cursor, limit=3)
        assert page.next_cursor is not None
        sizes.append(len(page.items))
        keys.extend(e.key for e in page.items)
        cursor = page.next_cursor
        if not page.items:
            break
    assert keys == [f"k{i}" for i in range(7)]
    assert sizes == [3, 3, 1, 0]

    await hive.put(ns, "late", 1)
    page = await hive.read_events(ns, after=cursor, limit=3)
    assert [e.key for e in page.items] == ["late"]


async def test_read_events_from_zero_starts_at_the_oldest_event(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "first", 1)
    await hive.put(ns, "second", 1)
    from_zero = await events_after(hive, "0", prefix=ns)
    assert [e.key for e in from_zero] == ["first", "second"]
    page = await hive.read_events(ns, after=None, limit=10)
    assert [e.key for e in page.items] == ["first", "second"]


async def test_read_events_prefix_matches_whole_segments(hive: hivemem.Hive, ns: str) -> None:
    head = await hive.head()
    await hive.put(f"{ns}/a", "in", 1)
    await hive.put(f"{ns}/a/deep", "in-deep", 1)
    await hive.put(f"{ns}/ab", "out", 1)
    assert [e.key for e in await events_after(hive, head, prefix=f"{ns}/a")] == ["in", "in-deep"]


async def test_watch_replays_from_cursor_then_follows_live(hive: hivemem.Hive, ns: str) -> None:
    head = await hive.head()
    for i in range(3):
        await hive.put(ns, f"old{i}", i)
    await hive.put(f"{ns}x", "other-namespace", 0)

    async with aclosing(hive.watch(ns, after=head)) as events:
        replayed = await take(events, 3)
        assert [(e.type, e.key, e.version) for e in replayed] == [
            ("item.put", "old0", 1),
            ("item.put", "old1", 1),
            ("item.put", "old2", 1),
        ]
        written = await hive.put(f"{ns}/live", "new", {"live": True})
        (live,) = await take(events, 1)
        assert (live.type, live.namespace, live.key, live.version, live.author) == (
            "item.put",
            f"{ns}/live",
            "new",
            written.version,
            "tester",
        )


async def test_watch_without_cursor_yields_only_events_after_subscribing(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "before", 1)
    async with aclosing(hive.watch(ns)) as events:
        first = asyncio.ensure_future(take(events, 1, within=15))
        await asyncio.sleep(1.0)
        await hive.put(ns, "after", 2)
        (event,) = await first
    assert (event.type, event.key) == ("item.put", "after")


async def test_publish_is_delivered_to_watchers_of_its_prefix(hive: hivemem.Hive, ns: str) -> None:
    head = await hive.head()
    async with aclosing(hive.watch(f"{ns}/chan", after=head)) as events:
        await hive.publish(f"{ns}/elsewhere", {"not": "for you"})
        published = await hive.publish(f"{ns}/chan", {"task": 7, "words": ["a", "b"]})
        assert (published.type, published.namespace, published.data) == (
            "publish",
            f"{ns}/chan",
            {"task": 7, "words": ["a", "b"]},
        )
        assert published.author == "tester"
        (got,) = await take(events, 1)
    assert got.cursor == published.cursor
    assert (got.type, got.namespace, got.data, got.author) == (
        "publish",
        f"{ns}/chan",
        {"task": 7, "words": ["a", "b"]},
        "tester",
    )


async def test_watch_restarted_after_last_cursor_gets_the_rest_exactly_once(
    hive: hivemem.Hive, ns: str
) -> None:
    head = await hive.head()
    keys = [f"k{i:02d}" for i in range(10)]
    for key in keys:
        await hive.put(ns, key, key)

    async with aclosing(hive.watch(ns, after=head)) as events:
        first = await take(events, 4)
    last = first[-1].cursor

    async with aclosing(hive.watch(ns, after=last)) as events:
        rest = await take(events, 6)
        await hive.put(ns, "sentinel", 0)
        (sentinel,) = await take(events, 1)

    assert [e.key for e in first + rest] == keys
    assert sentinel.key == "sentinel"
    assert summary(first + rest) == summary(mine(await events_after(hive, head), ns)[:10])
