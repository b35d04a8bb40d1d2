"""SQLite's lexical index lags the writes and catches up (backends/sqlite/search.py):
a search still sees every write acknowledged before it, never by a stale text, and
FTS5 agrees with the items once it has caught up (its own integrity check)."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import hivemem
from hivemem.backends.sqlite import SqliteBackend
from hivemem.backends.sqlite.schema import MIGRATIONS
from hivemem.backends.sqlite.search import LEXICAL_BATCH
from hivemem.config import Settings
from hivemem.core import LocalHive

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def engine_hive(path: Path, agent: str = "a") -> LocalHive:
    """A hive ranking text in FTS5 (never the in-process index), without an embedder."""
    return LocalHive(
        SqliteBackend(str(path), Settings()),
        agent=agent,
        settings=Settings(embedder="none", lexical_index="engine"),
    )


def pending(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM lexical_pending").fetchone()[0])


def integrity_check(path: Path) -> None:
    """FTS5's check that its index holds exactly the external content's terms (raises
    sqlite3.DatabaseError when it does not)."""
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('integrity-check', 1)")


async def found(hive: LocalHive, word: str) -> set[str]:
    hits = await hive.search("t", word, mode="lexical", limit=100)
    return {h.item.key for h in hits}


async def test_a_search_sees_puts_the_index_has_not_caught_up_with(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with engine_hive(db) as hive:
        for i in range(10):
            await hive.put("t", f"k{i}", {"n": i}, text=f"{WORDS[i % 3]} report {i}")
        assert pending(db) == 10  # the puts wrote no FTS5 entry
        assert await found(hive, "alpha") == {"k0", "k3", "k6", "k9"}
        assert pending(db) == 0  # the search brought FTS5 up to date first
        await hive.put("t", "k0", {"n": 0}, text="bravo again")
        assert await found(hive, "alpha") == {"k3", "k6", "k9"}
        assert await found(hive, "bravo") == {"k0", "k1", "k4", "k7"}
        await hive.delete("t", "k1")
        assert await found(hive, "bravo") == {"k0", "k4", "k7"}
    integrity_check(db)


async def test_a_put_with_the_same_text_marks_nothing(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with engine_hive(db) as hive:
        await hive.put("t", "k", {"n": 1}, text="alpha bravo")
        assert await found(hive, "alpha") == {"k"}
        await hive.put("t", "k", {"n": 2}, text="alpha bravo")  # value only changes
        assert pending(db) == 0
        await hive.put("t", "k", {"n": 3}, text="charlie")
        assert pending(db) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_writes_and_searches_agree_with_a_model(tmp_path: Path, seed: int) -> None:
    """Puts (new text, same text, no text), deletes and expiries over 30 keys from two
    hives on one file, with searches between them: every search returns exactly the
    keys whose current text holds the word, and FTS5 passes its integrity check."""
    db = tmp_path / "h.db"
    rng = random.Random(seed)
    model: dict[str, str] = {}  # key -> current searchable text
    async with engine_hive(db, "a") as a, engine_hive(db, "b") as b:
        for step in range(600):
            hive = a if rng.random() < 0.5 else b
            key = f"k{rng.randrange(30)}"
            op = rng.random()
            if op < 0.45:
                text = " ".join(rng.sample(WORDS, 3))
                await hive.put("t", key, {"s": step}, text=text)
                model[key] = text
            elif op < 0.55 and key in model:
                await hive.put("t", key, {"s": step}, text=model[key])
            elif op < 0.62:
                await hive.put("t", key, {"s": step})  # no text: not searchable
                model.pop(key, None)
            elif op < 0.72:
                await hive.delete("t", key)
                model.pop(key, None)
            elif op < 0.76:
                # Expires at once; the next search must not find it, and the sweep
                # (or a later put of the key) removes its entry.
                await hive.put("t", key, {"s": step}, text="juliet kilo", ttl=0.001)
                model.pop(key, None)
                await asyncio.sleep(0.002)
                if rng.random() < 0.5:
                    await hive.sweep()
            else:
                word = rng.choice([*WORDS, "juliet"])
                expect = {k for k, t in model.items() if word in t.split()}
                assert await found(hive, word) == expect, (step, word)
        await a.search("t", "alpha", mode="lexical")
        assert pending(db) == 0
    integrity_check(db)


async def test_a_process_catches_up_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with engine_hive(db) as hive:
        for i in range(LEXICAL_BATCH + 20):
            await hive.put("t", f"k{i}", {"n": i}, text=f"alpha {i}")
        # Polls the file: the catch-up is a write of the store's, with no event of its own.
        for _ in range(200):
            if pending(db) < LEXICAL_BATCH:
                break
            await asyncio.sleep(0.05)
        assert pending(db) < LEXICAL_BATCH  # no search ran


def test_sync_puts_in_the_calling_thread_catch_up_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    settings = Settings(embedder="none", lexical_index="engine")
    with hivemem.connect_sync(f"sqlite:///{db}", agent="a", settings=settings) as hive:
        for i in range(LEXICAL_BATCH + 20):
            hive.put("t", f"k{i}", {"n": i}, text=f"alpha {i}")
        deadline = time.monotonic() + 10
        while pending(db) >= LEXICAL_BATCH and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending(db) < LEXICAL_BATCH
        hits = hive.search("t", "alpha", mode="lexical", limit=100)
        assert len(hits) == 100
        assert pending(db) == 0
    integrity_check(db)


async def test_an_entry_marked_while_a_search_runs_is_left_out(tmp_path: Path) -> None:
    """A put committed between a search's catch-up and its query leaves FTS5 holding
    the item's older text: the search must not rank the item by it."""
    db = tmp_path / "h.db"
    async with engine_hive(db) as hive:
        await hive.put("t", "racer", {"n": 1}, text="alpha old words")
        await hive.put("t", "other", {"n": 1}, text="alpha steady")
        await hive.put("t", "later", {"n": 1}, text="bravo")
        backend = hive._backend
        assert isinstance(backend, SqliteBackend)
        engine = backend._engine
        write = engine.write
        raced = False

        async def write_then_race(fn: Any) -> Any:
            nonlocal raced
            result = await write(fn)
            if not raced:  # right after the search's catch-up commits
                raced = True
                await hive.put("t", "racer", {"n": 2}, text="charlie new words")
            return result

        engine.write = write_then_race  # type: ignore[method-assign]
        try:
            assert await found(hive, "alpha") == {"other"}
        finally:
            engine.write = write  # type: ignore[method-assign]
        assert raced
        assert pending(db) == 1
        assert await found(hive, "charlie") == {"racer"}
        assert await found(hive, "alpha") == {"other"}
    integrity_check(db)


async def test_a_store_of_the_previous_schema_keeps_its_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Migration 9 moves each entry's text from FTS5's own copy to ``search_docs`` and
    rebuilds FTS5 over it, saying so before and after (it takes a while on a large store)."""
    db = tmp_path / "old.db"
    c = sqlite3.connect(db, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:8], start=1):
        c.executescript(script)
        c.execute(f"PRAGMA user_version={number}")
    now = time.time()
    for i, text in enumerate(["alpha one", "bravo two", "alpha three"]):
        c.execute(
            "INSERT INTO items (ns, key, value, version, author, created_at, updated_at) "
            "VALUES ('t', ?, ?, 1, 'a', ?, ?)",
            (f"k{i}", b"1", now, now),
        )
        doc = c.execute(
            "INSERT INTO search_docs (ns, key, version) VALUES ('t', ?, 1) RETURNING id",
            (f"k{i}",),
        ).fetchone()[0]
        c.execute("INSERT INTO search_fts (rowid, text) VALUES (?, ?)", (doc, text))
    c.close()
    caplog.set_level(logging.WARNING, logger="hivemem.sqlite")
    async with engine_hive(db) as hive:
        said = [r.getMessage() for r in caplog.records if r.name == "hivemem.sqlite"]
        assert len(said) == 2, said
        assert said[0].startswith(f"upgrading the store {db} from schema 8 to {len(MIGRATIONS)}")
        assert "rebuilds the lexical index" in said[0]
        assert said[1].startswith(f"upgraded the store {db} to schema {len(MIGRATIONS)} in ")
        assert await found(hive, "alpha") == {"k0", "k2"}
        await hive.put("t", "k0", 1, text="bravo now")
        assert await found(hive, "bravo") == {"k0", "k1"}
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert c.execute("SELECT text FROM search_docs WHERE key = 'k2'").fetchone() == (
            "alpha three",
        )
    integrity_check(db)
    # Opening it again, or opening a new store, upgrades nothing and says nothing.
    caplog.clear()
    async with engine_hive(db), engine_hive(tmp_path / "new.db"):
        pass
    assert not [r for r in caplog.records if r.name == "hivemem.sqlite"]


async def test_storing_a_vector_leaves_the_lexical_entry_alone(tmp_path: Path) -> None:
    """The indexer stores each deferred vector with the text the put indexed: FTS5 is
    not written again for it."""
    db = tmp_path / "h.db"
    settings = Settings(embedder="minilm", lexical_index="engine")
    async with hivemem.connect(f"sqlite:///{db}", agent="a", settings=settings) as hive:
        for i in range(5):
            await hive.put("t", f"k{i}", f"{WORDS[i]} note {i}")
        hits = await hive.search("t", "note", mode="lexical")
        assert {h.item.key for h in hits} == {f"k{i}" for i in range(5)}
        assert pending(db) == 0
        hits = await hive.search("t", "note", consistency="indexed")  # runs the indexer
        assert len(hits) == 5
        with sqlite3.connect(db) as c:
            assert c.execute("SELECT count(*) FROM search_docs WHERE vec IS NULL").fetchone() == (
                0,
            )
        assert pending(db) == 0
