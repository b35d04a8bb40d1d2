"""SQLite backend: the embedded and service default.

- WAL journal, so readers never block the writer; several processes on one host
  may share one file (SQLite's own file locks serialise writers).
- ``synchronous=FULL`` by default: a commit is fsynced before it is acknowledged,
  so an acknowledged write survives ``kill -9`` and power loss (``NORMAL``
  survives ``kill -9`` only).
- Writes run on one writer thread with its own connection, inside
  ``BEGIN IMMEDIATE`` so the version check and the write see the same state;
  reads run on a small pool of reader threads. The event loop never blocks.
- Feed notification across processes: after each commit the writer writes one
  byte to ``<file>.notify``; every process watches that file with inotify and
  wakes its watchers. A slow safety poll (``feed_poll_seconds``) covers
  platforms without inotify. No tight polling loop.
- Event cursors are the feed table's AUTOINCREMENT ids; SQLite has one writer at
  a time, so id order is commit order and a cursor never skips a later commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hivemem.backends.base import (
    Backend,
    ChangeSignal,
    DeleteWrite,
    EventRow,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
)
from hivemem.config import Settings
from hivemem.errors import Conflict, CursorExpired, InvalidInput, NotFound, Unavailable

__all__ = ["SqliteBackend"]

T = TypeVar("T")

#: Most write jobs committed in one transaction by the writer thread.
_GROUP_COMMIT_MAX = 256

_MIGRATIONS: list[str] = [
    # 1: items, versions, sessions, messages, feed.
    """
    CREATE TABLE items (
        ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,
        author TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        expires_at REAL, text TEXT, metadata BLOB,
        PRIMARY KEY (ns, key)
    );
    CREATE INDEX items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE item_versions (
        ns TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL,
        author TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        expires_at REAL, text TEXT, metadata BLOB,
        PRIMARY KEY (ns, key, version)
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, app TEXT NOT NULL, user TEXT, agent TEXT,
        created_by TEXT NOT NULL, metadata BLOB NOT NULL, state BLOB NOT NULL,
        state_version INTEGER NOT NULL, messages INTEGER NOT NULL, turns INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost REAL NOT NULL,
        started_at REAL NOT NULL, last_activity_at REAL NOT NULL
    );
    CREATE INDEX sessions_app ON sessions (app, id);
    CREATE INDEX sessions_user ON sessions (user, id);
    CREATE INDEX sessions_agent ON sessions (agent, id);
    CREATE TABLE messages (
        session_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
        content BLOB NOT NULL, author TEXT NOT NULL, created_at REAL NOT NULL,
        tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost REAL NOT NULL,
        metadata BLOB NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, ns TEXT NOT NULL,
        key TEXT, version INTEGER, author TEXT NOT NULL, at REAL NOT NULL, data BLOB
    );
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
]

_ITEM_COLS = "ns, key, value, version, author, created_at, updated_at, expires_at, text, metadata"
_SESSION_COLS = (
    "id, app, user, agent, created_by, metadata, state, state_version, messages, turns, "
    "tokens_in, tokens_out, cost, started_at, last_activity_at"
)
_MESSAGE_COLS = (
    "session_id, seq, role, content, author, created_at, tokens_in, tokens_out, cost, metadata"
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
# Segment-aware prefix match: ns = p, or p/ <= ns < p0 ('0' follows '/' in ASCII).
_UNDER = "(ns = ? OR (ns >= ? AND ns < ?))"


def _under(prefix: str) -> tuple[str, str, str]:
    return (prefix, prefix + "/", prefix + "0")


def _item(row: Sequence[Any]) -> ItemRow:
    return ItemRow(*row)


def _event(row: Sequence[Any]) -> EventRow:
    return EventRow(str(row[0]), *row[1:])


class SqliteBackend(Backend):
    """Items, sessions and the feed in one SQLite database (a file or private memory).

    Args:
        path: a file path, or ``":memory:"`` for a private in-memory database
            (one connection, gone when closed).
        settings: ``sqlite_synchronous``, ``sqlite_busy_timeout_seconds``,
            ``sqlite_readers`` and ``feed_poll_seconds`` apply.
    """

    def __init__(self, path: str, settings: Settings) -> None:
        self.path = path
        self.memory = path == ":memory:"
        self.settings = settings
        self.changes = ChangeSignal()
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._write_conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]] = []
        self._pending_lock = threading.Lock()
        self._notify_fd: int | None = None
        self._inotify: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

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

    # Connections and threads -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.settings.sqlite_busy_timeout_seconds,
            cached_statements=256,
        )
        if not self.memory:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.settings.sqlite_synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(self.settings.sqlite_busy_timeout_seconds * 1000)}")
        with self._conn_lock:
            self._connections.append(conn)
        return conn

    def _reader_conn(self) -> sqlite3.Connection:
        if self.memory:
            assert self._write_conn is not None
            return self._write_conn
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise Unavailable("the sqlite store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, lambda: fn(self._reader_conn()))
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"sqlite store unavailable: {exc}") from exc

    def _commit_pending(self) -> None:
        """Run every queued write job in one transaction (group commit), on the writer thread.

        Each job runs inside its own SAVEPOINT: a job that raises (a Conflict, say)
        is rolled back alone and gets its exception; the others commit together,
        sharing one fsync. Jobs are queued before this task is submitted, so every
        job is taken by its own drain task or an earlier one.
        """
        conn = self._write_conn
        assert conn is not None
        with self._pending_lock:
            jobs, self._pending = (
                self._pending[:_GROUP_COMMIT_MAX],
                self._pending[_GROUP_COMMIT_MAX:],
            )
        if not jobs:
            return
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for fn, _ in jobs:
                    conn.execute("SAVEPOINT job")
                    try:
                        outcomes.append((True, fn(conn)))
                    except Exception as exc:
                        conn.execute("ROLLBACK TO job")
                        outcomes.append((False, exc))
                    conn.execute("RELEASE job")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            error = Unavailable(f"sqlite store unavailable: {exc}")
            for _, fut in jobs:
                fut.set_exception(error)
            return
        if self._notify_fd is not None:
            os.pwrite(self._notify_fd, b"\x01", 0)
        for (_, fut), (ok, value) in zip(jobs, outcomes, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        writer = self._writer
        if writer is None:
            raise Unavailable("the sqlite store is closed")
        fut: Future[T] = Future()
        with self._pending_lock:
            self._pending.append((fn, fut))
        writer.submit(self._commit_pending)
        result = await asyncio.wrap_future(fut)
        self.changes.notify()
        return result

    async def open(self) -> None:
        if self._writer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hivemem-sqlite-writer")
        if self.memory:
            self._readers = self._writer
        else:
            if not Path(self.path).parent.is_dir():
                await self.close()
                raise Unavailable(
                    f"cannot open sqlite store {self.path!r}: directory "
                    f"{str(Path(self.path).parent)!r} does not exist"
                )
            self._readers = ThreadPoolExecutor(
                self.settings.sqlite_readers, thread_name_prefix="hivemem-sqlite-reader"
            )
        loop = self._loop
        try:
            self._write_conn = await loop.run_in_executor(self._writer, self._connect)
            await loop.run_in_executor(self._writer, self._migrate)
        except sqlite3.Error as exc:
            await self.close()
            raise Unavailable(f"cannot open sqlite store {self.path!r}: {exc}") from exc
        if not self.memory:
            self._start_notifications()

    def _migrate(self) -> None:
        conn = self._write_conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS, start=1):
                if number > current:
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _start_notifications(self) -> None:
        notify_path = self.path + ".notify"
        self._notify_fd = os.open(notify_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            from inotify_simple import INotify, flags  # type: ignore[import-untyped]
        except ImportError:  # not Linux: the safety poll alone wakes watchers
            return
        inotify = INotify()
        inotify.add_watch(notify_path, flags.MODIFY)
        assert self._loop is not None
        self._loop.add_reader(inotify.fileno(), self._on_inotify)
        self._inotify = inotify

    def _on_inotify(self) -> None:
        with contextlib.suppress(OSError):
            self._inotify.read(timeout=0)
        self.changes.notify()

    async def close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        writer, readers = self._writer, self._readers
        self._writer = self._readers = None
        for pool in {id(p): p for p in (writer, readers) if p is not None}.values():
            pool.shutdown(wait=True)
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._write_conn = None
        if self._notify_fd is not None:
            os.close(self._notify_fd)
            self._notify_fd = None

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # Items -------------------------------------------------------------------------

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        def run(c: sqlite3.Connection) -> ItemRow | None:
            row = c.execute(
                f"SELECT {_ITEM_COLS} FROM items WHERE ns = ? AND key = ? AND {_LIVE}",
                (namespace, key, now),
            ).fetchone()
            return _item(row) if row else None

        return await self._read(run)

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
    ) -> list[ItemRow | bool]:
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
                    raise Conflict(
                        f"{w.namespace}/{w.key} is at version {current}, not {w.if_version}",
                        field=f"ops.{i}.if_version" if len(writes) > 1 else "if_version",
                        current_version=current,
                    )
                if isinstance(w, DeleteWrite):
                    if found is not None:
                        self._delete_item(c, w.namespace, w.key)
                        self._event(c, "item.deleted", w.namespace, w.key, current, author, now)
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
                c.execute(
                    f"INSERT OR REPLACE INTO items ({_ITEM_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
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
                if history_limit > 0:
                    c.execute(
                        f"INSERT OR REPLACE INTO item_versions ({_ITEM_COLS}) "
                        f"SELECT {_ITEM_COLS} FROM items WHERE ns = ? AND key = ?",
                        (w.namespace, w.key),
                    )
                    c.execute(
                        "DELETE FROM item_versions WHERE ns = ? AND key = ? AND version <= ?",
                        (w.namespace, w.key, row.version - history_limit),
                    )
                self._event(c, "item.put", w.namespace, w.key, row.version, author, now)
                results.append(row)
            return results

        return await self._write(run)

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

    @staticmethod
    def _delete_item(c: sqlite3.Connection, namespace: str, key: str) -> None:
        c.execute("DELETE FROM items WHERE ns = ? AND key = ?", (namespace, key))
        c.execute("DELETE FROM item_versions WHERE ns = ? AND key = ?", (namespace, key))

    def _expire(
        self, c: sqlite3.Connection, namespace: str, key: str, version: int, now: float
    ) -> None:
        self._delete_item(c, namespace, key)
        self._event(c, "item.expired", namespace, key, version, "hivemem", now)

    async def list_items(
        self, prefix: str, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        where, args = [_LIVE], list[Any]([now])
        if prefix:
            where.append(_UNDER)
            args.extend(_under(prefix))
        if after is not None:
            where.append("(ns, key) > (?, ?)")
            args.extend(after)
        sql = f"SELECT {_ITEM_COLS} FROM items WHERE {' AND '.join(where)} ORDER BY ns, key LIMIT ?"
        args.append(limit)
        return await self._read(lambda c: [_item(r) for r in c.execute(sql, args)])

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        where, args = [_LIVE], list[Any]([now])
        if prefix:
            where.append(_UNDER)
            args.extend(_under(prefix))
        sql = f"SELECT DISTINCT ns FROM items WHERE {' AND '.join(where)} ORDER BY ns"
        return await self._read(lambda c: [r[0] for r in c.execute(sql, args)])

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        def run(c: sqlite3.Connection) -> list[ItemRow]:
            live = c.execute(
                f"SELECT 1 FROM items WHERE ns = ? AND key = ? AND {_LIVE}", (namespace, key, now)
            ).fetchone()
            if live is None:
                return []
            return [
                _item(r)
                for r in c.execute(
                    f"SELECT {_ITEM_COLS} FROM item_versions WHERE ns = ? AND key = ? "
                    "ORDER BY version DESC LIMIT ?",
                    (namespace, key, limit),
                )
            ]

        return await self._read(run)

    async def sweep(self, now: float, events_before: float) -> tuple[int, int]:
        def run(c: sqlite3.Connection) -> tuple[int, int]:
            expired = c.execute(
                "SELECT ns, key, version FROM items WHERE expires_at IS NOT NULL "
                "AND expires_at <= ? LIMIT 1000",
                (now,),
            ).fetchall()
            for ns, key, version in expired:
                self._expire(c, ns, key, version, now)
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
            return len(expired), trimmed

        return await self._write(run)

    # Sessions ----------------------------------------------------------------------

    async def create_session(self, row: SessionRow) -> SessionRow:
        def run(c: sqlite3.Connection) -> SessionRow:
            try:
                c.execute(
                    f"INSERT INTO sessions ({_SESSION_COLS}) VALUES "
                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"session {row.id!r} already exists", field="session_id") from None
            self._event(
                c, "session.created", f"_sessions/{row.id}", None, 0, row.created_by, row.started_at
            )
            return row

        return await self._write(run)

    @staticmethod
    def _session(c: sqlite3.Connection, session_id: str) -> SessionRow | None:
        row = c.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return SessionRow(*row) if row else None

    @staticmethod
    def _no_session(session_id: str) -> NotFound:
        return NotFound(f"no session {session_id!r}", field="session_id")

    async def get_session(self, session_id: str) -> SessionRow | None:
        return await self._read(lambda c: self._session(c, session_id))

    async def list_sessions(
        self, app: str | None, user: str | None, agent: str | None, after: str | None, limit: int
    ) -> list[SessionRow]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("app", app), ("user", user), ("agent", agent)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_SESSION_COLS} FROM sessions {cond} ORDER BY id LIMIT ?"
        args.append(limit)
        return await self._read(lambda c: [SessionRow(*r) for r in c.execute(sql, args)])

    async def delete_session(self, session_id: str, *, author: str, now: float) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            if c.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                return False
            c.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            self._event(c, "session.deleted", f"_sessions/{session_id}", None, None, author, now)
            return True

        return await self._write(run)

    async def append_messages(
        self, session_id: str, messages: Sequence[NewMessage], *, author: str, now: float
    ) -> list[MessageRow]:
        def run(c: sqlite3.Connection) -> list[MessageRow]:
            found = c.execute(
                "UPDATE sessions SET messages = messages + ?, turns = turns + ?, "
                "tokens_in = tokens_in + ?, tokens_out = tokens_out + ?, cost = cost + ?, "
                "last_activity_at = ? WHERE id = ? RETURNING messages",
                (
                    len(messages),
                    sum(m.role == "user" for m in messages),
                    sum(m.tokens_in for m in messages),
                    sum(m.tokens_out for m in messages),
                    sum(m.cost for m in messages),
                    now,
                    session_id,
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
                f"INSERT INTO messages ({_MESSAGE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
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

        return await self._write(run)

    async def read_messages(self, session_id: str, after: int, limit: int) -> list[MessageRow]:
        def run(c: sqlite3.Connection) -> list[MessageRow]:
            if c.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                raise self._no_session(session_id)
            return [
                MessageRow(*r)
                for r in c.execute(
                    f"SELECT {_MESSAGE_COLS} FROM messages WHERE session_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (session_id, after, limit),
                )
            ]

        return await self._read(run)

    async def save_state(
        self, session_id: str, state: bytes, if_version: int | None, *, author: str, now: float
    ) -> SessionRow:
        def run(c: sqlite3.Connection) -> SessionRow:
            found = c.execute(
                "SELECT state_version FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if found is None:
                raise self._no_session(session_id)
            if if_version is not None and if_version != found[0]:
                raise Conflict(
                    f"session {session_id!r} state is at version {found[0]}, not {if_version}",
                    field="if_version",
                    current_version=found[0],
                )
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

        return await self._write(run)

    # Feed --------------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes, *, author: str, now: float) -> EventRow:
        def run(c: sqlite3.Connection) -> EventRow:
            cursor = self._event(c, "publish", channel, None, None, author, now, payload)
            return EventRow(str(cursor), "publish", channel, None, None, author, now, payload)

        return await self._write(run)

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
            where.append(_UNDER)
            args.extend(_under(prefix))
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

        return await self._read(run)

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
        return [_event(r) for r in c.execute(sql, args)]

    @staticmethod
    def _head(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    async def head(self) -> str:
        return str(await self._read(self._head))
