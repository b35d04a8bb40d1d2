"""The SQLite backend: items, sessions and the feed as SQL over :class:`SqliteEngine`.

Event cursors are the feed table's AUTOINCREMENT ids. SQLite has one writer at
a time, so id order is commit order and a reader that has passed a cursor never
later finds an event below it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hivemem.backends.base import Backend
from hivemem.backends.results import decode_stored_result, encode_stored_result, split_request_id
from hivemem.backends.rows import (
    CheckWrite,
    DeleteWrite,
    EventRow,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
    key_range,
    prefix_range,
    state_conflict,
    version_conflict,
)
from hivemem.backends.signals import ChangeSignal
from hivemem.backends.sqlite.engine import SqliteEngine
from hivemem.backends.sqlite.schema import (
    ITEM_COLS,
    LIVE,
    MESSAGE_COLS,
    SESSION_COLS,
    SESSION_LIVE,
    UNDER,
    event_row,
    item_row,
    session_row,
)
from hivemem.backends.sqlite.search import LEXICAL_BATCH, SearchMixin, index_put, index_remove
from hivemem.backends.sqlite.tasks import TasksMixin
from hivemem.config import Settings
from hivemem.errors import Conflict, CursorExpired, InvalidInput, NotFound

__all__ = ["SqliteBackend"]

T = TypeVar("T")

#: Most expired items, and most expired sessions, one sweep removes.
SWEEP_BATCH = 1000
#: Ids of up to ``?`` (2nd) sessions expired at ``?`` (1st). The expression and condition
#: are those of the partial index ``sessions_expiry``, so it finds them without reading
#: the others.
EXPIRED_SESSIONS = (
    "SELECT id FROM sessions WHERE ttl IS NOT NULL AND last_activity_at + ttl <= ? LIMIT ?"
)


def once(
    request_id: str | None, now: float, run: Callable[[sqlite3.Connection], T]
) -> Callable[[sqlite3.Connection], T]:
    """Wrap a write job so that, with a request id, it runs at most once: a stored
    result is returned instead of writing again; a new result is stored with the write.

    ``request_id`` may end in ``#<fingerprint>`` (see
    :func:`~hivemem.backends.results.split_request_id`): the row is keyed by the id, the
    fingerprint is stored in front of the result bytes (``#<fp>\\n``; rows stored
    without one start with ``{``), and a repeat with another fingerprint raises
    RequestIdReused before ``run`` writes anything."""
    rid, fingerprint = split_request_id(request_id)
    if rid is None:
        return run

    def wrapped(c: sqlite3.Connection) -> T:
        found = c.execute("SELECT result FROM requests WHERE id = ?", (rid,)).fetchone()
        if found is not None:
            result: T = decode_stored_result(bytes(found[0]), fingerprint)
            return result
        result = run(c)
        c.execute(
            "INSERT INTO requests (id, result, at) VALUES (?, ?, ?)",
            (rid, encode_stored_result(result, fingerprint), now),
        )
        return result

    return wrapped


def _live_item(
    namespace: str, key: str, now: float
) -> Callable[[sqlite3.Connection], ItemRow | None]:
    """The read of one live item (a primary-key lookup)."""

    def run(c: sqlite3.Connection) -> ItemRow | None:
        row = c.execute(
            f"SELECT {ITEM_COLS} FROM items WHERE ns = ? AND key = ? AND {LIVE}",
            (namespace, key, now),
        ).fetchone()
        return item_row(row) if row else None

    return run


#: Writes an item's current version: inserted, or updated in place when the key exists.
_UPSERT_ITEM = (
    f"INSERT INTO items ({ITEM_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
    "author = excluded.author, created_at = excluded.created_at, "
    "updated_at = excluded.updated_at, expires_at = excluded.expires_at, "
    "text = excluded.text, metadata = excluded.metadata"
)


class SqliteBackend(SearchMixin, TasksMixin, Backend):
    """Items, sessions and the feed in one SQLite database (a file or private memory).

    Args:
        path: a file path, or ``":memory:"`` for a private in-memory database
            (one connection, gone when closed).
        settings: ``sqlite_synchronous``, ``sqlite_busy_timeout_seconds``,
            ``sqlite_readers`` and ``feed_poll_seconds`` apply.
    """

    def __init__(self, path: str, settings: Settings) -> None:
        self.path = path
        self.settings = settings
        self.changes = ChangeSignal()
        self._engine = SqliteEngine(path, settings, self.changes)

    def __repr__(self) -> str:
        return f"SqliteBackend({self.path!r})"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> SqliteBackend:
        """Build from ``sqlite:///rel.db``, ``sqlite:////abs.db`` or ``sqlite://:memory:``.

        Raises:
            InvalidInput: the URL has no path (field ``url``).
        """
        rest = url.split(":", 1)[1]
        if rest in ("//:memory:", "///:memory:", ":memory:"):
            return cls(":memory:", settings)
        if not rest.startswith("///") or len(rest) <= 3:
            raise InvalidInput(
                f"bad sqlite URL {url!r}: use sqlite:///relative.db, sqlite:////absolute.db "
                "or sqlite://:memory:",
                field="url",
            )
        return cls(rest[3:], settings)

    def _job(
        self, request_id: str | None, now: float, run: Callable[[sqlite3.Connection], T]
    ) -> Callable[[sqlite3.Connection], T]:
        return once(request_id, now, run)

    async def open(self) -> None:
        self._lexical_closed = False
        await self._engine.open()

    async def close(self) -> None:
        await self._close_lexical()
        await self._engine.close()

    async def ping(self) -> None:
        await self._engine.read(lambda c: c.execute("SELECT 1").fetchone())

    # Items -------------------------------------------------------------------------

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        return await self._engine.read_point(_live_item(namespace, key, now))

    def get_item_here(self, namespace: str, key: str, now: float) -> tuple[bool, ItemRow | None]:
        return self._engine.read_point_here(_live_item(namespace, key, now))

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        job = self._items_job(writes, author, now, history_limit, request_id)
        results = await self._engine.write(job)
        self._lexical_due()
        return results

    def can_write_here(self) -> bool:
        return not self._engine.memory

    def write_items_here(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> tuple[bool, list[ItemRow | bool] | None]:
        job = self._items_job(writes, author, now, history_limit, request_id)
        done = self._engine.write_here(job)
        if self._lexical_marks >= LEXICAL_BATCH:
            self._engine.call_soon(self._lexical_due)
        return done

    def _items_job(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None,
    ) -> Callable[[sqlite3.Connection], list[ItemRow | bool]]:
        """The write job of :meth:`write_items`: a function of the write connection,
        run inside its transaction."""

        def run(c: sqlite3.Connection) -> list[ItemRow | bool]:
            results: list[ItemRow | bool] = []
            for i, w in enumerate(writes):
                found = c.execute(
                    "SELECT version, created_at, expires_at FROM items WHERE ns = ? AND key = ?",
                    (w.namespace, w.key),
                ).fetchone()
                if found is not None and found[2] is not None and found[2] <= now:
                    self._expire(c, w.namespace, w.key, found[0], now)
                    found = None
                current = 0 if found is None else found[0]
                # A conditional delete needs something to delete: absent is a mismatch.
                mismatch = w.if_version is not None and (
                    w.if_version != current or (found is None and isinstance(w, DeleteWrite))
                )
                if mismatch:
                    raise version_conflict(w, current, i, len(writes))
                if isinstance(w, CheckWrite):
                    results.append(True)
                    continue
                if isinstance(w, DeleteWrite):
                    if found is not None:
                        self._delete_item(c, w.namespace, w.key)
                        self._event(
                            c, w.event or "item.deleted", w.namespace, w.key, current, author, now
                        )
                    results.append(found is not None)
                    continue
                row = ItemRow(
                    w.namespace,
                    w.key,
                    w.value,
                    current + 1,
                    author,
                    now if found is None else found[1],
                    now,
                    w.expires_at,
                    w.text,
                    w.metadata,
                )
                if history_limit > 1 and found is not None:
                    # The version being replaced joins the history; the current version
                    # lives in ``items`` alone (history = it + the older ones here).
                    c.execute(
                        f"INSERT OR REPLACE INTO item_versions ({ITEM_COLS}) "
                        f"SELECT {ITEM_COLS} FROM items WHERE ns = ? AND key = ?",
                        (w.namespace, w.key),
                    )
                    if row.version > history_limit:  # else nothing is old enough to go
                        c.execute(
                            "DELETE FROM item_versions WHERE ns = ? AND key = ? AND version <= ?",
                            (w.namespace, w.key, row.version - history_limit),
                        )
                # An update in place: the row keeps its rowid, so neither the key index
                # nor another table page is written (INSERT OR REPLACE would delete it
                # and insert it again at the end of the table).
                c.execute(
                    _UPSERT_ITEM,
                    (
                        row.namespace,
                        row.key,
                        row.value,
                        row.version,
                        row.author,
                        row.created_at,
                        row.updated_at,
                        row.expires_at,
                        row.text,
                        row.metadata,
                    ),
                )
                if index_put(c, w.namespace, w.key, row.version, w.index_text, w.vector, w.model):
                    self._lexical_marks += 1
                self._event(c, w.event or "item.put", w.namespace, w.key, row.version, author, now)
                results.append(row)
            return results

        return once(request_id, now, run)

    @staticmethod
    def _event(
        c: sqlite3.Connection,
        type_: str,
        namespace: str,
        key: str | None,
        version: int | None,
        author: str,
        now: float,
        data: bytes | None = None,
    ) -> int:
        cur = c.execute(
            "INSERT INTO events (type, ns, key, version, author, at, data) VALUES (?,?,?,?,?,?,?)",
            (type_, namespace, key, version, author, now, data),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _delete_item(self, c: sqlite3.Connection, namespace: str, key: str) -> None:
        c.execute("DELETE FROM items WHERE ns = ? AND key = ?", (namespace, key))
        c.execute("DELETE FROM item_versions WHERE ns = ? AND key = ?", (namespace, key))
        if index_remove(c, namespace, key):
            self._lexical_marks += 1

    def _expire(
        self, c: sqlite3.Connection, namespace: str, key: str, version: int, now: float
    ) -> None:
        self._delete_item(c, namespace, key)
        self._event(c, "item.expired", namespace, key, version, "hivemem", now)

    async def list_items(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        limit: int,
        now: float,
        *,
        key_prefix: str | None = None,
    ) -> list[ItemRow]:
        where, args = [LIVE], list[Any]([now])
        if key_prefix is not None:
            low, high = key_range(key_prefix)
            where.append("ns = ? AND key >= ?")
            args.extend((prefix, low))
            if high is not None:
                where.append("key < ?")
                args.append(high)
        elif prefix:
            where.append(UNDER)
            args.extend(prefix_range(prefix))
        if after is not None:
            where.append("(ns, key) > (?, ?)")
            args.extend(after)
        sql = f"SELECT {ITEM_COLS} FROM items WHERE {' AND '.join(where)} ORDER BY ns, key LIMIT ?"
        args.append(limit)
        return await self._engine.read(lambda c: [item_row(r) for r in c.execute(sql, args)])

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        where, args = [LIVE], list[Any]([now])
        if prefix:
            where.append(UNDER)
            args.extend(prefix_range(prefix))
        sql = f"SELECT DISTINCT ns FROM items WHERE {' AND '.join(where)} ORDER BY ns"
        return await self._engine.read(lambda c: [r[0] for r in c.execute(sql, args)])

    async def namespace_counts(self, prefix: str, now: float) -> list[tuple[str, int]]:
        where, args = [LIVE], list[Any]([now])
        if prefix:
            where.append(UNDER)
            args.extend(prefix_range(prefix))
        sql = f"SELECT ns, count(*) FROM items WHERE {' AND '.join(where)} GROUP BY ns ORDER BY ns"
        return await self._engine.read(lambda c: [(r[0], r[1]) for r in c.execute(sql, args)])

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        def run(c: sqlite3.Connection) -> list[ItemRow]:
            current = c.execute(
                f"SELECT {ITEM_COLS} FROM items WHERE ns = ? AND key = ? AND {LIVE}",
                (namespace, key, now),
            ).fetchone()
            if current is None or limit < 1:
                return []
            head = item_row(current)
            return [head] + [
                item_row(r)
                for r in c.execute(
                    f"SELECT {ITEM_COLS} FROM item_versions WHERE ns = ? AND key = ? "
                    "AND version < ? ORDER BY version DESC LIMIT ?",
                    (namespace, key, head.version, limit - 1),
                )
            ]

        return await self._engine.read(run)

    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        def run(c: sqlite3.Connection) -> tuple[int, int]:
            expired = c.execute(
                "SELECT ns, key, version FROM items WHERE expires_at IS NOT NULL "
                "AND expires_at <= ? LIMIT ?",
                (now, SWEEP_BATCH),
            ).fetchall()
            for ns, key, version in expired:
                self._expire(c, ns, key, version, now)
            sessions = c.execute(EXPIRED_SESSIONS, (now, SWEEP_BATCH)).fetchall()
            for (session_id,) in sessions:
                self._drop_session(c, session_id, "session.expired", "hivemem", now)
            last = c.execute(
                "SELECT MAX(id) FROM events WHERE at < ?", (events_before,)
            ).fetchone()[0]
            trimmed = 0
            if last is not None:
                trimmed = c.execute("DELETE FROM events WHERE id <= ?", (last,)).rowcount
                c.execute(
                    "INSERT INTO meta (name, value) VALUES ('trimmed_through', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
                    (last,),
                )
            c.execute("DELETE FROM requests WHERE at < ?", (requests_before,))
            return len(expired) + len(sessions), trimmed

        swept = await self._engine.write(run)
        self._lexical_due()
        return swept

    # Sessions ----------------------------------------------------------------------

    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        def run(c: sqlite3.Connection) -> SessionRow:
            try:
                c.execute(
                    f"INSERT INTO sessions ({SESSION_COLS}) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        row.id,
                        row.app,
                        row.user,
                        row.agent,
                        row.created_by,
                        row.metadata,
                        row.state,
                        row.state_version,
                        row.messages,
                        row.turns,
                        row.tokens_in,
                        row.tokens_out,
                        row.cost,
                        row.started_at,
                        row.last_activity_at,
                        row.ttl,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"session {row.id!r} already exists", field="session_id") from None
            self._event(
                c, "session.created", f"_sessions/{row.id}", None, 0, row.created_by, row.started_at
            )
            return row

        return await self._engine.write(once(request_id, row.started_at, run))

    @staticmethod
    def _session(c: sqlite3.Connection, session_id: str) -> SessionRow | None:
        row = c.execute(
            f"SELECT {SESSION_COLS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return session_row(row) if row else None

    @staticmethod
    def _no_session(session_id: str) -> NotFound:
        return NotFound(f"no session {session_id!r}", field="session_id")

    async def get_session(self, session_id: str) -> SessionRow | None:
        return await self._engine.read_point(lambda c: self._session(c, session_id))

    async def list_sessions(
        self,
        app: str | None,
        user: str | None,
        agent: str | None,
        after: str | None,
        limit: int,
        now: float,
    ) -> list[SessionRow]:
        where: list[str] = [SESSION_LIVE]
        args: list[Any] = [now]
        for column, value in (("app", app), ("user", user), ("agent", agent)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        sql = f"SELECT {SESSION_COLS} FROM sessions WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        args.append(limit)
        return await self._engine.read(lambda c: [session_row(r) for r in c.execute(sql, args)])

    async def delete_session(
        self, session_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            live = c.execute(
                f"SELECT 1 FROM sessions WHERE id = ? AND {SESSION_LIVE}", (session_id, now)
            ).fetchone()
            if live is None:  # absent, or expired: the sweeper removes it
                return False
            self._drop_session(c, session_id, "session.deleted", author, now)
            return True

        return await self._engine.write(once(request_id, now, run))

    def _drop_session(
        self, c: sqlite3.Connection, session_id: str, type_: str, author: str, now: float
    ) -> None:
        """Delete a session and its messages, with event ``type_`` on ``_sessions/<id>``."""
        c.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        c.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
        self._event(c, type_, f"_sessions/{session_id}", None, None, author, now)

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> list[MessageRow]:
        def run(c: sqlite3.Connection) -> list[MessageRow]:
            found = c.execute(
                "UPDATE sessions SET messages = messages + ?, turns = turns + ?, "
                "tokens_in = tokens_in + ?, tokens_out = tokens_out + ?, cost = cost + ?, "
                f"last_activity_at = ? WHERE id = ? AND {SESSION_LIVE} RETURNING messages",
                (
                    len(messages),
                    sum(m.role == "user" for m in messages),
                    sum(m.tokens_in for m in messages),
                    sum(m.tokens_out for m in messages),
                    sum(m.cost for m in messages),
                    now,
                    session_id,
                    now,
                ),
            ).fetchone()
            if found is None:
                raise self._no_session(session_id)
            first = found[0] - len(messages) + 1
            rows = [
                MessageRow(
                    session_id,
                    first + i,
                    m.role,
                    m.content,
                    author,
                    now,
                    m.tokens_in,
                    m.tokens_out,
                    m.cost,
                    m.metadata,
                )
                for i, m in enumerate(messages)
            ]
            c.executemany(
                f"INSERT INTO messages ({MESSAGE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.session_id,
                        r.seq,
                        r.role,
                        r.content,
                        r.author,
                        r.created_at,
                        r.tokens_in,
                        r.tokens_out,
                        r.cost,
                        r.metadata,
                    )
                    for r in rows
                ],
            )
            self._event(
                c, "session.messages", f"_sessions/{session_id}", None, found[0], author, now
            )
            return rows

        return await self._engine.write(once(request_id, now, run))

    async def read_messages(
        self, session_id: str, after: int, limit: int, now: float
    ) -> list[MessageRow]:

        def run(c: sqlite3.Connection) -> list[MessageRow]:
            live = c.execute(
                f"SELECT 1 FROM sessions WHERE id = ? AND {SESSION_LIVE}", (session_id, now)
            ).fetchone()
            if live is None:
                raise self._no_session(session_id)
            return [
                MessageRow(*r)
                for r in c.execute(
                    f"SELECT {MESSAGE_COLS} FROM messages WHERE session_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (session_id, after, limit),
                )
            ]

        return await self._engine.read(run)

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
        def run(c: sqlite3.Connection) -> SessionRow:
            found = c.execute(
                f"SELECT state_version FROM sessions WHERE id = ? AND {SESSION_LIVE}",
                (session_id, now),
            ).fetchone()
            if found is None:
                raise self._no_session(session_id)
            if if_version is not None and if_version != found[0]:
                raise state_conflict(session_id, found[0], if_version)
            c.execute(
                "UPDATE sessions SET state = ?, state_version = state_version + 1, "
                "last_activity_at = ? WHERE id = ?",
                (state, now, session_id),
            )
            self._event(
                c, "session.state", f"_sessions/{session_id}", None, found[0] + 1, author, now
            )
            row = self._session(c, session_id)
            assert row is not None
            return row

        return await self._engine.write(once(request_id, now, run))

    # Feed --------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        def run(c: sqlite3.Connection) -> EventRow:
            cursor = self._event(c, "publish", channel, None, None, author, now, payload)
            return EventRow(str(cursor), "publish", channel, None, None, author, now, payload)

        return await self._engine.write(once(request_id, now, run))

    @staticmethod
    def _parse_cursor(after: str | None) -> int:
        if after is None:
            return 0
        if not after.isascii() or not after.isdigit() or len(after) > 19:
            raise InvalidInput(f"{after!r} is not a feed cursor of this store", field="after")
        return int(after)

    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        start = self._parse_cursor(after)
        where, args = ["id > ?"], list[Any]([start])
        if prefix:
            where.append(UNDER)
            args.extend(prefix_range(prefix))
        sql = (
            "SELECT id, type, ns, key, version, author, at, data FROM events "
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        )
        args.append(limit)

        def run(c: sqlite3.Connection) -> tuple[list[EventRow], str]:
            c.execute("BEGIN")  # one snapshot for the rows and the head
            try:
                rows = self._events_in(c, start, sql, args)
                if len(rows) == limit:
                    return rows, rows[-1].cursor
                return rows, str(max(start, self._head(c)))
            finally:
                c.execute("COMMIT")

        return await self._engine.read(run)

    @staticmethod
    def _events_in(
        c: sqlite3.Connection, start: int, sql: str, args: Sequence[Any]
    ) -> list[EventRow]:
        if start > 0:
            trimmed = c.execute("SELECT value FROM meta WHERE name = 'trimmed_through'").fetchone()
            if trimmed is not None and start < trimmed[0]:
                raise CursorExpired(
                    f"events after cursor {start} were trimmed (retention); "
                    f"resume from {trimmed[0]} or later",
                    field="after",
                )
        return [event_row(r) for r in c.execute(sql, args)]

    @staticmethod
    def _head(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    async def head(self) -> str:
        return str(await self._engine.read_point(self._head))
