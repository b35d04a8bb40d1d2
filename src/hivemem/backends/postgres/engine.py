"""The PostgreSQL engine: the connection pool, transactions with retries, error
mapping and cross-process change notification.

- psycopg 3 (async) over a :class:`psycopg_pool.AsyncConnectionPool` of
  autocommit connections: a read is one statement (one snapshot); a write runs in
  an explicit transaction at PostgreSQL's default isolation, READ COMMITTED, with
  row and advisory locks where a decision depends on a row (see backend.py), or as
  one statement on an autocommit connection, its own transaction
  (:meth:`PostgresEngine.write_one`, :meth:`PostgresEngine.write_alone`).
- Retries are tenacity's (one policy, :func:`_retrying`, run by :func:`_retried`): a
  write that PostgreSQL aborts for a deadlock or a serialisation failure (nothing
  committed) is retried up to :data:`WRITE_RETRIES` times with exponential backoff
  and full jitter (uniform in [0, min(0.2 s, 0.004 s * 2^(n-1))] before retry n;
  "Exponential Backoff And Jitter", Brooker, AWS Architecture Blog 2015), so writers
  that collided do not collide again in step. A connection that fails before
  anything was committed (a read; a write before its COMMIT was sent) is replaced
  and the work retried once, at once; a write whose COMMIT was sent is not (its
  outcome is unknown), nor is a one-statement write once its statement was sent
  (:meth:`PostgresEngine.write_alone` first checks that the server has not closed
  the idle pooled connection, and takes another if it has).
- Engine failures (connection refused, server gone, pool exhausted for
  :data:`POOL_TIMEOUT_SECONDS`) raise :class:`~hivemem.errors.Unavailable`.
- Change notification: each write that appends events calls ``pg_notify`` in its
  transaction (delivered at commit, never for a rolled-back write); every process
  keeps one dedicated connection LISTENing on :data:`CHANNEL` (read by a callback
  on its socket) and wakes its watchers (``ChangeSignal.notify``) on each
  notification; the connection is
  re-established, until the engine closes, with exponential backoff (0.1 s doubling
  to 5 s, starting over once a connection listens again); watchers are woken then
  too, as notifications may have been missed. Local commits wake local watchers
  directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import pq
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

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
#: Backoff before retry n of an aborted write: uniform in [0, min(0.2, 0.004 * 2^(n-1))] s.
WRITE_BACKOFF = wait_random_exponential(multiplier=0.004, max=0.2)
#: Backoff before reconnection attempt n of the change listener: min(5, 0.1 * 2^(n-1)) s.
LISTEN_BACKOFF = wait_exponential(multiplier=0.1, max=5.0)
#: The LISTEN/NOTIFY channel announcing new feed events (payload: the new head).
CHANNEL = "hivemem_feed"
#: The listener checks its connection at least this often.
LISTEN_CHECK_SECONDS = 30.0

#: A transaction PostgreSQL aborted, nothing committed, that may succeed if run again:
#: SQLSTATE 40000, a serialisation failure (40001) and a deadlock (40P01). (psycopg
#: makes the last two siblings of TransactionRollback, not subclasses.)
_ABORTED = (pgerrors.TransactionRollback, pgerrors.SerializationFailure, pgerrors.DeadlockDetected)
#: Errors of a failed connection. (PoolTimeout and the :data:`_ABORTED` errors are
#: OperationalErrors too: handle them first.)
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def _backoff(state: RetryCallState) -> float:
    """Seconds before the next attempt: :data:`WRITE_BACKOFF` after an aborted write,
    none before retrying on a fresh connection."""
    failed = state.outcome.exception() if state.outcome is not None else None
    return WRITE_BACKOFF(state) if isinstance(failed, _ABORTED) else 0.0


def _retrying(retry_on: tuple[type[Exception], ...], attempts: int) -> AsyncRetrying:
    """The engine's retry policy: up to ``attempts`` attempts in all while each fails
    with one of ``retry_on``, waiting :func:`_backoff` between them; the last error is
    re-raised as it is."""
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop_after_attempt(attempts),
        wait=_backoff,
        reraise=True,
    )


async def _retried(
    once: Callable[[], Awaitable[T]], retry_on: tuple[type[Exception], ...], attempts: int
) -> T:
    """``once()`` under :func:`_retrying` (``retry_on``, ``attempts`` in all).

    The first attempt runs outside tenacity, whose bookkeeping costs tens of
    microseconds of CPU per call, as much as a point read itself; after a retryable
    failure tenacity takes that failure as its first attempt (raising it again) and
    decides every retry from there, so attempts, waits and budget are the policy's."""
    try:
        return await once()
    except retry_on as exc:
        first: BaseException | None = exc
    async for attempt in _retrying(retry_on, attempts):
        with attempt:
            if first is not None:
                failed, first = first, None
                raise failed
            result = await once()
    return result


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

    async def _listen_forever(self, conn: Conn) -> None:
        """Wake watchers on each notification on ``conn``; when the connection fails,
        listen on a new one (until :meth:`close` cancels this task).

        Tenacity runs one round per connection: its first attempt follows the
        connection until it fails, the next ones connect again after
        :data:`LISTEN_BACKOFF`, and the round ends once one listens (so the backoff
        starts over for the next failure)."""
        listening: Conn | None = conn
        try:
            while True:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(Exception),
                    wait=LISTEN_BACKOFF,
                    before_sleep=self._listener_failed,
                    reraise=True,
                ):
                    with attempt:
                        if listening is None:
                            listening = await self._listen_anew()
                        else:
                            try:
                                await self._follow(listening)
                            except Exception:
                                with contextlib.suppress(Exception):
                                    await listening.close()
                                listening = None
                                raise
        finally:
            if listening is not None:
                with contextlib.suppress(Exception):
                    await listening.close()

    async def _listen_anew(self) -> Conn:
        """A new connection LISTENing on :data:`CHANNEL`; wakes watchers, since
        notifications may have been missed while there was none."""
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self.changes.notify()
        self.changes.hint(None)
        return conn

    async def _follow(self, conn: Conn) -> None:
        """Wake watchers (and pass on task hints) on each notification on ``conn``,
        checking the connection every :data:`LISTEN_CHECK_SECONDS`; returns only by
        raising, when the connection fails.

        Notifications are read by a reader callback on the connection's socket, not by
        psycopg's ``notifies()``, which registers and unregisters the socket with the
        event loop for each one: every group of puts this process commits comes back
        as a notification, and that cost a tenth of the writers' CPU. During the
        periodic check, psycopg hands them to a notify handler instead."""
        loop = asyncio.get_running_loop()
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        fd = pgconn.socket
        failed: asyncio.Future[BaseException] = loop.create_future()

        def noted(payload: str) -> None:
            self.changes.notify()
            hints = parse_task_hints(payload)
            if hints is None:
                self.changes.hint(None)
            for hint in hints or ():
                self.changes.hint(hint)

        def readable() -> None:
            try:
                pgconn.consume_input()
                while (pgn := pgconn.notifies()) is not None:
                    noted(pgn.extra.decode(encoding))
                if pgconn.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the listening connection was closed")
            except Exception as exc:
                loop.remove_reader(fd)
                if not failed.done():
                    failed.set_result(exc)

        conn.add_notify_handler(lambda note: noted(note.payload))
        try:
            while True:
                loop.add_reader(fd, readable)
                readable()  # anything libpq read already
                done, _ = await asyncio.wait({failed}, timeout=LISTEN_CHECK_SECONDS)
                loop.remove_reader(fd)
                if done:
                    raise failed.result()
                await conn.execute("SELECT 1")  # a dead connection raises here
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)

    def _listener_failed(self, state: RetryCallState) -> None:
        failed = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "PostgreSQL change listener on %s failed: %s; reconnecting in %.1f s",
            self.label,
            failed,
            state.upcoming_sleep,
        )

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

        async def once() -> T:
            try:
                async with self._connection(wait) as conn:
                    return await fn(conn)
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS:
                self._down = True  # the retry probes the server first
                raise

        try:
            return await _retried(once, _CONNECTION_ERRORS, 2)
        except _CONNECTION_ERRORS as exc:
            raise self._failed(exc) from exc

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

        async def once() -> tuple[Any, ...] | None:
            try:
                async with self._connection() as conn:
                    cur = await conn.execute(sql, args, binary=True)
                    return await cur.fetchone()
            except _ABORTED:
                raise
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS as exc:
                raise self._failed(exc) from exc

        return await self._retry_write(once, reconnect=False)

    async def _retry_write(self, once: Callable[[], Awaitable[T]], *, reconnect: bool) -> T:
        """Run a write attempt ``once`` under the write retry policy: again after a
        deadlock or serialisation failure (nothing committed) and, with ``reconnect``,
        after a connection error ``once`` lets through (it raises those only when
        nothing was sent or committed).

        Raises:
            Unavailable: still aborted after :data:`WRITE_RETRIES` retries, or the
                connection failed again.
        """
        retry_on = (*_ABORTED, *_CONNECTION_ERRORS) if reconnect else _ABORTED
        try:
            return await _retried(once, retry_on, WRITE_RETRIES + 1)
        except _ABORTED as exc:
            raise self.unavailable(exc, f"aborted {WRITE_RETRIES + 1} times") from exc
        except _CONNECTION_ERRORS as exc:
            raise self.unavailable(exc) from exc

    async def write_alone(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled autocommit connection, where it executes one
        statement, its own transaction (one round trip, no BEGIN/COMMIT, no pipeline),
        and return its result. Wakes no watchers.

        Retried on a deadlock or serialisation failure (nothing was committed). A
        pooled connection the server has closed while it sat idle (seen before anything
        is sent) is replaced and ``fn`` runs on a new one, once, as :meth:`write` does.

        Raises:
            Unavailable: no free connection, or the connection failed after the
                statement was sent (its outcome is unknown: not retried).
        """
        replaced = False

        async def once() -> T:
            nonlocal replaced
            sent = False
            try:
                async with self._connection() as conn:
                    if _closed_by_server(conn) and not replaced:
                        raise psycopg.OperationalError("the server closed the idle connection")
                    sent = True
                    return await fn(conn)
            except _ABORTED:
                raise
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS as exc:
                error = self._failed(exc)
                if sent or replaced:
                    raise error from exc
                replaced = True  # nothing was sent: running it on a new connection is safe
                raise

        return await self._retry_write(once, reconnect=True)

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
        reconnected = False

        async def once() -> T:
            nonlocal reconnected
            committing = False
            try:
                async with (
                    self._connection() as conn,
                    conn.pipeline(),
                    conn.transaction(),
                ):
                    result = await fn(conn)
                    committing = True
            except _ABORTED:
                raise
            except PoolTimeout as exc:
                raise self._failed(exc, "no free connection") from exc
            except _CONNECTION_ERRORS as exc:
                error = self._failed(exc)
                if committing or reconnected:  # the outcome is unknown, or retried already
                    raise error from exc
                reconnected = True  # no COMMIT was sent: retrying once is safe
                raise
            return result

        result = await self._retry_write(once, reconnect=True)
        if notify:
            self.changes.notify()
        return result


def _closed_by_server(conn: Conn) -> bool:
    """Whether the server has closed an idle connection: its socket reads a last
    message and an end of file, which libpq then notes. Polls, never waits, sends
    nothing; a healthy idle connection costs one ``select``."""
    pgconn = conn.pgconn
    try:
        # Up to three reads: libpq notes the end of file on the read after the one
        # that took the server's last message ("terminating connection ...").
        for _ in range(3):
            if pgconn.status != pq.ConnStatus.OK:
                return True
            # poll, not select: a service with 1,000 streams open has sockets past
            # select's limit of 1,024.
            waiting = select.poll()
            waiting.register(pgconn.socket, select.POLLIN)
            if not waiting.poll(0):  # an idle connection has nothing to read unless closing
                return False
            pgconn.consume_input()
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return pgconn.status != pq.ConnStatus.OK


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
