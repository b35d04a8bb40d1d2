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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
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

from hivemem.backends.groups import PutGroups
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
        #: Internal request keys: ``~<this engine's random prefix><counter>``.
        self._request_prefix = os.urandom(8).hex()
        self._request_count = itertools.count()
        #: The group commit of single puts (``RedisItems._put_one``), made at the first.
        self._put_groups: PutGroups[Any, bytes] | None = None

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
        """Let the groups of puts in flight finish (at most 10 s), stop the listener and
        close the client's connections."""
        if self._put_groups is not None:
            await self._put_groups.drain(10.0)
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

        Raises:
            RequestIdReused: the script refused a request id used for another request.
            Unavailable: the store is not open or not reachable.
        """
        script = self._scripts.get(name)
        if script is None:
            raise Unavailable(f"the Redis store {self._where} is not open")

        async def call() -> Any:
            try:
                return await script(keys=list(keys), args=list(args))
            except rex.NoScriptError:
                # A promoted replica lacks the script and the client's view of the
                # primaries may still be stale: EVAL sends the source to the node that
                # owns the keys (and caches it there).
                return await self.client.eval(script.script, len(keys), *keys, *args)  # type: ignore[arg-type]

        try:
            return await self._retrying(call, name)
        except rex.ResponseError as exc:
            if str(exc).startswith("HMREQUEST"):
                raise RequestIdReused() from None
            raise

    async def _requested(
        self, p: int, request_id: str | None, run: Callable[[str, str], Awaitable[Any]]
    ) -> Any:
        """Call ``run(rk, ttl)``, a write script on partition ``p``, with its request-key
        argument and TTL (ms) for ``request_id`` (see :mod:`.scripts`), and return its
        reply (``{'ok'|'dup', ...}`` when applied or repeated, a refusal otherwise).

        Without a request id: an internal one (``~`` and a counter after 16 random hex
        digits drawn when the engine was made; no fingerprint). With a
        fingerprint (``<id>#<fp>``) the id is also bound to it by a binding key in the
        partition of the id, so that reusing the id for a request on another partition
        is refused too: the script checks the binding itself when it can reach the key
        (a standalone server, or the same slot); in a cluster, otherwise, it is bound
        here first (one more round trip) and unbound if the write is refused (Conflict,
        NotFound: it then stored nothing).

        Raises:
            RequestIdReused: the id was used with another fingerprint; nothing written.
        """
        if request_id is None:
            rid = f"~{self._request_prefix}{next(self._request_count):x}"
            return await run(f"{tag(p)}:req:{rid}", str(self._internal_ttl_ms))
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
