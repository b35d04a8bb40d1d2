"""Sessions: conversation logs, state documents and running counters."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import ValidationError

from hivemem import validation as check
from hivemem.backends.rows import MessageRow, NewMessage, SessionRow, session_expired
from hivemem.core import cursors
from hivemem.core.area import Area, timestamp
from hivemem.errors import InvalidInput, NotFound
from hivemem.models import Message, MessageIn, Page, Session
from hivemem.policy.rules import session_namespace

#: A session listing scans at most this many pages of sessions it may not show.
_SCAN_PAGES = 10


def new_session_id() -> str:
    """A 24-hex-digit id whose first 12 digits are the creation time in ms, so ids sort
    roughly by creation, and whose last 12 are random."""
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


def to_session(row: SessionRow) -> Session:
    """Build the public record from a stored row."""
    return Session.model_construct(
        id=row.id,
        app=row.app,
        user=row.user,
        agent=row.agent,
        created_by=row.created_by,
        metadata=orjson.loads(row.metadata),
        state=orjson.loads(row.state),
        state_version=row.state_version,
        messages=row.messages,
        turns=row.turns,
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
        cost=row.cost,
        started_at=timestamp(row.started_at),
        last_activity_at=timestamp(row.last_activity_at),
        ttl=row.ttl,
        expires_at=None if row.ttl is None else timestamp(row.last_activity_at + row.ttl),
    )


def to_message(row: MessageRow) -> Message:
    """Build the public record from a stored row."""
    return Message.model_construct(
        session_id=row.session_id,
        seq=row.seq,
        role=row.role,
        content=orjson.loads(row.content),
        author=row.author,
        created_at=timestamp(row.created_at),
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
        cost=row.cost,
        metadata=orjson.loads(row.metadata),
    )


class SessionsMixin(Area):
    """The session operations of :class:`~hivemem.core.LocalHive`."""

    def _session_id(self, session_id: object) -> str:
        return check.segment(session_id, "session_id", self._settings)

    def _may_session(self, row: SessionRow) -> bool:
        return self._may("sessions", session_namespace(row.app, row.user))

    async def _visible_session(self, session_id: str) -> None:
        """With a policy in force, refuse a session this view may not see as absent.

        Raises:
            NotFound: no such session, or one the principal may not use.
        """
        if self._access is None:
            return
        row = await self._backend.get_session(session_id)
        if row is None or not self._may_session(row) or session_expired(row, self._now()):
            raise NotFound(f"no session {session_id!r}", field="session_id")

    async def create_session(
        self,
        *,
        app: str,
        user: str | None = None,
        agent: str | None = None,
        session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        ttl: float | None = None,
    ) -> Session:
        s = self._settings
        now = self._now()
        if ttl is not None:
            ttl = check.ttl(ttl, settings=s)
        row = SessionRow(
            id=new_session_id() if session_id is None else self._session_id(session_id),
            app=check.segment(app, "app", s),
            user=None if user is None else check.segment(user, "user", s),
            agent=None if agent is None else check.segment(agent, "agent", s),
            created_by=self.agent,
            metadata=check.json_object(metadata or {}, "metadata", s.max_metadata_bytes),
            state=check.json_object(state or {}, "state", s.max_value_bytes),
            state_version=0 if state is None else 1,
            messages=0,
            turns=0,
            tokens_in=0,
            tokens_out=0,
            cost=0.0,
            started_at=now,
            last_activity_at=now,
            ttl=ttl,
        )
        self._must("sessions", session_namespace(row.app, row.user), "app")
        request_id = self._scoped_request_id(
            "create_session",
            row.id if session_id is not None else None,
            row.app,
            row.user,
            row.agent,
            row.metadata,
            row.state if state is not None else None,
            ttl,
        )
        await self._ready()
        return to_session(
            await self._once(self._backend.create_session(row, request_id=request_id))
        )

    async def get_session(self, session_id: str) -> Session:
        session_id = self._session_id(session_id)
        await self._ready()
        row = await self._backend.get_session(session_id)
        if row is None or not self._may_session(row) or session_expired(row, self._now()):
            raise NotFound(f"no session {session_id!r}", field="session_id")
        return to_session(row)

    async def list_sessions(
        self,
        *,
        app: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Session]:
        s = self._settings
        for name, value in (("app", app), ("user", user), ("agent", agent)):
            if value is not None:
                check.segment(value, name, s)
        check.limit(limit, s)
        after = cursors.decode(cursor)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("cursor was not made by list_sessions()", field="cursor")
        await self._ready()
        if self._access is not None and not self._access.anywhere("sessions"):
            return Page[Session](items=[], next_cursor=None)
        out: builtins.list[SessionRow] = []
        budget = _SCAN_PAGES * limit
        while True:
            rows = await self._backend.list_sessions(app, user, agent, after, limit, self._now())
            budget -= len(rows)
            for row in rows:
                after = row.id
                if self._may_session(row):
                    out.append(row)
                    if len(out) == limit:
                        return Page[Session](
                            items=[to_session(r) for r in out], next_cursor=cursors.encode(after)
                        )
            if len(rows) < limit:
                return Page[Session](items=[to_session(r) for r in out], next_cursor=None)
            if budget <= 0:
                return Page[Session](
                    items=[to_session(r) for r in out], next_cursor=cursors.encode(after)
                )

    async def delete_session(self, session_id: str) -> bool:
        session_id = self._session_id(session_id)
        request_id = self._scoped_request_id("delete_session", session_id)
        await self._ready()
        try:
            await self._visible_session(session_id)
        except NotFound:
            return False
        return await self._once(
            self._backend.delete_session(
                session_id, author=self.agent, now=self._now(), request_id=request_id
            )
        )

    async def append_messages(
        self, session_id: str, messages: Sequence[MessageIn | dict[str, Any]]
    ) -> builtins.list[Message]:
        session_id = self._session_id(session_id)
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
            raise InvalidInput("messages must be a list", field="messages")
        if not 1 <= len(messages) <= self._settings.max_batch_ops:
            raise InvalidInput(
                f"append 1 to {self._settings.max_batch_ops} messages at a time", field="messages"
            )
        new = [self._new_message(m, i) for i, m in enumerate(messages)]
        request_id = self._scoped_request_id("append_messages", session_id, new)
        await self._ready()
        await self._visible_session(session_id)
        rows = await self._once(
            self._backend.append_messages(
                session_id, new, author=self.agent, now=self._now(), request_id=request_id
            )
        )
        if any(m.tokens_in or m.tokens_out or m.cost for m in new):
            await self._count_usage(session_id, new)
        return [to_message(r) for r in rows]

    async def _count_usage(self, session_id: str, new: builtins.list[NewMessage]) -> None:
        """Add the messages' tokens and cost to the metrics, labelled by the session's
        app (read once per session and remembered)."""
        metrics = self.metrics
        app = metrics.session_apps.get(session_id)
        if app is None:
            row = await self._backend.get_session(session_id)
            app = metrics.app_label(row.app if row is not None else None)
            if len(metrics.session_apps) >= 10_000:
                metrics.session_apps.clear()
            metrics.session_apps[session_id] = app
        tokens_in = sum(m.tokens_in or 0 for m in new)
        tokens_out = sum(m.tokens_out or 0 for m in new)
        cost = sum(m.cost or 0.0 for m in new)
        if tokens_in:
            metrics.session_tokens.labels(app, "input").inc(tokens_in)
        if tokens_out:
            metrics.session_tokens.labels(app, "output").inc(tokens_out)
        if cost > 0:
            metrics.session_cost.labels(app).inc(cost)

    def _new_message(self, message: MessageIn | dict[str, Any], index: int) -> NewMessage:
        field = f"messages.{index}"
        if isinstance(message, dict):
            try:
                message = MessageIn.model_validate(message)
            except ValidationError as exc:
                raise check.invalid_input(exc, prefix=field) from None
        if not isinstance(message, MessageIn):
            raise InvalidInput("each message must be a MessageIn or dict", field=field)
        s = self._settings
        return NewMessage(
            role=check.segment(message.role, f"{field}.role", s),
            content=check.to_json(message.content, f"{field}.content", s.max_value_bytes),
            tokens_in=message.tokens_in,
            tokens_out=message.tokens_out,
            cost=message.cost,
            metadata=check.json_object(message.metadata, f"{field}.metadata", s.max_metadata_bytes),
        )

    async def get_messages(
        self, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[Message]:
        session_id = self._session_id(session_id)
        check.count(after, field="after")
        check.limit(limit, self._settings)
        await self._ready()
        await self._visible_session(session_id)
        rows = await self._backend.read_messages(session_id, after, limit, self._now())
        return [to_message(r) for r in rows]

    async def save_state(
        self, session_id: str, state: dict[str, Any], *, if_version: int | None = None
    ) -> Session:
        session_id = self._session_id(session_id)
        data = check.json_object(state, "state", self._settings.max_value_bytes)
        if if_version is not None:
            check.version(if_version)
        request_id = self._scoped_request_id("save_state", session_id, data, if_version)
        await self._ready()
        await self._visible_session(session_id)
        row = await self._once(
            self._backend.save_state(
                session_id,
                data,
                if_version,
                author=self.agent,
                now=self._now(),
                request_id=request_id,
            )
        )
        return to_session(row)
