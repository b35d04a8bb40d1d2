"""HivememTaskStore (A2A VersionedTaskStore): compare-and-set saves as the SDK's contract
states them, on every store kind; two replicas racing on one task keep one write; listing
matches the SDK's own in-memory store; an owner sees only its tasks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from a2a.auth.user import User
from a2a.server.cluster.task_store import ConcurrentTaskModificationError
from a2a.server.cluster.version import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.server.tasks.inmemory_task_store import InMemoryTaskStore
from a2a.types import a2a_pb2 as pb
from a2a.types.a2a_pb2 import ListTasksRequest, Task, TaskState, TaskStatusUpdateEvent

import hivemem
from hivemem.integrations.a2a import HivememTaskStore
from tests.conftest import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[1]
#: The greeter replica of the A2A example (``a2a_pods.py URL PORT NAME`` serves one).
REPLICA = REPO / "examples" / "integrations" / "a2a_pods.py"


class Named(User):
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


ANN = ServerCallContext(user=Named("ann"))
BOB = ServerCallContext(user=Named("bob"))


def task(task_id: str, state: int, context_id: str = "c1") -> Task:
    t = Task(id=task_id, context_id=context_id)
    t.status.state = state
    return t


async def test_saves_are_compare_and_set_on_the_version(hive: hivemem.Hive, ns: str) -> None:
    store = HivememTaskStore(hive, prefix=ns)
    v1 = await store.save(
        task("t1", TaskState.TASK_STATE_SUBMITTED),
        event=None,
        prev=None,
        prev_version=TaskVersion.MISSING,
        context=ANN,
    )
    with pytest.raises(ConcurrentTaskModificationError):  # created already
        await store.save(
            task("t1", TaskState.TASK_STATE_WORKING),
            event=None,
            prev=None,
            prev_version=TaskVersion.MISSING,
            context=ANN,
        )
    event = TaskStatusUpdateEvent(task_id="t1", context_id="c1")
    event.status.state = TaskState.TASK_STATE_WORKING
    v2 = await store.save(
        task("t1", TaskState.TASK_STATE_WORKING),
        event=event,
        prev=None,
        prev_version=v1,
        context=ANN,
    )
    assert v2.is_after(v1)
    with pytest.raises(ConcurrentTaskModificationError):  # a stale version
        await store.save(
            task("t1", TaskState.TASK_STATE_COMPLETED),
            event=None,
            prev=None,
            prev_version=v1,
            context=ANN,
        )
    stored = await store.get("t1", ANN)
    assert stored is not None and stored.version == v2
    assert stored.task.status.state == TaskState.TASK_STATE_WORKING
    events = await hive.list(f"{ns}/ann/events/t1", key_prefix="")
    assert [i.key for i in events.items] == ["000000000002"]


async def test_cancel_overwrites_a_live_task_and_is_refused_for_a_finished_one(
    hive: hivemem.Hive, ns: str
) -> None:
    store = HivememTaskStore(hive, prefix=ns)
    v1 = await store.save(
        task("t1", TaskState.TASK_STATE_WORKING),
        event=None,
        prev=None,
        prev_version=TaskVersion.MISSING,
        context=ANN,
    )
    await store.save(  # another writer moved it on meanwhile
        task("t1", TaskState.TASK_STATE_INPUT_REQUIRED),
        event=None,
        prev=None,
        prev_version=v1,
        context=ANN,
    )
    canceled = await store.save(  # cancel ignores the stale version
        task("t1", TaskState.TASK_STATE_CANCELED),
        event=None,
        prev=None,
        prev_version=v1,
        context=ANN,
    )
    assert canceled == TaskVersion(3)
    for task_id in ("t1", "absent"):  # terminal, or not there
        with pytest.raises(ConcurrentTaskModificationError):
            await store.save(
                task(task_id, TaskState.TASK_STATE_CANCELED),
                event=None,
                prev=None,
                prev_version=canceled,
                context=ANN,
            )


async def test_two_replicas_racing_on_one_task_keep_one_write(hive_url: str, ns: str) -> None:
    settings = None if hive_url.startswith("http") else hivemem.Settings(embedder="none")
    # Two connections are two replicas; an in-memory SQLite store exists once per
    # connection, so there the two stores share one.
    second = hive_url if ":memory:" not in hive_url else None
    async with (
        hivemem.connect(hive_url, agent="replica-a", settings=settings) as a,
        hivemem.connect(second or "sqlite://:memory:", agent="replica-b", settings=settings) as b,
    ):
        b = b if second else a
        stores = [HivememTaskStore(a, prefix=ns), HivememTaskStore(b, prefix=ns)]
        v1 = await stores[0].save(
            task("t1", TaskState.TASK_STATE_SUBMITTED),
            event=None,
            prev=None,
            prev_version=TaskVersion.MISSING,
            context=ANN,
        )
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].save(
                    task("t1", TaskState.TASK_STATE_WORKING, context_id=f"c{i}"),
                    event=None,
                    prev=None,
                    prev_version=v1,
                    context=ANN,
                )
                for i in range(6)
            ),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, TaskVersion)]
        assert len(won) == 1 and won[0] == TaskVersion(2)
        assert all(
            isinstance(o, ConcurrentTaskModificationError)
            for o in outcomes
            if not isinstance(o, TaskVersion)
        )
        stored = await stores[1].get("t1", ANN)
        assert stored is not None and stored.version == TaskVersion(2)


async def test_listing_matches_the_sdks_store_and_owners_are_apart(
    hive: hivemem.Hive, ns: str
) -> None:
    ours, theirs = HivememTaskStore(hive, prefix=ns), InMemoryTaskStore()
    states = [TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED]
    for i in range(7):
        t = task(f"t{i}", states[i % 2], context_id=f"c{i % 3}")
        t.status.timestamp.FromSeconds(1_700_000_000 + i)
        await ours.save(t, event=None, prev=None, prev_version=TaskVersion.MISSING, context=ANN)
        await theirs.save(t, ANN)
    for params in (
        ListTasksRequest(),
        ListTasksRequest(context_id="c1"),
        ListTasksRequest(status=TaskState.TASK_STATE_COMPLETED),
        ListTasksRequest(page_size=3),
    ):
        a, b = await ours.list(params, ANN), await theirs.list(params, ANN)
        assert [t.id for t in a.tasks] == [t.id for t in b.tasks], params
        assert a.next_page_token == b.next_page_token
    assert (await ours.list(ListTasksRequest(), BOB)).tasks == []
    assert await ours.get("t1", BOB) is None
    await ours.delete("t1", ANN)
    assert await ours.get("t1", ANN) is None


@pytest.mark.slow
@pytest.mark.matrix  # two server processes: .ci/run's matrix pass
async def test_two_server_replicas_serve_one_task_found_through_the_registry(
    tmp_path: Path,
) -> None:
    """A client finds the greeter in the registry, starts a task on one replica and
    finishes it on the other: the task keeps both turns, whichever replica is asked."""
    from a2a.client.client_factory import create_client
    from a2a.helpers.proto_helpers import get_message_text

    svc = ServiceProcess(tmp_path / "hive.db", env={"HIVEMEM_EMBEDDER": "none"})
    svc.start()
    ports = [free_port(), free_port()]
    replicas = [
        subprocess.Popen(  # noqa: ASYNC220  (started once, not awaited on)
            [sys.executable, str(REPLICA), svc.url, str(port), f"greeter-{i}"],
            cwd=REPO,
        )
        for i, port in enumerate(ports)
    ]
    try:
        async with hivemem.connect(svc.url, agent="client") as hive:
            for _ in range(200):
                found = await hive.agents(capability="greet")
                if len(found) == 2:
                    break
                await asyncio.sleep(0.1)
            assert sorted(a.name for a in found) == ["greeter-0", "greeter-1"]
            assert all(
                a.metadata["a2a_card"].endswith("/.well-known/agent-card.json") for a in found
            )
            first, second = [await create_client(a.endpoint) for a in found]

            async def send(client: Any, text: str, task_id: str = "", context_id: str = "") -> Any:
                msg = pb.Message(
                    role=pb.Role.ROLE_USER,
                    message_id=uuid.uuid4().hex,
                    task_id=task_id,
                    context_id=context_id,
                    parts=[pb.Part(text=text)],
                )
                last = None
                async for response in client.send_message(pb.SendMessageRequest(message=msg)):
                    last = response
                return last.task

            started = await send(first, "hi")
            assert started.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            assert get_message_text(started.status.message) == "greeter-0: your name?"
            done = await send(second, "Ada", started.id, started.context_id)
            assert done.id == started.id
            assert done.status.state == TaskState.TASK_STATE_COMPLETED
            assert get_message_text(done.status.message) == "greeter-1: hello Ada"
            again = await first.get_task(pb.GetTaskRequest(id=started.id))
            texts = [get_message_text(m) for m in again.history]
            assert "hi" in texts and "Ada" in texts  # neither replica's turn was lost
            assert again.status.state == TaskState.TASK_STATE_COMPLETED
    finally:
        for proc in replicas:
            proc.terminate()
            proc.wait(timeout=10)
        svc.terminate()
