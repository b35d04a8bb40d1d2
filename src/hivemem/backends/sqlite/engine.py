"""The SQLite engine: connections, threads, group commit and change notification.

- WAL journal, so readers never block the writer; several processes on one host
  may share one file (SQLite's own file locks serialise writers).
- ``synchronous=FULL`` by default: a commit is fsynced before it is acknowledged,
  so an acknowledged write survives ``kill -9`` and power loss (``NORMAL``
  survives ``kill -9`` only).
- Writes run on one writer thread with group commit: every queued write job
  runs in one ``BEGIN IMMEDIATE`` transaction, each in its own SAVEPOINT, so one
  job's error rolls back that job alone and the rest share one fsync. A
  :class:`~hivemem.SyncHive` caller's item write runs in its own thread instead when
  the writer is idle (:meth:`SqliteEngine.write_here`), under the same commit lock.
- Point reads (one row by primary key) run inline on the event loop's thread
  through a connection that never waits for a lock: a thread hop costs more
  than the query. If SQLite reports the database busy, the read goes to a reader
  thread instead. Scans run on a pool of reader threads.
- Change notification across processes: after each commit the writer writes one
  byte to ``<file>.notify``; every process watches that file with inotify and
  wakes its watchers. A slow safety poll covers platforms without inotify.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hivemem.backends.signals import ChangeSignal
from hivemem.backends.sqlite.schema import MIGRATIONS, SLOW_MIGRATIONS
from hivemem.config import Settings
from hivemem.errors import Unavailable

T = TypeVar("T")

log = logging.getLogger("hivemem.sqlite")

#: Most write jobs committed in one transaction by the writer thread.
GROUP_COMMIT_MAX = 256
#: Most calling threads with a point-read connection of their own (one per thread).
HERE_CONNECTIONS = 64


#: A queued write job: the function, the future its caller awaits, and that caller's loop.
_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Hand each job of a group its outcome, on the caller's event loop (one wake-up of
    the loop per group, not one per job). A caller that gave up waiting (a cancelled
    await cancels its future) gets nothing; its job ran: a cancelled write may apply."""
    for fut, ok, value in outcomes:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class SqliteEngine:
    """Runs functions of a ``sqlite3.Connection`` for the backend, off or on the loop.

    Args:
        path: a file path, or ``":memory:"`` for a private in-memory database
            (one connection on one thread, gone when closed).
        settings: ``sqlite_synchronous``, ``sqlite_busy_timeout_seconds`` and
            ``sqlite_readers`` apply.
        changes: the signal raised after each local commit and each notification
            from another process.
    """

    def __init__(self, path: str, settings: Settings, changes: ChangeSignal) -> None:
        self.path = path
        self.memory = path == ":memory:"
        self.settings = settings
        self.changes = changes
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._write_conn: sqlite3.Connection | None = None
        self._inline_conn: sqlite3.Connection | None = None
        #: Point-read connections of calling threads (SyncHive), per thread and opening.
        self._here = threading.local()
        self._here_count = 0
        self._opening = 0
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()
        #: Held while a transaction runs on the write connection: by the writer thread
        #: for each group, by a calling thread for a write of its own (:meth:`write_here`).
        self._commit_lock = threading.Lock()
        #: A drain of ``_pending`` is queued on the writer thread (or running and not yet
        #: past taking its jobs): a write queues another only when none is.
        self._drain_queued = False
        self._notify_fd: int | None = None
        self._inotify: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle ---------------------------------------------------------------------

    def _connect(self, busy_timeout: float | None = None) -> sqlite3.Connection:
        timeout = (
            self.settings.sqlite_busy_timeout_seconds if busy_timeout is None else busy_timeout
        )
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=timeout,
            cached_statements=256,
        )
        if not self.memory:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.settings.sqlite_synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        with self._conn_lock:
            self._connections.append(conn)
        return conn

    async def open(self) -> None:
        """Start the threads, connect, migrate the schema and start notifications.

        Raises:
            Unavailable: the file cannot be opened or its directory does not exist.
        """
        if self._writer is not None:
            return
        if not self.memory and not Path(self.path).parent.is_dir():
            raise Unavailable(
                f"cannot open sqlite store {self.path!r}: directory "
                f"{str(Path(self.path).parent)!r} does not exist"
            )
        self._loop = loop = asyncio.get_running_loop()
        self._opening += 1
        self._here_count = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hivemem-sqlite-writer")
        self._readers = (
            self._writer
            if self.memory
            else ThreadPoolExecutor(
                self.settings.sqlite_readers, thread_name_prefix="hivemem-sqlite-reader"
            )
        )
        try:
            self._write_conn = await loop.run_in_executor(self._writer, self._connect)
            await loop.run_in_executor(self._writer, self._migrate)
            if not self.memory:
                self._inline_conn = self._connect(busy_timeout=0)
        except sqlite3.Error as exc:
            await self.close()
            raise Unavailable(f"cannot open sqlite store {self.path!r}: {exc}") from exc
        if not self.memory:
            self._start_notifications()

    def _migrate(self) -> None:
        conn = self._write_conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            upgrade = 0 < current < len(MIGRATIONS)
            if upgrade:
                slow = [note for n, note in SLOW_MIGRATIONS.items() if n > current]
                log.warning(
                    "upgrading the store %s from schema %d to %d%s",
                    self.path,
                    current,
                    len(MIGRATIONS),
                    "".join(f"; {note}" for note in slow),
                )
            for number, script in enumerate(MIGRATIONS, start=1):
                if number > current:
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if upgrade:
            log.warning(
                "upgraded the store %s to schema %d in %.1f s",
                self.path,
                len(MIGRATIONS),
                time.monotonic() - started,
            )

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
        """Stop notifications and threads and close every connection."""
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        writer, readers = self._writer, self._readers
        self._writer = self._readers = None
        for pool in {id(p): p for p in (writer, readers) if p is not None}.values():
            pool.shutdown(wait=True)
        with self._commit_lock, self._conn_lock:  # no write of a calling thread runs
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._write_conn = self._inline_conn = None
        if self._notify_fd is not None:
            os.close(self._notify_fd)
            self._notify_fd = None

    # Reads -------------------------------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        if self.memory:
            assert self._write_conn is not None
            return self._write_conn
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on a reader thread. Raises Unavailable if the store fails."""
        if self._readers is None:
            raise Unavailable("the sqlite store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, lambda: fn(self._reader_conn()))
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"sqlite store unavailable: {exc}") from exc

    async def read_point(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short read (a primary-key lookup) inline; see the module notes."""
        conn = self._inline_conn
        if conn is None:
            return await self.read(fn)
        try:
            return fn(conn)
        except sqlite3.OperationalError:
            return await self.read(fn)

    def read_point_here(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """Run a short read (a primary-key lookup) in the calling thread, which is not the
        event loop's (a :class:`~hivemem.SyncHive` caller), through that thread's own
        connection, which never waits for a lock: a hop to the loop's thread and back
        costs ten times the query. Returns (True, result), or (False, None) when it
        cannot: an in-memory store, a closed one, the file busy, or more than
        :data:`HERE_CONNECTIONS` threads already reading this way; the caller then goes
        through the event loop."""
        if self.memory or self._writer is None:
            return False, None
        here = self._here
        conn: sqlite3.Connection | None = getattr(here, "conn", None)
        if conn is None or getattr(here, "opening", None) != self._opening:
            with self._conn_lock:
                if self._here_count >= HERE_CONNECTIONS:
                    return False, None
                self._here_count += 1
            conn = self._connect(busy_timeout=0)
            here.conn, here.opening = conn, self._opening
        try:
            return True, fn(conn)
        except sqlite3.Error:  # busy, or closed by close() meanwhile
            return False, None

    # Writes ------------------------------------------------------------------------

    def _commit_pending(self) -> None:
        """Run the queued write jobs in one transaction (group commit), on the writer thread.

        At most one drain is queued at a time (:meth:`write` queues one only when none
        is): jobs queued while a group commits form the next group. Outcomes go back to
        each caller's loop in one call per loop and group (:func:`_deliver`).
        """
        while True:
            with self._pending_lock:
                jobs = self._pending[:GROUP_COMMIT_MAX]
                del self._pending[:GROUP_COMMIT_MAX]
                more = self._drain_queued = bool(self._pending)
            if jobs:
                self._commit_group(jobs)
            if not more:
                return
            # More than a group was queued: the next drain goes behind what else waits
            # for this thread (an in-memory store's reads run here too), unless the
            # engine is closing, when this thread finishes the queue itself.
            writer = self._writer
            if writer is not None:
                with contextlib.suppress(RuntimeError):  # shut down meanwhile
                    writer.submit(self._commit_pending)
                    return

    def _commit_group(self, jobs: list[_Job]) -> None:
        """Commit ``jobs`` in one transaction (:meth:`_run_group`) and send each its
        outcome on its caller's loop."""
        with self._commit_lock:
            outcomes = self._run_group([fn for fn, _, _ in jobs])
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, fut, loop), (ok, value) in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, done in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits
                loop.call_soon_threadsafe(_deliver, done)

    def _run_group(self, jobs: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """Run ``jobs`` in one transaction, each in its own SAVEPOINT (a lone job
        without one), and commit it; each job's (ok, result or exception). Called with
        the commit lock held."""
        conn = self._write_conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if len(jobs) == 1:  # alone: its error rolls back the transaction itself
                    try:
                        outcomes.append((True, jobs[0](conn)))
                    except Exception as exc:
                        conn.execute("ROLLBACK")
                        outcomes.append((False, exc))
                else:
                    for fn in jobs:
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
            if conn.in_transaction:
                conn.execute("COMMIT")
                if self._notify_fd is not None:
                    os.pwrite(self._notify_fd, b"\x01", 0)
        except sqlite3.Error as exc:
            error = Unavailable(f"sqlite store unavailable: {exc}")
            outcomes = [(False, error)] * len(jobs)
        return outcomes

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` on the store's event loop soon, from any thread (nothing when the
        loop is gone)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(fn)

    def write_here(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """Run ``fn`` in a write transaction of its own in the calling thread, which is
        not the event loop's (a :class:`~hivemem.SyncHive` caller), and return (True,
        its result) once committed: a hop to the loop's thread and on to the writer
        thread and back cost more than the write. Returns (False, None) without running
        ``fn`` when it cannot: an in-memory or closed store, or the writer thread (or
        another caller) committing meanwhile, when the write joins the next group
        through the loop instead (:meth:`write`), so that concurrent writes still share
        commits.

        An exception raised by ``fn`` rolls back its changes and is re-raised.

        Raises:
            Unavailable: the commit failed.
        """
        if self.memory or self._writer is None or not self._commit_lock.acquire(blocking=False):
            return False, None
        try:
            if self._writer is None:  # closed meanwhile
                return False, None
            ((ok, value),) = self._run_group([fn])
        finally:
            self._commit_lock.release()
        if not ok:
            raise value
        self.call_soon(self.changes.notify)  # this process's watchers
        return True, value

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside a write transaction and return its result once committed.

        An exception raised by ``fn`` rolls back its own changes and is re-raised.

        Raises:
            Unavailable: the store is closed or the commit failed.
        """
        writer = self._writer
        if writer is None:
            raise Unavailable("the sqlite store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._pending_lock:
            self._pending.append((fn, fut, loop))
            queue, self._drain_queued = not self._drain_queued, True
        if queue:
            writer.submit(self._commit_pending)
        result = await fut
        self.changes.notify()
        return result
