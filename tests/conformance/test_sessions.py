"""Sessions: identity, message log, counters, versioned state, listing and deletion."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import hivemem
from hivemem import Conflict, MessageIn, NotFound
from tests.conftest import Clock


def new_id(tag: str = "s") -> str:
    return f"{tag}{uuid.uuid4().hex[:12]}"


async def test_create_session_then_get_returns_it(hive: hivemem.Hive) -> None:
    app = new_id("app")
    created = await hive.create_session(
        app=app, user="alice", agent="helper", metadata={"channel": "web", "n": 1}
    )
    assert created.id
    assert (created.app, created.user, created.agent) == (app, "alice", "helper")
    assert created.created_by == "tester"
    assert created.metadata == {"channel": "web", "n": 1}
    assert (created.state, created.state_version) == ({}, 0)
    assert (created.messages, created.turns, created.tokens_in, created.tokens_out) == (0, 0, 0, 0)
    assert created.cost == 0
    assert created.last_activity_at >= created.started_at

    got = await hive.get_session(created.id)
    assert got.model_dump(exclude={"started_at", "last_activity_at"}) == created.model_dump(
        exclude={"started_at", "last_activity_at"}
    )


async def test_create_session_with_own_id_and_initial_state(hive: hivemem.Hive) -> None:
    sid = new_id()
    created = await hive.create_session(app=new_id("app"), session_id=sid, state={"step": 1})
    assert created.id == sid
    assert (created.state, created.state_version) == ({"step": 1}, 1)
    got = await hive.get_session(sid)
    assert (got.state, got.state_version) == ({"step": 1}, 1)


async def test_create_session_with_an_existing_id_raises_conflict(hive: hivemem.Hive) -> None:
    sid = new_id()
    await hive.create_session(app="first-app", session_id=sid, metadata={"who": "first"})
    with pytest.raises(Conflict):
        await hive.create_session(app="second-app", session_id=sid)
    got = await hive.get_session(sid)
    assert (got.app, got.metadata) == ("first-app", {"who": "first"})


async def test_unknown_session_raises_not_found(hive: hivemem.Hive) -> None:
    sid = new_id("missing")
    with pytest.raises(NotFound):
        await hive.get_session(sid)
    with pytest.raises(NotFound):
        await hive.append_message(sid, "user", "hello")
    with pytest.raises(NotFound):
        await hive.append_messages(sid, [{"role": "user", "content": "hello"}])
    with pytest.raises(NotFound):
        await hive.get_messages(sid)
    with pytest.raises(NotFound):
        await hive.save_state(sid, {"a": 1})
    assert await hive.delete_session(sid) is False


async def test_append_assigns_consecutive_sequence_numbers_across_calls(
    hive: hivemem.Hive,
) -> None:
    sid = (await hive.create_session(app=new_id("app"))).id
    first = await hive.append_messages(
        sid,
        [
            MessageIn(role="system", content="be brief"),
            {"role": "user", "content": "hi"},
        ],
    )
    one = await hive.append_message(sid, "assistant", [{"type": "text", "text": "hello"}])
    more = await hive.append_messages(sid, [{"role": "user", "content": f"m{i}"} for i in range(3)])
    assert [m.seq for m in first] == [1, 2]
    assert one.seq == 3
    assert [m.seq for m in more] == [4, 5, 6]
    assert all(m.session_id == sid and m.author == "tester" for m in [*first, one, *more])

    stored = await hive.get_messages(sid)
    assert [m.seq for m in stored] == [1, 2, 3, 4, 5, 6]
    assert [m.role for m in stored] == ["system", "user", "assistant", "user", "user", "user"]
    assert [m.content for m in stored] == [
        "be brief",
        "hi",
        [{"type": "text", "text": "hello"}],
        "m0",
        "m1",
        "m2",
    ]


async def test_get_messages_after_and_limit(hive: hivemem.Hive) -> None:
    sid = (await hive.create_session(app=new_id("app"))).id
    await hive.append_messages(sid, [{"role": "user", "content": i} for i in range(1, 11)])
    assert [m.seq for m in await hive.get_messages(sid, after=7)] == [8, 9, 10]
    assert [m.seq for m in await hive.get_messages(sid, after=2, limit=3)] == [3, 4, 5]
    assert await hive.get_messages(sid, after=10) == []
    assert [m.content for m in await hive.get_messages(sid, limit=2)] == [1, 2]


async def test_session_counters_move_with_appends(hive: hivemem.Hive) -> None:
    sid = (await hive.create_session(app=new_id("app"))).id
    before = await hive.get_session(sid)
    await asyncio.sleep(0.05)
    await hive.append_messages(
        sid,
        [
            {"role": "user", "content": "q1", "tokens_in": 10},
            {"role": "assistant", "content": "a1", "tokens_out": 20, "cost": 0.25},
        ],
    )
    middle = await hive.get_session(sid)
    assert (middle.messages, middle.turns, middle.tokens_in, middle.tokens_out) == (2, 1, 10, 20)
    assert middle.cost == pytest.approx(0.25)
    assert middle.last_activity_at > before.last_activity_at

    await asyncio.sleep(0.05)
    await hive.append_message(sid, "user", "q2", tokens_in=5, tokens_out=1, cost=0.5)
    await hive.append_message(sid, "tool", {"result": 42}, metadata={"tool": "calc"})
    after = await hive.get_session(sid)
    assert (after.messages, after.turns, after.tokens_in, after.tokens_out) == (4, 2, 15, 21)
    assert after.cost == pytest.approx(0.75)
    assert after.last_activity_at > middle.last_activity_at
    assert after.started_at == before.started_at
    tool = (await hive.get_messages(sid, after=3))[0]
    assert (tool.role, tool.content, tool.metadata) == ("tool", {"result": 42}, {"tool": "calc"})


async def test_save_state_is_compare_and_set_on_state_version(hive: hivemem.Hive) -> None:
    sid = (await hive.create_session(app=new_id("app"))).id
    first = await hive.save_state(sid, {"plan": ["a"]}, if_version=0)
    assert (first.state, first.state_version) == ({"plan": ["a"]}, 1)

    with pytest.raises(Conflict) as info:
        await hive.save_state(sid, {"plan": ["lost"]}, if_version=0)
    assert info.value.current_version == 1
    got = await hive.get_session(sid)
    assert (got.state, got.state_version) == ({"plan": ["a"]}, 1)

    second = await hive.save_state(sid, {"plan": ["a", "b"]}, if_version=1)
    assert second.state_version == 2
    third = await hive.save_state(sid, {"plan": []})
    assert (third.state, third.state_version) == ({"plan": []}, 3)
    with pytest.raises(Conflict):
        await hive.save_state(sid, {"plan": ["stale"]}, if_version=2)
    got = await hive.get_session(sid)
    assert (got.state, got.state_version) == ({"plan": []}, 3)


async def test_list_sessions_filters_by_app_user_agent_and_pages_oldest_first(
    hive: hivemem.Hive,
) -> None:
    app = new_id("app")
    other_app = new_id("app")
    ids = []
    for i in range(7):
        created = await hive.create_session(
            app=app,
            user="u1" if i % 2 == 0 else "u2",
            agent="special" if i == 3 else "plain",
            session_id=f"{app}-{i}",
        )
        ids.append(created.id)
    await hive.create_session(app=other_app, user="u1", agent="plain")

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await hive.list_sessions(app=app, limit=3, cursor=cursor)
        assert len(page.items) <= 3
        seen.extend(s.id for s in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids

    by_user = (await hive.list_sessions(app=app, user="u2")).items
    assert [s.id for s in by_user] == [ids[1], ids[3], ids[5]]
    by_agent = (await hive.list_sessions(app=app, agent="special")).items
    assert [s.id for s in by_agent] == [ids[3]]
    both = (await hive.list_sessions(app=app, user="u1", agent="special")).items
    assert both == []
    assert [s.app for s in (await hive.list_sessions(app=other_app)).items] == [other_app]


async def test_delete_session_removes_it_and_its_messages(hive: hivemem.Hive) -> None:
    app = new_id("app")
    sid = (await hive.create_session(app=app)).id
    await hive.append_message(sid, "user", "hello")
    assert await hive.delete_session(sid) is True
    with pytest.raises(NotFound):
        await hive.get_session(sid)
    with pytest.raises(NotFound):
        await hive.get_messages(sid)
    assert (await hive.list_sessions(app=app)).items == []
    assert await hive.delete_session(sid) is False

    again = await hive.create_session(app=app, session_id=sid)
    assert again.messages == 0
    assert await hive.get_messages(sid) == []


async def test_a_session_with_a_ttl_says_when_it_expires(hive: hivemem.Hive) -> None:
    forever = await hive.create_session(app=new_id("app"))
    assert (forever.ttl, forever.expires_at) == (None, None)
    timed = await hive.create_session(app=new_id("app"), ttl=3600)
    assert timed.ttl == 3600
    assert timed.expires_at is not None
    assert abs((timed.expires_at - timed.last_activity_at).total_seconds() - 3600) < 0.01
    got = await hive.get_session(timed.id)
    assert (got.ttl, got.expires_at) == (timed.ttl, timed.expires_at)


async def test_an_expired_session_is_absent_to_every_call(hive: hivemem.Hive, clock: Clock) -> None:
    app = new_id("app")
    sid = new_id()
    # 3 s: the next two calls must come before it ends (on a slow remote store as well).
    await hive.create_session(app=app, session_id=sid, ttl=3.0)
    keep = await hive.create_session(app=app)
    await hive.append_messages(sid, [MessageIn(role="user", content="hi")])
    await clock.sleep(3.2)

    with pytest.raises(NotFound):
        await hive.get_session(sid)
    with pytest.raises(NotFound):
        await hive.append_messages(sid, [MessageIn(role="user", content="late")])
    with pytest.raises(NotFound):
        await hive.get_messages(sid)
    with pytest.raises(NotFound):
        await hive.save_state(sid, {"late": True})
    assert [s.id for s in (await hive.list_sessions(app=app)).items] == [keep.id]
    assert await hive.delete_session(sid) is False
    # An expired id stays taken until the sweeper deletes the session.
    with pytest.raises(NotFound):
        await hive.get_session(sid)


async def test_appends_and_state_saves_restart_a_sessions_ttl(
    hive: hivemem.Hive, clock: Clock
) -> None:
    # 4 s in all, 1 s idle at most: the session outlives its 2.5 s TTL only if each
    # append and the save restart it. (A remote store's requests take real time between
    # the sleeps: 1.5 s of margin, as moto under a busy matrix run can take 0.6 s.)
    session = await hive.create_session(app=new_id("app"), ttl=2.5)
    for turn in range(3):
        await clock.sleep(1.0)
        await hive.append_messages(session.id, [MessageIn(role="user", content=turn)])
    await clock.sleep(1.0)
    saved = await hive.save_state(session.id, {"step": 3})
    assert saved.expires_at is not None and saved.expires_at > session.expires_at  # type: ignore[operator]
    await clock.sleep(1.0)
    got = await hive.get_session(session.id)
    assert got.messages == 3 and got.state == {"step": 3}
