"""Items: versions, conditional writes, deletes, TTL, listing, batches, history, authorship."""

from __future__ import annotations

import pytest

import hivemem
from hivemem import Conflict, DeleteOp, Item, PutOp
from tests.conftest import Clock

from ._feed import events_after, mine, summary


def fields(item: Item | None) -> tuple[object, ...] | None:
    """The fields of an item that must survive a round trip exactly (timestamps aside)."""
    if item is None:
        return None
    return (
        item.namespace,
        item.key,
        item.value,
        item.version,
        item.author,
        item.text,
        item.metadata,
    )


async def test_get_of_absent_item_returns_none(hive: hivemem.Hive, ns: str) -> None:
    assert await hive.get(ns, "nothing-here") is None


async def test_put_creates_version_one_and_each_write_adds_one(hive: hivemem.Hive, ns: str) -> None:
    first = await hive.put(ns, "k", {"n": 1})
    assert (first.namespace, first.key, first.value, first.version) == (ns, "k", {"n": 1}, 1)
    assert first.author == "tester"
    assert first.expires_at is None

    second = await hive.put(ns, "k", {"n": 2})
    third = await hive.put(ns, "k", [1, "two", None, 3.5, True])
    assert (second.version, third.version) == (2, 3)
    assert second.created_at == first.created_at
    assert third.updated_at >= second.updated_at >= first.updated_at

    got = await hive.get(ns, "k")
    assert fields(got) == fields(third)
    assert got is not None and got.created_at == first.created_at


async def test_if_version_zero_creates_only_when_absent(hive: hivemem.Hive, ns: str) -> None:
    created = await hive.put(ns, "k", "first", if_version=0)
    assert created.version == 1

    with pytest.raises(Conflict) as info:
        await hive.put(ns, "k", "second", if_version=0)
    assert info.value.current_version == 1

    got = await hive.get(ns, "k")
    assert got is not None and (got.value, got.version) == ("first", 1)


async def test_put_with_matching_if_version_writes(hive: hivemem.Hive, ns: str) -> None:
    await hive.put(ns, "k", 1)
    await hive.put(ns, "k", 2)
    item = await hive.put(ns, "k", 3, if_version=2)
    assert (item.value, item.version) == (3, 3)


async def test_put_with_stale_version_raises_conflict_and_writes_nothing(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "k", "v1")
    current = await hive.put(ns, "k", "v2")
    history_before = await hive.history(ns, "k")
    head = await hive.head()

    for stale in (1, 3, 99):
        with pytest.raises(Conflict) as info:
            await hive.put(ns, "k", "lost", if_version=stale)
        assert info.value.current_version == 2

    assert fields(await hive.get(ns, "k")) == fields(current)
    assert [fields(i) for i in await hive.history(ns, "k")] == [fields(i) for i in history_before]
    assert mine(await events_after(hive, head), ns) == []


async def test_put_with_if_version_on_absent_item_conflicts_with_current_version_zero(
    hive: hivemem.Hive, ns: str
) -> None:
    with pytest.raises(Conflict) as info:
        await hive.put(ns, "k", "x", if_version=1)
    assert info.value.current_version == 0
    assert await hive.get(ns, "k") is None


async def test_delete_without_if_version_removes_item_and_history(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "k", 1)
    await hive.put(ns, "k", 2)
    assert await hive.delete(ns, "k") is True
    assert await hive.get(ns, "k") is None
    assert await hive.history(ns, "k") == []
    assert await hive.delete(ns, "k") is False


async def test_delete_with_stale_if_version_conflicts_and_keeps_item(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "k", 1)
    kept = await hive.put(ns, "k", 2)
    head = await hive.head()
    with pytest.raises(Conflict) as info:
        await hive.delete(ns, "k", if_version=1)
    assert info.value.current_version == 2
    assert fields(await hive.get(ns, "k")) == fields(kept)
    assert mine(await events_after(hive, head), ns) == []


async def test_delete_with_matching_if_version_deletes(hive: hivemem.Hive, ns: str) -> None:
    await hive.put(ns, "k", 1)
    await hive.put(ns, "k", 2)
    assert await hive.delete(ns, "k", if_version=2) is True
    assert await hive.get(ns, "k") is None


async def test_delete_of_absent_item_with_if_version_conflicts_with_version_zero(
    hive: hivemem.Hive, ns: str
) -> None:
    with pytest.raises(Conflict) as info:
        await hive.delete(ns, "k", if_version=1)
    assert info.value.current_version == 0


async def test_delete_of_absent_item_with_if_version_zero_conflicts(
    hive: hivemem.Hive, ns: str
) -> None:
    # Hive.delete: "Conflict: if_version was given and the item is absent or at another
    # version; nothing was deleted."
    head = await hive.head()
    with pytest.raises(Conflict) as info:
        await hive.delete(ns, "k", if_version=0)
    assert info.value.current_version == 0
    assert mine(await events_after(hive, head), ns) == []


async def test_put_after_delete_creates_the_item_anew_at_version_one(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "k", "old")
    await hive.put(ns, "k", "older")
    await hive.delete(ns, "k")
    fresh = await hive.put(ns, "k", "new", if_version=0)
    assert fresh.version == 1
    assert [i.version for i in await hive.history(ns, "k")] == [1]


async def test_expired_item_is_not_returned_by_get_list_or_list_namespaces(
    hive: hivemem.Hive, ns: str, clock: Clock
) -> None:
    # 3 s: the next put and the get must come before it ends, and through a service on
    # moto, in a busy matrix run, they once took over 1 s.
    short = await hive.put(f"{ns}/ttl", "k", "soon gone", ttl=3.0)
    await hive.put(f"{ns}/keep", "k", "stays")
    assert short.expires_at is not None
    assert short.expires_at > short.updated_at
    got = await hive.get(f"{ns}/ttl", "k")
    assert got is not None and got.value == "soon gone"

    await clock.sleep(3.2)

    assert await hive.get(f"{ns}/ttl", "k") is None
    assert [(i.namespace, i.key) for i in (await hive.list(ns)).items] == [(f"{ns}/keep", "k")]
    assert (await hive.list(f"{ns}/ttl")).items == []
    assert (await hive.list_namespaces(ns)).items == [f"{ns}/keep"]


async def test_expired_item_can_be_created_again_with_if_version_zero(
    hive: hivemem.Hive, ns: str, clock: Clock
) -> None:
    await hive.put(ns, "k", "first", ttl=0.3)
    await clock.sleep(0.5)
    again = await hive.put(ns, "k", "second", if_version=0)
    assert again.version == 1
    assert again.value == "second"


async def test_each_write_sets_the_expiry_anew(hive: hivemem.Hive, ns: str, clock: Clock) -> None:
    await hive.put(ns, "k", "short-lived", ttl=3.0)  # the rewrite must come before it ends
    rewritten = await hive.put(ns, "k", "forever")
    assert rewritten.expires_at is None
    await clock.sleep(3.2)
    got = await hive.get(ns, "k")
    assert got is not None and (got.value, got.version) == ("forever", 2)


async def test_list_pages_cover_every_item_exactly_once_in_namespace_key_order(
    hive: hivemem.Hive, ns: str
) -> None:
    expected = []
    for sub in ("b", "a/x", "a", "c/d/e"):
        for i in (3, 0, 5, 1, 4, 2):
            await hive.put(f"{ns}/{sub}", f"k{i:02d}", {"sub": sub, "i": i})
            expected.append((f"{ns}/{sub}", f"k{i:02d}"))
    expected.sort()

    seen: list[tuple[str, str]] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await hive.list(ns, limit=7, cursor=cursor)
        assert len(page.items) <= 7
        seen.extend((i.namespace, i.key) for i in page.items)
        pages += 1
        assert pages < 20, "pagination does not end"
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == expected
    assert pages >= 4


async def test_list_prefix_matches_whole_segments(hive: hivemem.Hive, ns: str) -> None:
    await hive.put(f"{ns}/a/b", "k", 1)
    await hive.put(f"{ns}/a/b/deeper", "k", 2)
    await hive.put(f"{ns}/a/bc", "k", 3)
    await hive.put(f"{ns}/a/b-c", "k", 4)

    listed = [(i.namespace, i.value) for i in (await hive.list(f"{ns}/a/b")).items]
    assert listed == [(f"{ns}/a/b", 1), (f"{ns}/a/b/deeper", 2)]

    names = (await hive.list_namespaces(f"{ns}/a/b")).items
    assert names == [f"{ns}/a/b", f"{ns}/a/b/deeper"]


async def test_namespace_counts_count_each_namespace_itself_and_page(
    hive: hivemem.Hive, ns: str
) -> None:
    for sub, n in (("a", 3), ("a/deep", 2), ("b", 1), ("c", 4)):
        for i in range(n):
            await hive.put(f"{ns}/{sub}", f"k{i}", i)
    await hive.delete(f"{ns}/c", "k0")
    await hive.put(f"{ns}/gone", "only", 1)
    await hive.delete(f"{ns}/gone", "only")

    everything = await hive.namespace_counts(ns)
    assert [(c.namespace, c.items) for c in everything.items] == [
        (f"{ns}/a", 3),
        (f"{ns}/a/deep", 2),
        (f"{ns}/b", 1),
        (f"{ns}/c", 3),
    ]
    assert everything.next_cursor is None
    assert [c.namespace for c in everything.items] == (await hive.list_namespaces(ns)).items

    first = await hive.namespace_counts(ns, limit=3)
    assert [c.items for c in first.items] == [3, 2, 1] and first.next_cursor is not None
    rest = await hive.namespace_counts(ns, limit=3, cursor=first.next_cursor)
    assert [(c.namespace, c.items) for c in rest.items] == [(f"{ns}/c", 3)]
    assert rest.next_cursor is None
    assert [c.namespace for c in (await hive.namespace_counts(f"{ns}/a")).items] == [
        f"{ns}/a",
        f"{ns}/a/deep",
    ]
    with pytest.raises(hivemem.InvalidInput) as bad:
        await hive.namespace_counts(ns, limit=0)
    assert bad.value.field == "limit"


async def test_list_namespaces_truncates_to_max_depth_and_deduplicates(
    hive: hivemem.Hive, ns: str
) -> None:
    for sub in ("a/x", "a/y", "a/y/z", "b", "c/q"):
        await hive.put(f"{ns}/{sub}", "k", sub)

    assert (await hive.list_namespaces(ns)).items == [
        f"{ns}/a/x",
        f"{ns}/a/y",
        f"{ns}/a/y/z",
        f"{ns}/b",
        f"{ns}/c/q",
    ]
    assert (await hive.list_namespaces(ns, max_depth=2)).items == [
        f"{ns}/a",
        f"{ns}/b",
        f"{ns}/c",
    ]
    assert (await hive.list_namespaces(ns, max_depth=3)).items == [
        f"{ns}/a/x",
        f"{ns}/a/y",
        f"{ns}/b",
        f"{ns}/c/q",
    ]


async def test_list_namespaces_pages_cover_every_namespace_once(
    hive: hivemem.Hive, ns: str
) -> None:
    expected = sorted(f"{ns}/n{i:02d}" for i in range(11))
    for name in reversed(expected):
        await hive.put(name, "k", 0)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):
        page = await hive.list_namespaces(ns, limit=3, cursor=cursor)
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == expected


async def test_batch_applies_every_op_and_returns_one_result_per_op(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.put(ns, "old", "x")
    results = await hive.batch(
        [
            PutOp(namespace=ns, key="a", value=1),
            PutOp(namespace=ns, key="old", value="y", if_version=1),
            DeleteOp(namespace=ns, key="old"),
            DeleteOp(namespace=ns, key="never-existed"),
            PutOp(namespace=ns, key="b", value=2, if_version=0),
        ]
    )
    assert len(results) == 5
    a, old, deleted, absent, b = results
    assert isinstance(a, Item) and (a.key, a.value, a.version, a.author) == ("a", 1, 1, "tester")
    assert isinstance(old, Item) and (old.value, old.version) == ("y", 2)
    assert deleted is True
    assert absent is False
    assert isinstance(b, Item) and (b.key, b.version) == ("b", 1)
    assert await hive.get(ns, "old") is None
    assert [i.key for i in (await hive.list(ns)).items] == ["a", "b"]


async def test_batch_whose_third_op_conflicts_writes_nothing(hive: hivemem.Hive, ns: str) -> None:
    await hive.put(ns, "c", "original")
    head = await hive.head()
    with pytest.raises(Conflict) as info:
        await hive.batch(
            [
                PutOp(namespace=ns, key="a", value=1),
                DeleteOp(namespace=ns, key="c"),
                PutOp(namespace=ns, key="c", value="conflicting", if_version=7),
                PutOp(namespace=ns, key="d", value=4),
            ]
        )
    assert info.value.field == "ops.2.if_version"
    assert await hive.get(ns, "a") is None
    assert await hive.get(ns, "d") is None
    kept = await hive.get(ns, "c")
    assert kept is not None and (kept.value, kept.version) == ("original", 1)
    assert mine(await events_after(hive, head), ns) == []


async def test_history_is_newest_first_and_bounded(hive: hivemem.Hive, ns: str) -> None:
    for n in range(1, 16):
        await hive.put(ns, "k", {"n": n})
    history = await hive.history(ns, "k")
    assert [i.version for i in history] == list(range(15, 5, -1))
    assert [i.value for i in history] == [{"n": v} for v in range(15, 5, -1)]
    assert all(i.author == "tester" for i in history)

    assert [i.version for i in await hive.history(ns, "k", limit=3)] == [15, 14, 13]


async def test_history_of_absent_item_is_empty(hive: hivemem.Hive, ns: str) -> None:
    assert await hive.history(ns, "never") == []


async def test_author_is_stamped_from_identity_not_from_payload(
    hive: hivemem.Hive, ns: str
) -> None:
    head = await hive.head()
    mine_item = await hive.put(ns, "k", {"author": "mallory", "text": "claims another author"})
    assert mine_item.author == "tester"

    other = hive.as_agent("planner-2")
    assert other.agent == "planner-2"
    theirs = await other.put(ns, "k", {"author": "tester"})
    assert theirs.author == "planner-2"
    got = await hive.get(ns, "k")
    assert got is not None and got.author == "planner-2"

    assert [i.author for i in await hive.history(ns, "k")] == ["planner-2", "tester"]
    authors = [(e.type, e.author) for e in mine(await events_after(hive, head), ns)]
    assert authors == [("item.put", "tester"), ("item.put", "planner-2")]


async def test_metadata_and_text_round_trip(hive: hivemem.Hive, ns: str) -> None:
    metadata = {"tags": ["a", "b"], "score": 0.5, "n": 3, "nested": {"x": None, "ok": True}}
    put = await hive.put(ns, "k", {"v": 1}, text="what search indexes", metadata=metadata)
    assert (put.metadata, put.text) == (metadata, "what search indexes")
    got = await hive.get(ns, "k")
    assert got is not None and (got.metadata, got.text) == (metadata, "what search indexes")
    listed = (await hive.list(ns)).items
    assert [(i.metadata, i.text) for i in listed] == [(metadata, "what search indexes")]


async def test_unicode_and_url_unsafe_keys_and_values_round_trip(
    hive: hivemem.Hive, ns: str
) -> None:
    value = {"日本語": "ミツバチ 🐝", "emoji": "🧠💾", "rtl": "עברית", "nul-free": "a\u00e9\u4e2d"}
    keys = ["ключ-🔑", "a b?c#d%e&f=g+h", "..", "100%", "naïve café"]
    for key in keys:
        stored = await hive.put(ns, key, value)
        assert stored.key == key
        got = await hive.get(ns, key)
        assert got is not None and (got.key, got.value) == (key, value)
        assert [i.version for i in await hive.history(ns, key)] == [1]
    listed = (await hive.list(ns)).items
    assert sorted(i.key for i in listed) == sorted(keys)
    assert all(i.value == value for i in listed)
    for key in keys:
        assert await hive.delete(ns, key) is True


async def test_put_events_carry_the_written_versions(hive: hivemem.Hive, ns: str) -> None:
    head = await hive.head()
    await hive.put(ns, "k", 1)
    await hive.put(ns, "k", 2, if_version=1)
    assert summary(mine(await events_after(hive, head), ns)) == [
        ("item.put", ns, "k", 1, "tester"),
        ("item.put", ns, "k", 2, "tester"),
    ]


async def test_list_with_a_key_prefix_lists_one_namespace_by_key(
    hive: hivemem.Hive, ns: str
) -> None:
    keys = ["mem-1", "mem-2", "mem-10", "memo", "me", "other", "mem-é", "mem-\U0010ffff"]
    for k in keys:
        await hive.put(ns, k, k)
    await hive.put(f"{ns}/sub", "mem-3", "under it, not in it")
    await hive.put(f"{ns}x", "mem-4", "a sibling namespace")

    page = await hive.list(ns, key_prefix="mem-")
    assert [i.key for i in page.items] == sorted(k for k in keys if k.startswith("mem-"))
    assert page.next_cursor is None
    assert [i.key for i in (await hive.list(ns, key_prefix="")).items] == sorted(keys)
    assert (await hive.list(ns, key_prefix="zzz")).items == []
    assert [i.key for i in (await hive.list(ns, key_prefix="mem-\U0010ffff")).items] == [
        "mem-\U0010ffff"
    ]

    seen: list[str] = []
    cursor = None
    while True:
        page = await hive.list(ns, key_prefix="me", limit=2, cursor=cursor)
        assert len(page.items) <= 2
        seen += [i.key for i in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(k for k in keys if k.startswith("me"))


async def test_list_with_a_key_prefix_skips_expired_items(
    hive: hivemem.Hive, ns: str, clock: Clock
) -> None:
    await hive.put(ns, "doc-1", "stays")
    await hive.put(ns, "doc-2", "soon gone", ttl=0.3)
    await clock.sleep(0.5)
    assert [i.key for i in (await hive.list(ns, key_prefix="doc-")).items] == ["doc-1"]
