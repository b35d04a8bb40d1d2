"""The task queue, the same on every store kind, embedded and over HTTP."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import hivemem
from hivemem import Conflict, InvalidInput, NotFound, TooLarge


async def feed(hive: hivemem.Hive, prefix: str) -> list[tuple[str, str | None, int | None]]:
    page = await hive.read_events(prefix, after="0", limit=1000)
    return [(e.type, e.key, e.version) for e in page.items]


async def test_submit_claim_complete_and_the_submitter_gets_the_result(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/jobs"
    task = await hive.submit(queue, {"url": "https://example.org"}, priority=2)
    assert (task.state, task.attempt, task.submitted_by, task.priority) == ("ready", 0, "tester", 2)
    assert task.payload == {"url": "https://example.org"}
    waiter = asyncio.create_task(hive.result(task.id, wait=10))
    worker = hive.as_agent("worker-1")
    claimed = await worker.claim(queue, lease=5)
    assert claimed is not None and claimed.id == task.id
    assert (claimed.state, claimed.attempt, claimed.claimed_by) == ("running", 1, "worker-1")
    assert claimed.lease_expires_at is not None
    beat = await worker.heartbeat(claimed, lease=20)
    assert beat.lease_expires_at is not None and beat.lease_expires_at > claimed.lease_expires_at
    done = await worker.complete(claimed, {"words": 42})
    assert (done.state, done.result, done.done) == ("completed", {"words": 42}, True)
    finished = await asyncio.wait_for(waiter, 10)
    assert (finished.state, finished.result) == ("completed", {"words": 42})
    assert await feed(hive, f"_tasks/{queue}") == [
        ("task.submitted", task.id, 0),
        ("task.claimed", task.id, 1),
        ("task.completed", task.id, 1),
    ]
    stats = await hive.queue_stats(queue)
    assert (stats.completed, stats.ready, stats.running) == (1, 0, 0)


async def test_a_waiting_claim_is_woken_by_a_submit(hive: hivemem.Hive, ns: str) -> None:
    queue = f"{ns}/wake"
    claimer = asyncio.create_task(hive.as_agent("w").claim(queue, wait=10))
    await asyncio.sleep(0.3)
    assert not claimer.done()
    task = await hive.submit(queue, "hello")
    got = await asyncio.wait_for(claimer, 5)
    assert got is not None and got.id == task.id
    assert await hive.claim(queue) is None  # nothing else due; no wait


async def test_failures_retry_then_dead_letter_with_each_error_then_requeue(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/flaky"
    task = await hive.submit(queue, 1, max_attempts=3, backoff=0)
    for n in (1, 2, 3):
        claimed = await hive.claim(queue)
        assert claimed is not None and claimed.attempt == n
        after = await hive.fail(claimed, f"boom {n}")
    assert after.state == "dead"
    assert [(e.attempt, e.error, e.worker) for e in after.errors] == [
        (1, "boom 1", "tester"),
        (2, "boom 2", "tester"),
        (3, "boom 3", "tester"),
    ]
    assert await hive.claim(queue) is None
    dead = await hive.list_tasks(queue, state="dead")
    assert [t.id for t in dead.items] == [task.id]
    back = await hive.requeue(task.id)
    assert (back.state, back.attempt, len(back.errors)) == ("ready", 0, 3)
    again = await hive.claim(queue)
    assert again is not None and again.attempt == 1


async def test_a_failure_with_backoff_is_delayed_and_a_non_retryable_one_is_dead(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/backoff"
    a = await hive.submit(queue, "a", backoff=60)
    claimed = await hive.claim(queue)
    assert claimed is not None
    failed = await hive.fail(claimed, "try later")
    assert failed.state == "delayed"
    assert (failed.run_at - failed.updated_at).total_seconds() == pytest.approx(60, abs=1)
    assert await hive.claim(queue) is None
    b = await hive.submit(queue, "b")
    claimed = await hive.claim(queue)
    assert claimed is not None and claimed.id == b.id
    dead = await hive.fail(claimed, "bad payload", retryable=False)
    assert (dead.state, dead.attempt) == ("dead", 1)
    stats = await hive.queue_stats(queue)
    assert (stats.delayed, stats.dead, stats.ready) == (1, 1, 0)
    assert (await hive.get_task(a.id)).state == "delayed"  # type: ignore[union-attr]


#: How far a stored claim time may lie outside the test's own readings of the clock (the
#: service runs in another process; times travel as µs).
CLOCK_SLACK = timedelta(milliseconds=50)


async def test_a_task_keeps_when_its_attempt_was_claimed_until_it_is_requeued(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/claimed-at"
    task = await hive.submit(queue, None, max_attempts=2, backoff=0)
    assert task.claimed_at is None
    before = datetime.now(UTC)
    first = await hive.claim(queue)
    after = datetime.now(UTC)
    assert first is not None and first.claimed_at is not None
    assert before - CLOCK_SLACK <= first.claimed_at <= after + CLOCK_SLACK
    assert first.claimed_at == first.updated_at  # the claim's own now
    stored = await hive.get_task(task.id)
    assert stored is not None and stored.claimed_at == first.claimed_at
    beat = await hive.heartbeat(first, lease=20)
    assert beat.claimed_at == first.claimed_at
    # A failed attempt that will be retried is ready again, and still says when it began.
    retried = await hive.fail(first, "once more")
    assert (retried.state, retried.claimed_at) == ("ready", first.claimed_at)
    await asyncio.sleep(0.01)
    second = await hive.claim(queue)
    assert second is not None and second.attempt == 2
    assert second.claimed_at is not None and second.claimed_at > first.claimed_at
    dead = await hive.fail(second, "no more")
    assert (dead.state, dead.claimed_at) == ("dead", second.claimed_at)
    back = await hive.requeue(task.id)
    assert (back.state, back.claimed_at) == ("ready", None)
    stored = await hive.get_task(task.id)
    assert stored is not None and stored.claimed_at is None
    third = await hive.claim(queue)
    assert third is not None and third.claimed_at is not None
    released = await hive.release_task(third)  # the last claim's time stays
    assert (released.state, released.claimed_at) == ("ready", third.claimed_at)
    fourth = await hive.claim(queue)
    assert fourth is not None and fourth.claimed_at is not None
    done = await hive.complete(fourth, "ok")
    assert (done.state, done.claimed_at) == ("completed", fourth.claimed_at)
    listed = (await hive.list_tasks(queue)).items
    assert [(t.id, t.claimed_at) for t in listed] == [(task.id, fourth.claimed_at)]


async def test_an_expired_lease_keeps_the_claim_time_of_its_attempt(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/claimed-expired"
    task = await hive.submit(queue, None, max_attempts=1)
    held = await hive.claim(queue, lease=0.2)
    assert held is not None and held.claimed_at is not None
    await asyncio.sleep(0.4)
    assert await hive.claim(queue) is None  # settles the lease: the task is dead
    dead = await hive.get_task(task.id)
    assert dead is not None and dead.state == "dead"
    assert [e.error for e in dead.errors] == ["lease expired"]
    assert dead.claimed_at == held.claimed_at


async def test_idempotency_key_submits_once(hive: hivemem.Hive, ns: str) -> None:
    queue = f"{ns}/idem"
    first = await hive.submit(queue, {"n": 1}, idempotency_key="order-17")
    again = await hive.submit(queue, {"n": 2}, idempotency_key="order-17")
    assert again.id == first.id and again.payload == {"n": 1}
    assert len((await hive.list_tasks(queue)).items) == 1


async def test_priority_then_submission_order_and_delay(hive: hivemem.Hive, ns: str) -> None:
    queue = f"{ns}/order"
    low = await hive.submit(queue, "low", priority=-1)
    first = await hive.submit(queue, "first")
    second = await hive.submit(queue, "second")
    urgent = await hive.submit(queue, "urgent", priority=5)
    later = await hive.submit(queue, "later", priority=9, delay=60)
    assert later.state == "delayed"
    got = []
    while (t := await hive.claim(queue)) is not None:
        got.append(t.id)
    assert got == [urgent.id, first.id, second.id, low.id]
    page1 = await hive.list_tasks(queue, limit=3)
    page2 = await hive.list_tasks(queue, limit=3, cursor=page1.next_cursor)
    assert [t.id for t in page1.items + page2.items] == [
        low.id,
        first.id,
        second.id,
        urgent.id,
        later.id,
    ]


async def test_cancel_stops_a_running_task_and_its_worker_learns_it(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/cancel"
    task = await hive.submit(queue, None)
    claimed = await hive.claim(queue)
    assert claimed is not None
    cancelled = await hive.cancel(task.id)
    assert cancelled.state == "cancelled"
    with pytest.raises(Conflict) as err:
        await hive.heartbeat(claimed)
    assert err.value.field == "attempt"
    with pytest.raises(Conflict) as err:
        await hive.cancel(task.id)
    assert err.value.field == "task_id"
    assert (await hive.result(task.id)).state == "cancelled"


async def test_an_expired_lease_returns_the_task_and_the_late_worker_is_refused(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/lease"
    task = await hive.submit(queue, None)
    slow = hive.as_agent("slow")
    held = await slow.claim(queue, lease=0.3)
    assert held is not None
    await asyncio.sleep(0.5)
    fast = hive.as_agent("fast")
    # A short wait: on a slow store (moto in a busy matrix run) the claim's look may come
    # a little before the expiry it is meant to find.
    again = await fast.claim(queue, wait=5)
    assert again is not None and again.id == task.id and again.attempt == 2
    assert [e.error for e in again.errors] == ["lease expired"]
    with pytest.raises(Conflict) as err:
        await slow.complete(held, "late")
    assert err.value.field == "attempt"
    done = await fast.complete(again, "on time")
    assert done.result == "on time"


async def test_workers_cannot_finish_tasks_they_do_not_hold(hive: hivemem.Hive, ns: str) -> None:
    queue = f"{ns}/owner"
    await hive.submit(queue, None)
    claimed = await hive.as_agent("owner").claim(queue)
    assert claimed is not None
    with pytest.raises(Conflict) as err:
        await hive.as_agent("intruder").complete(claimed, "mine")
    assert err.value.field == "attempt"
    got = await hive.get_task(claimed.id)
    assert got is not None and got.state == "running" and got.result is None


async def test_bad_task_input_names_the_field_and_changes_nothing(
    hive: hivemem.Hive, ns: str
) -> None:
    queue = f"{ns}/bad"
    cases = [
        (dict(timeout=-1), "timeout"),
        (dict(backoff=-0.5), "backoff"),
        (dict(delay=-1), "delay"),
        (dict(max_attempts=0), "max_attempts"),
        (dict(priority=1001), "priority"),
        (dict(idempotency_key=""), "idempotency_key"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidInput) as err:
            await hive.submit(queue, None, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field, kwargs
    with pytest.raises(TooLarge) as big:
        await hive.submit(queue, "x" * (hive_payload_limit() + 10))
    assert big.value.field == "payload"
    with pytest.raises(InvalidInput) as bad_queue:
        await hive.submit("_tasks", None)
    assert bad_queue.value.field == "queue"
    with pytest.raises(InvalidInput) as lease:
        await hive.claim(queue, lease=-5)
    assert lease.value.field == "lease"
    with pytest.raises(InvalidInput) as wait:
        await hive.claim(queue, wait=-1)
    assert wait.value.field == "wait"
    with pytest.raises(NotFound) as missing:
        await hive.result("0123456789abcdef")
    assert missing.value.field == "task_id"
    with pytest.raises(InvalidInput) as malformed:
        await hive.cancel("../etc")
    assert malformed.value.field == "task_id"
    assert (await hive.list_tasks(queue)).items == []
    stats = await hive.queue_stats(queue)
    assert stats.ready == stats.dead == stats.running == 0


def hive_payload_limit() -> int:
    return hivemem.Settings().max_payload_bytes


async def test_queues_lists_each_queue_holding_a_task_with_its_counts(
    hive: hivemem.Hive, ns: str
) -> None:
    await hive.submit(f"{ns}/b", 1)
    await hive.submit(f"{ns}/b", 2)
    await hive.submit(f"{ns}/a/deep", 3, delay=60)
    claimed = await hive.claim(f"{ns}/b")
    assert claimed is not None
    mine = [q for q in await hive.queues() if q.queue.startswith(f"{ns}/")]
    assert [(q.queue, q.ready, q.delayed, q.running) for q in mine] == [
        (f"{ns}/a/deep", 0, 1, 0),
        (f"{ns}/b", 1, 0, 1),
    ]
    again = await hive.queue_stats(f"{ns}/b")  # the same figures (the age moves on)
    assert mine[1].model_dump(exclude={"oldest_ready_seconds"}) == again.model_dump(
        exclude={"oldest_ready_seconds"}
    )
    assert mine[1].oldest_ready_seconds is not None
    await hive.complete(claimed, "done")  # a finished task still holds its queue
    assert f"{ns}/b" in {q.queue for q in await hive.queues()}
