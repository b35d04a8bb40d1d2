"""VectorIndex: exact top-k, prefix and filter scopes, row bookkeeping, the HNSW option,
and coherence with writes made through a LocalHive."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hivemem import InvalidInput
from hivemem.backends.sqlite import SqliteBackend
from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.core.vectors import VectorIndex

Key = tuple[str, str]
DIM = 32


def unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int, centres: int = 50) -> npt.NDArray[np.float32]:
    """Unit vectors drawn around random centres, shaped like real text embeddings."""
    rng = np.random.default_rng(seed)
    middle = np.random.default_rng(12345).standard_normal((centres, dim))
    return unit(middle[rng.integers(0, centres, n)] + 0.8 * rng.standard_normal((n, dim)))


def make_index(kind: str = "exact", dim: int = DIM) -> VectorIndex:
    """An index whose rows are set by hand (its backend is never opened)."""
    return VectorIndex(SqliteBackend(":memory:", Settings()), "test", dim, 1.0, kind=kind)


def fill(index: VectorIndex, keys: Sequence[Key], vectors: npt.NDArray[np.float32]) -> None:
    for key, vec in zip(keys, vectors, strict=True):
        index.set(key, vec.tobytes())


def reference(
    keys: Sequence[Key],
    vectors: npt.NDArray[np.float32],
    query: npt.NDArray[np.float32],
    k: int,
    keep: set[Key] | None = None,
) -> list[Key]:
    """Brute-force top-k: every in-scope row scored, sorted by similarity."""
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    return [keys[i] for i in order if keep is None or keys[i] in keep][:k]


def in_prefix(key: Key, prefix: str) -> bool:
    return key[0] == prefix or key[0].startswith(prefix + "/")


NAMESPACES = ["a", "a/b", "a/b/c", "ab", "c", "c/a"]


def dataset(n: int, seed: int = 0) -> tuple[list[Key], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    keys = [(NAMESPACES[i % len(NAMESPACES)], f"k{i}") for i in range(n)]
    return keys, unit(rng.standard_normal((n, DIM)))


# Exact search ------------------------------------------------------------------------------


def test_exact_top_k_equals_a_brute_force_reference() -> None:
    keys, vectors = dataset(2000)
    index = make_index()
    fill(index, keys, vectors)
    rng = np.random.default_rng(1)
    for query in unit(rng.standard_normal((20, DIM))):
        hits = index.search(query, "", None, 25)
        assert [key for key, _ in hits] == reference(keys, vectors, query, 25)
        expected = {keys[i]: float(s) for i, s in enumerate(vectors @ query)}
        assert all(score == pytest.approx(expected[key], abs=1e-5) for key, score in hits)


def test_exact_search_returns_everything_when_k_exceeds_the_rows() -> None:
    keys, vectors = dataset(30)
    index = make_index()
    fill(index, keys, vectors)
    hits = index.search(vectors[0], "", None, 100)
    assert [key for key, _ in hits] == reference(keys, vectors, vectors[0], 100)
    assert hits[0][0] == keys[0]


@pytest.mark.parametrize("gather_share", [0.0, 1.0], ids=["mask-all-rows", "gather-rows"])
@pytest.mark.parametrize("prefix", ["a", "a/b", "ab", "c", "c/a", "zzz"])
def test_prefix_keeps_only_namespaces_at_or_under_it(prefix: str, gather_share: float) -> None:
    keys, vectors = dataset(1200)
    index = make_index()
    index.gather_share = gather_share
    fill(index, keys, vectors)
    query = unit(np.random.default_rng(2).standard_normal(DIM))
    hits = index.search(query, prefix, None, 40)
    keep = {key for key in keys if in_prefix(key, prefix)}
    assert [key for key, _ in hits] == reference(keys, vectors, query, 40, keep)
    assert all(in_prefix(key, prefix) for key, _ in hits)


@pytest.mark.parametrize("gather_share", [0.0, 1.0], ids=["mask-all-rows", "gather-rows"])
def test_allowed_set_restricts_results_and_combines_with_the_prefix(gather_share: float) -> None:
    keys, vectors = dataset(1200)
    index = make_index()
    index.gather_share = gather_share
    fill(index, keys, vectors)
    allowed = [*keys[::3], ("a", "no-such-key")]
    query = unit(np.random.default_rng(3).standard_normal(DIM))
    hits = index.search(query, "", allowed, 30)
    assert [key for key, _ in hits] == reference(keys, vectors, query, 30, set(allowed))
    hits = index.search(query, "a", allowed, 30)
    keep = {key for key in allowed if in_prefix(key, "a")}
    assert [key for key, _ in hits] == reference(keys, vectors, query, 30, keep)
    assert index.search(query, "", [], 30) == []


def test_a_namespace_added_after_a_search_joins_its_prefix() -> None:
    keys, vectors = dataset(60)
    index = make_index()
    fill(index, keys, vectors)
    query = vectors[5]
    assert all(key[0] != "a/new" for key, _ in index.search(query, "a", None, 100))
    index.set(("a/new", "x"), query.tobytes())
    assert index.search(query, "a", None, 1)[0][0] == ("a/new", "x")


# Row bookkeeping ---------------------------------------------------------------------------


def test_remove_moves_the_last_row_into_the_hole_and_keeps_positions_right() -> None:
    keys, vectors = dataset(5)
    index = make_index()
    fill(index, keys, vectors)
    index.remove(keys[1])
    index.remove(("a", "never-set"))
    assert len(index) == 4
    for i in (0, 2, 3, 4):
        assert index.search(vectors[i], "", None, 1)[0] == (keys[i], pytest.approx(1.0, abs=1e-5))
    assert keys[1] not in {key for key, _ in index.search(vectors[1], "", None, 10)}
    index.remove(keys[4])  # the last row: nothing moves
    index.set(keys[1], vectors[1].tobytes())
    assert index.search(vectors[1], "", None, 1)[0][0] == keys[1]
    assert {key for key, _ in index.search(vectors[0], "", None, 10)} == {
        keys[0],
        keys[1],
        keys[2],
        keys[3],
    }


def test_set_replaces_the_vector_of_an_existing_key() -> None:
    keys, vectors = dataset(50)
    index = make_index()
    fill(index, keys, vectors)
    index.set(keys[7], vectors[30].tobytes())
    assert len(index) == 50
    top = index.search(vectors[30], "", None, 2)
    assert {key for key, _ in top} == {keys[7], keys[30]}
    assert all(score == pytest.approx(1.0, abs=1e-5) for _, score in top)


def test_a_vector_of_another_dimension_removes_the_key() -> None:
    keys, vectors = dataset(3)
    index = make_index()
    fill(index, keys, vectors)
    index.set(keys[0], np.ones(DIM + 1, dtype=np.float32).tobytes())
    assert len(index) == 2
    assert keys[0] not in {key for key, _ in index.search(vectors[0], "", None, 10)}


def test_growth_past_capacity_keeps_every_vector() -> None:
    keys, vectors = dataset(5000, seed=4)  # the matrix starts with 1024 rows
    index = make_index()
    fill(index, keys, vectors)
    assert len(index) == 5000
    for i in (0, 1023, 1024, 2047, 2048, 4999):
        assert index.search(vectors[i], "", None, 1)[0][0] == keys[i]
    query = unit(np.random.default_rng(5).standard_normal(DIM))
    assert [key for key, _ in index.search(query, "", None, 50)] == reference(
        keys, vectors, query, 50
    )


class IndexMatchesADict(RuleBasedStateMachine):
    """Any sequence of sets and removes leaves the index answering like a dict of
    vectors searched by brute force."""

    def __init__(self) -> None:
        super().__init__()
        self.index = make_index(dim=8)
        self.model: dict[Key, npt.NDArray[np.float32]] = {}

    keys = st.tuples(
        st.sampled_from(["p", "p/q", "r"]), st.sampled_from([f"k{i}" for i in range(12)])
    )

    @rule(key=keys, seed=st.integers(0, 2**32 - 1))
    def set(self, key: Key, seed: int) -> None:
        vec = unit(np.random.default_rng(seed).standard_normal(8))
        self.index.set(key, vec.tobytes())
        self.model[key] = vec

    @rule(key=keys)
    def remove(self, key: Key) -> None:
        self.index.remove(key)
        self.model.pop(key, None)

    @invariant()
    def answers_like_the_dict(self) -> None:
        assert len(self.index) == len(self.model)
        query = unit(np.ones(8))
        for prefix in ("", "p", "r"):
            keys = [key for key in self.model if not prefix or in_prefix(key, prefix)]
            scores = {key: float(self.model[key] @ query) for key in keys}
            hits = self.index.search(query, prefix, None, 50)
            assert sorted(key for key, _ in hits) == sorted(keys)
            assert all(score == pytest.approx(scores[key], abs=1e-5) for key, score in hits)
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


TestIndexMatchesADict = IndexMatchesADict.TestCase
TestIndexMatchesADict.settings = hsettings(max_examples=60, stateful_step_count=40, deadline=None)


# Options -----------------------------------------------------------------------------------


def test_unknown_index_kind_is_rejected_naming_the_setting() -> None:
    with pytest.raises(InvalidInput) as caught:
        make_index(kind="annoy")
    assert caught.value.field == "vector_index"


def test_hnsw_without_usearch_installed_raises_invalid_input_with_a_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "usearch.index", None)  # as if it were not installed
    with pytest.raises(InvalidInput) as caught:
        make_index(kind="hnsw")
    assert caught.value.field == "vector_index"
    assert "pip install" in caught.value.message


async def built_hnsw(keys: Sequence[Key], vectors: npt.NDArray[np.float32]) -> VectorIndex:
    index = make_index(kind="hnsw", dim=vectors.shape[1])
    index.exact_below = 0
    fill(index, keys, vectors)
    index.refresh_graph()
    await index.wait_built()
    return index


async def test_hnsw_recall_at_10_is_at_least_0_95_of_exact_on_5k_vectors() -> None:
    vectors = clustered(5000, 384, seed=6)
    keys = [(f"ns{i % 5}", f"k{i}") for i in range(5000)]
    index = await built_hnsw(keys, vectors)
    exact = make_index(dim=384)
    fill(exact, keys, vectors)
    found = total = 0
    for query in clustered(200, 384, seed=7):
        truth = {key for key, _ in exact.search(query, "", None, 10)}
        hits = index.search(query, "", None, 10)
        assert len(hits) == 10
        found += len(truth & {key for key, _ in hits})
        total += 10
    assert found / total >= 0.95


async def test_hnsw_results_stay_in_the_prefix_and_allowed_set() -> None:
    vectors = clustered(3000, DIM, seed=8)
    keys = [(NAMESPACES[i % len(NAMESPACES)], f"k{i}") for i in range(3000)]
    index = await built_hnsw(keys, vectors)
    allowed = keys[::7]
    for query in clustered(30, DIM, seed=9):
        for prefix, scope in (("a/b", None), ("", allowed), ("c", allowed)):
            hits = index.search(query, prefix, scope, 10)
            assert hits
            assert all(in_prefix(key, prefix) or not prefix for key, _ in hits)
            assert scope is None or all(key in set(scope) for key, _ in hits)


async def test_hnsw_sees_changes_made_after_its_graph_was_built() -> None:
    vectors = clustered(2000, DIM, seed=10)
    keys = [("g", f"k{i}") for i in range(2000)]
    index = await built_hnsw(keys, vectors)
    query = clustered(1, DIM, seed=11)[0]
    index.set(("g", "new"), query.tobytes())  # not in the graph yet
    assert index.search(query, "", None, 1)[0][0] == ("g", "new")
    index.set(("g", "new"), (-query).tobytes())  # replaced: its old label is dead
    assert ("g", "new") not in {key for key, _ in index.search(query, "", None, 10)}
    best = index.search(query, "", None, 1)[0][0]
    index.remove(best)
    assert best not in {key for key, _ in index.search(query, "", None, 10)}


async def test_hnsw_refreshes_its_graph_after_many_changes() -> None:
    vectors = clustered(3000, DIM, seed=12)
    keys = [("g", f"k{i}") for i in range(3000)]
    index = await built_hnsw(keys[:1000], vectors[:1000])
    index.refresh_after = 500
    fill(index, keys[1000:], vectors[1000:])
    for key in keys[:200]:
        index.remove(key)
    index.refresh_graph()
    await index.wait_built()
    exact = make_index()
    fill(exact, keys[200:], vectors[200:])
    found = 0
    queries = clustered(50, DIM, seed=13)
    for query in queries:
        truth = {key for key, _ in exact.search(query, "", None, 10)}
        hits = index.search(query, "", None, 10)
        assert all(key not in set(keys[:200]) for key, _ in hits)
        found += len(truth & {key for key, _ in hits})
    assert found / (10 * len(queries)) >= 0.95
    await index.close()


# Coherence with the store ------------------------------------------------------------------


class FakeEmbedder:
    """A tiny deterministic embedder (the Embedder protocol): a unit vector per text."""

    name = "fake-16"
    dim = 16

    def vector(self, text: str) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return unit(np.random.default_rng(seed).standard_normal(self.dim))

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dim))

    async def close(self) -> None:
        return None


def local_hive(path: Path, agent: str) -> LocalHive:
    # Vectors at write time: these tests follow the in-process index, not the indexer.
    settings = Settings(embedder="none", feed_poll_seconds=0.05, index_mode="sync")
    return LocalHive(
        SqliteBackend(str(path), settings), agent=agent, settings=settings, embedder=FakeEmbedder()
    )


async def test_sync_picks_up_puts_changes_and_deletes_written_through_a_local_hive(
    tmp_path: Path,
) -> None:
    hive = local_hive(tmp_path / "v.db", "writer")
    emb = FakeEmbedder()
    try:
        await hive.put("docs", "a", "alpha text")
        await hive.put("docs/sub", "b", {"note": 1}, text="bravo text")
        await hive.put("docs", "plain", {"no": "text"})  # nothing to index
        index = hive._vector_index(emb.dim)
        await index.sync()
        assert len(index) == 2
        assert index.search(emb.vector("alpha text"), "docs", None, 1)[0][0] == ("docs", "a")

        await hive.put("docs", "a", "changed text")
        await hive.put("docs", "c", "charlie text")
        await hive.delete("docs/sub", "b")
        await index.sync()
        assert len(index) == 2
        top = index.search(emb.vector("changed text"), "", None, 1)[0]
        assert top == (("docs", "a"), pytest.approx(1.0, abs=1e-5))
        keys = {key for key, _ in index.search(emb.vector("bravo text"), "", None, 10)}
        assert keys == {("docs", "a"), ("docs", "c")}
    finally:
        await hive.close()


async def test_sync_picks_up_writes_of_another_hive_on_the_same_file(tmp_path: Path) -> None:
    reader = local_hive(tmp_path / "shared.db", "reader")
    writer = local_hive(tmp_path / "shared.db", "writer")
    emb = FakeEmbedder()
    try:
        await reader.open()
        await writer.put("team", "x", "first note")
        index = reader._vector_index(emb.dim)
        await index.sync()
        assert len(index) == 1
        await writer.put("team", "y", "second note")
        await writer.delete("team", "x")
        for _ in range(100):  # the reader catches up within feed_poll_seconds
            await index.sync()
            if [key for key, _ in index.search(emb.vector("second note"), "", None, 5)] == [
                ("team", "y")
            ]:
                break
            await asyncio.sleep(0.02)
        assert [key for key, _ in index.search(emb.vector("second note"), "", None, 5)] == [
            ("team", "y")
        ]
    finally:
        await writer.close()
        await reader.close()


async def test_sqlite_fills_the_vector_matrix_as_the_default_builds_it(tmp_path: Path) -> None:
    from hivemem.backends.base import Backend
    from hivemem.backends.rows import PutWrite

    settings = Settings(embedder="none")
    backend = SqliteBackend(str(tmp_path / "m.db"), settings)
    await backend.open()
    try:
        rng = np.random.default_rng(7)
        writes = [
            PutWrite(
                "ns",
                f"k{i}",
                b"1",
                None,
                None,
                None,
                None,
                index_text="t",
                vector=rng.standard_normal(8 if i % 5 else 4).astype(np.float32).tobytes(),
                model="m" if i % 7 else "other",
            )
            for i in range(60)
        ]
        await backend.write_items(writes, author="x", now=1.0, history_limit=0)
        keys, matrix = await backend.load_vector_matrix("m", 8)
        want_keys, want = await Backend.load_vector_matrix(backend, "m", 8)
        assert sorted(keys) == sorted(want_keys) and len(keys) == len(
            [i for i in range(60) if i % 5 and i % 7]
        )
        order = {k: i for i, k in enumerate(want_keys)}
        assert matrix.dtype == np.float32 and matrix.shape == (len(keys), 8)
        assert np.array_equal(matrix, want[[order[k] for k in keys]])
    finally:
        await backend.close()
