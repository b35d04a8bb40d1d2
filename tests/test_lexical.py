"""LexicalIndex: tokens and BM25 scores equal to SQLite FTS5's, scopes, rebuilds, and the
same search results from the in-process index and from FTS5 through a LocalHive."""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import pathlib
import random
import re
import sqlite3
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hivemem import SearchHit
from hivemem.backends.sqlite import SqliteBackend
from hivemem.backends.sqlite.search import match_expression
from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.core.lexical import LexicalIndex, tokens
from hivemem.core.search import query_terms

Key = tuple[str, str]
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_conversation.json"


def corpus() -> list[str]:
    """Real English text available on any machine: the sample conversation shipped in
    examples/, then sentences of the standard library's docstrings (deterministic for
    one Python version)."""
    data = json.loads(SAMPLE.read_text())
    texts = []
    for conv in data:
        for name, value in conv["conversation"].items():
            if name.startswith("session_") and isinstance(value, list):
                texts += [f"{turn['speaker']}: {turn['text']}" for turn in value]
    for module in (collections, json, textwrap, argparse, random, sqlite3, pathlib):
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name)) or ""
            texts += [s.strip() for s in doc.split(". ") if len(s.split()) > 3]
    return list(dict.fromkeys(texts))[:800]


def fts(texts: Sequence[str]) -> sqlite3.Connection:
    """An FTS5 table over ``texts`` (rowid = position + 1), tokenized like hivemem's."""
    c = sqlite3.connect(":memory:")
    c.execute(
        "CREATE VIRTUAL TABLE f USING fts5(text, tokenize = 'porter unicode61 remove_diacritics 2')"
    )
    c.execute("CREATE VIRTUAL TABLE v USING fts5vocab(f, instance)")
    c.executemany("INSERT INTO f (rowid, text) VALUES (?, ?)", enumerate(texts, start=1))
    return c


def make_index() -> LexicalIndex:
    """An index whose documents are set by hand (its backend is never opened)."""
    return LexicalIndex(SqliteBackend(":memory:", Settings()), 1.0)


def fts_ranking(c: sqlite3.Connection, words: Sequence[str]) -> dict[int, float]:
    sql = "SELECT rowid, -bm25(f) FROM f WHERE f MATCH ?"
    # FTS5 stems the query's words itself; give it one word per distinct term, as the
    # in-process index counts each term once.
    by_term: dict[str, str] = {}
    for word in words:
        for term, part in zip(tokens(word), words_of(word), strict=True):
            by_term.setdefault(term, part)
    return {row: score for row, score in c.execute(sql, (match_expression([*by_term.values()]),))}


def words_of(text: str) -> list[str]:
    """The words of ``text`` before stemming."""
    return re.findall(r"[^\W_]+", text)


def test_tokens_are_those_of_fts5() -> None:
    texts = [*corpus()[:200], "Café naïve Ünïcode under_score x2y 3.14 ÉTÉ déjà-vu"]
    c = fts(texts)
    for i, text in enumerate(texts, start=1):
        ours = tokens(text)
        theirs = [
            r[0]
            for r in c.execute(
                "SELECT term FROM v WHERE doc = ? ORDER BY offset", (i,)
            )  # fts5vocab instance: one row per token
        ]
        assert ours == theirs, text


def test_scores_equal_fts5_bm25() -> None:
    texts = corpus()
    assert len(texts) > 100
    c = fts(texts)
    index = make_index()
    for i, text in enumerate(texts, start=1):
        index.set(("ns", str(i)), text)
    rng = random.Random(7)
    queries = [query_terms(t) for t in rng.sample(texts, 40)]
    queries += [["dog"], ["painting", "sunset"], ["zzzz-not-there"]]
    for words in queries:
        expected = fts_ranking(c, words)
        got = {int(key[1]): score for key, score in index.search(words, "", None, len(texts))}
        assert got.keys() == expected.keys(), words
        for doc, score in expected.items():
            assert got[doc] == pytest.approx(score, rel=1e-4, abs=1e-5), (words, doc)


def test_changes_and_rebuild_keep_scores_exact() -> None:
    texts = corpus()
    index = make_index()
    live: dict[int, str] = {}
    rng = random.Random(11)
    for step in range(3000):
        doc = rng.randrange(150)
        if rng.random() < 0.2:
            index.remove(("ns", str(doc)))
            live.pop(doc, None)
        else:
            text = rng.choice(texts)
            index.set(("ns", str(doc)), text)
            live[doc] = text
        if step % 500 == 499:
            index._synced()  # the rebuild check sync() runs
    c = fts([live.get(d, "") for d in range(150)])
    gone = [d + 1 for d in range(150) if d not in live]
    c.executemany("DELETE FROM f WHERE rowid = ?", [(d,) for d in gone])
    for words in (query_terms(t) for t in rng.sample(texts, 30)):
        expected = fts_ranking(c, words)
        got = {int(key[1]) + 1: s for key, s in index.search(words, "", None, 1000)}
        assert got.keys() == expected.keys()
        for doc, score in expected.items():
            assert got[doc] == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert len(index) == len(live)


@hsettings(max_examples=60, deadline=None)
@given(
    docs=st.dictionaries(
        st.tuples(st.sampled_from(["a", "a/b", "a/c", "ab", "z"]), st.sampled_from("pqrst")),
        st.lists(st.sampled_from(["apple", "pear", "plum", "fig", "kiwi"]), min_size=1),
        min_size=1,
    ),
    prefix=st.sampled_from(["", "a", "a/b", "z", "q"]),
    k=st.integers(1, 30),
)
def test_prefix_and_allowed_scopes(docs: dict[Key, list[str]], prefix: str, k: int) -> None:
    index = make_index()
    for key, words in docs.items():
        index.set(key, " ".join(words))
    allowed = sorted(docs)[::2]
    for scope in (None, allowed):
        hits = index.search(["apple", "plum"], prefix, scope, k)
        in_scope = {
            key
            for key, words in docs.items()
            if (not prefix or key[0] == prefix or key[0].startswith(prefix + "/"))
            and (scope is None or key in scope)
            and {"apple", "plum"} & set(words)
        }
        assert {key for key, _ in hits} <= in_scope
        assert len(hits) == min(k, len(in_scope))
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)


def same_hits(a: Sequence[SearchHit], b: Sequence[SearchHit]) -> bool:
    """Equal BM25 scores in order (float32 against SQLite's doubles: relative 1e-5), and
    the same items wherever scores are not tied with the last one (the order among equal
    scores is each index's own)."""
    sa = [h.lexical_score or 0.0 for h in a]
    sb = [h.lexical_score or 0.0 for h in b]
    if len(sa) != len(sb) or any(
        x != pytest.approx(y, rel=1e-5) for x, y in zip(sa, sb, strict=True)
    ):
        return False
    last = sa[-1] if sa else None

    def untied(hits: Sequence[SearchHit], scores: list[float]) -> set[Key]:
        return {
            (h.item.namespace, h.item.key)
            for h, s in zip(hits, scores, strict=True)
            if s != pytest.approx(last, rel=1e-5)
        }

    return untied(a, sa) == untied(b, sb)


async def test_memory_and_engine_indexes_return_the_same_hits(tmp_path: Path) -> None:
    url = tmp_path / "hive.db"
    texts = corpus()
    engine = LocalHive(
        SqliteBackend(str(url), Settings()),
        agent="a",
        settings=Settings(embedder="none", lexical_index="engine"),
    )
    memory = LocalHive(
        SqliteBackend(str(url), Settings()),
        agent="b",
        settings=Settings(embedder="none", lexical_index="memory"),
    )
    async with engine, memory:
        for i, text in enumerate(texts):
            await engine.put(f"conv/{i % 3}", f"t{i}", text, metadata={"n": i % 5})
        # Changes made through the other hive reach the memory index through the feed.
        for i in range(0, len(texts), 7):
            await engine.put(f"conv/{i % 3}", f"t{i}", "replaced words about kites")
        for i in range(3, len(texts), 11):
            await engine.delete(f"conv/{i % 3}", f"t{i}")
        rng = random.Random(3)
        for text in [*rng.sample(texts, 25), "kites"]:
            for prefix, flt in (("", None), ("conv/1", None), ("", {"n": {"$in": [1, 2]}})):
                a = await engine.search(prefix, text, mode="lexical", filter=flt, limit=10)
                b = await memory.search(prefix, text, mode="lexical", filter=flt, limit=10)
                assert same_hits(a, b), text
