"""The Redis backend: items, sessions, task queues and the feed as Lua scripts over
partitions.

See the package docstring for durability and :mod:`.layout` for the keys. Every
change is one script (see :mod:`.scripts`; the task queues' in :mod:`.task_scripts`,
their methods in :mod:`.tasks`) that checks, writes, appends its feed event and stores
its request-id result in one atomic step, within one partition (one hash slot in a
cluster).

The feed and its cursors
------------------------

Each partition's events are a stream whose ids ``<ts>-<seq>`` grow in commit order
(``ts`` = the server's clock in microseconds, forced past the partition's last id).
The feed's order is (ts, seq, partition) — commit order within a partition, so per
namespace tree — and an event's cursor is its place in that order, so a publish
returns the same cursor a reader later sees for it.

A reader must never pass an event that is not committed yet (no gaps). A partition
read at server time R (``READ_FEED`` returns R = max(clock, last ts + 1)) will only
ever get events with ts >= R. So a read takes the smallest R of all partitions, W,
and returns only events with ts < W: every event before them, in every partition, is
already visible. When fewer than ``limit`` events come back the next cursor is the
watermark ``w<W-1>`` (every event with ts < W considered). This assumes the masters'
clocks run forward; a master whose clock is ahead of the others delays visibility by
the difference (a few milliseconds with NTP), it never loses an event.

Retries and request ids
-----------------------

Engine errors that may be transient (connection refused or lost, timeouts,
CLUSTERDOWN, TRYAGAIN, MASTERDOWN, a READONLY former master, loading) are retried
with backoff for ``redis_retry_seconds`` (default 10 s: a cluster failover takes
about ``cluster-node-timeout`` plus a second), then raised as Unavailable. A write
whose reply was lost may have been applied, so every write carries a request id: the
caller's, or an internal one (kept :data:`INTERNAL_REQUEST_TTL_MS`); re-running the
script then returns the stored result instead of writing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
import uuid
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry

from hivemem.backends.base import Backend
from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.redis import scripts
from hivemem.backends.redis.layout import (
    CHANNEL,
    ITEM_FIELDS,
    PARTITIONS,
    SCHEMA,
    SESSION_FIELDS,
    SESSIONS_TAG,
    START,
    Position,
    event_from,
    event_position,
    item_from,
    item_from_hash,
    lex_ranges,
    member,
    message_from,
    meta_key,
    num,
    opt,
    parse_cursor,
    partition_of,
    partitions_under,
    session_from,
    session_partition,
    split_member,
    tag,
    unpack,
    watermark,
)
from hivemem.backends.redis.tasks import RedisTasks
from hivemem.backends.results import RequestIdReused, split_request_id
from hivemem.backends.rows import (
    CheckWrite,
    DeleteWrite,
    EventRow,
    IndexEntry,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
)
from hivemem.backends.signals import ChangeSignal, parse_task_hints
from hivemem.config import Settings
from hivemem.errors import Conflict, CursorExpired, InvalidInput, NotFound, Unavailable

__all__ = ["RedisBackend"]

log = logging.getLogger("hivemem.redis")

T = TypeVar("T")

#: How long results of writes made without a caller's request id are kept, at least:
#: longer than any retry of the write (they only make a retried script idempotent);
#: three times the retry budget when that is longer.
INTERNAL_REQUEST_TTL_MS = 60_000
#: Socket timeouts (seconds).
CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 10.0
#: Most stream entries one feed read scans per partition and call.
_SCAN = 1000
#: Most items expired per partition and sweep.
_SWEEP_ITEMS = 1000
#: Members per index page (load_texts, load_vectors, matching_keys).
_PAGE = 1000

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


@dataclass(slots=True)
class _PartRead:
    """What READ_FEED returned for one partition."""

    r: int
    last: bytes | None
    trim: bytes | None
    scanned: bytes | None
    n: int
    entries: list[Any]


def _part_read(raw: Sequence[Any]) -> _PartRead:
    return _PartRead(int(raw[0]), raw[1], raw[2], raw[3], int(raw[4]), list(raw[5]))


class RedisBackend(RedisTasks, Backend):
    """Items, sessions, task queues and the feed in Redis 7 (standalone or Redis Cluster).

    Args:
        url: the store URL (see :meth:`from_url`).
        settings: ``request_retention_seconds``, ``feed_poll_seconds`` and
            ``redis_retry_seconds`` apply.
        nodes: the cluster's startup nodes (host, port), or ``None`` for a standalone
            server at ``url``.
        cluster_options: username, password and ssl of a cluster URL.
    """

    task_hints = True

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

    #: No full-text search on stock Redis 7: the core ranks in process.
    native_lexical: ClassVar[bool] = False

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
        self._closing = False
        self._retry_seconds = settings.redis_retry_seconds
        self._request_ttl_ms = max(1, int(settings.request_retention_seconds * 1000))
        self._internal_ttl_ms = max(INTERNAL_REQUEST_TTL_MS, int(3000 * self._retry_seconds))
        self._where = _redact(url)

    def __repr__(self) -> str:
        return f"RedisBackend({self._where!r})"

    @property
    def is_cluster(self) -> bool:
        """Whether the store is a Redis Cluster."""
        return self._nodes is not None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisBackend:
        """Build from ``redis://[user:pw@]host:port[/db]``, ``rediss://...`` (TLS) or
        ``redis+cluster://[user:pw@]host:port,host:port,...[?ssl=true]`` (a cluster,
        given by some of its nodes).

        Raises:
            InvalidInput: the URL is malformed (field ``url``).
        """
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("redis", "rediss", "redis+cluster"):
            raise _bad_url(url)
        if scheme in ("redis", "rediss"):
            try:
                parsed = urllib.parse.urlsplit(url)
                parsed.port  # noqa: B018 (raises ValueError on a bad port)
            except ValueError:
                raise _bad_url(url) from None
            db = parsed.path.strip("/")
            if not parsed.hostname or "," in parsed.netloc or (db and not db.isdigit()):
                raise _bad_url(url)
            return cls(url, settings)
        netloc, _, tail = rest.partition("/")
        netloc, _, query = netloc.partition("?")
        if not query and "?" in tail:
            query = tail.split("?", 1)[1]
        options: dict[str, Any] = {}
        creds, at, hosts = netloc.rpartition("@")
        if at:
            user, colon, password = creds.partition(":")
            if user:
                options["username"] = urllib.parse.unquote(user)
            if colon:
                options["password"] = urllib.parse.unquote(password)
        params = urllib.parse.parse_qs(query)
        if params.get("ssl", ["false"])[-1].lower() in ("1", "true", "yes"):
            options["ssl"] = True
        nodes = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            host = host.strip("[]")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad_url(url)
            nodes.append((host, int(port)))
        if not nodes:
            raise _bad_url(url)
        return cls(url, settings, nodes=nodes, cluster_options=options)

    # Connections ---------------------------------------------------------------------

    def _new_client(self) -> aioredis.Redis | RedisCluster:
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        common: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_keepalive": True,
            "retry": retry,
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
        """The redis-py client (opened by :meth:`open`)."""
        if self._client is None:
            raise Unavailable(f"the Redis store {self._where} is not open")
        return self._client

    async def open(self) -> None:
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
        async def run() -> None:
            await self.client.ping()

        await self._retrying(run, "ping", budget=min(self._retry_seconds, 3.0))

    async def _retrying(
        self, op: Callable[[], Awaitable[T]], what: str, *, budget: float | None = None
    ) -> T:
        """Run ``op``, retrying transient engine errors with backoff for the retry budget;
        then raise Unavailable. Only idempotent operations may come here (every write
        script carries a request id, so re-running it is)."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await op()
            except Exception as exc:
                if not _transient(exc):
                    if isinstance(exc, rex.OutOfMemoryError):
                        raise Unavailable(
                            f"Redis at {self._where} is out of memory ({what}): {exc}"
                        ) from exc
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + (self._retry_seconds if budget is None else budget)
                if now >= deadline:
                    raise Unavailable(
                        f"Redis at {self._where} is unavailable ({what}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                log.debug("redis %s failed (%s), retrying", what, exc)
                await asyncio.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 0.5)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
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

        Without a request id: an internal one (``~<uuid>``, no fingerprint). With a
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
            return await run(f"{tag(p)}:req:~{uuid.uuid4().hex}", str(self._internal_ttl_ms))
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

    async def _listen(self) -> None:
        """Wake this process's watchers when any process commits: subscribe to the
        channel every write script publishes on; reconnect (to another node in a
        cluster) when the connection drops."""
        delay = 0.1
        attempt = 0
        while not self._closing:
            sub: aioredis.Redis | None = None
            try:
                sub = self._sub = self._subscriber(attempt)
                attempt += 1
                pubsub = sub.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CHANNEL)
                    self.changes.notify()  # something may have changed while away
                    self.changes.hint(None)
                    delay = 0.1
                    while not self._closing:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                        if msg is not None:
                            self.changes.notify()
                            self._pass_hints(msg.get("data"))
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("redis change listener: %s; reconnecting in %.1f s", exc, delay)
            finally:
                self._sub = None
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.aclose()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _subscriber(self, attempt: int) -> aioredis.Redis:
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_keepalive": True,
            "health_check_interval": 10,
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

    # Items ---------------------------------------------------------------------------

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        m = member(namespace, key)
        ik = tag(partition_of(namespace)).encode() + b":i:" + m

        async def run() -> list[Any]:
            return list(await self.client.hmget(ik, list(ITEM_FIELDS)))

        h = await self._retrying(run, "get")
        if h[1] is None or (h[5] is not None and float(h[5]) <= now):
            return None
        return item_from_hash(m, h)

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        parts = [partition_of(w.namespace) for w in writes]
        involved = list(dict.fromkeys(parts))
        if self.is_cluster and len(involved) > 1:
            raise InvalidInput(
                "on a Redis Cluster one batch can only write namespaces that share their first "
                "segment's partition; these ops span "
                + ", ".join(sorted({w.namespace.split("/", 1)[0] for w in writes}))
                + " (split the batch, or keep batched namespaces under one top-level segment)",
                field="ops",
            )
        args: list[Any] = [num(now), author, str(history_limit), "", "", str(len(writes))]
        for w, p in zip(writes, parts, strict=True):
            if_version = "" if w.if_version is None else str(w.if_version)
            if isinstance(w, CheckWrite):
                args += ["C", tag(p), w.namespace, w.key, if_version, *[""] * 8]
                continue
            if isinstance(w, DeleteWrite):
                args += ["D", tag(p), w.namespace, w.key, if_version, *[""] * 7, w.event or ""]
                continue
            args += [
                "P",
                tag(p),
                w.namespace,
                w.key,
                if_version,
                w.value,
                opt(w.text),
                opt(w.metadata),
                "" if w.expires_at is None else num(w.expires_at),
                opt(w.index_text),
                opt(w.vector),
                opt(w.model),
                w.event or "",
            ]
        keys = [meta_key(p) for p in involved]

        async def run(rk: str, ttl: str) -> Any:
            args[3], args[4] = rk, ttl
            return await self._script("write_items", keys, args)

        reply = await self._requested(involved[0], request_id, run)
        status = reply[0]
        if status == b"conflict":
            i, current = int(reply[1]), int(reply[2])
            w = writes[i]
            raise Conflict(
                f"{w.namespace}/{w.key} is at version {current}, not {w.if_version}"
                if current
                else f"{w.namespace}/{w.key} does not exist (version 0); if_version was "
                f"{w.if_version}",
                field=f"ops.{i}.if_version" if len(writes) > 1 else "if_version",
                current_version=current,
            )
        if status == b"ok":
            self.changes.notify()
        results: list[ItemRow | bool] = []
        for rec in unpack(reply[1]):
            assert rec is not None
            if rec in (b"0", b"1"):
                results.append(rec == b"1")
            else:
                results.append(item_from(unpack(rec)))
        return results

    async def list_items(
        self, prefix: str, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        ranges = lex_ranges(prefix, None if after is None else member(*after))
        if not ranges or limit <= 0:
            return []
        flat = [x for r in ranges for x in r]
        replies = await asyncio.gather(
            *(
                self._script("list_items", [meta_key(p)], [tag(p), num(now), str(limit), *flat])
                for p in partitions_under(prefix)
            )
        )
        rows = [item_from(unpack(rec)) for reply in replies for rec in reply]
        rows.sort(key=lambda r: (r.namespace, r.key))
        return rows[:limit]

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        flat = [x for r in lex_ranges(prefix) for x in r]
        replies = await asyncio.gather(
            *(
                self._script("namespaces", [meta_key(p)], [tag(p), num(now), *flat])
                for p in partitions_under(prefix)
            )
        )
        return sorted({ns.decode("utf-8") for reply in replies for ns in reply})

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        p = partition_of(namespace)
        reply = await self._script(
            "history", [meta_key(p)], [tag(p), member(namespace, key), num(now), str(limit)]
        )
        return [item_from(unpack(rec)) for rec in reply]

    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        # Request-id results expire natively (PX = request_retention_seconds), so
        # requests_before needs no work here.
        before = str(max(1, int(events_before * 1_000_000)))
        replies = await asyncio.gather(
            *(
                self._script("sweep", [meta_key(p)], [tag(p), num(now), before, str(_SWEEP_ITEMS)])
                for p in range(PARTITIONS)
            )
        )
        expired = sum(int(r[0]) for r in replies)
        trimmed = sum(int(r[1]) for r in replies)
        if expired:
            self.changes.notify()
        return expired, trimmed

    # Sessions ------------------------------------------------------------------------

    @staticmethod
    def _session_indexes(app: str, user: str | None, agent: str | None) -> list[str]:
        keys = [f"{SESSIONS_TAG}:all", f"{SESSIONS_TAG}:app:{app}"]
        if user is not None:
            keys.append(f"{SESSIONS_TAG}:user:{user}")
        if agent is not None:
            keys.append(f"{SESSIONS_TAG}:agent:{agent}")
        return keys

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
        ]

        async def run(rk: str, ttl: str) -> Any:
            # The id goes into the (global) session indexes first, then the session is
            # created: list_sessions never misses a session, and it checks every indexed
            # id against the session itself, so an entry left by a failed create is
            # ignored.
            await self._script(
                "session_index",
                self._session_indexes(row.app, row.user, row.agent),
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
        self, app: str | None, user: str | None, agent: str | None, after: str | None, limit: int
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
            app, user, agent = (None if v is None else v.decode("utf-8") for v in reply[2:5])
            assert app is not None
            await self._script(
                "session_index", self._session_indexes(app, user, agent), ["rem", session_id]
            )
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
            raise NotFound(f"no session {session_id!r}", field="session_id")
        if reply[0] == b"ok":
            self.changes.notify()
        return [message_from(unpack(rec)) for rec in unpack(reply[1]) if rec is not None]

    async def read_messages(self, session_id: str, after: int, limit: int) -> list[MessageRow]:
        p = session_partition(session_id)
        reply = await self._script(
            "read_messages", [meta_key(p)], [tag(p), session_id, str(after), str(limit)]
        )
        if reply[0] == b"notfound":
            raise NotFound(f"no session {session_id!r}", field="session_id")
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
            raise NotFound(f"no session {session_id!r}", field="session_id")
        if reply[0] == b"conflict":
            current = int(reply[1])
            raise Conflict(
                f"session {session_id!r} state is at version {current}, not {if_version}",
                field="if_version",
                current_version=current,
            )
        if reply[0] == b"ok":
            self.changes.notify()
        return session_from(unpack(reply[1]))

    # Feed ----------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        p = partition_of(channel)

        async def run(rk: str, ttl: str) -> Any:
            return await self._script(
                "publish", [meta_key(p)], [tag(p), channel, payload, author, num(now), rk, ttl]
            )

        reply = await self._requested(p, request_id, run)
        if reply[0] == b"ok":
            self.changes.notify()
        event_id, ch, who, at, data = unpack(reply[1])
        assert event_id is not None and ch is not None and who is not None and at is not None
        return EventRow(
            event_position(event_id, p).encode(),
            "publish",
            ch.decode("utf-8"),
            None,
            None,
            who.decode("utf-8"),
            float(at),
            data,
        )

    async def _read_parts(
        self, prefix: str, specs: dict[int, tuple[int, str, str]]
    ) -> dict[int, _PartRead]:
        """Run READ_FEED over the partitions of ``specs`` (p -> count, start, end): in one
        call on a standalone server, one call per partition on a cluster."""
        ps = sorted(specs)
        if not self.is_cluster:
            args: list[Any] = [prefix]
            for p in ps:
                args += [str(specs[p][0]), specs[p][1], specs[p][2]]
            reply = await self._script("read_feed", [meta_key(p) for p in ps], args)
            return {p: _part_read(raw) for p, raw in zip(ps, reply, strict=True)}
        replies = await asyncio.gather(
            *(
                self._script(
                    "read_feed",
                    [meta_key(p)],
                    [prefix, str(specs[p][0]), specs[p][1], specs[p][2]],
                )
                for p in ps
            )
        )
        return {p: _part_read(reply[0]) for p, reply in zip(ps, replies, strict=True)}

    @staticmethod
    def _check_trim(read: _PartRead, p: int, since: Position) -> None:
        if since.is_start or read.trim is None:
            return
        trimmed = event_position(read.trim, p)
        if trimmed > since:
            raise CursorExpired(
                f"events after cursor {since.encode()} were trimmed (retention); "
                "read from the feed's head or from '0' again",
                field="after",
            )

    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        pos = parse_cursor(after)
        relevant = set(partitions_under(prefix))
        scan = min(_SCAN, max(limit, 64))
        for attempt in range(4):
            specs = {
                p: (scan if p in relevant else 0, pos.start_id(p), "+") for p in range(PARTITIONS)
            }
            reads = await self._read_parts(prefix, specs)
            w = min(r.r for r in reads.values())
            found: list[tuple[Position, EventRow]] = []
            withheld = 0
            pending: dict[int, Position] = {}
            for p, r in reads.items():
                self._check_trim(r, p, pos)
                count = 0
                for entry in r.entries:
                    at = event_position(entry[0], p)
                    if at.ts >= w:
                        withheld = max(withheld, at.ts)
                        break
                    found.append((at, event_from(entry[0], entry[1], p)))
                    count += 1
                if (
                    p in relevant
                    and r.n >= scan
                    and r.scanned is not None
                    and count < limit
                    and event_position(r.scanned, p).ts < w
                ):
                    pending[p] = event_position(r.scanned, p)
            counts = defaultdict(int, {p: 0 for p in pending})
            for at, _ in found:
                counts[at.p] += 1
            while pending:
                specs = {p: (scan, f"({at.ts}-{at.seq}", f"({w}-0") for p, at in pending.items()}
                more = await self._read_parts(prefix, specs)
                nxt: dict[int, Position] = {}
                for p, r in more.items():
                    self._check_trim(r, p, pending[p])
                    for entry in r.entries:
                        at = event_position(entry[0], p)
                        found.append((at, event_from(entry[0], entry[1], p)))
                        counts[p] += 1
                    if r.n >= scan and r.scanned is not None and counts[p] < limit:
                        nxt[p] = event_position(r.scanned, p)
                pending = nxt
            found.sort(key=lambda f: f[0])
            rows = [row for _, row in found[:limit]]
            if len(rows) == limit:
                return rows, rows[-1].cursor
            if withheld and attempt < 3:
                # An event committed as we read: W will pass it in a moment.
                await asyncio.sleep(min(0.05, (withheld - w) / 1e6 + 0.0005))
                continue
            return rows, max(pos, watermark(w - 1)).encode()
        raise AssertionError("unreachable")

    async def head(self) -> str:
        w = 0
        for attempt in range(4):
            specs = {p: (0, "-", "+") for p in range(PARTITIONS)}
            reads = await self._read_parts("", specs)
            w = min(r.r for r in reads.values())
            lasts = [event_position(r.last, p) for p, r in reads.items() if r.last is not None]
            if all(last.ts < w for last in lasts):
                return max(lasts).encode() if lasts else START.encode()
            if attempt < 3:
                await asyncio.sleep(0.001)
        return watermark(w - 1).encode()

    # Search --------------------------------------------------------------------------

    async def search_lexical(
        self,
        prefix: str,
        terms: Sequence[str],
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        raise NotImplementedError("Redis has no full-text ranking here: the core ranks in process")

    def _by_partition(self, keys: Iterable[tuple[str, str]]) -> dict[int, list[bytes]]:
        groups: dict[int, list[bytes]] = defaultdict(list)
        for ns, key in keys:
            groups[partition_of(ns)].append(member(ns, key))
        return groups

    async def _fields(
        self, keys: Sequence[tuple[str, str]], fields: Sequence[str]
    ) -> list[tuple[bytes, list[Any]]]:
        """(member, values of ``fields``) of the existing items among ``keys``."""
        groups = self._by_partition(keys)
        replies = await asyncio.gather(
            *(
                self._script("fields", [meta_key(p)], [tag(p), str(len(fields)), *fields, *ms])
                for p, ms in groups.items()
                if ms
            )
        )
        return [(row[0], list(row[1:])) for reply in replies for row in reply]

    async def _scan_index(
        self,
        p: int,
        fields: Sequence[str],
        ranges: Sequence[tuple[bytes, bytes]] = ((b"-", b"+"),),
    ) -> list[tuple[bytes, list[Any]]]:
        """(member, values of ``fields``) of every indexed item of partition ``p`` in
        ``ranges``, page by page."""
        out: list[tuple[bytes, list[Any]]] = []
        for lo, hi in ranges:
            start = lo
            while True:
                reply = await self._script(
                    "scan",
                    [meta_key(p)],
                    [tag(p), "idx", start, hi, str(_PAGE), str(len(fields)), *fields],
                )
                out.extend((row[0], list(row[1:])) for row in reply)
                if len(reply) < _PAGE:
                    break
                start = b"(" + reply[-1][0]
        return out

    async def load_texts(self) -> list[tuple[str, str, str]]:
        pages = await asyncio.gather(*(self._scan_index(p, ["xt"]) for p in range(PARTITIONS)))
        out = []
        for page in pages:
            for m, (text,) in page:
                if text is not None:
                    ns, key = split_member(m)
                    out.append((ns, key, text.decode("utf-8")))
        return out

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        found = {}
        for m, (text,) in await self._fields(keys, ["xt"]):
            if text is not None:
                found[split_member(m)] = text.decode("utf-8")
        return found

    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        ranges = lex_ranges(prefix)
        pages = await asyncio.gather(
            *(self._scan_index(p, ["a", "u", "m", "e"], ranges) for p in partitions_under(prefix))
        )
        out = []
        for page in pages:
            for m, (author, updated, meta, expires) in page:
                if author is None or (expires is not None and float(expires) <= now):
                    continue
                ns, key = split_member(m)
                row = ItemRow(
                    ns,
                    key,
                    b"",
                    0,
                    author.decode("utf-8"),
                    0.0,
                    float(updated),
                    None if expires is None else float(expires),
                    None,
                    meta,
                )
                if row_matches(row, conditions):
                    out.append((ns, key))
        out.sort()
        return out

    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        pages = await asyncio.gather(
            *(self._scan_index(p, ["xm", "xe"]) for p in range(PARTITIONS))
        )
        wanted = model.encode("utf-8")
        out = []
        for page in pages:
            for m, (found_model, vec) in page:
                if found_model == wanted and vec is not None:
                    ns, key = split_member(m)
                    out.append((ns, key, bytes(vec)))
        return out

    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        wanted = model.encode("utf-8")
        found = {}
        for m, (found_model, vec) in await self._fields(keys, ["xm", "xe"]):
            if found_model == wanted and vec is not None:
                found[split_member(m)] = bytes(vec)
        return found

    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        rows = []
        for m, h in await self._fields(keys, ITEM_FIELDS):
            if h[1] is not None and (h[5] is None or float(h[5]) > now):
                rows.append(item_from_hash(m, h))
        return rows

    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        start = b"-" if after is None else b"(" + member(*after)

        async def part(p: int) -> list[ItemRow]:
            rows: list[ItemRow] = []
            lo: bytes | None = start
            while lo is not None and len(rows) < limit:
                reply = await self._script(
                    "unindexed",
                    [meta_key(p)],
                    [tag(p), num(now), opt(model), str(limit - len(rows)), lo],
                )
                rows.extend(item_from(unpack(rec)) for rec in reply[0])
                lo = reply[1] if len(reply) > 1 else None
            return rows

        parts = await asyncio.gather(*(part(p) for p in range(PARTITIONS)))
        rows = sorted((r for rows in parts for r in rows), key=lambda r: (r.namespace, r.key))
        return rows[:limit]

    async def count_items(self, now: float) -> int:
        replies = await asyncio.gather(
            *(self._script("count", [meta_key(p)], [tag(p), num(now)]) for p in range(PARTITIONS))
        )
        return sum(int(r) for r in replies)

    async def set_index(self, entries: Sequence[IndexEntry]) -> int:
        groups: dict[int, list[Any]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for e in entries:
            p = partition_of(e.namespace)
            groups[p] += [
                member(e.namespace, e.key),
                str(e.version),
                opt(e.text),
                opt(e.vector),
                opt(e.model),
            ]
            counts[p] += 1
        replies = await asyncio.gather(
            *(
                self._script("set_index", [meta_key(p)], [tag(p), str(counts[p]), *args])
                for p, args in groups.items()
            )
        )
        return sum(int(r) for r in replies)


def _bad_url(url: str) -> InvalidInput:
    return InvalidInput(
        f"bad Redis URL {_redact(url)!r}: use redis://host:port[/db], rediss://host:port[/db] "
        "or redis+cluster://host:port,host:port,...",
        field="url",
    )


def _redact(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, tail = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{tail}"
