"""The PostgreSQL engine: the connection pool, transactions with retries, error
mapping and cross-process change notification.

- psycopg 3 (async) over a :class:`psycopg_pool.AsyncConnectionPool` of
  autocommit connections: a read is one statement (one snapshot); a write runs in
  an explicit transaction at PostgreSQL's default isolation, READ COMMITTED, with
  row and advisory locks where a decision depends on a row (see backend.py).
- Write transactions that PostgreSQL aborts for a deadlock or a serialisation
  failure (nothing committed) are retried with jittered backoff; a pooled
  connection found dead before anything was sent is replaced and the work retried.
- Engine failures (connection refused, server gone, pool exhausted for
  :data:`POOL_TIMEOUT_SECONDS`) raise :class:`~hivemem.errors.Unavailable`.
- Change notification: each write that appends events calls ``pg_notify`` in its
  transaction (delivered at commit, never for a rolled-back write); every process
  keeps one dedicated connection LISTENing on :data:`CHANNEL` and wakes its
  watchers (``ChangeSignal.notify``) on each notification; the connection is
  re-established with backoff if it drops (watchers are woken then too, as
  notifications may have been missed). Local commits wake local watchers directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from hivemem.backends.signals import ChangeSignal, parse_task_hints
from hivemem.errors import Unavailable

__all__ = ["CHANNEL", "Conn", "PostgresEngine", "key_lock", "lock_keys"]

log = logging.getLogger("hivemem.postgres")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

#: Most connections a process keeps to the database (one more listens for changes).
POOL_MAX_SIZE = 10
#: Connections opened at start and kept open while idle.
POOL_MIN_SIZE = 1
#: How long an operation waits for a free pooled connection before Unavailable.
POOL_TIMEOUT_SECONDS = 10.0
#: libpq connect timeout, unless the URL sets ``connect_timeout``.
CONNECT_TIMEOUT_SECONDS = 10
#: How long :meth:`PostgresEngine.ping` waits.
PING_TIMEOUT_SECONDS = 5.0
#: Retries of a write aborted by a deadlock or serialisation failure.
WRITE_RETRIES = 10
#: The LISTEN/NOTIFY channel announcing new feed events (payload: the new head).
CHANNEL = "hivemem_feed"
#: The listener checks its connection at least this often.
LISTEN_CHECK_SECONDS = 30.0

_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class PostgresEngine:
    """Runs async functions of a connection for the backend.

    Args:
        conninfo: a libpq URL or connection string.
        label: ``host:port/db`` for messages (no password).
        changes: the signal raised after each local commit that appended events and
            each notification from another process.
        configure: called on each new pooled connection (type adapters).
    """

    def __init__(
        self,
        conninfo: str,
        label: str,
        changes: ChangeSignal,
        configure: Callable[[Conn], Awaitable[None]] | None = None,
        *,
        pool_size: int = POOL_MAX_SIZE,
        pool_timeout: float = POOL_TIMEOUT_SECONDS,
    ) -> None:
        self.conninfo = conninfo
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.label = label
        self.changes = changes
        self._configure = configure
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._down = False

    def unavailable(self, exc: BaseException, doing: str = "") -> Unavailable:
        """The Unavailable error for an engine failure."""
        what = f" ({doing})" if doing else ""
        detail = str(exc).strip() or type(exc).__name__
        return Unavailable(f"PostgreSQL store {self.label} unavailable{what}: {detail}")

    # Lifecycle ---------------------------------------------------------------------

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` succeeded and :meth:`close` has not been called since."""
        return self._pool is not None

    async def connect(self) -> Conn:
        """A new autocommit connection outside the pool.

        Raises:
            Unavailable: the server cannot be reached or refused the connection.
        """
        try:
            return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        except _CONNECTION_ERRORS as exc:
            raise self.unavailable(exc, "connecting") from exc

    async def open(self, listener: Conn) -> None:
        """Open the pool and start listening for changes on ``listener`` (a connection
        from :meth:`connect`, now owned by the engine).

        Raises:
            Unavailable: the pool could not connect within the connect timeout.
        """
        try:
            await listener.execute(f"LISTEN {CHANNEL}")
        except _CONNECTION_ERRORS as exc:
            await listener.close()
            raise self.unavailable(exc, "listening for changes") from exc
        self._listener = asyncio.create_task(
            self._listen_forever(listener), name="hivemem-postgres-listener"
        )
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.conninfo,
            min_size=POOL_MIN_SIZE,
            max_size=max(self.pool_size, POOL_MIN_SIZE),
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=self.pool_timeout,
            name="hivemem",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except (PoolTimeout, *_CONNECTION_ERRORS) as exc:
            await pool.close()
            await self.close()
            raise self.unavailable(exc, "opening the connection pool") from exc
        self._pool = pool

    async def close(self) -> None:
        """Stop listening and close every connection."""
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _listen_forever(self, conn: Conn | None) -> None:
        """Wake watchers on each notification; reconnect (with backoff) when the
        listening connection fails."""
        backoff = 0.1
        while True:
            try:
                if conn is None:
                    conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.changes.notify()  # notifications may have been missed meanwhile
                    self.changes.hint(None)
                    backoff = 0.1
                while True:
                    async for note in conn.notifies(timeout=LISTEN_CHECK_SECONDS):
                        self.changes.notify()
                        hints = parse_task_hints(note.payload)
                        if hints is None:
                            self.changes.hint(None)
                        for hint in hints or ():
                            self.changes.hint(hint)
                    await conn.execute("SELECT 1")  # a dead connection raises here
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise
            except Exception as exc:
                log.warning("PostgreSQL change listener on %s failed: %s", self.label, exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # Work --------------------------------------------------------------------------

    def _require_pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise Unavailable(f"the PostgreSQL store {self.label} is closed")
        return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self, wait: float | None = None) -> AsyncIterator[Conn]:
        pool = self._require_pool()
        if self._down:
            await self._probe()
        async with pool.connection(timeout=wait) as conn:
            yield conn

    async def _probe(self) -> None:
        """After a connection failure: fail fast while the server is still down
        (rather than wait for the pool's timeout); once it answers, drop the pool's
        dead connections and carry on."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        except _CONNECTION_ERRORS as exc:
            raise self.unavailable(exc) from exc
        await conn.close()
        self._down = False
        if self._pool is not None:
            await self._pool.check()

    def _failed(self, exc: BaseException, doing: str = "") -> Unavailable:
        self._down = True
        return self.unavailable(exc, doing)

    async def ping(self) -> None:
        """One round trip. Raises Unavailable if the server does not answer."""
        await self.read(lambda c: c.execute("SELECT 1"), wait=PING_TIMEOUT_SECONDS)

    async def read(self, fn: Callable[[Conn], Awaitable[T]], wait: float | None = None) -> T:
        """Run ``fn`` on a pooled autocommit connection (retried once, on a fresh
        connection, if the connection failed: reads are idempotent).

        Raises:
            Unavailable: the server cannot be reached.
        """
        for attempt in (1, 2):
            try:
                async with self._connection(wait) as conn:
                    return await fn(conn)
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS as exc:
                error = self._failed(exc)
                if attempt == 2:
                    raise error from exc
        raise AssertionError("unreachable")

    async def write_one(self, sql: str, args: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run one statement as its own transaction on an autocommit connection (one
        round trip, no BEGIN/COMMIT, no pipeline: about half the client CPU of
        :meth:`write` for a single statement) and return its first row,
        or None. Wakes no watchers.

        Retried on a deadlock or serialisation failure (nothing was committed).

        Raises:
            Unavailable: no free connection, or the connection failed; not retried, as
                the statement may have committed (the outcome is unknown).
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._connection() as conn:
                    cur = await conn.execute(sql, args, binary=True)
                    return await cur.fetchone()
            except pgerrors.TransactionRollback as exc:
                if attempt > WRITE_RETRIES:
                    raise self.unavailable(exc, f"aborted {attempt} times") from exc
                await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise self._failed(exc) from exc

    async def write(self, fn: Callable[[Conn], Awaitable[T]], *, notify: bool = True) -> T:
        """Run ``fn`` in a transaction, in pipeline mode, and return its result once
        committed.

        Pipeline mode: statements ``fn`` executes without fetching their results are
        sent with the next one it fetches, or with the COMMIT; so a typical write
        takes two round trips (read the rows it decides on; write, append, commit).
        An exception raised by ``fn`` rolls the transaction back and is re-raised.
        Deadlocks and serialisation failures are retried (nothing was committed), and
        so, once, is a connection failure before the COMMIT was sent.

        Raises:
            Unavailable: the server cannot be reached, or the connection failed
                while committing (the outcome is then unknown).
        """
        attempt = 0
        reconnected = False
        while True:
            attempt += 1
            committing = False
            try:
                async with (
                    self._connection() as conn,
                    conn.pipeline(),
                    conn.transaction(),
                ):
                    result = await fn(conn)
                    committing = True
            except pgerrors.TransactionRollback as exc:
                if attempt > WRITE_RETRIES:
                    raise self.unavailable(exc, f"aborted {attempt} times") from exc
                await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
                continue
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS as exc:
                error = self._failed(exc)
                if not committing and not reconnected:
                    reconnected = True  # no COMMIT was sent: retrying is safe
                    continue
                raise error from exc
            if notify:
                self.changes.notify()
            return result


def key_lock(namespace: str, key: str) -> int:
    """The advisory lock id (a signed 64-bit int) of an item's key."""
    digest = hashlib.blake2b(
        namespace.encode("utf-8", "surrogatepass") + b"\x00" + key.encode("utf-8", "surrogatepass"),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_keys(conn: Conn, keys: Sequence[tuple[str, str]]) -> None:
    """Take the advisory locks of ``keys`` until the transaction ends, in sorted order."""
    ids = sorted({key_lock(ns, key) for ns, key in keys})
    if len(ids) == 1:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ids[0],))
    elif ids:
        await conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (ids,))
