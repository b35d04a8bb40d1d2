"""The coordination API of the blocking SyncHive: tasks, leases, fencing, idempotent
calls, signals, waits and the agent registry, over an embedded SQLite store, called
from plain threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hivemem
from hivemem.errors import Conflict, InvalidInput, OnceFailed
from hivemem.models import Item


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[hivemem.SyncHive]:
    with hivemem.connect_sync(f"sqlite:///{tmp_path}/h.db", agent="a") as h:
        yield h


def later(seconds: float, fn: Any, *args: Any, **kwargs: Any) -> threading.Timer:
    """Call ``fn`` in another thread after ``seconds``."""
    timer = threading.Timer(seconds, fn, args, kwargs)
    timer.start()
    return timer


# Tasks -------------------------------------------------------------------------------


def test_submit_claim_complete_result(hive: hivemem.SyncHive) -> None:
    worker = hive.as_agent("w")
    task = hive.submit("jobs", {"n": 2})
    assert task.state == "ready"
    assert hive.result(task.id).done is False

    claimed = worker.claim("jobs", lease=5)
    assert claimed is not None and claimed.id == task.id
    assert claimed.state == "running" and claimed.attempt == 1
    assert claimed.payload == {"n": 2}
    worker.heartbeat(claimed)
    assert hive.queue_stats("jobs").running == 1

    later(0.2, worker.complete, claimed, {"square": 4})
    done = hive.result(task.id, wait=5)
    assert done.state == "completed" and done.result == {"square": 4}
    assert done.claimed_by == "w"
    got = hive.get_task(task.id)
    assert got is not None and got.state == "completed"
    assert [t.id for t in hive.list_tasks("jobs", state="completed").items] == [task.id]
    assert worker.claim("jobs") is None


def test_task_fails_to_dead_then_requeue(hive: hivemem.SyncHive) -> None:
    task = hive.submit("jobs", "x", max_attempts=2, backoff=0.05)
    first = hive.claim("jobs", lease=5)
    assert first is not None
    assert hive.fail(first, "boom 1").state in ("ready", "delayed")
    second = hive.claim("jobs", lease=5, wait=5)
    assert second is not None and second.attempt == 2
    dead = hive.fail(second, "boom 2")
    assert dead.state == "dead"
    assert [(e.attempt, e.error) for e in dead.errors] == [(1, "boom 1"), (2, "boom 2")]
    assert hive.result(task.id).state == "dead"

    again = hive.requeue(task.id)
    assert again.state == "ready"
    third = hive.claim("jobs", lease=5)
    assert third is not None and third.id == task.id
    assert len(third.errors) == 2  # past errors are kept
    hive.release_task(third)
    assert hive.cancel(task.id).state == "cancelled"
    with pytest.raises(Conflict):
        hive.cancel(task.id)


# Leases and fencing ------------------------------------------------------------------


def test_lease_context_keeps_the_lease_alive(hive: hivemem.SyncHive) -> None:
    other = hive.as_agent("b")
    with hive.lease("locks/x", 0.6) as held:
        assert held.holder == "a"
        time.sleep(1.5)  # well past the ttl: only the background renewals keep it
        with pytest.raises(Conflict) as caught:
            other.acquire("locks/x", 1)
        assert caught.value.field == "name"
        hive.put("data", "k", 1, fence=("locks/x", held.token))
    # released at the end of the block: the other agent gets it at once
    taken = other.acquire("locks/x", 1)
    assert taken.holder == "b" and taken.token > held.token
    assert other.release(taken)


def test_lease_context_releases_on_error(hive: hivemem.SyncHive) -> None:
    with pytest.raises(ValueError), hive.lease("locks/y", 5):
        raise ValueError("inside")
    assert hive.as_agent("b").acquire("locks/y", 1).holder == "b"


def test_lease_context_conflict_on_enter(hive: hivemem.SyncHive) -> None:
    hive.as_agent("b").acquire("locks/z", 5)
    with pytest.raises(Conflict), hive.lease("locks/z", 1, wait=0.2):
        pytest.fail("entered a held lease")


def test_stale_fence_is_refused(hive: hivemem.SyncHive) -> None:
    other = hive.as_agent("b")
    mine = hive.acquire("locks/f", 5)
    mine = hive.renew(mine)
    hive.put("data", "k", "mine", fence=("locks/f", mine.token))
    assert hive.release(mine)
    theirs = other.acquire("locks/f", 5)
    assert theirs.token > mine.token
    with pytest.raises(Conflict) as caught:
        hive.put("data", "k", "stale", fence=("locks/f", mine.token))
    assert caught.value.field == "fence"
    item = hive.get("data", "k")
    assert item is not None and item.value == "mine"
    assert other.put("data", "k", "theirs", fence=("locks/f", theirs.token)).value == "theirs"


# Idempotent calls --------------------------------------------------------------------


def test_once_runs_once_for_concurrent_threads(hive: hivemem.SyncHive) -> None:
    runs: list[str] = []
    start = threading.Barrier(10)
    results: list[Any] = []
    errors: list[BaseException] = []

    def fn() -> dict[str, Any]:
        runs.append(threading.current_thread().name)
        time.sleep(0.3)  # blocks the caller's thread, not the loop
        return {"sent": True}

    def caller() -> None:
        start.wait()
        try:
            results.append(hive.once("s1:turn-1:email", fn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, name=f"caller-{i}") for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(runs) == 1 and runs[0].startswith("caller-")  # run in a caller's thread
    assert results == [{"sent": True}] * 10
    assert hive.once("s1:turn-1:email", fn) == {"sent": True}  # later: at once, not run
    assert len(runs) == 1


def test_once_runs_again_after_a_failure(hive: hivemem.SyncHive) -> None:
    calls = 0

    def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first try fails")
        return calls

    with pytest.raises(RuntimeError, match="first try fails"):
        hive.once("k", flaky)
    assert hive.once("k", flaky) == 2
    assert hive.once("k", flaky) == 2
    assert calls == 2


def test_once_keep_errors(hive: hivemem.SyncHive) -> None:
    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("no")

    with pytest.raises(ValueError):
        hive.once("k", broken, keep_errors=True)
    with pytest.raises(OnceFailed) as caught:
        hive.once("k", broken, keep_errors=True)
    assert "ValueError: no" in str(caught.value)
    assert caught.value.holder == "a"
    assert calls == 1


def test_once_non_json_result_frees_the_key(hive: hivemem.SyncHive) -> None:
    with pytest.raises(InvalidInput) as caught:
        hive.once("k", object)
    assert caught.value.field == "result"
    assert hive.once("k", lambda: 7) == 7


def test_once_renews_a_short_lease(hive: hivemem.SyncHive) -> None:
    # A 1 s lease renewed every third of it: a renewal may stall 0.6 s on a busy machine
    # (with 0.3 s, a stall of 0.2 s beside the suite's other workers lost the lease).
    def slow() -> str:
        time.sleep(2.5)
        return "ok"

    racer: list[Any] = []
    t = threading.Thread(target=lambda: racer.append(hive.once("k", lambda: "racer", lease=1.0)))

    def run_then_race() -> str:
        t.start()  # while fn runs past its 1 s lease, another caller must not run
        return slow()

    assert hive.once("k", run_then_race, lease=1.0) == "ok"
    t.join(5)
    assert racer == ["ok"]


def test_once_keys_are_per_agent_unless_shared(hive: hivemem.SyncHive) -> None:
    other = hive.as_agent("b")
    assert hive.once("k", lambda: "a") == "a"
    assert other.once("k", lambda: "b") == "b"
    assert hive.once("k2", lambda: "a", shared=True) == "a"
    assert other.once("k2", lambda: "b", shared=True) == "a"


def test_idempotent_decorator(hive: hivemem.SyncHive) -> None:
    sent: list[str] = []

    @hive.idempotent(key=lambda session, to: f"{session}:email:{to}")
    def send(session: str, to: str) -> str:
        sent.append(to)
        return f"sent to {to}"

    assert send.__name__ == "send"
    assert send("s1", "x@example.com") == "sent to x@example.com"
    assert send("s1", "x@example.com") == "sent to x@example.com"
    assert send("s2", "x@example.com") == "sent to x@example.com"
    assert sent == ["x@example.com", "x@example.com"]


def test_begin_renew_end_once(hive: hivemem.SyncHive) -> None:
    ticket = hive.begin_once("k")
    assert ticket.status == "run" and ticket.token is not None
    hive.renew_once("k", ticket.token)
    assert hive.begin_once("k").status == "running"
    hive.end_once("k", ticket.token, result=[1, 2])
    done = hive.begin_once("k")
    assert done.status == "done" and done.result == [1, 2]
    with pytest.raises(Conflict):
        hive.renew_once("k", ticket.token)


# Signals and waits ---------------------------------------------------------------------


def test_wait_signal(hive: hivemem.SyncHive) -> None:
    other = hive.as_agent("b")
    assert hive.get_signal("phase") is None
    later(0.2, other.set_signal, "phase", "warming")
    later(0.4, other.set_signal, "phase", "go")
    began = time.monotonic()
    signal = hive.wait_signal("phase", lambda v: v == "go", timeout=5)
    assert signal.value == "go" and signal.set_by == "b" and signal.version == 2
    assert time.monotonic() - began >= 0.3
    with pytest.raises(TimeoutError):
        hive.wait_signal("phase", lambda v: v == "never", timeout=0.3)
    seen = hive.get_signal("phase")
    assert seen is not None
    later(0.1, other.set_signal, "phase", "done")
    changed = hive.get_signal("phase", changed_from=seen.version, wait=5)
    assert changed is not None and changed.value == "done"


def test_wait_for(hive: hivemem.SyncHive) -> None:
    other = hive.as_agent("b")
    other.put("jobs", "j1", {"state": "queued"})

    def finish() -> None:
        other.put("jobs", "j1", {"state": "running"})
        other.put("jobs", "j1", {"state": "done"})

    later(0.2, finish)

    def is_done(item: Item) -> bool:
        return bool(item.value["state"] == "done")

    item = hive.wait_for("jobs", "j1", is_done, timeout=5)
    assert item.value == {"state": "done"} and item.version == 3
    assert hive.wait_for("jobs", "j1", timeout=1).version == 3  # already there
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        hive.wait_for("jobs", "j2", timeout=0.3)
    assert 0.25 <= time.monotonic() - began < 3


# Agent registry ----------------------------------------------------------------------


def test_register_and_find_with_heartbeats(hive: hivemem.SyncHive) -> None:
    record = hive.register("a", capabilities=["summarise", "search"], ttl=1.0)
    assert record.healthy and record.capabilities == ["search", "summarise"]
    hive.register("quiet", capabilities=["summarise"], ttl=1.0, heartbeat=False)
    assert [r.name for r in hive.agents(capability="summarise")] == ["a", "quiet"]
    assert hive.agents(capability="translate") == []

    time.sleep(1.6)  # past the ttl: only "a" sent heartbeats (from the background loop)
    assert [r.name for r in hive.agents(capability="summarise")] == ["a"]
    assert [r.name for r in hive.agents(capability="summarise", healthy=False)] == ["quiet"]
    assert hive.heartbeat_agent("quiet").healthy

    assert hive.unregister("a")
    assert not hive.unregister("a")
    assert [r.name for r in hive.agents(healthy=None)] == ["quiet"]


def test_close_ends_an_open_lease_block(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/h.db"
    hive = hivemem.connect_sync(url, agent="a")
    entered = threading.Event()
    outcome: list[str] = []

    def hold() -> None:
        with hive.lease("locks/x", 5):
            entered.set()
            time.sleep(0.5)
        outcome.append("left")

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(5)
    closer = threading.Thread(target=hive.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()  # close does not wait for the block
    holder.join(5)
    assert outcome == ["left"]
    with hivemem.connect_sync(url, agent="b") as other:
        assert other.acquire("locks/x", 1).holder == "b"  # close released it
