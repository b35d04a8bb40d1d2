"""Feed bridges (``hivemem bridge ...``): delivery at least once, exactly once by event id.

Every receiver is real and on loopback: an aiohttp server of this test (the webhook),
moto's server (SNS, with an SQS queue subscribed to the topic to read what was
published) and a standalone redis-server (pub/sub). The hive is a SQLite file of the
test, written by the test and followed by the bridge: a ``hivemem bridge`` subprocess
where a crash (``kill -9``) or a signal is the point, a :class:`Bridge` in this process
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from typer.testing import CliRunner

import hivemem
from hivemem.bridges import Bridge, CursorTaken, Message, Retry, Sink, event_id
from hivemem.bridges import base as bridge_base
from hivemem.bridges.redis_pubsub import RedisPubSubSink
from hivemem.bridges.webhook import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSink,
    sign,
    verify_signature,
)
from hivemem.cli import app
from hivemem.config import Settings
from hivemem.hive import Hive
from hivemem.models import PutOp

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests"
#: What bridge subprocesses add to the environment: no embedder, no config file.
ENV = {"HIVEMEM_EMBEDDER": "none", "HIVEMEM_CONFIG": ""}
#: Fast retries for the tests (seconds).
FAST = Retry(max_attempts=3, backoff_seconds=0.01, max_backoff_seconds=0.05)


# Helpers ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hive.db'}"


@contextlib.asynccontextmanager
async def opened(url: str, agent: str = "writer") -> AsyncIterator[Hive]:
    async with hivemem.connect(url, agent=agent, settings=Settings(embedder="none")) as hive:
        yield hive


async def write(hive: Hive, ns: str, start: int, count: int, batch: int = 100) -> None:
    """Write items ``k<start>`` .. ``k<start+count-1>`` under ``ns``, ``batch`` per call."""
    for first in range(start, start + count, batch):
        last = min(first + batch, start + count)
        await hive.batch(
            [PutOp(namespace=ns, key=f"k{i}", value={"n": i}) for i in range(first, last)]
        )


async def event_ids(hive: Hive, prefix: str) -> dict[str, str]:
    """Every event id under ``prefix`` in the feed, with its key."""
    ids: dict[str, str] = {}
    cursor = "0"
    while True:
        page = await hive.read_events(prefix, after=cursor, limit=1000)
        for ev in page.items:
            ids[event_id(ev)] = ev.key or ""
        if not page.items:
            return ids
        cursor = page.next_cursor or cursor


async def last_cursor(hive: Hive, prefix: str) -> str:
    """The cursor of the newest event under ``prefix`` (the head may be a bridge's own
    record, which no watcher sees)."""
    return list(await event_ids(hive, prefix))[-1].rsplit("-", 1)[0]


async def until(
    condition: Callable[[], bool],
    seconds: float,
    what: str,
    proc: asyncio.subprocess.Process | None = None,
    log: Path | None = None,
) -> None:
    """Wait until ``condition()``; fail after ``seconds``, or at once if ``proc`` exits
    (with the end of its ``log``)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.returncode is not None:
            output = tail(log) if log is not None else ""
            raise AssertionError(f"the bridge exited ({proc.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


class Receiver:
    """A webhook receiver on a free loopback port: records each request (its event id,
    body and whether its signature verifies) and answers what ``answer(body)`` says
    (200 by default; an awaitable is awaited first, e.g. to stall)."""

    def __init__(self, answer: Callable[[dict[str, Any]], Awaitable[int] | int] | None = None):
        self.answer = answer
        self.requests: list[tuple[str, dict[str, Any], bool]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    @property
    def ids(self) -> list[str]:
        return [i for i, _, _ in self.requests]

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        genuine = verify_signature(raw, request.headers, SECRET)
        self.requests.append((request.headers[EVENT_ID_HEADER], body, genuine))
        status = 200
        if self.answer is not None:
            got = self.answer(body)
            status = await got if not isinstance(got, int) else got
        return web.Response(status=status, text="refused" if status >= 300 else "")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class Collected(Sink):
    """A sink in memory: keeps every message it is sent."""

    kind = "memory"

    def __init__(self) -> None:
        self.messages: list[Message] = []

    @property
    def target(self) -> str:
        return "memory"

    async def send(self, message: Message) -> None:
        self.messages.append(message)


async def spawn(args: list[str], log: Path) -> asyncio.subprocess.Process:
    """``python -m hivemem bridge <args>`` with stdout and stderr appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hivemem",
            "bridge",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env={**os.environ, **ENV},  # read now: the moto fixture sets AWS credentials
            start_new_session=True,
        )
    finally:
        os.close(fd)


def tail(log: Path) -> str:
    """The end of a bridge's log, for a failure's message."""
    return log.read_text()[-4000:] if log.exists() else "<no log>"


async def finish(proc: asyncio.subprocess.Process, sig: int, log: Path) -> int:
    """Send ``sig``, wait for the exit (20 s at most), return its code."""
    if proc.returncode is None:
        os.killpg(proc.pid, sig)
    try:
        return await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"the bridge did not stop:\n{tail(log)}") from None


@contextlib.asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``bridge`` in a task for the block; stop it and wait for it at the end."""
    task = asyncio.create_task(bridge.run())
    try:
        yield task
    finally:
        bridge.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


def dead_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# Crash and restart (kill -9), each sink --------------------------------------------------


@pytest.mark.slow
async def test_webhook_bridge_killed_with_sigkill_and_restarted_delivers_2000_events_once_by_id(
    store: str, tmp_path: Path
) -> None:
    log, dead = tmp_path / "bridge.log", tmp_path / "dead.jsonl"
    args = [
        "webhook",
        "",  # the receiver's URL, below
        "--secret",
        SECRET,
        "--url",
        store,
        "--name",
        "hook",
        "--prefix",
        "feed",
        "--from-start",
        "--save-every",
        "50",
        "--dead-letter",
        str(dead),
    ]
    async with Receiver() as rx, opened(store) as hive:
        args[1] = rx.url
        await write(hive, "feed", 0, 1000)
        await write(hive, "other", 0, 10)  # outside the prefix: never sent
        first = await spawn(args, log)
        more = asyncio.create_task(write(hive, "feed", 1000, 1000, batch=50))
        await until(lambda: len(rx.requests) >= 600, 60, "600 deliveries", first, log)
        assert await finish(first, signal.SIGKILL, log) == -signal.SIGKILL
        second = await spawn(args, log)
        await more
        await until(lambda: len(set(rx.ids)) >= 2000, 60, "2000 events", second, log)
        assert await finish(second, signal.SIGTERM, log) == 0, tail(log)
        expected = await event_ids(hive, "feed")
    assert len(expected) == 2000
    assert set(rx.ids) == set(expected)  # every event at least once, nothing else
    assert all(body["id"] == i and genuine for i, body, genuine in rx.requests)
    assert sorted(expected[i] for i in set(rx.ids)) == sorted(f"k{n}" for n in range(2000))
    # Redelivered after the kill: at most what waited to be recorded (--save-every 50)
    # plus the delivery in flight.
    assert len(rx.requests) - 2000 <= 50 + 1
    assert dead_lines(dead) == []
    assert "took the cursor over from" in log.read_text()


async def _sns_setup(endpoint: str) -> tuple[Any, Any, str, str]:
    session = importlib.import_module("aiobotocore.session").get_session()
    sns = await session.create_client(
        "sns", region_name="us-east-1", endpoint_url=endpoint
    ).__aenter__()
    sqs = await session.create_client(
        "sqs", region_name="us-east-1", endpoint_url=endpoint
    ).__aenter__()
    name = f"hive-{uuid.uuid4().hex[:8]}"
    topic = (await sns.create_topic(Name=name))["TopicArn"]
    queue_url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    attrs = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    await sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=attrs["Attributes"]["QueueArn"],
        Attributes={"RawMessageDelivery": "true"},
    )
    return sns, sqs, topic, queue_url


async def _drain(sqs: Any, queue_url: str, into: list[tuple[str, dict[str, Any]]]) -> None:
    """Move what the queue holds into ``into`` as (event_id attribute, body), forever."""
    while True:
        got = await sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,  # moto serves one request at a time: never hold it
            MessageAttributeNames=["All"],
        )
        messages = got.get("Messages", [])
        for m in messages:
            into.append((m["MessageAttributes"]["event_id"]["StringValue"], json.loads(m["Body"])))
        if messages:
            await sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ],
            )
        else:
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.matrix  # the webhook bridge's kill test runs by default; this one in .ci/run
async def test_sns_bridge_killed_with_sigkill_and_restarted_publishes_every_event_once_by_id(
    store: str, tmp_path: Path, moto_endpoint: str
) -> None:
    log, dead = tmp_path / "bridge.log", tmp_path / "dead.jsonl"
    sns, sqs, topic, queue_url = await _sns_setup(moto_endpoint)
    received: list[tuple[str, dict[str, Any]]] = []
    drain = asyncio.create_task(_drain(sqs, queue_url, received))
    args = [
        "sns",
        "--topic",
        topic,
        "--endpoint-url",
        moto_endpoint,
        "--region",
        "us-east-1",
        "--url",
        store,
        "--name",
        "to-sns",
        "--prefix",
        "feed",
        "--from-start",
        "--save-every",
        "20",
        "--dead-letter",
        str(dead),
    ]
    try:
        async with opened(store) as hive:
            await write(hive, "feed", 0, 200, batch=50)
            first = await spawn(args, log)
            await until(lambda: len(received) >= 60, 60, "60 messages", first, log)
            assert await finish(first, signal.SIGKILL, log) == -signal.SIGKILL
            second = await spawn(args, log)
            await until(lambda: len({i for i, _ in received}) >= 200, 60, "200 events", second, log)
            assert await finish(second, signal.SIGTERM, log) == 0, tail(log)
            expected = await event_ids(hive, "feed")
    finally:
        drain.cancel()
        await sns.__aexit__(None, None, None)
        await sqs.__aexit__(None, None, None)
    assert len(expected) == 200
    assert {i for i, _ in received} == set(expected)
    assert all(body["id"] == i and body["namespace"] == "feed" for i, body in received)
    assert len(received) - 200 <= 20 + 1
    assert dead_lines(dead) == []


async def test_redis_pubsub_bridge_stopped_with_sigterm_resumes_after_what_it_delivered(
    store: str, tmp_path: Path, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    log, dead = tmp_path / "bridge.log", tmp_path / "dead.jsonl"
    channel = f"hive:{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    received: list[dict[str, Any]] = []

    async def listen() -> None:
        async for m in pubsub.listen():
            if m["type"] == "message":
                received.append(json.loads(m["data"]))

    listener = asyncio.create_task(listen())
    args = [
        "redis-pubsub",
        "--redis-url",
        redis_url,
        "--channel",
        channel,
        "--url",
        store,
        "--name",
        "live",
        "--from-start",
        "--dead-letter",
        str(dead),
    ]
    try:
        async with opened(store) as hive:
            await write(hive, "feed", 0, 300)
            first = await spawn(args, log)
            await until(lambda: len(received) >= 100, 60, "100 messages", first, log)
            assert await finish(first, signal.SIGTERM, log) == 0, tail(log)
            await write(hive, "feed", 300, 100)
            # The same consumer again, in this process this time (one process start less).
            sink = RedisPubSubSink(redis_url, channel)
            again = Bridge(hive, sink, name="live", dead_letter=dead)
            async with running(again):
                await until(lambda: len({m["id"] for m in received}) >= 400, 30, "400 events")
            expected = await event_ids(hive, "")
    finally:
        listener.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
    assert {m["id"] for m in received} == set(expected)
    # A clean stop records what was delivered: only a publish cut short by the signal
    # (at most one, --concurrency 1) can come again.
    assert len(received) - 400 <= 1
    assert "stopped: " in log.read_text() and dead_lines(dead) == []


# Failures: dead letters and retries ---------------------------------------------------------


async def test_events_refused_with_400_go_to_the_dead_letter_file_and_the_bridge_moves_on(
    store: str, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    async with (
        Receiver(lambda body: 400 if body["key"].startswith("bad") else 200) as rx,
        opened(store) as hive,
    ):
        await hive.batch(
            [PutOp(namespace="feed", key=k, value=1) for k in ("a", "bad1", "b", "bad2", "c")]
        )
        bridge = Bridge(
            hive, WebhookSink(rx.url, SECRET), name="hook", prefix="feed", from_start=True,
            dead_letter=dead, retry=FAST,
        )  # fmt: skip
        async with running(bridge):
            await until(lambda: bridge.stats.delivered + bridge.stats.dead_lettered == 5, 10, "5")
        last = await last_cursor(hive, "feed")
    assert [b["key"] for _, b, _ in rx.requests] == ["a", "bad1", "b", "bad2", "c"]  # one try each
    lines = dead_lines(dead)
    assert [line["event"]["key"] for line in lines] == ["bad1", "bad2"]
    for line in lines:
        assert line["attempts"] == 1 and line["permanent"] is True
        assert "answered 400" in line["error"] and line["id"] == line["event"]["id"]
        assert (line["bridge"], line["sink"], line["target"]) == ("hook", "webhook", rx.url)
    assert bridge.stats.cursor == last  # moved past the dead letters


async def test_a_receiver_that_keeps_failing_is_retried_max_attempts_times_then_dead_lettered(
    store: str, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    async with (
        Receiver(lambda body: 503 if body["key"] == "down" else 200) as rx,
        opened(store) as hive,
    ):
        await hive.batch([PutOp(namespace="feed", key=k, value=1) for k in ("down", "up")])
        bridge = Bridge(
            hive, WebhookSink(rx.url, SECRET), name="hook", from_start=True, dead_letter=dead,
            retry=FAST,
        )  # fmt: skip
        async with running(bridge):
            await until(lambda: bridge.stats.delivered == 1, 10, "the next event delivered")
    assert [b["key"] for _, b, _ in rx.requests] == ["down"] * 3 + ["up"]
    (line,) = dead_lines(dead)
    assert (line["attempts"], line["permanent"]) == (3, False)
    assert "answered 503" in line["error"]
    assert len({i for i in rx.ids[:3]}) == 1  # the same event id on every try


async def test_a_request_past_the_timeout_is_tried_again_and_delivered(
    store: str, tmp_path: Path
) -> None:
    stalled: list[int] = []

    async def answer(body: dict[str, Any]) -> int:
        if not stalled:
            stalled.append(1)
            await asyncio.sleep(1.0)  # past the sink's timeout: the bridge gives up on it
        return 204

    async with Receiver(answer) as rx, opened(store) as hive:
        await hive.put("feed", "slow", 1)
        sink = WebhookSink(rx.url, SECRET, timeout_seconds=0.2)
        bridge = Bridge(
            hive, sink, name="hook", from_start=True, dead_letter=tmp_path / "d", retry=FAST
        )
        async with running(bridge):
            await until(lambda: bridge.stats.delivered == 1, 10, "the retried delivery")
    assert len(rx.requests) == 2 and rx.ids[0] == rx.ids[1]
    assert bridge.stats.dead_lettered == 0


async def test_a_redis_that_cannot_be_reached_sends_events_to_the_dead_letter_file(
    store: str, tmp_path: Path
) -> None:
    from tests.conftest import free_port

    async with opened(store) as hive:
        await hive.put("feed", "x", 1)
        sink = RedisPubSubSink(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.5)
        bridge = Bridge(
            hive, sink, name="r", from_start=True, dead_letter=tmp_path / "d.jsonl", retry=FAST
        )
        async with running(bridge):
            await until(lambda: bridge.stats.dead_lettered == 1, 10, "a dead letter")
    (line,) = dead_lines(tmp_path / "d.jsonl")
    assert line["attempts"] == 3 and "ConnectionError" in line["error"]


async def test_with_concurrency_a_slow_delivery_holds_the_recorded_cursor_back(
    store: str, tmp_path: Path
) -> None:
    release = asyncio.Event()

    class Stalls(Collected):
        async def send(self, message: Message) -> None:
            if message.event.key == "k2":
                await release.wait()
            await super().send(message)

    async with opened(store) as hive:
        await write(hive, "feed", 0, 10)
        cursors = [e.rsplit("-", 1)[0] for e in await event_ids(hive, "feed")]
        sink = Stalls()
        bridge = Bridge(
            hive, sink, name="c", from_start=True, dead_letter=tmp_path / "d",
            concurrency=4, save_every=1, save_seconds=0.01,
        )  # fmt: skip
        async with running(bridge):
            await until(lambda: len(sink.messages) == 9, 10, "all but k2")
            await asyncio.sleep(0.1)  # several records were due meanwhile
            assert bridge.stats.cursor == cursors[1]  # k1: k2 is not delivered yet
            release.set()
            await until(lambda: bridge.stats.cursor == cursors[9], 10, "k9 recorded")
    assert sorted(m.event.key or "" for m in sink.messages) == sorted(f"k{n}" for n in range(10))


async def test_sns_refusals_are_permanent_and_a_fifo_topic_gets_the_event_id_to_deduplicate(
    store: str, moto_endpoint: str
) -> None:
    from hivemem.bridges import Undeliverable
    from hivemem.bridges.sns import SnsSink

    async with opened(store) as hive:
        await hive.put("team/a", "k", 1)
        (event,) = (await hive.read_events("team")).items
    message = Message.of(event)
    missing = SnsSink("arn:aws:sns:us-east-1:123456789012:nowhere", endpoint_url=moto_endpoint)
    await missing.open()
    try:
        with pytest.raises(Undeliverable, match="nowhere"):
            await missing.send(message)
    finally:
        await missing.close()
    fifo = SnsSink("arn:aws:sns:us-east-1:123456789012:hive.fifo")._request(message)
    assert (fifo["MessageGroupId"], fifo["MessageDeduplicationId"]) == ("team/a", message.id)
    assert fifo["MessageAttributes"]["event_id"]["StringValue"] == message.id
    assert json.loads(fifo["Message"]) == json.loads(message.body)


# Signatures ------------------------------------------------------------------------


def _signed(body: bytes, at: int) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(at), SIGNATURE_HEADER: sign(SECRET, at, body)}


def test_verify_signature_accepts_a_genuine_request() -> None:
    body, now = b'{"id": "7-ab", "type": "item.put"}', int(time.time())
    headers = _signed(body, now)
    assert verify_signature(body, headers, SECRET)
    assert verify_signature(body, {k.lower(): v for k, v in headers.items()}, SECRET.encode())
    expected = (
        "sha256="
        + __import__("hmac").new(SECRET.encode(), f"{now}.".encode() + body, "sha256").hexdigest()
    )
    assert headers[SIGNATURE_HEADER] == expected  # the scheme docs/bridges.md describes


def test_verify_signature_rejects_a_tampered_body_timestamp_or_secret_and_a_stale_request() -> None:
    body, now = b'{"id": "7-ab", "type": "item.put"}', int(time.time())
    headers = _signed(body, now)
    assert not verify_signature(body.replace(b"put", b"del"), headers, SECRET)
    assert not verify_signature(body, {**headers, TIMESTAMP_HEADER: str(now + 1)}, SECRET)
    assert not verify_signature(body, headers, "another-secret")
    assert not verify_signature(body, {TIMESTAMP_HEADER: str(now)}, SECRET)  # no signature
    stale = _signed(body, now - 301)
    assert not verify_signature(body, stale, SECRET)
    assert verify_signature(body, stale, SECRET, tolerance_seconds=400)


# One cursor per name ------------------------------------------------------------------


async def test_a_second_bridge_of_the_same_name_takes_over_and_the_first_stops_without_recording(
    store: str, tmp_path: Path
) -> None:
    async with opened(store) as writer, opened(store, "a") as hive_a, opened(store, "b") as hive_b:
        await write(writer, "feed", 0, 10)
        head = await writer.head()
        first, second = Collected(), Collected()
        bridge_a = Bridge(
            hive_a, first, name="same", from_start=True, dead_letter=tmp_path / "a", save_every=1
        )
        task_a = asyncio.create_task(bridge_a.run())
        await until(lambda: bridge_a.stats.cursor == head, 10, "a records its 10 events")
        bridge_b = Bridge(hive_b, second, name="same", dead_letter=tmp_path / "b", save_every=1)
        async with running(bridge_b):
            await until(lambda: bridge_b.stats.saves == 1, 10, "b's claim")
            await write(writer, "feed", 10, 5)  # a delivers k10, and its record is refused
            with pytest.raises(CursorTaken, match="took the cursor over"):
                await asyncio.wait_for(task_a, 10)
            last = await last_cursor(writer, "feed")
            await until(lambda: bridge_b.stats.cursor == last, 10, "b records k10..k14")
            assert bridge_b._store is not None
            record = await bridge_b._store.load()
    assert bridge_a.stats.cursor == head  # a recorded nothing after b's claim
    assert record is not None and record.owner == bridge_b.owner
    assert record.cursor == bridge_b.stats.cursor
    assert [m.event.key for m in second.messages] == [f"k{n}" for n in range(10, 15)]


async def test_an_idle_bridge_finds_out_it_was_taken_over(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_base, "OWNER_CHECK_SECONDS", 0.1)
    async with opened(store, "a") as hive_a, opened(store, "b") as hive_b:
        bridge_a = Bridge(hive_a, Collected(), name="idle", dead_letter=tmp_path / "a")
        task_a = asyncio.create_task(bridge_a.run())
        await until(lambda: bridge_a.stats.saves == 1, 10, "a's claim")
        async with running(Bridge(hive_b, Collected(), name="idle", dead_letter=tmp_path / "b")):
            with pytest.raises(CursorTaken):
                await asyncio.wait_for(task_a, 10)


async def test_a_first_run_starts_at_the_head_and_a_restart_resumes_after_its_cursor(
    store: str, tmp_path: Path
) -> None:
    async with opened(store) as hive:
        await write(hive, "feed", 0, 3)
        fresh = Collected()
        bridge = Bridge(hive, fresh, name="late", dead_letter=tmp_path / "d")
        async with running(bridge):
            await until(lambda: bridge.stats.saves == 1, 10, "the claim")
            await write(hive, "feed", 3, 2)
            await until(lambda: len(fresh.messages) == 2, 10, "two new events")
        await write(hive, "feed", 5, 1)  # while no bridge runs
        again = Collected()
        # --from-start applies to a first run only: the stored cursor wins.
        restarted = Bridge(hive, again, name="late", from_start=True, dead_letter=tmp_path / "d")
        async with running(restarted):
            await until(lambda: len(again.messages) == 1, 10, "the event written meanwhile")
            await asyncio.sleep(0.1)
    assert [m.event.key for m in fresh.messages] == ["k3", "k4"]  # not k0..k2
    assert [m.event.key for m in again.messages] == ["k5"]


# Over HTTP, messages, the command line ------------------------------------------------


async def test_over_http_the_cursor_is_an_item_whose_own_events_are_never_forwarded(
    service: Any, tmp_path: Path
) -> None:
    ns, name = f"bridged-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    async with opened(service.url, "bridge") as hive:
        sink = Collected()
        bridge = Bridge(hive, sink, name=name, dead_letter=tmp_path / "d", save_seconds=0.05)
        async with running(bridge):
            await until(lambda: bridge.stats.saves == 1, 10, "the claim")
            for n in range(5):
                await hive.put(ns, f"k{n}", n)
                await asyncio.sleep(0.1)  # a record between events
            await until(
                lambda: len([m for m in sink.messages if m.event.namespace == ns]) == 5, 10, "5"
            )
            await asyncio.sleep(0.2)
        record = await hive.get("hivemem-bridges", name)
    assert bridge.stats.saves >= 3
    assert not [m for m in sink.messages if m.event.namespace == "hivemem-bridges"]
    assert record is not None and record.value["cursor"] == bridge.stats.cursor
    assert record.value["owner"] == bridge.owner and record.value["delivered"] >= 5


async def test_each_message_is_the_event_as_json_with_an_id_stable_across_reads(store: str) -> None:
    async with opened(store) as hive:
        await hive.put("feed", "a", {"x": 1})
        await hive.publish("chan", {"hello": "world"})
        first = (await hive.read_events("", after="0")).items
        second = (await hive.read_events("", after="0")).items
    ids = [event_id(e) for e in first]
    assert ids == [event_id(e) for e in second] and len(set(ids)) == 2
    assert all(
        re.fullmatch(rf"{re.escape(e.cursor)}-[0-9a-f]{{16}}", i)
        for e, i in zip(first, ids, strict=True)
    )
    body = json.loads(Message.of(first[1]).body)
    assert body["id"] == ids[1] and body["type"] == "publish" and body["data"] == {"hello": "world"}
    assert set(body) == {
        "id",
        "cursor",
        "type",
        "namespace",
        "key",
        "version",
        "author",
        "at",
        "data",
    }


def test_bridge_commands_list_the_sinks_and_refuse_bad_options_with_a_red_line(store: str) -> None:
    runner = CliRunner()
    env = {"HIVEMEM_CONFIG": "", "COLUMNS": "200"}
    listed = runner.invoke(app, ["bridge", "--help"], env=env)
    assert listed.exit_code == 0
    assert all(cmd in listed.stdout for cmd in ("webhook", "sns", "redis-pubsub"))
    bad = runner.invoke(
        app,
        ["bridge", "webhook", "ftp://x", "--secret", "s", "--name", "n", "--url", store],
        env=env,
    )
    assert bad.exit_code == 2 and "http(s)" in bad.stderr and "Traceback" not in bad.stderr
    arn = runner.invoke(
        app, ["bridge", "sns", "--topic", "nope", "--name", "n", "--url", store], env=env
    )
    assert arn.exit_code == 2 and "topic ARN" in arn.stderr


async def test_the_receiver_example_in_docs_runs_as_pasted(store: str, tmp_path: Path) -> None:
    from tests.conftest import free_port

    doc = (REPO / "docs" / "bridges.md").read_text()
    code = re.search(r"<!-- bridges-test: receiver -->\n```python\n(.*?)```", doc, re.S)
    assert code, "docs/bridges.md: the receiver example is marked <!-- bridges-test: receiver -->"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code.group(1),
        env={**os.environ, **ENV, "PORT": str(port), "HIVEMEM_WEBHOOK_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with opened(store) as hive:
            await hive.put("orders", "o-1", {"total": 3})
            sink = WebhookSink(f"http://127.0.0.1:{port}/hook", SECRET)
            patient = Retry(max_attempts=50, backoff_seconds=0.1, max_backoff_seconds=0.2)
            bridge = Bridge(
                hive, sink, name="docs", from_start=True, dead_letter=tmp_path / "d", retry=patient
            )
            async with running(bridge):  # tried again until the receiver listens
                await until(lambda: bridge.stats.delivered == 1, 30, "the example's answer")
            # A redelivery (a new bridge from the start) is recognised by its id.
            again = Bridge(
                hive, sink, name="docs", from_start=True, reset=True, dead_letter=tmp_path / "d"
            )
            async with running(again):
                await until(lambda: again.stats.delivered == 1, 10, "the redelivery")
            forged = await _post(f"http://127.0.0.1:{port}/hook", b"{}", {SIGNATURE_HEADER: "x"})
    finally:
        proc.terminate()
        out, err = await proc.communicate()
    assert forged == 401
    assert out.decode().splitlines() == ["item.put orders o-1"], err.decode()


async def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        return r.status
