"""AgentScope 1.0 and AgentScope Runtime on hivemem (``pip install
'hivemem[agentscope-runtime]'``: agentscope-runtime 1.1 needs agentscope 1.0 and
``mcp<2``, so it lives in a virtualenv of its own, apart from the ``agentscope`` extra's
agentscope 2.x).

The runtime's ``AgentApp`` keeps nothing between requests: an app's ``/process``
handler builds its agent, loads the session, replies and saves. With these two classes
the session and the memory live in one hive that every app and replica shares:

- :class:`HivememSession` implements ``agentscope.session.SessionBase``
  (``save_session_state`` / ``load_session_state`` of the agent's state modules, e.g.
  its working memory) per (user, session). A save is compare-and-set on the version this
  object loaded: two replicas that served one session at once cannot overwrite each
  other silently; the later save raises :class:`~hivemem.errors.Conflict`.
- :class:`HivememLongTermMemory` implements
  ``agentscope.memory.LongTermMemoryBase``: ``record`` / ``retrieve`` (the ReActAgent's
  static control) and the ``record_to_memory`` / ``retrieve_from_memory`` tools (agent
  control) on hivemem's hybrid search, per user, shared by every app.

Layout (labels escaped as :mod:`hivemem.integrations.labels` says):
``<prefix>/sessions/<user>`` holds one item per session (key: session id; value: the
state modules' ``state_dict()`` by name); ``<prefix>/memory/<user>`` one item per
memory: ``m.<message id>`` for a recorded message (recording it again stores nothing),
``f.<sha256 of the text>`` for a fact recorded by the tool.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

from agentscope.memory import LongTermMemoryBase
from agentscope.message import Msg, TextBlock
from agentscope.session import SessionBase
from agentscope.tool import ToolResponse

from hivemem.errors import Conflict, HivememError
from hivemem.integrations.labels import encode_key, encode_label, encode_part

if TYPE_CHECKING:
    from agentscope.module import StateModule

    from hivemem.hive import Hive


class HivememSession(SessionBase):
    """AgentScope 1.0 session state kept in a hive.

    Args:
        hive: an opened async :class:`~hivemem.Hive`.
        prefix: the namespace sessions (and nothing else) are kept under.

    Raises (from both methods): :class:`~hivemem.errors.Unavailable` (store or service
    unreachable), :class:`~hivemem.errors.TooLarge` (state over ``max_value_bytes``).
    """

    def __init__(self, hive: Hive, *, prefix: str = "agentscope-runtime/sessions") -> None:
        self._hive = hive
        self._prefix = prefix
        self._versions: dict[tuple[str, str], int] = {}

    def _where(self, user_id: str) -> str:
        return f"{self._prefix}/{encode_label(user_id or 'default_user')}"

    async def load_session_state(
        self,
        session_id: str,
        user_id: str = "default_user",
        allow_not_exist: bool = True,
        **state_modules_mapping: StateModule,
    ) -> None:
        """Load each named module's stored state into it (none stored: leave them as they
        are, or raise ``ValueError`` when ``allow_not_exist`` is false)."""
        item = await self._hive.get(self._where(user_id), encode_key(session_id))
        self._versions[(user_id, session_id)] = 0 if item is None else item.version
        if item is None:
            if not allow_not_exist:
                raise ValueError(f"session {session_id!r} of user {user_id!r} does not exist")
            return
        for name, module in state_modules_mapping.items():
            if name in item.value:
                module.load_state_dict(item.value[name])

    async def save_session_state(
        self,
        session_id: str,
        user_id: str = "default_user",
        **state_modules_mapping: StateModule,
    ) -> None:
        """Store the modules' ``state_dict()`` by name, if no one saved the session since
        this object loaded it (a session it never loaded must be new).

        Raises:
            Conflict: another replica saved it in between; nothing was written.
        """
        ident = (user_id, session_id)
        expected = self._versions.get(ident, 0)
        value = {name: module.state_dict() for name, module in state_modules_mapping.items()}
        try:
            item = await self._hive.put(
                self._where(user_id),
                encode_key(session_id),
                value,
                if_version=expected,
                text="",
            )
        except Conflict as exc:
            raise Conflict(
                f"session {session_id!r} of user {user_id!r} was saved elsewhere since it "
                f"was loaded here at version {expected} (it is at {exc.current_version}); "
                "load it again",
                field="state",
                current_version=exc.current_version,
            ) from exc
        self._versions[ident] = item.version


class HivememLongTermMemory(LongTermMemoryBase):
    """AgentScope 1.0 long-term memory on hivemem search, per user.

    Args:
        hive: an opened async :class:`~hivemem.Hive`.
        user_id: whose memory this is.
        prefix: the namespace memories are kept under (``<prefix>/<user>``).
        limit: memories :meth:`retrieve` returns, 1..100.
    """

    def __init__(
        self,
        hive: Hive,
        *,
        user_id: str,
        prefix: str = "agentscope-runtime/memory",
        limit: int = 5,
    ) -> None:
        super().__init__()
        if not user_id:
            raise ValueError("HivememLongTermMemory needs a non-empty user_id")
        if not 1 <= limit <= 100:
            raise ValueError(f"limit must be 1..100, got {limit}")
        self._hive = hive
        self.namespace = f"{prefix}/{encode_label(user_id)}"
        self.limit = limit

    async def _search(self, query: str, limit: int) -> list[str]:
        hits = await self._hive.search(self.namespace, query[:4096], limit=limit)
        return [str(h.item.value.get("text", "")) for h in hits if isinstance(h.item.value, dict)]

    async def record(self, msgs: list[Msg | None], **kwargs: Any) -> None:
        """Store the text of each user or assistant message, once per message id."""
        for msg in msgs:
            if msg is None or msg.role not in ("user", "assistant"):
                continue
            text = msg.get_text_content()
            if not text:
                continue
            try:
                await self._hive.put(
                    self.namespace,
                    "m." + encode_part(msg.id),
                    {"text": f"{msg.name}: {text}", "role": msg.role, "at": time.time()},
                    text=text,
                    if_version=0,
                )
            except Conflict:
                pass  # recorded on an earlier turn

    async def retrieve(self, msg: Msg | list[Msg] | None, limit: int = 5, **kwargs: Any) -> str:
        """The memories best matching the text of ``msg``, one per line ("" if none)."""
        msgs = msg if isinstance(msg, list) else [msg]
        query = "\n".join(t for m in msgs if m is not None and (t := m.get_text_content()))
        if not query.strip():
            return ""
        return "\n".join(await self._search(query, min(limit, self.limit) or self.limit))

    async def record_to_memory(
        self, thinking: str, content: list[str], **kwargs: Any
    ) -> ToolResponse:
        """Use this function to record important information that you may need later.
        The target content should be specific and concise, e.g. who, when, where, do what,
        why, how, etc.

        Args:
            thinking (`str`):
                Your thinking and reasoning about what to record.
            content (`list[str]`):
                The content to remember, which is a list of strings.
        """
        facts = [c.strip() for c in content if isinstance(c, str) and c.strip()]
        try:
            for fact in facts:
                key = "f." + hashlib.sha256(fact.encode("utf-8")).hexdigest()[:32]
                await self._hive.put(
                    self.namespace, key, {"text": fact, "at": time.time()}, text=fact
                )
        except HivememError as exc:
            return _response(f"Error recording memory: {exc}")
        return _response(f"Recorded {len(facts)} fact(s).")

    async def retrieve_from_memory(
        self, keywords: list[str], limit: int = 5, **kwargs: Any
    ) -> ToolResponse:
        """Retrieve the memory based on the given keywords.

        Args:
            keywords (`list[str]`):
                The keywords to search for in the memory, which should be specific and
                concise, e.g. the person's name, the date, the location, etc.
            limit (`int`, optional):
                The maximum number of memories to retrieve per keyword. Defaults to 5.
        """
        found: dict[str, None] = {}
        try:
            for word in keywords:
                if isinstance(word, str) and word.strip():
                    for text in await self._search(word, max(1, min(100, int(limit)))):
                        found.setdefault(text)
        except HivememError as exc:
            return _response(f"Error searching memory: {exc}")
        return _response("\n".join(found) if found else "(no relevant memories found)")


def _response(text: str) -> ToolResponse:
    return ToolResponse(content=[TextBlock(type="text", text=text)])
