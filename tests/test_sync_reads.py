"""SyncHive.get on an embedded SQLite file reads in the calling thread: the same answers
as through the event loop (fresh writes, expiry, permissions), from many threads at once,
across a close and a reopen; other stores go through the loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import hivemem
from hivemem import Settings, SyncHive
from hivemem.backends.sqlite import SqliteBackend
from hivemem.core import LocalHive

POLICY = """
[[rules]]
actions = ["read", "write"]
namespaces = ["team/{agent}/**"]
agents = ["*"]
"""


def settings(**extra: object) -> Settings:
    return Settings(embedder="none", **extra)  # type: ignore[arg-type]


def test_reads_in_the_calling_thread_see_every_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    with hivemem.connect_sync(url, agent="a", settings=settings()) as hive:
        assert hive.get("ns", "k") is None  # opens the store through the loop
        hive.put("ns", "k", {"v": 1})
        done, item = hive._hive._get_here("ns", "k")
        assert done and item is not None and item.value == {"v": 1}  # read here
        hive.put("ns", "k", {"v": 2})
        got = hive.get("ns", "k")
        assert got is not None and got.value == {"v": 2} and got.version == 2
        hive.put("ns", "brief", 1, ttl=0.2)
        assert hive.get("ns", "brief") is not None
        time.sleep(0.3)
        assert hive.get("ns", "brief") is None
        code = (
            "import hivemem\n"
            f"h = hivemem.connect_sync({url!r}, agent='w', settings=hivemem.Settings("
            "embedder='none'))\n"
            "h.put('ns', 'other', 'from another process')\n"
            "h.close()\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        other = hive.get("ns", "other")
        assert other is not None and other.author == "w"


def test_many_threads_read_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    with hivemem.connect_sync(url, agent="a", settings=settings()) as hive:
        hive.batch(
            [{"op": "put", "namespace": "ns", "key": f"k{i}", "value": i} for i in range(50)]
        )
        errors: list[str] = []

        def read(t: int) -> None:
            for i in range(500):
                item = hive.get("ns", f"k{(i + t) % 50}")
                if item is None or item.value != (i + t) % 50:
                    errors.append(f"{t}:{i}:{item}")

        threads = [threading.Thread(target=read, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    # Reopened: the threads' connections of the first opening are not reused.
    with hivemem.connect_sync(url, agent="a", settings=settings()) as hive:
        hive.get("ns", "k0")
        done, item = hive._hive._get_here("ns", "k1")
        assert done and item is not None and item.value == 1


def test_permissions_hold_in_the_calling_thread(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    s = settings(policy_file=str(policy))
    backend = SqliteBackend(str(tmp_path / "p.db"), s)
    hive = SyncHive(LocalHive(backend, agent="a", settings=s))
    try:
        hive.put("team/a", "mine", 1)
        other = SyncHive(LocalHive(SqliteBackend(str(tmp_path / "p.db"), s), agent="b", settings=s))
        try:
            other.put("team/b", "theirs", 2)
        finally:
            other.close()
        assert hive._hive._get_here("team/b", "theirs") == (True, None)
        assert hive.get("team/b", "theirs") is None
        mine = hive.get("team/a", "mine")
        assert mine is not None and mine.value == 1
    finally:
        hive.close()


def test_memory_stores_read_through_the_loop() -> None:
    with hivemem.connect_sync("sqlite://:memory:", agent="a", settings=settings()) as hive:
        hive.put("ns", "k", 1)
        assert hive._hive._get_here("ns", "k") == (False, None)
        item = hive.get("ns", "k")
        assert item is not None and item.value == 1
