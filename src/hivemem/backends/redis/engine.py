"""The Redis engine: the client (standalone or cluster), opening and closing, script
calls, retries, request ids and the change listener.

:class:`RedisEngine` is the base of every area of the backend (:mod:`.items`,
:mod:`.sessions`, :mod:`.feed`, :mod:`.search`, :mod:`.tasks`); each area calls
:meth:`RedisEngine._script` for its Lua scripts (:mod:`.scripts`) and
:meth:`RedisEngine._requested` for writes that carry a request id.

Retries and request ids
-----------------------

Engine errors that may be transient (connection refused or lost, timeouts,
CLUSTERDOWN, TRYAGAIN, MASTERDOWN, a READONLY former master, loading) are retried
for ``redis_retry_seconds`` after the first failure (default 10 s: a cluster
failover takes about ``cluster-node-timeout`` plus a second), then raised as
Unavailable. The waits between attempts are exponential with full jitter (uniform
in [0, min(0.5 s, 0.05 s * 2^(attempt-1))]; "Exponential Backoff And Jitter",
Brooker, AWS Architecture Blog 2015), so processes that lost the same master do
not retry in step. A write whose reply was lost may have been applied, so every
write carries a request id: the caller's, or an internal one (kept
:data:`INTERNAL_REQUEST_TTL_MS`); re-running the script then returns the stored
result instead of writing again.

There is one retry mechanism, tenacity's, and redis-py's own is switched off
(``Retry(NoBackoff(), 0)`` on every client): redis-py's ``Retry`` counts attempts and
matches error classes, while this budget is a time (a failover lasts seconds,
whatever the number of attempts) and whether an error is transient depends on its
message too (``LOADING``, ``CLUSTERDOWN`` replies; see :func:`_transient`). The
cluster client still refreshes its slot map after a connection error: it marks
itself for re-initialisation and the next attempt does it.

Shared round trips
------------------

On a standalone server, calls of the small write scripts (:data:`_PIPELINED`) made by
concurrent tasks share round trips: each call queues its ``EVALSHA`` and waits for its
own reply; once per event-loop pass the queued calls go out together in one write on
one pooled connection, a pipeline without MULTI (packed and parsed by redis-py, as its
own pipelines are; :meth:`RedisEngine._flush`), read back in a task of their own. One
round trip then serves many puts, and the server runs them in one pass of its event
loop, with one fsync of the append-only file. Redis still runs each script alone,
start to end, so each call is exactly as atomic as when sent alone; its reply, or its
error (a conflict, a refused request id, NOSCRIPT, an argument redis-py cannot
encode, ...), goes to its own caller only. An engine error of the round trip itself
(connection lost, timeout) goes to every call of it, and each caller retries as above
(its request id makes that safe). A caller cancelled before its batch went out is left
out of it; one cancelled later does not disturb the batch, whose other replies are
still read and delivered. A batch holds at most :data:`_PIPELINE_MAX_CALLS` calls and
:data:`_PIPELINE_MAX_BYTES` of arguments, and a call whose arguments exceed
:data:`_PIPELINE_CALL_BYTES` goes alone, so that no large request delays the small
ones batched with it. A Redis Cluster sends every call alone
(a pipeline there would have to be split by node and slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_never,
    wait_random_exponential,
)

from hivemem.backends.redis import scripts
from hivemem.backends.redis.layout import CHANNEL, PARTITIONS, SCHEMA, SESSIONS_TAG, meta_key, tag
from hivemem.backends.results import RequestIdReused, split_request_id
from hivemem.backends.signals import ChangeSignal, parse_task_hints
from hivemem.config import Settings, redact_url
from hivemem.errors import InvalidInput, Unavailable

__all__ = ["INTERNAL_REQUEST_TTL_MS", "RedisEngine"]

log = logging.getLogger("hivemem.redis")

T = TypeVar("T")

#: How long results of writes made without a caller's request id are kept, at least:
#: longer than any retry of the write (they only make a retried script idempotent);
#: three times the retry budget when that is longer.
INTERNAL_REQUEST_TTL_MS = 60_000
#: Socket timeouts (seconds).
CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 10.0
#: Waits between attempts of a request (seconds): full jitter over 0.05 * 2^(n-1),
#: at most 0.5.
_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 0.5
#: Waits between reconnections of the change listener (seconds), likewise.
_LISTEN_FIRST_SECONDS = 0.1
_LISTEN_MAX_SECONDS = 2.0
#: A subscription that lasted this long (seconds) was healthy: when it drops, the
#: listener reconnects at once and its backoff starts over.
_LISTEN_HEALTHY_SECONDS = 5.0

#: Scripts whose calls from concurrent tasks share round trips on a standalone server
#: (see the module): writes with small replies (about the size of their arguments).
_PIPELINED = frozenset(
    {
        "write_items",
        "bind_request",
        "publish",
        "create_session",
        "append_messages",
        "save_state",
        "delete_session",
    }
)
#: Most calls in one shared round trip.
_PIPELINE_MAX_CALLS = 64
#: Most bytes of arguments in one shared round trip (a batch is cut before the call
#: that would pass it; a first call may pass it alone).
_PIPELINE_MAX_BYTES = 256 * 1024
#: A call with more bytes of arguments than this goes alone.
_PIPELINE_CALL_BYTES = 32 * 1024
#: Errors of redis-py's encoder, raised while a pipeline packs its commands (before
#: anything was sent): its calls are then sent one by one, so that only the call at
#: fault gets the error.
_PACKING_ERRORS: tuple[type[BaseException], ...] = (rex.DataError, UnicodeError)

#: Calls of one shared round trip: (command arguments, the caller's future).
_Batch = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]

#: Errors after which the same request may succeed: retried, then Unavailable.
_TRANSIENT: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterError,
    rex.TryAgainError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    rex.NoScriptError,  # a new master lacks the script: the next attempt loads it
    OSError,
)


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside redis-py itself (not in hivemem)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_globals.get("__name__", "").startswith("redis.")


def _transient(exc: BaseException) -> bool:
    """Whether the request that raised ``exc`` may succeed if sent again."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, AttributeError) and _raised_in_redis_py(exc):
        # redis-py's cluster client closes every connection when a node reports
        # CLUSTERDOWN; a command of another task caught using one of them fails with
        # "'NoneType' object has no attribute ..." before it was sent.
        return True
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        return text.startswith(
            ("LOADING", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "READONLY", "BUSY ")
        )
    if isinstance(exc, rex.RedisClusterException):
        text = str(exc)
        return "cannot be connected" in text or "not covered" in text or "agree" in text
    return False


class _Budget:
    """Stop and wait rules of one retried call: stop ``seconds`` after its first failure
    (not after its first attempt, so an attempt that hung until the socket timeout
    still leaves the whole budget to a failover), and never sleep past that point."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._first: float | None = None
        self._jitter = wait_random_exponential(
            multiplier=_RETRY_FIRST_SECONDS, max=_RETRY_MAX_SECONDS
        )

    def _left(self, state: RetryCallState) -> float:
        now = state.outcome_timestamp or time.monotonic()
        if self._first is None:
            self._first = now
        return self._first + self.seconds - now

    def wait(self, state: RetryCallState) -> float:
        return max(0.0, min(self._jitter(state), self._left(state)))

    def stop(self, state: RetryCallState) -> bool:
        return self._left(state) <= 0


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.debug("redis %s failed (%s), retrying in %.2f s", what, exc, state.upcoming_sleep)

    return before_sleep


def _no_retries() -> Retry:
    """redis-py's retry object that never retries (tenacity retries; see the module)."""
    return Retry(NoBackoff(), 0)


def redact(url: str) -> str:
    """``url`` without its password (:func:`hivemem.config.redact_url`)."""
    return redact_url(url)


class RedisEngine:
    """The connection to a standalone Redis 7 or a Redis Cluster, shared by the areas
    of :class:`~.backend.RedisBackend`.

    Args:
        url: the store URL (see :meth:`~.backend.RedisBackend.from_url`).
        settings: ``request_retention_seconds`` and ``redis_retry_seconds`` apply.
        nodes: the cluster's startup nodes (host, port), or ``None`` for a standalone
            server at ``url``.
        cluster_options: username, password and ssl of a cluster URL.
    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        nodes: Sequence[tuple[str, int]] | None = None,
        cluster_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.settings = settings
        self.changes = ChangeSignal()
        self._nodes = list(nodes) if nodes is not None else None
        self._cluster_options = dict(cluster_options or {})
        self._client: aioredis.Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._listener: asyncio.Task[None] | None = None
        self._sub: aioredis.Redis | None = None
        self._sub_attempts = 0
        self._closing = False
        #: The retry budget (seconds); read at each call.
        self._retry_seconds = settings.redis_retry_seconds
        self._request_ttl_ms = max(1, int(settings.request_retention_seconds * 1000))
        self._internal_ttl_ms = max(INTERNAL_REQUEST_TTL_MS, int(3000 * self._retry_seconds))
        self._where = redact(url)
        #: Calls waiting for the next shared round trip: (command arguments, bytes of
        #: arguments, the caller's future).
        self._queued: list[tuple[tuple[Any, ...], int, asyncio.Future[Any]]] = []
        self._flush_soon = False
        self._queue_loop: asyncio.AbstractEventLoop | None = None
        #: Shared round trips under way (kept referenced until done).
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def is_cluster(self) -> bool:
        """Whether the store is a Redis Cluster."""
        return self._nodes is not None

    # Connections ---------------------------------------------------------------------

    def _new_client(self) -> aioredis.Redis | RedisCluster:
        common: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_keepalive": True,
            "retry": _no_retries(),
        }
        if self._nodes is None:
            return aioredis.Redis.from_url(self.url, health_check_interval=30, **common)
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self._nodes],
            require_full_coverage=False,
            **common,
            **self._cluster_options,
        )

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The redis-py client (opened by :meth:`open`).

        Raises:
            Unavailable: the store is not open.
        """
        if self._client is None:
            raise Unavailable(f"the Redis store {self._where} is not open")
        return self._client

    async def open(self) -> None:
        """Connect, load the scripts, check the store's layout and start the listener.

        Raises:
            Unavailable: no server answered within the retry budget.
            InvalidInput: the store has another layout or partition count (``url``).
        """
        if self._client is not None:
            return
        client = self._new_client()
        self._client = client
        self._scripts = {
            name: client.register_script(scripts.source(name))
            for name in (*scripts.WRITE_SCRIPTS, *scripts.READ_SCRIPTS)
        }
        try:
            if isinstance(client, RedisCluster):
                await self._retrying(client.initialize, "connect")
            await self._check_config()
        except BaseException:
            self._client = None
            with contextlib.suppress(Exception):
                await client.aclose()
            raise
        self._closing = False
        self._listener = asyncio.create_task(self._listen(), name="hivemem-redis-listener")

    async def _check_config(self) -> None:
        key = f"{SESSIONS_TAG}:config"
        want = {"schema": SCHEMA, "partitions": str(PARTITIONS)}

        async def run() -> list[Any]:
            c = self.client
            for name, value in want.items():
                await c.hsetnx(key, name, value)
            return list(await c.hmget(key, list(want)))

        found = await self._retrying(run, "open")
        got = {
            name: (v.decode() if v is not None else None)
            for name, v in zip(want, found, strict=True)
        }
        if got != want:
            raise InvalidInput(
                f"the Redis store at {self._where} has layout {got}, this hivemem uses {want}",
                field="url",
            )

    async def close(self) -> None:
        """Stop the listener and close the client's connections."""
        self._closing = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            # redis-py can swallow a cancellation that lands in a pub/sub read; closing
            # the subscriber's connection ends that read, and the loop sees _closing.
            done, _ = await asyncio.wait({listener}, timeout=0.5)
            if not done:
                sub = self._sub
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.connection_pool.disconnect()
                await asyncio.wait({listener}, timeout=2.0)
            if listener.done() and not listener.cancelled():
                with contextlib.suppress(BaseException):
                    listener.result()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> None:
        """One round trip, retried for at most 3 s.

        Raises:
            Unavailable: the server did not answer.
        """

        async def run() -> None:
            await self.client.ping()

        await self._retrying(run, "ping", budget=min(self._retry_seconds, 3.0))

    # Calls ---------------------------------------------------------------------------

    async def _retrying(
        self, op: Callable[[], Awaitable[T]], what: str, *, budget: float | None = None
    ) -> T:
        """Run ``op``, retrying transient engine errors (:func:`_transient`) for the retry
        budget (seconds after the first failure; ``budget`` overrides
        ``redis_retry_seconds``). Only idempotent operations may come here (every write
        script carries a request id, so re-running it is).

        Raises:
            Unavailable: still failing when the budget ran out, or the server is out of
                memory (``what`` names the operation in the message).
        """
        # The first attempt runs outside tenacity, whose bookkeeping (it inspects the
        # callables on every call) costs more CPU than the round trip; after a transient
        # failure tenacity takes that failure as its first attempt (raising it again) and
        # decides every retry from there, as in the PostgreSQL engine.
        first: BaseException | None = None
        try:
            return await op()
        except Exception as exc:  # decided below, by the same rules as every retry
            first = exc
        result: T
        limit = _Budget(self._retry_seconds if budget is None else budget)
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=limit.stop,
            wait=limit.wait,
            before_sleep=_log_retry(what),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    result = await op()
        except rex.OutOfMemoryError as exc:
            raise Unavailable(f"Redis at {self._where} is out of memory ({what}): {exc}") from exc
        except Exception as exc:
            if not _transient(exc):
                raise
            raise Unavailable(
                f"Redis at {self._where} is unavailable ({what}): {type(exc).__name__}: {exc}"
            ) from exc
        return result

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` of :mod:`.scripts` with ``keys`` and ``args``, retried.

        On a standalone server the calls of :data:`_PIPELINED` scripts share round trips
        with concurrent calls (see the module); the reply and the errors are the same.

        Raises:
            RequestIdReused: the script refused a request id used for another request.
            Unavailable: the store is not open or not reachable.
        """
        script = self._scripts.get(name)
        if script is None:
            raise Unavailable(f"the Redis store {self._where} is not open")
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        size = 0
        if self._nodes is None and name in _PIPELINED:
            for a in args:
                size += len(a) if isinstance(a, (bytes, str)) else 32
            if size > _PIPELINE_CALL_BYTES:
                size = -1
        else:
            size = -1

        async def call() -> Any:
            client = self.client
            try:
                if size >= 0:
                    return await self._queue(command, size)
                return await client.execute_command(*command)
            except rex.NoScriptError:
                # A promoted replica (or a restarted server) lacks the script and the
                # client's view of the primaries may still be stale: EVAL sends the
                # source to the node that owns the keys (and caches it there).
                return await client.eval(script.script, len(keys), *keys, *args)  # type: ignore[arg-type]

        try:
            return await self._retrying(call, name)
        except rex.ResponseError as exc:
            if str(exc).startswith("HMREQUEST"):
                raise RequestIdReused() from None
            raise

    def _standalone(self) -> aioredis.Redis:
        """The standalone client (shared round trips are for a standalone server only).

        Raises:
            Unavailable: the store is not open.
        """
        client = self.client
        assert isinstance(client, aioredis.Redis)
        return client

    def _queue(self, command: tuple[Any, ...], size: int) -> asyncio.Future[Any]:
        """Queue ``command`` (``size`` bytes of arguments) for the next shared round
        trip and return the future of its reply (see the module)."""
        loop = asyncio.get_running_loop()
        if loop is not self._queue_loop:
            # First use, or the engine moved to another event loop: a flush scheduled
            # on a loop that stopped before running it will never run.
            self._queue_loop, self._queued, self._flush_soon = loop, [], False
        fut: asyncio.Future[Any] = loop.create_future()
        self._queued.append((command, size, fut))
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Send the queued calls (see :meth:`_take_queued`), each batch in a task of its
        own."""
        self._flush_soon = False
        for batch in self._take_queued():
            self._start(batch)

    def _take_queued(self) -> list[_Batch]:
        """The queued calls whose caller still waits (one cancelled before its call went
        out is left out: it is not sent), in batches of at most
        :data:`_PIPELINE_MAX_CALLS` calls and :data:`_PIPELINE_MAX_BYTES`."""
        queued, self._queued = self._queued, []
        batches: list[_Batch] = []
        batch: _Batch = []
        size = 0
        for command, n, fut in queued:
            if fut.done():
                continue
            if batch and (len(batch) >= _PIPELINE_MAX_CALLS or size + n > _PIPELINE_MAX_BYTES):
                batches.append(batch)
                batch, size = [], 0
            batch.append((command, fut))
            size += n
        if batch:
            batches.append(batch)
        return batches

    def _start(self, batch: _Batch) -> None:
        """Run :meth:`_round_trip` of ``batch`` in a task of its own."""
        task = asyncio.get_running_loop().create_task(self._round_trip(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: _Batch) -> tuple[Connection, _Batch] | None:
        """Send ``batch`` in one write on a pooled connection; return the connection and
        the calls sent. A call redis-py cannot encode fails alone, before anything is
        sent. When the write fails every call fails with its error: returns ``None``."""
        conn: Connection | None = None
        try:
            pool = self._standalone().connection_pool
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            assert conn is not None
            try:
                packed = conn.pack_commands([command for command, _ in batch])
            except _PACKING_ERRORS:
                encodable: _Batch = []
                for command, fut in batch:
                    try:
                        conn.pack_command(*command)
                    except _PACKING_ERRORS as exc:  # that call's own error
                        if not fut.done():
                            fut.set_exception(exc)
                        continue
                    encodable.append((command, fut))
                batch = encodable
                if not batch:
                    await pool.release(conn)
                    return None
                packed = conn.pack_commands([command for command, _ in batch])
            await conn.send_packed_command(packed)
        except BaseException as exc:
            if conn is not None:
                await self._drop(conn)
            self._fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return None
        return conn, batch

    async def _drop(self, conn: Connection) -> None:
        """Disconnect ``conn`` (its replies are out of step) and give it back to the pool,
        which connects it again on its next use."""
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self._standalone().connection_pool.release(conn)

    @staticmethod
    def _fail(batch: _Batch, exc: BaseException) -> None:
        """Pass ``exc`` to every caller of ``batch`` still waiting (cancel them if it is a
        cancellation)."""
        for _, fut in batch:
            if fut.done():
                continue
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)

    async def _round_trip(self, batch: _Batch) -> None:
        """Send ``batch`` in one write, read its replies in order and pass each reply or
        error to its own caller's future; an error of the round trip itself (connection
        lost, timeout) to every caller."""
        sent = await self._send_batch(batch)
        if sent is None:
            return
        conn, batch = sent
        replies: list[Any] = []
        try:
            client = self._standalone()
            for _ in batch:
                try:
                    replies.append(await client.parse_response(conn, "EVALSHA"))
                except rex.ResponseError as exc:  # the call's own error
                    replies.append(exc)
        except BaseException as exc:  # the round trip failed: every call of it did
            await self._drop(conn)
            self._fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        with contextlib.suppress(Exception):
            await client.connection_pool.release(conn)
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def _requested(
        self, p: int, request_id: str | None, run: Callable[[str, str], Awaitable[Any]]
    ) -> Any:
        """Call ``run(rk, ttl)``, a write script on partition ``p``, with its request-key
        argument and TTL (ms) for ``request_id`` (see :mod:`.scripts`), and return its
        reply (``{'ok'|'dup', ...}`` when applied or repeated, a refusal otherwise).

        Without a request id: an internal one (``~`` and 32 random hex digits, no
        fingerprint). With a fingerprint (``<id>#<fp>``) the id is also bound to it by a
        binding key in the partition of the id, so that reusing the id for a request on
        another partition is refused too: the script checks the binding itself when it
        can reach the key (a standalone server, or the same slot); in a cluster,
        otherwise, it is bound here first (one more round trip) and unbound if the write
        is refused (Conflict, NotFound: it then stored nothing).

        Raises:
            RequestIdReused: the id was used with another fingerprint; nothing written.
        """
        if request_id is None:
            # 128 random bits, as a uuid4 (whose object costs more than the bits).
            return await run(f"{tag(p)}:req:~{os.urandom(16).hex()}", str(self._internal_ttl_ms))
        ttl = str(self._request_ttl_ms)
        rid, fingerprint = split_request_id(request_id)
        rk = f"{tag(p)}:req:{rid}"
        if fingerprint is None:
            return await run(rk, ttl)
        pb = zlib.crc32(rid.encode("utf-8", "surrogatepass")) % PARTITIONS
        bk = f"{tag(pb)}:bind:{rid}"
        if not self.is_cluster or pb == p:
            return await run(f"{rk}#{fingerprint}#{bk}", ttl)
        reply = await self._script("bind_request", [meta_key(pb)], [bk, fingerprint, ttl, "bind"])
        if reply[0] == b"reused":
            raise RequestIdReused()
        unbind = [bk, fingerprint, ttl, "unbind"]
        try:
            reply = await run(f"{rk}#{fingerprint}", ttl)
        except RequestIdReused:  # the write stored nothing: free the id again
            with contextlib.suppress(Unavailable):
                await self._script("bind_request", [meta_key(pb)], unbind)
            raise
        # Refused (conflict, notfound): likewise. A repeat of a result stored without
        # fingerprint (before fingerprints): the id stays unbound, as it was.
        if reply[0] != b"ok" and (reply[0] != b"dup" or not reply[2]):
            with contextlib.suppress(Unavailable):
                await self._script("bind_request", [meta_key(pb)], unbind)
        return reply

    # Change listener -----------------------------------------------------------------

    def _pass_hints(self, payload: bytes | str | None) -> None:
        """Pass on the task hints of a change notification (its payload: ``1`` and the
        task events the script appended, see ``feed_done`` in scripts.py)."""
        if payload is None:
            return
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        hints = parse_task_hints(text)
        if hints is None:
            self.changes.hint(None)
        for hint in hints or ():
            self.changes.hint(hint)

    async def _listen(self) -> None:
        """Wake this process's watchers when any process commits: subscribe to the
        channel every write script publishes on; reconnect (to another node in a
        cluster) until closed. Waits between attempts have full jitter like requests',
        over 0.1 s doubling to at most 2 s; the backoff starts over after a healthy
        subscription drops."""
        while not self._closing:
            retrying = AsyncRetrying(
                retry=retry_if_exception(
                    lambda exc: isinstance(exc, Exception) and not self._closing
                ),
                stop=stop_never,
                wait=wait_random_exponential(
                    multiplier=_LISTEN_FIRST_SECONDS, max=_LISTEN_MAX_SECONDS
                ),
                before_sleep=_log_retry("change listener"),
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._subscribe_once()
            except Exception as exc:  # only when closing
                log.debug("redis change listener stopped: %s", exc)

    async def _subscribe_once(self) -> None:
        """Subscribe and pass on notifications until the connection drops or the
        backend closes. Returns when closing, or when a subscription that lasted
        :data:`_LISTEN_HEALTHY_SECONDS` dropped; raises when it failed sooner."""
        sub = self._sub = self._subscriber(self._sub_attempts)
        self._sub_attempts += 1
        since: float | None = None
        try:
            pubsub = sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                since = time.monotonic()
                self.changes.notify()  # something may have changed while away
                self.changes.hint(None)
                while not self._closing:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None:
                        self.changes.notify()
                        self._pass_hints(msg.get("data"))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
        except Exception as exc:
            if since is None or time.monotonic() - since < _LISTEN_HEALTHY_SECONDS:
                raise
            log.debug("redis change listener: %s; reconnecting", exc)
        finally:
            self._sub = None
            with contextlib.suppress(Exception):
                await sub.aclose()

    def _subscriber(self, attempt: int) -> aioredis.Redis:
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_keepalive": True,
            "health_check_interval": 10,
            "retry": _no_retries(),
        }
        if self._nodes is None:
            return aioredis.Redis.from_url(self.url, **common)
        client = self._client
        hosts: list[tuple[str, int]] = list(self._nodes)
        if isinstance(client, RedisCluster):
            with contextlib.suppress(Exception):
                found = [(n.host, int(n.port)) for n in client.get_nodes()]
                hosts = found or hosts
        host, port = hosts[attempt % len(hosts)]
        opts = {k: v for k, v in self._cluster_options.items() if k != "ssl"}
        return aioredis.Redis(
            host=host, port=port, ssl=bool(self._cluster_options.get("ssl")), **opts, **common
        )
