"""SyncHive.put on an embedded SQLite file writes in the calling thread when the hive's
writer is idle: the same outcomes and errors as a put through the event loop (compared
case by case on two stores), the same rows, history and events; concurrent callers from
many threads still get consecutive versions; this process's watchers are woken; a busy
writer, an in-memory store, an embedding before the write and a blob store send the put
through the loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hivemem
from hivemem import Settings, SyncHive
from hivemem.backends.sqlite import SqliteBackend
from hivemem.core import LocalHive
from hivemem.errors import HivememError

POLICY = """
[[rules]]
actions = ["read", "write"]
namespaces = ["team/{agent}/**"]
agents = ["*"]
"""


def settings(**extra: object) -> Settings:
    return Settings(embedder="none", max_text_terms=50, **extra)  # type: ignore[arg-type]


def engine_of(hive: SyncHive) -> Any:
    backend = hive._hive._backend  # type: ignore[attr-defined]
    assert isinstance(backend, SqliteBackend)
    return backend._engine


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[SyncHive]:
    with hivemem.connect_sync(
        f"sqlite:///{tmp_path / 'w.db'}", agent="a", settings=settings()
    ) as h:
        h.get("ns", "k")  # opened
        yield h


def here(hive: SyncHive, *args: Any, **kwargs: Any) -> Any:
    """A put that must run in the calling thread."""
    done, item = hive._hive._put_here(*args, **kwargs)
    assert done
    return item


def through_loop(hive: SyncHive, *args: Any, **kwargs: Any) -> Any:
    return hive._portal.call(lambda: hive._hive.put(*args, **kwargs))


#: Puts applied in order to a fresh store, each with its expected outcome made of what
#: both paths return: an item's (namespace, key, value, version, author, text, metadata)
#: or an error's (type, field, current_version).
CASES: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("ns", "k", {"v": 1}), {}),
    (("ns", "k", {"v": 2}), {"if_version": 1}),
    (("ns", "k", {"v": 3}), {"if_version": 1}),  # stale: Conflict, current 2
    (("ns", "k", "x"), {"if_version": 0}),  # exists: Conflict
    (("ns", "new", "x"), {"if_version": 0}),
    (("ns", "new", "y"), {"if_version": 5}),
    (("ns", "t", {"a": 1}), {"text": "some words to index", "metadata": {"kind": "note"}}),
    (("ns", "ttl", 1), {"ttl": 60}),
    (("ns", "ttl", 1), {"ttl": -1}),  # InvalidInput ttl
    (("bad//ns", "k", 1), {}),  # InvalidInput namespace
    (("ns", "bad/key", 1), {}),  # InvalidInput key
    (("ns", "big", "x" * 2_000_000), {}),  # TooLarge value
    (("ns", "words", " ".join(f"w{i}" for i in range(60))), {}),  # TooLarge: terms
    (("ns", "k", float("nan")), {}),  # not JSON
    (("ns", "k", 1), {"metadata": {"x": object()}}),  # not JSON
    (("ns", "k", {"v": 4}), {}),
]


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        item = call()
    except HivememError as exc:
        return (type(exc).__name__, exc.field, getattr(exc, "current_version", None))
    return (item.namespace, item.key, item.value, item.version, item.author, item.text)


def state(hive: SyncHive) -> list[Any]:
    items = [(i.key, i.value, i.version, i.metadata) for i in hive.list("ns").items]
    history = [(i.version, i.value) for i in hive.history("ns", "k")]
    events = hive.read_events("ns", after=None, limit=100).items
    return [items, history, [(e.type, e.key, e.version, e.author) for e in events]]


def test_a_put_in_the_calling_thread_answers_as_one_through_the_loop(tmp_path: Path) -> None:
    s = settings()
    with (
        hivemem.connect_sync(f"sqlite:///{tmp_path / 'h.db'}", agent="a", settings=s) as a,
        hivemem.connect_sync(f"sqlite:///{tmp_path / 'l.db'}", agent="a", settings=s) as b,
    ):
        a.get("ns", "k")
        b.get("ns", "k")
        kinds = set()
        for args, kwargs in CASES:
            mine = outcome(lambda args=args, kwargs=kwargs: a.put(*args, **kwargs))
            theirs = outcome(lambda args=args, kwargs=kwargs: through_loop(b, *args, **kwargs))
            assert mine == theirs, (args, kwargs)
            kinds.add(mine[0] if isinstance(mine[0], str) and mine[0][0].isupper() else "ok")
        assert {"ok", "Conflict", "InvalidInput", "TooLarge"} <= kinds
        assert state(a) == state(b)
        assert here(a, "ns", "k", 5).version == 4  # and it did run here


def test_fences_and_request_ids_hold_in_the_calling_thread(hive: SyncHive) -> None:
    first = hive.acquire("jobs/q", ttl=30)
    item = here(hive, "ns", "f", 1, fence=(first.name, first.token))
    assert item.version == 1
    hive.release(first)
    second = hive.acquire("jobs/q", ttl=30)
    assert second.token > first.token
    with pytest.raises(hivemem.Conflict) as stale:
        hive._hive._put_here("ns", "f", 2, fence=(first.name, first.token))
    assert stale.value.field == "fence" and stale.value.current_version == second.token
    got = hive.get("ns", "f")
    assert got is not None and got.version == 1
    view = SyncHive(hive._hive.with_request_id("r-1"), _loop=hive._loop)  # type: ignore[attr-defined]
    once = here(view, "ns", "rid", "first")
    again = here(view, "ns", "rid", "first")
    assert (again.version, again.value) == (once.version, once.value) == (1, "first")
    with pytest.raises(hivemem.InvalidInput) as reused:
        view._hive._put_here("ns", "rid", "other")
    assert reused.value.field == "request_id"


def test_permissions_hold_in_the_calling_thread(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    s = settings(policy_file=str(policy))
    hive = SyncHive(LocalHive(SqliteBackend(str(tmp_path / "p.db"), s), agent="a", settings=s))
    try:
        hive.get("team/a", "x")
        assert here(hive, "team/a", "mine", 1).version == 1
        with pytest.raises(hivemem.PermissionDenied) as denied:
            hive._hive._put_here("team/b", "theirs", 2)
        assert denied.value.field == "namespace"
    finally:
        hive.close()


def test_many_threads_put_at_once_with_consecutive_versions(hive: SyncHive) -> None:
    errors: list[BaseException] = []
    versions: dict[str, list[int]] = {f"k{k}": [] for k in range(4)}
    lock = threading.Lock()

    def writer(t: int) -> None:
        try:
            for i in range(40):
                key = f"k{(t + i) % 4}"
                item = hive.put("ns", key, {"t": t, "i": i})
                with lock:
                    versions[key].append(item.version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for key, seen in versions.items():
        assert sorted(seen) == list(range(1, 81)), key
    events = hive.read_events("ns", after=None, limit=1000).items
    assert len(events) == 320
    for key in versions:
        assert [e.version for e in events if e.key == key] == list(range(1, 81))


def test_this_process_watchers_are_woken(hive: SyncHive) -> None:
    changes = hive._hive._backend.changes  # type: ignore[attr-defined]
    before = changes.generation
    here(hive, "ns", "w", 1)
    deadline = time.monotonic() + 5
    while changes.generation == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert changes.generation > before
    # a watcher waiting in the loop sees the put
    head = hive.head()
    got: list[Any] = []

    def watch() -> None:
        for event in hive.watch("ns", after=head):
            got.append(event)
            return

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.2)
    here(hive, "ns", "w", 2)
    watcher.join(10)
    assert [(e.key, e.version) for e in got] == [("w", 2)]


def test_a_busy_writer_sends_the_put_through_the_loop(hive: SyncHive) -> None:
    engine = engine_of(hive)
    with engine._commit_lock:  # as while the writer thread commits a group
        assert hive._hive._put_here("ns", "busy", 1) == (False, None)
        assert hive.get("ns", "busy") is None  # nothing was written
    assert here(hive, "ns", "busy", 1).version == 1


def test_stores_that_cannot_write_here_go_through_the_loop(tmp_path: Path) -> None:
    with hivemem.connect_sync("sqlite://:memory:", agent="a", settings=settings()) as memory:
        memory.get("ns", "k")
        assert memory._hive._put_here("ns", "k", 1) == (False, None)
        assert memory.put("ns", "k", 1).version == 1
    sync_index = Settings(index_mode="sync")  # embeds before the write: in the loop
    url = f"sqlite:///{tmp_path / 's.db'}"
    with hivemem.connect_sync(url, agent="a", settings=sync_index) as embedding:
        embedding.get("ns", "k")
        assert embedding._hive._put_here("ns", "k", "a text") == (False, None)
    blobs = settings(blob_store=f"file://{tmp_path / 'blobs'}")
    with hivemem.connect_sync(f"sqlite:///{tmp_path / 'b.db'}", agent="a", settings=blobs) as b:
        b.get("ns", "k")
        assert b._hive._put_here("ns", "k", 1) == (False, None)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with hivemem.connect_sync(url, agent="a", settings=settings()) as c:
        assert here(c, "ns", "k", 1).version == 1
    assert c._hive._put_here("ns", "k", 2) == (False, None)  # closed
