"""AgentScope 2.x on hivemem (``pip install 'hivemem[agentscope]'``; agentscope 2.0).

Two pieces, both on an async :class:`~hivemem.Hive` (any store kind, embedded or over
HTTP):

- :class:`HivememStateStore` keeps an agent's ``AgentState`` (its context, summary,
  tasks, middleware context) per (user, agent, session), so a pod that picks up a
  session continues where another left it. Saves are compare-and-set on the version the
  store last loaded or saved: two pods that resumed one session cannot overwrite each
  other silently; the later save raises :class:`~hivemem.errors.Conflict`.
- :class:`HivememMemoryMiddleware` is long-term memory as an AgentScope middleware, the
  shape of AgentScope's own ``Mem0Middleware``: before a reply it searches hivemem
  (hybrid search) with the user's words and puts what it finds in the agent's context as
  a hint; after the reply it stores the exchange; in ``agent_control``/``both`` mode it
  also gives the agent ``search_memory`` and ``add_memory`` tools. Memories are shared:
  every agent (in any pod) with the same user id and hive finds them.

Layout (labels escaped as :mod:`hivemem.integrations.labels` says):

- ``<prefix>/<app>/state/<user>/<agent>``: one item per session, keyed by session id,
  value the ``AgentState`` as JSON (kept out of search);
- ``<prefix>/<app>/memory/<user>`` (and ``/<agent>`` under it when the middleware has an
  ``agent_id``): one item per memory; an exchange is keyed ``x.<reply id>`` (storing a
  reply again replaces it), a fact added by the tool ``f.<sha256 of its text>`` (the
  same fact twice is one item).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from agentscope.event import ReplyStartEvent
from agentscope.message import AssistantMsg, HintBlock, Msg, TextBlock, ToolResultState
from agentscope.middleware import MiddlewareBase
from agentscope.permission import PermissionBehavior, PermissionDecision
from agentscope.state import AgentState
from agentscope.tool import ToolBase, ToolChunk

from hivemem.errors import Conflict, HivememError
from hivemem.integrations._common import every_item
from hivemem.integrations.labels import decode, encode_key, encode_label, encode_part

if TYPE_CHECKING:
    from agentscope.agent import Agent

    from hivemem.hive import Hive

log = logging.getLogger("hivemem.integrations.agentscope")

Mode = Literal["static_control", "agent_control", "both"]


class HivememStateStore:
    """AgentScope ``AgentState`` kept in a hive, per (user, agent, session).

    Args:
        hive: an opened async :class:`~hivemem.Hive`.
        app: the application's name (a namespace segment of its own).
        prefix: the hivemem namespace everything is kept under.

    Raises (from every method): :class:`~hivemem.errors.Unavailable` when the store or
    service cannot be reached; :class:`~hivemem.errors.TooLarge` for a state over the
    hive's ``max_value_bytes`` (1 MiB by default; compress the context, or raise the
    setting); :class:`~hivemem.errors.InvalidInput` for an empty id.
    """

    def __init__(self, hive: Hive, *, app: str = "default", prefix: str = "agentscope") -> None:
        self._hive = hive
        self._base = f"{prefix}/{encode_label(app)}/state"
        self._versions: dict[tuple[str, str, str], int] = {}

    def _where(self, user_id: str, agent_id: str) -> str:
        return f"{self._base}/{encode_label(user_id)}/{encode_label(agent_id)}"

    async def load(self, user_id: str, agent_id: str, session_id: str) -> AgentState | None:
        """The session's stored state, or ``None`` if none was saved; the store remembers
        its version for the next :meth:`save`."""
        item = await self._hive.get(self._where(user_id, agent_id), encode_key(session_id))
        self._versions[(user_id, agent_id, session_id)] = 0 if item is None else item.version
        return None if item is None else AgentState.model_validate(item.value)

    def version(self, user_id: str, agent_id: str, session_id: str) -> int | None:
        """The version this store last loaded or saved for the session (0: known absent),
        or ``None`` if it has not read it."""
        return self._versions.get((user_id, agent_id, session_id))

    async def save(self, user_id: str, agent_id: str, session_id: str, state: AgentState) -> int:
        """Store ``state`` as the session's state, if no one saved it since this store
        last loaded or saved it (a session this store never read must be new).

        Returns:
            The stored version (1 for a new session).

        Raises:
            Conflict: another process saved the session in between (or it exists though
                this store never loaded it); nothing was written. :meth:`load` it again
                and redo the turn on the state found.
        """
        ident = (user_id, agent_id, session_id)
        expected = self._versions.get(ident, 0)
        try:
            item = await self._hive.put(
                self._where(user_id, agent_id),
                encode_key(session_id),
                state.model_dump(mode="json"),
                if_version=expected,
                text="",
            )
        except Conflict as exc:
            raise Conflict(
                f"session {session_id!r} of agent {agent_id!r} (user {user_id!r}) was saved "
                f"elsewhere since this store read it at version {expected} (it is at "
                f"{exc.current_version}); load it again",
                field="state",
                current_version=exc.current_version,
            ) from exc
        self._versions[ident] = item.version
        return item.version

    async def delete(self, user_id: str, agent_id: str, session_id: str) -> bool:
        """Forget the session's state. Returns whether there was one."""
        self._versions.pop((user_id, agent_id, session_id), None)
        return await self._hive.delete(self._where(user_id, agent_id), encode_key(session_id))

    async def list_sessions(self, user_id: str, agent_id: str) -> list[str]:
        """The ids of the agent's stored sessions for the user, in key order."""
        where = self._where(user_id, agent_id)
        return [decode(item.key) async for item in every_item(self._hive, where)]

    @contextlib.asynccontextmanager
    async def session(self, agent: Agent, *, user_id: str, session_id: str) -> AsyncIterator[Agent]:
        """Run ``agent`` on the session: its stored state (or a new one) becomes
        ``agent.state`` on entry, and ``agent.state`` is saved when the block ends
        without an exception (a failed turn leaves the stored state as it was)::

            async with states.session(agent, user_id="ann", session_id="s1"):
                await agent.reply(UserMsg(name="ann", content="hello"))

        Raises:
            Conflict: on exit, another process saved the session during the block.
        """
        state = await self.load(user_id, agent.name, session_id)
        agent.state = state if state is not None else AgentState(session_id=session_id)
        yield agent
        await self.save(user_id, agent.name, session_id, agent.state)


DEFAULT_HEADER = "## Relevant memories from past conversations"
DEFAULT_INTRO = (
    "The following memories about the user may be relevant. "
    "Use them only if they are pertinent to the current request."
)
DEFAULT_TOOL_INSTRUCTIONS = (
    "## Long-term memory\n\n"
    "You have `search_memory` and `add_memory` tools. Use search_memory when the "
    "conversation depends on something the user told you before (a preference, a fact, "
    "an earlier decision), and add_memory to keep a durable fact about the user for "
    "later conversations (yours or another agent's)."
)


class HivememMemoryMiddleware(MiddlewareBase):
    """Long-term memory for AgentScope 2.x agents on hivemem search.

    Args:
        hive: an opened async :class:`~hivemem.Hive`.
        user_id: whose memories these are (required, non-empty).
        agent_id: file this agent's memories under the user's (``None``: the user's
            namespace itself).
        app: the application's name (a namespace segment).
        prefix: the hivemem namespace everything is kept under.
        mode: ``"static_control"`` (search before each reply and store each exchange;
            no tools), ``"agent_control"`` (only the tools), or ``"both"`` (the default,
            as AgentScope's ``Mem0Middleware``).
        top_k: memories put in context per reply (and the tools' default limit), 1..100.
        search_mode: hivemem's search mode (``"hybrid"``: BM25 and vectors fused, or
            BM25 alone on a hive without an embedder; ``"lexical"``; ``"vector"``).
        scope_search_by_agent: with an ``agent_id``, search only this agent's memories;
            ``False`` searches all of the user's (every agent's).
        ttl: seconds each memory is kept (``None``: until deleted).

    A failed search or write (store unreachable) is logged at WARNING and the reply goes
    on without it, as AgentScope's own memory middlewares do; the tools report the error
    to the model instead.

    Raises:
        ValueError: an empty ``user_id``, an unknown ``mode``, ``top_k`` out of range.
    """

    def __init__(
        self,
        hive: Hive,
        *,
        user_id: str,
        agent_id: str | None = None,
        app: str = "default",
        prefix: str = "agentscope",
        mode: Mode = "both",
        top_k: int = 5,
        search_mode: Literal["hybrid", "vector", "lexical"] = "hybrid",
        scope_search_by_agent: bool = True,
        ttl: float | None = None,
        memory_section_header: str = DEFAULT_HEADER,
        memory_section_intro: str = DEFAULT_INTRO,
        tool_instructions: str = DEFAULT_TOOL_INSTRUCTIONS,
    ) -> None:
        if not isinstance(user_id, str) or not user_id.strip():
            raise ValueError("HivememMemoryMiddleware needs a non-empty user_id")
        if mode not in ("static_control", "agent_control", "both"):
            raise ValueError(
                f"unknown mode {mode!r}: expected 'static_control', 'agent_control' or 'both'"
            )
        if not 1 <= top_k <= 100:
            raise ValueError(f"top_k must be 1..100, got {top_k}")
        self._hive = hive
        self.user_id, self.agent_id, self.mode = user_id, agent_id, mode
        self.top_k, self.search_mode, self.ttl = top_k, search_mode, ttl
        user_ns = f"{prefix}/{encode_label(app)}/memory/{encode_label(user_id)}"
        #: where this middleware's memories are written
        self.namespace = user_ns if agent_id is None else f"{user_ns}/{encode_label(agent_id)}"
        #: where its searches look (a namespace and every namespace under it)
        self.search_scope = self.namespace if scope_search_by_agent else user_ns
        self._header, self._intro = memory_section_header, memory_section_intro
        self._tool_instructions = tool_instructions

    # --- the hive ---------------------------------------------------------------------

    async def search(self, query: str, *, limit: int | None = None) -> list[str]:
        """The texts of the memories best matching ``query``, best first.

        Raises:
            hivemem's errors (Unavailable, InvalidInput for a query over 4096 characters).
        """
        hits = await self._hive.search(
            self.search_scope, query[:4096], mode=self.search_mode, limit=limit or self.top_k
        )
        return [str(h.item.value.get("text", "")) for h in hits if isinstance(h.item.value, dict)]

    async def add(self, text: str, *, key: str | None = None, **fields: Any) -> None:
        """Store one memory (``text`` is what search finds), keyed ``key`` or by the hash
        of its text (so the same fact twice is one item)."""
        key = key or "f." + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        value = {"text": text, "at": time.time(), **fields}
        await self._hive.put(self.namespace, key, value, text=text, ttl=self.ttl)

    # --- hooks ------------------------------------------------------------------------

    async def on_reply(
        self,
        agent: Agent,
        input_kwargs: dict[str, Any],
        next_handler: Callable[..., AsyncGenerator[Any, None]],
    ) -> AsyncGenerator[Any, None]:
        if self.mode == "agent_control":
            async for item in next_handler(**input_kwargs):
                yield item
            return
        query = _user_text(input_kwargs.get("inputs"))
        memories: list[str] = []
        if query:
            try:
                memories = await self.search(query)
            except HivememError as exc:
                log.warning("agentscope memory: search for user %s failed: %s", self.user_id, exc)
        final: Msg | None = None
        injected = False
        async for item in next_handler(**input_kwargs):
            if memories and not injected and isinstance(item, ReplyStartEvent):
                agent.state.context.append(self._memory_message(memories))
                injected = True
            if isinstance(item, Msg) and item.role == "assistant":
                final = item
            yield item
        answer = final.get_text_content() if final is not None else None
        if query and final is not None and answer:
            try:
                await self.add(
                    f"user: {query}\nassistant: {answer}",
                    key="x." + encode_part(final.id),
                    user=query,
                    assistant=answer,
                    agent=agent.name,
                    session=agent.state.session_id,
                )
            except HivememError as exc:
                log.warning("agentscope memory: storing an exchange failed: %s", exc)

    async def on_system_prompt(self, agent: Agent, current_prompt: str) -> str:
        if self.mode == "static_control":
            return current_prompt
        return f"{current_prompt}\n\n{self._tool_instructions}"

    async def list_tools(self) -> list[ToolBase]:
        """The ``search_memory`` and ``add_memory`` tools (none in ``static_control``
        mode), to put in the agent's ``Toolkit``."""
        if self.mode == "static_control":
            return []
        return [_SearchMemory(self), _AddMemory(self)]

    def _memory_message(self, memories: list[str]) -> Msg:
        bullets = "\n".join(f"- {m}" for m in memories)
        return AssistantMsg(
            name="memory", content=[HintBlock(hint=f"{self._header}\n{self._intro}\n{bullets}")]
        )


def _user_text(inputs: Any) -> str | None:
    """The text of the user messages among a reply's inputs (None for resumption
    events and non-user inputs)."""
    msgs = inputs if isinstance(inputs, list) else [inputs]
    texts = [
        text
        for m in msgs
        if isinstance(m, Msg) and m.role == "user" and (text := m.get_text_content())
    ]
    return "\n".join(texts) if texts else None


class _MemoryTool(ToolBase):
    """A memory tool: allowed without asking (it only touches the user's memories)."""

    is_external_tool = False
    is_state_injected = False
    is_mcp = False
    mcp_name = None

    def __init__(self, middleware: HivememMemoryMiddleware) -> None:
        super().__init__()
        self._mw = middleware

    async def check_permissions(self, *_args: Any, **_kwargs: Any) -> PermissionDecision:
        return PermissionDecision(
            behavior=PermissionBehavior.ALLOW, message="auto-allowed: hivemem memory tool"
        )


_SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "keywords": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Short search phrases, e.g. a person's name or a topic.",
        },
        "limit": {
            "type": "integer",
            "description": "Most memories per keyword (1..100).",
            "default": 5,
        },
    },
    "required": ["keywords"],
}


class _SearchMemory(_MemoryTool):
    name = "search_memory"
    description = (
        "Find what is remembered about the user from earlier conversations (with any "
        "agent). Give a few short keywords or phrases (a name, a date, a topic); each is "
        "searched on its own and the results are merged. Returns one memory per line."
    )
    input_schema = _SEARCH_SCHEMA
    is_concurrency_safe = True
    is_read_only = True

    async def call(self, keywords: list[str], limit: int = 5) -> ToolChunk:
        words = [k for k in keywords if isinstance(k, str) and k.strip()]
        if not words:
            return _chunk("(no keywords given: nothing searched)")
        limit = max(1, min(100, int(limit)))
        seen: dict[str, None] = {}
        try:
            for word in words:
                for text in await self._mw.search(word, limit=limit):
                    seen.setdefault(text)
        except HivememError as exc:
            return _chunk(f"Error searching memory: {exc}", error=True)
        if not seen:
            return _chunk("(no relevant memories found)")
        return _chunk("\n".join(f"- {t}" for t in seen))


_ADD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "thinking": {"type": "string", "description": "Why this is worth remembering."},
        "content": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The facts to remember, one sentence each.",
        },
    },
    "required": ["thinking", "content"],
}


class _AddMemory(_MemoryTool):
    name = "add_memory"
    description = (
        "Remember durable facts about the user for later conversations (yours or another "
        "agent's). Give each fact as one complete, standalone sentence; only `content` is "
        "stored, `thinking` stays in this transcript."
    )
    input_schema = _ADD_SCHEMA
    is_concurrency_safe = False
    is_read_only = False

    async def call(self, thinking: str, content: list[str]) -> ToolChunk:
        facts = [c.strip() for c in content if isinstance(c, str) and c.strip()]
        if not facts:
            return _chunk("`content` is empty: nothing recorded.", error=True)
        try:
            for fact in facts:
                await self._mw.add(fact, kind="fact")
        except HivememError as exc:
            return _chunk(f"Error recording memory: {exc}", error=True)
        return _chunk(f"Recorded {len(facts)} fact(s).")


def _chunk(text: str, *, error: bool = False) -> ToolChunk:
    if error:
        return ToolChunk(content=[TextBlock(text=text)], state=ToolResultState.ERROR)
    return ToolChunk(content=[TextBlock(text=text)])
