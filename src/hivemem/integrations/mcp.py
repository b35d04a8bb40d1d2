"""hivemem as a Model Context Protocol server (``pip install 'hivemem[mcp]'``; mcp 2.x).

The tools give a model the shared memory, sessions, the feed and the task queue of a
hive, each with a typed (structured) result. Serve them:

- over stdio: ``hivemem mcp --url http://host:8080`` (a client of a service) or
  ``hivemem mcp --store sqlite:///./hive.db`` (an embedded hive), for MCP clients that
  start the server themselves (Claude Desktop, IDEs, agent frameworks' MCP clients);
- over streamable HTTP on a running service at ``/mcp`` (``hivemem serve`` mounts it
  when the ``mcp`` package is installed), behind the service's authentication: each call
  runs as the agent of the request's credentials, under its policy and rate limits;
- in process: ``build_server(hive)`` returns the ``MCPServer``.

A tool that fails returns an error result whose text is hivemem's message (a version
conflict, a bad argument naming its field, a permission refused); nothing is written
by a refused call.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from hivemem.errors import HivememError
from hivemem.models import Event, Item, Message, OnceTicket, SearchHit, Session, Task

if TYPE_CHECKING:
    from hivemem.hive import Hive

#: Actions of the service's rate limits and policy (see hivemem.policy) by tool.
Action = Literal["read", "write", "search", "watch", "publish", "sessions", "tasks"]
#: Gives the hive a tool runs against, for the tool's action (the service builds one per
#: authenticated agent and counts the call against its rate limit).
HiveProvider = Callable[[Action], Awaitable["Hive"]]

_Fn = TypeVar("_Fn", bound=Callable[..., Awaitable[Any]])

INSTRUCTIONS = (
    "hivemem is memory shared by several agents. Items live at (namespace, key); a "
    "namespace is a path like 'team/research' (segments of letters, digits and _ - . : @ +). "
    "Every write makes a new version; pass if_version to write only if nobody changed the "
    "item since you read it (a conflict tells you the version found). Use memory_search to "
    "find items by meaning and words, sessions for conversations, publish/watch_since to "
    "signal other agents, task_submit/task_result to hand work to workers."
)


class ItemResult(BaseModel):
    """Whether the item exists, and the item."""

    found: bool
    item: Item | None = None


class ItemsPage(BaseModel):
    """One page of items; pass next_cursor back to get the next page."""

    items: list[Item]
    next_cursor: str | None = None


class SearchResult(BaseModel):
    """Hits, best first."""

    hits: list[SearchHit]


class Deleted(BaseModel):
    """Whether an item was deleted (False: there was none)."""

    deleted: bool


class History(BaseModel):
    """Stored versions of an item, newest first."""

    versions: list[Item]


class EventsPage(BaseModel):
    """Events after the cursor, oldest first; call again with after=next_after."""

    events: list[Event]
    next_after: str = Field(description="The cursor to pass as `after` next time.")


class OnceEnded(BaseModel):
    """The call's outcome was kept (result) or its key freed (error)."""

    ended: bool


class SessionView(BaseModel):
    """A session with its latest messages, oldest first."""

    session: Session
    messages: list[Message]


def error_text(exc: HivememError) -> str:
    """What a model reads of a refused call: the error's kind, message and field
    (``Conflict: notes/plan is at version 2, not 1 (field if_version)``)."""
    field = getattr(exc, "field", None)
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} (field {field})" if field and field not in str(exc) else text


def build_server(hive: Hive | HiveProvider, *, name: str = "hivemem") -> MCPServer:
    """The MCP server whose tools act on ``hive``.

    Args:
        hive: a :class:`~hivemem.Hive` (every call acts as its agent), or an async
            function giving the hive for a tool's action (how the service binds each
            call to the request's agent).
        name: the server name clients see.

    Returns:
        An ``mcp.server.mcpserver.MCPServer``: ``.run("stdio")``, ``mcp.Client(server)``
        in process, or ``.streamable_http_app()``.
    """
    if callable(hive) and not hasattr(hive, "put"):
        provider: HiveProvider = hive
    else:

        async def provider(action: Action) -> Hive:
            return hive  # type: ignore[return-value]

    server = MCPServer(name, instructions=INSTRUCTIONS)

    def tool(fn: _Fn) -> _Fn:
        """Register ``fn``; a HivememError becomes a tool error the model reads."""

        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except HivememError as exc:
                raise ToolError(error_text(exc)) from exc

        server.tool()(call)
        return fn

    @tool
    async def memory_put(
        namespace: str,
        key: str,
        value: Any,
        if_version: int | None = None,
        ttl_seconds: float | None = None,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Item:
        """Store a JSON value at (namespace, key), replacing what is there.

        Use it to remember facts, results or state other agents should see. The value is
        any JSON (at most 1 MiB). if_version: 0 writes only if the key is free, n only if
        the item is still at version n (otherwise a conflict says the version found: read
        it again and decide). ttl_seconds: forget it after that long. text: what search
        should index (default: a string value, or the value's "text"/"content" field).
        metadata: a JSON object memory_search can filter on. Returns the stored item with
        its new version."""
        h = await provider("write")
        return await h.put(
            namespace,
            key,
            value,
            if_version=if_version,
            ttl=ttl_seconds,
            text=text,
            metadata=metadata,
        )

    @tool
    async def memory_get(namespace: str, key: str) -> ItemResult:
        """Read the item at (namespace, key): its value, version, author and times.
        found is false when there is none (or it expired)."""
        h = await provider("read")
        item = await h.get(namespace, key)
        return ItemResult(found=item is not None, item=item)

    @tool
    async def memory_delete(namespace: str, key: str, if_version: int | None = None) -> Deleted:
        """Delete the item at (namespace, key) and its history. With if_version, only if it
        is still at that version."""
        h = await provider("write")
        return Deleted(deleted=await h.delete(namespace, key, if_version=if_version))

    @tool
    async def memory_list(
        prefix: str = "",
        key_prefix: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ItemsPage:
        """List items at or under a namespace prefix ("" for all), ordered by namespace
        and key, limit 1-1000 per page. key_prefix lists only the keys of that one
        namespace starting with it. Pass next_cursor back as cursor for the next page."""
        h = await provider("read")
        page = await h.list(prefix, key_prefix=key_prefix, limit=limit, cursor=cursor)
        return ItemsPage(items=page.items, next_cursor=page.next_cursor)

    @tool
    async def memory_search(
        prefix: str,
        query: str,
        filter: dict[str, Any] | None = None,
        mode: Literal["hybrid", "vector", "lexical"] = "hybrid",
        limit: int = 10,
    ) -> SearchResult:
        """Find items at or under a namespace prefix by meaning and by words (hybrid),
        best first, limit 1-100. filter on metadata: {"field": value} or {"field":
        {"$in": [...]}} / {"$gt"|"$gte"|"$lt"|"$lte"|"$eq": v}. An item written a moment
        ago is found by its words at once, by meaning within moments."""
        h = await provider("search")
        return SearchResult(
            hits=await h.search(prefix, query, filter=filter, mode=mode, limit=limit)
        )

    @tool
    async def memory_history(namespace: str, key: str, limit: int = 10) -> History:
        """The stored versions of an item, newest first (the last few are kept), to see
        who changed what."""
        h = await provider("read")
        return History(versions=await h.history(namespace, key, limit=limit))

    @tool
    async def session_create(
        app: str,
        user: str | None = None,
        session_id: str | None = None,
        ttl_seconds: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Start a conversation session for an app (and user). Returns it with its id;
        ttl_seconds: forget it after that long without activity."""
        h = await provider("sessions")
        return await h.create_session(
            app=app, user=user, session_id=session_id, ttl=ttl_seconds, metadata=metadata
        )

    @tool
    async def session_append(
        session_id: str,
        role: str,
        content: Any,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> Message:
        """Append a message (role such as user, assistant or tool; content any JSON) to a
        session. Returns it with its sequence number."""
        h = await provider("sessions")
        return await h.append_message(
            session_id, role, content, tokens_in=tokens_in, tokens_out=tokens_out
        )

    @tool
    async def session_get(session_id: str, last: int = 50) -> SessionView:
        """A session (counters, state) with its last messages (1-1000), oldest first."""
        h = await provider("sessions")
        session = await h.get_session(session_id)
        first = max(0, session.messages - last)
        messages = await h.get_messages(session_id, after=first, limit=max(1, min(last, 1000)))
        return SessionView(session=session, messages=messages)

    @tool
    async def publish(channel: str, payload: Any) -> Event:
        """Publish a JSON payload (at most 64 KiB) on a channel (a namespace): agents
        watching it see the event. Returns the event with its cursor."""
        h = await provider("publish")
        return await h.publish(channel, payload)

    @tool
    async def watch_since(
        prefix: str = "", after: str | None = None, limit: int = 100
    ) -> EventsPage:
        """What changed at or under a namespace prefix since a cursor: writes, deletes,
        published events, task changes; oldest first, at most limit (1-1000). Omit after
        to start from the oldest event kept; pass next_after back to continue. A bounded
        read, not a stream."""
        h = await provider("watch")
        page = await h.read_events(prefix, after=after, limit=limit)
        next_after = page.next_cursor or (page.items[-1].cursor if page.items else after or "0")
        return EventsPage(events=page.items, next_after=next_after)

    @tool
    async def task_submit(
        queue: str,
        payload: Any = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay_seconds: float = 0,
        max_attempts: int = 3,
    ) -> Task:
        """Hand a job to the workers of a queue. The same idempotency_key submits it only
        once (a retry returns the first task). Returns the task; task_result waits for
        its outcome."""
        h = await provider("tasks")
        return await h.submit(
            queue,
            payload,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=delay_seconds,
            max_attempts=max_attempts,
        )

    @tool
    async def task_result(task_id: str, wait_seconds: float = 0) -> Task:
        """A submitted task's state; waits up to wait_seconds (at most 30) for it to be
        completed, dead or cancelled. result holds the worker's result, errors each
        failed attempt's error."""
        h = await provider("tasks")
        return await h.result(task_id, wait=min(max(wait_seconds, 0.0), 30.0))

    @tool
    async def once_begin(
        key: str, shared: bool = False, lease_seconds: float = 60.0, wait_seconds: float = 0
    ) -> OnceTicket:
        """Call before an action that must happen only once even if you are retried or
        another agent tries it too (sending an email, charging a card, opening a ticket),
        with a key naming that action (e.g. "ticket-991:refund"). status "run": do it,
        then call once_end with the token within lease_seconds. "done": it was already
        done; result is what was kept. "failed": it failed before and the error was kept.
        "running": someone else is doing it now (wait_seconds, at most 30, to wait).
        shared: one outcome for all agents instead of per agent."""
        h = await provider("tasks")
        return await h.begin_once(
            key,
            shared=shared,
            lease=lease_seconds,
            wait=min(max(wait_seconds, 0.0), 30.0) or None,
        )

    @tool
    async def once_end(
        key: str,
        token: int,
        result: Any = None,
        error: str | None = None,
        shared: bool = False,
    ) -> OnceEnded:
        """Finish an action begun with once_begin (status "run"): pass its result to keep
        it for later callers, or error if it failed (the key is then free to try again)."""
        h = await provider("tasks")
        await h.end_once(key, token, shared=shared, result=result, error=error)
        return OnceEnded(ended=True)

    return server


__all__ = ["INSTRUCTIONS", "build_server", "error_text"]
