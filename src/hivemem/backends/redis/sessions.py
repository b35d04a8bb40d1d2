"""Sessions of the Redis backend: the session hash, its message log, its expiry and the
global indexes that list sessions.

A session lives in the partition of ``_sessions/<id>`` (hash ``T:s:<id>``, messages
``T:msg:<id>``, see :mod:`.layout`), so each change, its event and its request-id
result are one script. Listing needs an order across partitions: the ids are also in
lexicographic sets of the ``{hm:sessions}`` slot (all, per app, per user, per agent).
An id enters them before its session is created and leaves them after it is deleted
or swept, so a listing never misses a session; it checks each id against the
session itself, so an entry left behind by a failed create is ignored.

Session TTL (sliding): a session with a ``ttl`` expires ``ttl`` seconds after its
``last_activity_at``. The scripts that move ``last_activity_at`` (append, state save)
refuse an expired session (NotFound, writing nothing) and otherwise move its place in
the partition's expiry set ``T:sexp`` (score = last_activity_at + ttl), which the
sweep reads to delete expired sessions without scanning every session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hivemem.backends.redis.engine import RedisEngine
from hivemem.backends.redis.layout import (
    SESSION_FIELDS,
    SESSIONS_TAG,
    message_from,
    meta_key,
    num,
    opt,
    session_from,
    session_partition,
    tag,
    unpack,
)
from hivemem.backends.rows import (
    MessageRow,
    NewMessage,
    SessionRow,
    session_expired,
    state_conflict,
)
from hivemem.errors import Conflict, NotFound

__all__ = ["RedisSessions", "session_indexes", "unindex_sessions"]


def session_indexes(app: str, user: str | None, agent: str | None) -> list[str]:
    """The keys of the global indexes that list a session of ``app``, ``user`` and
    ``agent`` (all in the ``{hm:sessions}`` slot)."""
    keys = [f"{SESSIONS_TAG}:all", f"{SESSIONS_TAG}:app:{app}"]
    if user is not None:
        keys.append(f"{SESSIONS_TAG}:user:{user}")
    if agent is not None:
        keys.append(f"{SESSIONS_TAG}:agent:{agent}")
    return keys


async def unindex_sessions(engine: RedisEngine, gone: Sequence[Sequence[bytes | None]]) -> None:
    """Remove deleted sessions, each ``(id, app, user, agent)`` (bytes; user and agent
    may be None), from the global indexes."""

    def text(b: bytes | None) -> str | None:
        return None if b is None else b.decode("utf-8")

    calls = []
    for sid, app, user, agent in gone:
        assert sid is not None and app is not None
        keys = session_indexes(app.decode("utf-8"), text(user), text(agent))
        calls.append(engine._script("session_index", keys, ["rem", sid.decode("utf-8")]))
    await asyncio.gather(*calls)


def _no_session(session_id: str) -> NotFound:
    return NotFound(f"no session {session_id!r}", field="session_id")


class RedisSessions(RedisEngine):
    """The session primitives of :class:`~.backend.RedisBackend`."""

    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        p = session_partition(row.id)
        args: list[Any] = [
            tag(p),
            row.id,
            "",
            "",
            row.app,
            opt(row.user),
            opt(row.agent),
            row.created_by,
            row.metadata,
            row.state,
            str(row.state_version),
            str(row.messages),
            str(row.turns),
            str(row.tokens_in),
            str(row.tokens_out),
            num(row.cost),
            num(row.started_at),
            num(row.last_activity_at),
            opt(None if row.ttl is None else num(row.ttl)),
        ]

        async def run(rk: str, ttl: str) -> Any:
            # The id goes into the (global) session indexes first, then the session is
            # created: list_sessions never misses a session, and it checks every indexed
            # id against the session itself, so an entry left by a failed create is
            # ignored.
            await self._script(
                "session_index",
                session_indexes(row.app, row.user, row.agent),
                ["add", row.id],
            )
            args[2], args[3] = rk, ttl
            return await self._script("create_session", [meta_key(p)], args)

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"conflict":
            raise Conflict(f"session {row.id!r} already exists", field="session_id")
        if reply[0] == b"ok":
            self.changes.notify()
        return session_from(unpack(reply[1]))

    async def _get_sessions(self, ids: Sequence[str]) -> list[SessionRow | None]:
        async def one(session_id: str) -> SessionRow | None:
            sk = f"{tag(session_partition(session_id))}:s:{session_id}"

            async def run() -> list[Any]:
                return list(await self.client.hmget(sk, list(SESSION_FIELDS)))

            h = await self._retrying(run, "get_session")
            if h[0] is None:
                return None
            return session_from([session_id.encode(), *h])

        return list(await asyncio.gather(*(one(i) for i in ids)))

    async def get_session(self, session_id: str) -> SessionRow | None:
        return (await self._get_sessions([session_id]))[0]

    async def list_sessions(
        self,
        app: str | None,
        user: str | None,
        agent: str | None,
        after: str | None,
        limit: int,
        now: float,
    ) -> list[SessionRow]:
        if app is not None:
            index = f"{SESSIONS_TAG}:app:{app}"
        elif user is not None:
            index = f"{SESSIONS_TAG}:user:{user}"
        elif agent is not None:
            index = f"{SESSIONS_TAG}:agent:{agent}"
        else:
            index = f"{SESSIONS_TAG}:all"
        out: list[SessionRow] = []
        start = "-" if after is None else "(" + after
        chunk = max(limit, 16)
        while len(out) < limit:
            lo = start

            async def page(lo: str = lo) -> list[Any]:
                return list(await self.client.zrangebylex(index, lo, "+", start=0, num=chunk))

            found = await self._retrying(page, "list_sessions")
            ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in found]
            for row in await self._get_sessions(ids):
                if (
                    row is not None
                    and (app is None or row.app == app)
                    and (user is None or row.user == user)
                    and (agent is None or row.agent == agent)
                    and not session_expired(row, now)
                ):
                    out.append(row)
            if len(ids) < chunk:
                break
            start = "(" + ids[-1]
        return out[:limit]

    async def delete_session(
        self, session_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> bool:
        p = session_partition(session_id)

        async def run(rk: str, ttl: str) -> Any:
            return await self._script(
                "delete_session", [meta_key(p)], [tag(p), session_id, rk, ttl, num(now), author]
            )

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"ok" and reply[1] == b"1":
            self.changes.notify()
            await unindex_sessions(self, [[session_id.encode(), *reply[2:5]]])
        return bool(reply[1] == b"1")

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> list[MessageRow]:
        p = session_partition(session_id)
        args: list[Any] = [
            tag(p),
            session_id,
            "",
            "",
            num(now),
            author,
            str(len(messages)),
            str(sum(m.role == "user" for m in messages)),
            str(sum(m.tokens_in for m in messages)),
            str(sum(m.tokens_out for m in messages)),
            num(sum(m.cost for m in messages)),
        ]
        for m in messages:
            args += [
                m.role,
                m.content,
                str(m.tokens_in),
                str(m.tokens_out),
                num(m.cost),
                m.metadata,
            ]

        async def run(rk: str, ttl: str) -> Any:
            args[2], args[3] = rk, ttl
            return await self._script("append_messages", [meta_key(p)], args)

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"notfound":
            raise _no_session(session_id)
        if reply[0] == b"ok":
            self.changes.notify()
        return [message_from(unpack(rec)) for rec in unpack(reply[1]) if rec is not None]

    async def read_messages(
        self, session_id: str, after: int, limit: int, now: float
    ) -> list[MessageRow]:
        p = session_partition(session_id)
        reply = await self._script(
            "read_messages",
            [meta_key(p)],
            [tag(p), session_id, str(after), str(limit), num(now)],
        )
        if reply[0] == b"notfound":
            raise _no_session(session_id)
        return [message_from(unpack(rec)) for rec in reply[1]]

    async def save_state(
        self,
        session_id: str,
        state: bytes,
        if_version: int | None,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> SessionRow:
        p = session_partition(session_id)
        args: list[Any] = [
            tag(p),
            session_id,
            "",
            "",
            state,
            "" if if_version is None else str(if_version),
            num(now),
            author,
        ]

        async def run(rk: str, ttl: str) -> Any:
            args[2], args[3] = rk, ttl
            return await self._script("save_state", [meta_key(p)], args)

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"notfound":
            raise _no_session(session_id)
        if reply[0] == b"conflict":
            raise state_conflict(session_id, int(reply[1]), if_version)
        if reply[0] == b"ok":
            self.changes.notify()
        return session_from(unpack(reply[1]))
