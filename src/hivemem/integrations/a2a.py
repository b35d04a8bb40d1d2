"""A2A on hivemem (``pip install 'hivemem[a2a]'``; a2a-sdk 1.3).

``HivememTaskStore`` implements the SDK's ``VersionedTaskStore``
(``a2a.server.cluster.task_store``), so A2A servers on several replicas share their tasks
through one hive without lost updates: a task is the item
``<prefix>/<owner>/<task id>`` (the owner from the SDK's ``OwnerResolver``, names escaped
as :mod:`hivemem.integrations.labels` says), its ``TaskVersion`` is the item's version,
and ``save`` is a compare-and-set on it:

- ``prev_version`` MISSING creates the task (only if absent);
- any other ``prev_version`` writes only if the stored version is still that one;
- a write moving the task to CANCELED replaces a stored task that is not terminal
  (completed, canceled, failed, rejected) whatever its version, and is refused when the
  task is terminal or absent;

a refused write raises ``ConcurrentTaskModificationError`` and writes nothing. With an
``event``, the event (the SDK's stream response, serialized) is stored beside the task in
the same batch, under ``<prefix>/<owner>/events/<task id>``, keyed by the new version.

``list`` reads the owner's tasks and lets the SDK's own ``InMemoryTaskStore`` filter,
order and page them, so its results (and page tokens) are the SDK's; it reads every task
of the owner.

:func:`serve_agent` builds the ASGI app of an A2A server (the SDK's
``DefaultRequestHandlerV2`` over ``HivememTaskStore``, JSON-RPC at ``/``, the card at
``/.well-known/agent-card.json``) that registers the agent in the hive's agent registry
while it runs, so several replicas serve one agent and a client finds it with
``hive.agents(capability=...)``.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from a2a.server.cluster.task_store import (
    ConcurrentTaskModificationError,
    StoredTask,
    VersionedTaskStore,
)
from a2a.server.cluster.version import TaskVersion
from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope
from a2a.server.tasks.inmemory_task_store import InMemoryTaskStore
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, Task, TaskState
from a2a.utils.proto_utils import to_stream_response
from google.protobuf.json_format import MessageToDict, ParseDict  # type: ignore[import-untyped]

from hivemem import models
from hivemem.errors import Conflict
from hivemem.integrations._common import every_item
from hivemem.integrations.labels import encode_key, encode_label

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from a2a.server.agent_execution.agent_executor import AgentExecutor
    from a2a.server.context import ServerCallContext
    from a2a.server.events.event_queue import Event
    from a2a.types.a2a_pb2 import AgentCard
    from starlette.applications import Starlette

    from hivemem.hive import Hive

#: States after which a task never changes (the SDK's own list).
TERMINAL = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)


def _int(version: TaskVersion) -> int:
    value = version._value  # the SDK's stores read it the same way
    if not isinstance(value, int):
        raise TypeError(f"HivememTaskStore needs integer versions, got {type(value).__name__}")
    return value


class HivememTaskStore(VersionedTaskStore):
    """A2A ``VersionedTaskStore`` on an async :class:`~hivemem.Hive`; see the module notes.

    Args:
        hive: the hive (embedded or a service) every replica shares.
        prefix: the hivemem namespace tasks are kept under.
        owner_resolver: who owns a call's tasks (the SDK's default: the user's name).

    Raises (besides ``ConcurrentTaskModificationError``): hivemem's
    :class:`~hivemem.errors.Unavailable`, and :class:`~hivemem.errors.TooLarge` for a
    task over the hive's ``max_value_bytes``.
    """

    def __init__(
        self,
        hive: Hive,
        *,
        prefix: str = "a2a",
        owner_resolver: OwnerResolver = resolve_user_scope,
    ) -> None:
        self._hive = hive
        self.prefix = prefix
        self.owner_resolver = owner_resolver

    def _space(self, context: ServerCallContext) -> str:
        owner = self.owner_resolver(context) or "+"
        return f"{self.prefix}/{encode_label(owner) if owner != '+' else owner}"

    async def save(
        self,
        task: Task,
        *,
        event: Event | None,
        prev: Task | None,
        prev_version: TaskVersion,
        context: ServerCallContext,
    ) -> TaskVersion:
        """Store ``task`` by compare-and-set (see the module notes); returns its version."""
        del prev
        space, key = self._space(context), encode_key(task.id)
        if task.status.state == TaskState.TASK_STATE_CANCELED:
            stored = await self._hive.get(space, key)
            if stored is None or _task(stored.value).status.state in TERMINAL:
                raise ConcurrentTaskModificationError(task.id)
            expected = stored.version
        elif prev_version.is_missing:
            expected = 0
        else:
            expected = _int(prev_version)
        ops: list[models.PutOp | models.DeleteOp] = [
            models.PutOp(
                namespace=space,
                key=key,
                value={"task": MessageToDict(task)},
                if_version=expected,
                text="",
            )
        ]
        if event is not None:
            raw = to_stream_response(event).SerializeToString()
            ops.append(
                models.PutOp(
                    namespace=f"{space}/events/{encode_label(task.id)}",
                    key=f"{expected + 1:012d}",
                    value={"event": base64.b64encode(raw).decode("ascii")},
                    text="",
                )
            )
        try:
            results = await self._hive.batch(ops)
        except Conflict as exc:
            raise ConcurrentTaskModificationError(task.id) from exc
        written = results[0]
        assert isinstance(written, models.Item)
        return TaskVersion(written.version)

    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        """The task with its version, or None."""
        item = await self._hive.get(self._space(context), encode_key(task_id))
        if item is None:
            return None
        return StoredTask(_task(item.value), TaskVersion(item.version))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """The owner's tasks, filtered, ordered and paged as the SDK's in-memory store does."""
        space = self._space(context)
        sdk = InMemoryTaskStore(owner_resolver=lambda _: "owner")
        async for item in every_item(self._hive, space, key_prefix=""):
            await sdk.save(_task(item.value), context)
        return await sdk.list(params, context)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        """Delete the task (absent: nothing to do)."""
        await self._hive.delete(self._space(context), encode_key(task_id))


def serve_agent(
    executor: AgentExecutor,
    card: AgentCard,
    hive: Hive,
    *,
    name: str | None = None,
    ttl: float = 15.0,
    prefix: str = "a2a",
) -> Starlette:
    """The ASGI app serving ``executor`` as the A2A agent ``card`` describes, its tasks in
    ``hive`` (run it with ``uvicorn.run(app, ...)``; start as many replicas as you like).

    While the app runs, the agent is registered as ``name`` (default: ``card.name``) with
    ``endpoint`` the URL of the card's first interface, ``capabilities`` its skills' ids
    and tags, and ``metadata`` ``{"a2a_card": <card URL>, "skills": [...]}``, heartbeating
    every ``ttl``/3 seconds; it is unregistered when the app stops. Find it with
    ``await hive.agents(capability="<skill>")`` and call ``record.endpoint`` with the
    SDK's client (``a2a.client.client_factory.create_client``).

    Raises:
        ValueError: the card has no interface (no URL to register).
    """
    from contextlib import asynccontextmanager

    from a2a.server.request_handlers.default_request_handler_v2 import (
        DefaultRequestHandlerV2,
    )
    from a2a.server.routes.agent_card_routes import create_agent_card_routes
    from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
    from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
    from starlette.applications import Starlette

    if not card.supported_interfaces:
        raise ValueError("the agent card has no supported_interfaces: no URL to register")
    url = card.supported_interfaces[0].url.rstrip("/")
    agent = name or card.name
    capabilities = sorted({s.id for s in card.skills} | {t for s in card.skills for t in s.tags})
    handler = DefaultRequestHandlerV2(executor, HivememTaskStore(hive, prefix=prefix), card)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hive.register(
            agent,
            capabilities=capabilities[:64],
            endpoint=url,
            metadata={
                "a2a_card": url + AGENT_CARD_WELL_KNOWN_PATH,
                "skills": [s.id for s in card.skills],
            },
            ttl=ttl,
        )
        try:
            yield
        finally:
            await hive.unregister(agent)

    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/")
    return Starlette(routes=routes, lifespan=lifespan)


def _task(value: dict[str, Any]) -> Task:
    task = Task()
    ParseDict(value["task"], task)
    return task


__all__ = ["TERMINAL", "HivememTaskStore", "serve_agent"]
