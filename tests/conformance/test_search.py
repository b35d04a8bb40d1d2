"""Search: every mode keeps to the prefix, the filter and live items; changes show at once;
embedded and remote agree; bad input names its field."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

import hivemem
from hivemem import Hive, InvalidInput
from tests.conftest import Clock, ServiceProcess

MODES = ("hybrid", "vector", "lexical")

DOCS = {
    # key: (sub-namespace, text, metadata)
    "cat": (
        "pets",
        "The cat sleeps on the warm windowsill all afternoon.",
        {"kind": "pet", "n": 1},
    ),
    "dog": ("pets", "Our dog loves chasing tennis balls in the park.", {"kind": "pet", "n": 2}),
    "car": (
        "garage",
        "The red sports car needs new tyres before the race.",
        {"kind": "car", "n": 3},
    ),
    "bike": (
        "garage",
        "A bicycle with a flat tyre leans against the fence.",
        {"kind": "car", "n": 4},
    ),
    "soup": (
        "kitchen",
        "Tomato soup simmers slowly with basil and garlic.",
        {"kind": "food", "n": 5},
    ),
}


async def load(hive: Hive, ns: str) -> None:
    for key, (sub, text, meta) in DOCS.items():
        await hive.put(f"{ns}/{sub}", key, {"note": key}, text=text, metadata=meta)


async def keys(hive: Hive, prefix: str, query: str, **kw: object) -> list[str]:
    kw.setdefault("consistency", "indexed")  # every write's vector searchable
    return [h.item.key for h in await hive.search(prefix, query, **kw)]  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
async def test_search_finds_the_matching_item_first(hive: Hive, ns: str, mode: str) -> None:
    await load(hive, ns)
    hits = await hive.search(ns, "tyres for the sports car", mode=mode, consistency="indexed")  # type: ignore[arg-type]
    assert hits[0].item.key == "car"
    assert hits[0].item.namespace == f"{ns}/garage"
    assert hits[0].score > 0
    if mode != "vector":
        assert hits[0].lexical_rank == 1
    if mode != "lexical":
        assert hits[0].vector_rank is not None


@pytest.mark.parametrize("mode", MODES)
async def test_search_returns_only_items_under_the_prefix(hive: Hive, ns: str, mode: str) -> None:
    await load(hive, ns)
    await hive.put(f"{ns}x/garage", "car", "red sports car tyres")  # same words, other prefix
    found = await hive.search(
        f"{ns}/garage", "car tyres cat soup", mode=mode, limit=20, consistency="indexed"
    )  # type: ignore[arg-type]
    assert found
    assert {h.item.namespace for h in found} == {f"{ns}/garage"}


@pytest.mark.parametrize("mode", MODES)
async def test_search_applies_metadata_author_and_time_filters(
    hive: Hive, ns: str, mode: str
) -> None:
    await load(hive, ns)
    q = "car tyre cat dog soup park"
    got = await keys(hive, ns, q, mode=mode, filter={"kind": "pet"}, limit=20)
    assert got and set(got) <= {"cat", "dog"}
    got = await keys(hive, ns, q, mode=mode, filter={"n": {"$gte": 3, "$lt": 5}}, limit=20)
    assert got and set(got) <= {"car", "bike"}
    got = await keys(hive, ns, q, mode=mode, filter={"kind": {"$in": ["food", "car"]}}, limit=20)
    assert got and set(got) <= {"car", "bike", "soup"}
    other = hive.as_agent("someone-else")
    await other.put(f"{ns}/pets", "cat", {"note": "cat"}, text=DOCS["cat"][1], metadata={"n": 1})
    assert set(await keys(hive, ns, q, mode=mode, author="someone-else", limit=20)) <= {"cat"}
    cut = time.time()
    await asyncio.sleep(0.05)
    await hive.put(f"{ns}/kitchen", "soup", {"note": "soup"}, text=DOCS["soup"][1])
    after = await keys(hive, ns, q, mode=mode, updated_after=cut, limit=20)
    assert set(after) <= {"soup"}
    before = await keys(hive, ns, q, mode=mode, updated_before=cut, limit=20)
    assert "soup" not in before


@pytest.mark.parametrize("mode", MODES)
async def test_search_never_returns_expired_items(
    hive: Hive, ns: str, mode: str, clock: Clock
) -> None:
    await hive.search(ns, "warm up the model", mode=mode)  # type: ignore[arg-type]
    # Vectors of other tests' writes first, so that "brief" is searchable well within
    # its TTL on a busy shared service.
    assert await hive.wait_indexed(timeout=60)
    # A TTL of seconds, not less: a busy machine once stalled 3 s between the put and
    # the search (Redis Cluster, 4 workers on 2 cores) and "brief" had expired already,
    # and a slower one once took over 6 s to index the two items (Redis Cluster and
    # DynamoDB). An embedded hive's clock moves without waiting: a minute costs nothing.
    ttl = 6.0 if clock.remote else 60.0
    await hive.put(ns, "brief", "a short lived note about volcanoes", ttl=ttl)
    await hive.put(ns, "lasting", "a lasting note about volcanoes")
    assert "brief" in await keys(hive, ns, "volcanoes", mode=mode)
    await clock.sleep(ttl + 0.2)
    assert await keys(hive, ns, "volcanoes", mode=mode) == ["lasting"]


async def test_changed_item_is_found_by_its_new_text_only(hive: Hive, ns: str) -> None:
    await hive.put(ns, "doc", "apples and pears from the orchard")
    await hive.put(ns, "other", "a completely unrelated sentence about trains")
    assert "doc" in await keys(hive, ns, "orchard apples", mode="lexical")
    await hive.put(ns, "doc", "submarines diving under the arctic ice")
    assert "doc" not in await keys(hive, ns, "orchard apples", mode="lexical")
    hits = await hive.search(ns, "submarine under ice", mode="vector", consistency="indexed")
    assert hits[0].item.key == "doc"
    assert hits[0].item.value == "submarines diving under the arctic ice"
    for mode in MODES:
        for hit in await hive.search(ns, "orchard apples pears", mode=mode):  # type: ignore[arg-type]
            assert "apples" not in str(hit.item.value)


async def test_deleted_item_is_never_returned(hive: Hive, ns: str) -> None:
    await hive.put(ns, "gone", "the lighthouse keeper's logbook")
    await hive.put(ns, "kept", "a lighthouse on the cliff")
    await hive.delete(ns, "gone")
    for mode in MODES:
        assert "gone" not in await keys(hive, ns, "lighthouse keeper logbook", mode=mode)


async def test_value_string_and_text_or_content_fields_are_indexed(hive: Hive, ns: str) -> None:
    await hive.put(ns, "s", "quasar radiation")
    await hive.put(ns, "t", {"text": "quasar spectra", "x": 1})
    await hive.put(ns, "c", {"content": "quasar jets"})
    await hive.put(ns, "n", {"other": "quasar"})  # no text: not searchable
    await hive.put(ns, "i", 42)
    assert set(await keys(hive, ns, "quasar", mode="lexical")) == {"s", "t", "c"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x", "mode": "fuzzy"}, "mode"),
        ({"query": "x", "limit": 0}, "limit"),
        ({"query": "x", "limit": 101}, "limit"),
        ({"query": "x", "filter": {"n": {"$near": 1}}}, "filter.n.$near"),
        ({"query": "x", "filter": {"n": {"$in": []}}}, "filter.n.$in"),
        ({"query": "x", "filter": {"n": [1, 2]}}, "filter.n"),
        ({"query": "x", "filter": {"n": None}}, "filter.n"),
        ({"query": "x", "prefix": "bad prefix!"}, "prefix"),
    ],
)
async def test_bad_search_input_names_the_field(
    hive: Hive, ns: str, kwargs: dict[str, object], field: str
) -> None:
    kwargs = dict(kwargs)
    prefix = kwargs.pop("prefix", ns)
    with pytest.raises(InvalidInput) as info:
        await hive.search(prefix, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


async def test_a_write_from_another_process_is_found(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    hive = hivemem.connect(url, agent="reader")
    await hive.put("kb", "first", "the first note mentions glaciers")
    assert await keys(hive, "kb", "glaciers") == ["first"]  # loads the vector index
    code = (
        "import hivemem\n"
        f"h = hivemem.connect_sync({url!r}, agent='writer')\n"
        "h.put('kb', 'second', 'penguins waddle across the antarctic glaciers')\n"
        "h.close()\n"
    )
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await asyncio.wait_for(writer.wait(), 120) == 0
    for mode in MODES:
        assert "second" in await keys(hive, "kb", "penguins antarctic", mode=mode), mode
    await hive.close()


async def test_embedded_and_remote_search_return_the_same_results(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "svc.db")
    svc.start()
    try:
        remote = hivemem.connect(svc.url, agent="same")
        local = hivemem.connect(f"sqlite:///{tmp_path}/local.db", agent="same")
        for hive in (remote, local):
            await load(hive, "kb")
        for mode in MODES:
            for query in ("tyres for the sports car", "sleepy cat", "garlic"):
                a = await remote.search("kb", query, mode=mode, limit=5, consistency="indexed")  # type: ignore[arg-type]
                b = await local.search("kb", query, mode=mode, limit=5, consistency="indexed")  # type: ignore[arg-type]
                assert [(h.item.key, h.lexical_rank, h.vector_rank) for h in a] == [
                    (h.item.key, h.lexical_rank, h.vector_rank) for h in b
                ], (mode, query)
                assert [h.score for h in a] == pytest.approx([h.score for h in b])
        await remote.close()
        await local.close()
    finally:
        svc.terminate()
