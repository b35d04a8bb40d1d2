"""Google ADK on hivemem (``pip install 'hivemem[adk]'``; google-adk 2.13).

- :class:`HivememSessionService`: ADK's ``BaseSessionService``, so
  ``Runner(agent=..., app_name=..., session_service=HivememSessionService(hive))`` keeps
  sessions, their events and their state in hivemem, shared by every replica.
- :class:`HivememMemoryService`: ADK's ``BaseMemoryService`` on hivemem's hybrid search.

Layout under ``prefix`` (default ``adk``; names escaped as
:mod:`hivemem.integrations.labels` says), all under one top-level segment so a batch is
atomic on every store, Redis Cluster included:

- ``<prefix>/<app>/app``, item ``state``: the ``app:`` state of the app;
- ``<prefix>/<app>/user/<user>``, item ``state``: the ``user:`` state of a user;
- ``<prefix>/<app>/s/<user>``, one item per session: its own state, its update time and
  its event count;
- ``<prefix>/<app>/e/<user>/<session>``, one item per event, keyed by its number
  inverted (newest first: ``num_recent_events`` is one page);
- ``<prefix>/<app>/memory/<user>``: what ``add_session_to_memory`` stored, one item per
  event with text.

State follows ADK's prefixes: ``app:`` keys are shared by the app's sessions, ``user:``
keys by a user's sessions, ``temp:`` keys are never stored, the rest belong to the
session. ``append_event`` writes the event, the session's new state and update time,
and the app and user state it changes in one hivemem batch, with compare-and-set on
each item it read: a session copy older than what is stored (its ``last_update_time``
behind the stored one, or another append landing between this one's read and write)
raises ADK's ``StaleSessionError``, and nothing is written. Update times strictly
increase per session, so every append makes earlier copies stale.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from google.adk.artifacts.base_artifact_service import (
    ArtifactVersion,
    BaseArtifactService,
    ensure_part,
)
from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.events.event import Event
from google.adk.memory.base_memory_service import BaseMemoryService, SearchMemoryResponse
from google.adk.memory.memory_entry import MemoryEntry
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from google.genai import types

from hivemem import models
from hivemem.errors import Conflict
from hivemem.integrations._common import PAGE, every_item
from hivemem.integrations.labels import decode, encode_key, encode_label, encode_part

if TYPE_CHECKING:
    from hivemem.hive import Hive

_TOP = 10**12 - 1
_BATCH = 100
#: Rounds an append retries when only the shared app or user state moved meanwhile.
ATTEMPTS = 20


class _Names:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def app(self, app: str) -> str:
        return f"{self.prefix}/{encode_label(app)}"

    def app_state(self, app: str) -> str:
        return f"{self.app(app)}/app"

    def user_state(self, app: str, user: str) -> str:
        return f"{self.app(app)}/user/{encode_label(user)}"

    def sessions(self, app: str, user: str | None = None) -> str:
        base = f"{self.app(app)}/s"
        return base if user is None else f"{base}/{encode_label(user)}"

    def events(self, app: str, user: str, session_id: str) -> str:
        return f"{self.app(app)}/e/{encode_label(user)}/{encode_label(session_id)}"

    def memory(self, app: str, user: str) -> str:
        return f"{self.app(app)}/memory/{encode_label(user)}"

    def artifacts(self, app: str, user: str, session_id: str | None) -> str:
        scope = "+" if session_id is None else encode_label(session_id)
        return f"{self.app(app)}/a/{encode_label(user)}/{scope}"


class HivememSessionService(BaseSessionService):
    """ADK ``BaseSessionService`` on an async :class:`~hivemem.Hive` (embedded or a
    service; used on the event loop ADK runs in). See the module notes for the layout
    and the compare-and-set rules.

    Raises (besides ADK's own errors named per method):
    :class:`~hivemem.errors.Unavailable` when the store or service cannot be reached,
    :class:`~hivemem.errors.TooLarge` for an event or state over ``max_value_bytes``.
    """

    def __init__(self, hive: Hive, *, prefix: str = "adk") -> None:
        self._hive = hive
        self._names = _Names(prefix)

    async def _list(self, namespace: str, key_prefix: str = "") -> list[models.Item]:
        return [i async for i in every_item(self._hive, namespace, key_prefix=key_prefix)]

    async def _state(self, namespace: str) -> tuple[dict[str, Any], int]:
        item = await self._hive.get(namespace, "state")
        return (dict(item.value), item.version) if item is not None else ({}, 0)

    async def _merged(self, app: str, user: str, own: dict[str, Any]) -> dict[str, Any]:
        (app_state, _), (user_state, _) = (
            await self._state(self._names.app_state(app)),
            await self._state(self._names.user_state(app, user)),
        )
        state = dict(own)
        state.update({State.APP_PREFIX + k: v for k, v in app_state.items()})
        state.update({State.USER_PREFIX + k: v for k, v in user_state.items()})
        return state

    def _shared_ops(
        self,
        app: str,
        user: str,
        deltas: dict[str, dict[str, Any]],
        read: dict[str, tuple[dict[str, Any], int]],
    ) -> list[models.PutOp]:
        ops = []
        for kind, namespace in (
            ("app", self._names.app_state(app)),
            ("user", self._names.user_state(app, user)),
        ):
            if deltas[kind]:
                current, version = read[kind]
                ops.append(
                    models.PutOp(
                        namespace=namespace,
                        key="state",
                        value={**current, **deltas[kind]},
                        if_version=version,
                    )
                )
        return ops

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """A new session (``AlreadyExistsError`` if ``session_id`` is taken)."""
        session_id = (session_id or "").strip() or str(uuid.uuid4())
        deltas = _session_util.extract_state_delta(_session_util.make_json_safe_state(state or {}))
        now = time.time()
        for attempt in range(ATTEMPTS):
            read = {
                "app": await self._state(self._names.app_state(app_name)),
                "user": await self._state(self._names.user_state(app_name, user_id)),
            }
            record = models.PutOp(
                namespace=self._names.sessions(app_name, user_id),
                key=encode_key(session_id),
                value={
                    "id": session_id,
                    "state": deltas["session"],
                    "update_time": now,
                    "events": 0,
                },
                if_version=0,
            )
            try:
                await self._hive.batch([record, *self._shared_ops(app_name, user_id, deltas, read)])
                break
            except Conflict as exc:
                if exc.field in ("if_version", "ops.0.if_version"):
                    raise AlreadyExistsError(
                        f"Session with id {session_id} already exists."
                    ) from exc
                if attempt == ATTEMPTS - 1:
                    raise
        return Session(
            app_name=app_name,
            user_id=user_id,
            id=session_id,
            state=await self._merged(app_name, user_id, deltas["session"]),
            last_update_time=now,
        )

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        """The session with its events (the latest ``num_recent_events``, those at or
        after ``after_timestamp``) and its state merged with the app's and the user's;
        None if absent."""
        session_id = session_id.strip() if session_id else session_id
        record = await self._hive.get(
            self._names.sessions(app_name, user_id), encode_key(session_id)
        )
        if record is None:
            return None
        namespace = self._names.events(app_name, user_id, session_id)
        wanted = config.num_recent_events if config else None
        if wanted == 0:
            items: list[models.Item] = []
        elif wanted is not None:
            items = []
            cursor: str | None = None
            while len(items) < wanted:
                page = await self._hive.list(
                    namespace, key_prefix="", limit=min(PAGE, wanted - len(items)), cursor=cursor
                )
                items += page.items
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        else:
            items = await self._list(namespace)
        events = [Event.model_validate(i.value) for i in reversed(items)]
        if config is not None and config.after_timestamp is not None:
            after = config.after_timestamp
            events = [e for e in events if e.timestamp >= after]
        return Session(
            app_name=app_name,
            user_id=user_id,
            id=session_id,
            state=await self._merged(app_name, user_id, record.value["state"]),
            events=events,
            last_update_time=record.value["update_time"],
        )

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """The sessions of a user (every user's when None), without events, oldest
        update first."""
        found = []
        for item in await self._list(self._names.sessions(app_name, user_id)):
            user = user_id if user_id is not None else decode(item.namespace.rsplit("/", 1)[1])
            found.append(
                Session(
                    app_name=app_name,
                    user_id=user,
                    id=item.value["id"],
                    state=await self._merged(app_name, user, item.value["state"]),
                    last_update_time=item.value["update_time"],
                )
            )
        found.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=found)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Delete the session and its events (the app and user state stay)."""
        doomed: list[models.PutOp | models.DeleteOp] = [
            models.DeleteOp(namespace=i.namespace, key=i.key)
            for i in await self._list(self._names.events(app_name, user_id, session_id))
        ]
        doomed.append(
            models.DeleteOp(
                namespace=self._names.sessions(app_name, user_id), key=encode_key(session_id)
            )
        )
        for start in range(0, len(doomed), _BATCH):
            await self._hive.batch(doomed[start : start + _BATCH])

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The user's ``user:`` state, without the prefix."""
        state, _ = await self._state(self._names.user_state(app_name, user_id))
        return state

    async def append_event(self, session: Session, event: Event) -> Event:
        """Store ``event`` and the state it changes; see the module notes.

        Raises:
            StaleSessionError: ``session`` is older than the stored session.
            ValueError: the session does not exist.
        """
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        deltas = _session_util.extract_state_delta(
            _session_util.make_json_safe_state(
                event.actions.state_delta if event.actions and event.actions.state_delta else {}
            )
        )
        sessions_ns = self._names.sessions(session.app_name, session.user_id)
        for attempt in range(ATTEMPTS):
            record = await self._hive.get(sessions_ns, encode_key(session.id))
            if record is None:
                raise ValueError(f"Session {session.id} not found.")
            stored = record.value
            if stored["update_time"] > session.last_update_time:
                raise StaleSessionError(
                    "The last_update_time provided in the session object is earlier than the "
                    "update_time in storage. Please check if it is a stale session."
                )
            read = {
                "app": await self._state(self._names.app_state(session.app_name)),
                "user": await self._state(
                    self._names.user_state(session.app_name, session.user_id)
                ),
            }
            number = int(stored["events"])
            update_time = max(float(event.timestamp), float(stored["update_time"]) + 1e-6)
            ops: list[models.PutOp | models.DeleteOp] = [
                models.PutOp(
                    namespace=sessions_ns,
                    key=encode_key(session.id),
                    value={
                        **stored,
                        "state": {**stored["state"], **deltas["session"]},
                        "update_time": update_time,
                        "events": number + 1,
                    },
                    if_version=record.version,
                ),
                models.PutOp(
                    namespace=self._names.events(session.app_name, session.user_id, session.id),
                    key=f"{_TOP - number:012d}",
                    value=event.model_dump(mode="json", exclude_none=True),
                    text="",
                ),
                *self._shared_ops(session.app_name, session.user_id, deltas, read),
            ]
            try:
                await self._hive.batch(ops)
            except Conflict as exc:
                if exc.field in (None, "ops.0.if_version"):
                    raise StaleSessionError(
                        f"Session {session.id} was changed by another writer meanwhile."
                    ) from exc
                if attempt == ATTEMPTS - 1:
                    raise
                continue  # only the shared app or user state moved: read it again
            self._commit_event_to_session(session, event)
            session.last_update_time = update_time
            return event
        raise AssertionError("unreachable")


class HivememMemoryService(BaseMemoryService):
    """ADK ``BaseMemoryService`` on an async :class:`~hivemem.Hive`: the text of a
    session's events is stored per user (``<prefix>/<app>/memory/<user>``, one item per
    event, so adding a session again stores nothing twice) and found by hivemem's
    hybrid search."""

    def __init__(self, hive: Hive, *, prefix: str = "adk", limit: int = 10) -> None:
        self._hive = hive
        self._names = _Names(prefix)
        self.limit = limit

    async def add_session_to_memory(self, session: Session) -> None:
        ops: list[models.PutOp | models.DeleteOp] = []
        for event in session.events:
            text = (
                " ".join(p.text for p in (event.content.parts or []) if event.content and p.text)
                if event.content
                else ""
            )
            if not text.strip():
                continue
            ops.append(
                models.PutOp(
                    namespace=self._names.memory(session.app_name, session.user_id),
                    key=encode_key(event.id),
                    value={
                        "text": text,
                        "author": event.author,
                        "timestamp": event.timestamp,
                        "session": session.id,
                    },
                    text=text,
                )
            )
        for start in range(0, len(ops), _BATCH):
            await self._hive.batch(ops[start : start + _BATCH])

    async def search_memory(
        self, *, app_name: str, user_id: str, query: str
    ) -> SearchMemoryResponse:
        if not query.strip():
            return SearchMemoryResponse()
        hits = await self._hive.search(
            self._names.memory(app_name, user_id), query, limit=self.limit
        )
        return SearchMemoryResponse(
            memories=[
                MemoryEntry(
                    content=types.Content(
                        parts=[types.Part(text=h.item.value["text"])], role="user"
                    ),
                    author=h.item.value.get("author"),
                    id=decode(h.item.key),
                    timestamp=_iso(h.item.value.get("timestamp")),
                    custom_metadata={"score": h.score, "session": h.item.value.get("session")},
                )
                for h in hits
            ]
        )


class HivememArtifactService(BaseArtifactService):
    """ADK ``BaseArtifactService`` on an async :class:`~hivemem.Hive`: versioned files.

    A file ``user:NAME`` belongs to the user (every session of theirs sees it); any other
    needs a session id. Each version is an item ``v.<file>.<version>`` of the scope's
    namespace (``<prefix>/<app>/a/<user>/<session or +>``) holding the ``Part`` as JSON
    (bytes base64, so a version is at most the hive's ``max_value_bytes``) with its
    metadata; ``h.<file>`` holds the next version number, taken with compare-and-set in
    the same batch as the version, so two writers never get one number. Versions start
    at 0. An ``artifact://`` reference is stored and returned as it is, not resolved.

    Raises: ``InputValidationError`` (ADK's) for a session-scoped file without a session
    id, or an empty part; hivemem's errors as the other services do.
    """

    def __init__(self, hive: Hive, *, prefix: str = "adk") -> None:
        self._hive = hive
        self._names = _Names(prefix)

    def _where(self, app: str, user: str, filename: str, session_id: str | None) -> str:
        from google.adk.errors.input_validation_error import InputValidationError

        if filename.startswith("user:"):
            return self._names.artifacts(app, user, None)
        if session_id is None:
            raise InputValidationError("Session ID must be provided for session-scoped artifacts.")
        return self._names.artifacts(app, user, session_id)

    async def save_artifact(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        artifact: types.Part | dict[str, Any],
        session_id: str | None = None,
        custom_metadata: dict[str, Any] | None = None,
    ) -> int:
        from google.adk.errors.input_validation_error import InputValidationError

        part = ensure_part(artifact)
        if part.inline_data is not None:
            mime = part.inline_data.mime_type
        elif part.text is not None:
            mime = "text/plain"
        elif part.file_data is not None:
            mime = part.file_data.mime_type
        else:
            raise InputValidationError("Not supported artifact type.")
        namespace = self._where(app_name, user_id, filename, session_id)
        name = encode_part(filename)
        for attempt in range(ATTEMPTS):
            head = await self._hive.get(namespace, f"h.{name}")
            version = int(head.value["next"]) if head is not None else 0
            record = {
                "filename": filename,
                "part": part.model_dump(mode="json", exclude_none=True),
                "mime_type": mime,
                "custom_metadata": dict(custom_metadata or {}),
                "create_time": time.time(),
            }
            try:
                await self._hive.batch(
                    [
                        models.PutOp(
                            namespace=namespace,
                            key=f"h.{name}",
                            value={"filename": filename, "next": version + 1},
                            if_version=head.version if head is not None else 0,
                        ),
                        models.PutOp(
                            namespace=namespace,
                            key=f"v.{name}.{version:08d}",
                            value=record,
                            text="",
                        ),
                    ]
                )
                return version
            except Conflict:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _versions(
        self, app_name: str, user_id: str, filename: str, session_id: str | None
    ) -> list[models.Item]:
        namespace = self._where(app_name, user_id, filename, session_id)
        versions = f"v.{encode_part(filename)}."
        return [i async for i in every_item(self._hive, namespace, key_prefix=versions)]

    @staticmethod
    def _number(item: models.Item) -> int:
        return int(item.key.rsplit(".", 1)[1])

    async def load_artifact(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        session_id: str | None = None,
        version: int | None = None,
    ) -> types.Part | None:
        namespace = self._where(app_name, user_id, filename, session_id)
        if version is not None:
            item = await self._hive.get(namespace, f"v.{encode_part(filename)}.{version:08d}")
        else:
            versions = await self._versions(app_name, user_id, filename, session_id)
            item = versions[-1] if versions else None
        if item is None:
            return None
        part = types.Part.model_validate(item.value["part"])
        return None if part == types.Part() else part

    async def list_artifact_keys(
        self, *, app_name: str, user_id: str, session_id: str | None = None
    ) -> list[str]:
        names: set[str] = set()
        scopes = [None] if session_id is None else [session_id, None]
        for scope in scopes:
            namespace = self._names.artifacts(app_name, user_id, scope)
            async for head in every_item(self._hive, namespace, key_prefix="h."):
                names.add(head.value["filename"])
        return sorted(names)

    async def delete_artifact(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        session_id: str | None = None,
    ) -> None:
        namespace = self._where(app_name, user_id, filename, session_id)
        doomed: list[models.PutOp | models.DeleteOp] = [
            models.DeleteOp(namespace=namespace, key=i.key)
            for i in await self._versions(app_name, user_id, filename, session_id)
        ]
        doomed.append(models.DeleteOp(namespace=namespace, key=f"h.{encode_part(filename)}"))
        for start in range(0, len(doomed), _BATCH):
            await self._hive.batch(doomed[start : start + _BATCH])

    async def list_versions(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        session_id: str | None = None,
    ) -> list[int]:
        items = await self._versions(app_name, user_id, filename, session_id)
        return [self._number(i) for i in items]

    def _version(self, item: models.Item) -> ArtifactVersion:
        return ArtifactVersion(
            version=self._number(item),
            canonical_uri=f"hivemem://{item.namespace}/{item.key}",
            custom_metadata=dict(item.value.get("custom_metadata") or {}),
            create_time=float(item.value["create_time"]),
            mime_type=item.value.get("mime_type"),
        )

    async def list_artifact_versions(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        session_id: str | None = None,
    ) -> list[ArtifactVersion]:
        items = await self._versions(app_name, user_id, filename, session_id)
        return [self._version(i) for i in items]

    async def get_artifact_version(
        self,
        *,
        app_name: str,
        user_id: str,
        filename: str,
        session_id: str | None = None,
        version: int | None = None,
    ) -> ArtifactVersion | None:
        items = await self._versions(app_name, user_id, filename, session_id)
        if version is not None:
            items = [i for i in items if self._number(i) == version]
        return self._version(items[-1]) if items else None


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, int | float):
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


__all__ = [
    "ATTEMPTS",
    "HivememArtifactService",
    "HivememMemoryService",
    "HivememSessionService",
]
