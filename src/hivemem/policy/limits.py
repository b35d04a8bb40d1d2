"""Rate limits per agent and per action class, counted in process or in a shared Redis.

Each action class of :data:`~hivemem.policy.principal.ACTIONS` has its own limit, set by
``Settings.rate_limit_<action>`` in `limits`_ notation (``"100/second"``,
``"1000/minute;50/second"``: every part must hold); an empty string leaves the class
unlimited. Counters are kept per
``(agent, action class)``: one agent going over its ``search`` limit neither slows its
writes nor any other agent.

Where the counters live is ``Settings.rate_limit_store``:

* ``memory://``: in this process (one replica's view; several replicas each allow the
  full limit);
* ``redis://host:port[/db]``, ``rediss://...`` or ``redis+cluster://host:port,...``
  (``?ssl=true`` for TLS): in Redis, through redis-py, so every replica pointed at it
  counts against the same limit. Keys start with ``hivemem:ratelimit:`` and expire on
  their own (after two windows without traffic).

.. _limits: https://limits.readthedocs.io/en/stable/quickstart.html#rate-limit-string-notation
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import ConfigurationError

from hivemem.config import Settings, redact_url
from hivemem.errors import InvalidInput, RateLimited
from hivemem.policy.principal import ACTIONS

__all__ = ["RateLimiter"]

log = logging.getLogger("hivemem.limits")

#: Prefix of every rate-limit key in Redis.
KEY_PREFIX = "hivemem:ratelimit"
#: Connect and read timeout of the Redis storage: a rate-limit check must not hold a
#: request long when Redis is slow or gone (a healthy Redis answers in well under 1 ms).
REDIS_TIMEOUT_SECONDS = 0.5
#: After the storage failed, requests pass without asking it for this long (so a Redis
#: that times out costs one timeout per period, not one per request).
OUTAGE_BYPASS_SECONDS = 1.0
#: Least time between two warnings about an unreachable storage.
WARN_INTERVAL_SECONDS = 30.0
#: How often the in-process storage sweeps out expired counters (see _memory_storage).
MEMORY_SWEEP_SECONDS = 1.0
#: Smallest ``retry_after`` reported (the service's Retry-After header is whole seconds).
MIN_RETRY_AFTER_SECONDS = 0.01


#: limits' MemoryStorage method that starts a sweep of expired counters (name-mangled).
_SWEEP_HOOK = "_MemoryStorage__schedule_expiry"


def _memory_storage() -> MemoryStorage:
    """limits' in-process storage, made to sweep expired counters at most once a second.

    ``MemoryStorage`` starts a task sweeping *every* key whenever its previous sweep has
    finished, i.e. about once per event-loop turn with traffic: with 1,000 to 10,000 live
    counters that measured 40-100 µs per hit instead of ~10. Expired counters are also
    dropped when read, so a slower sweep changes the memory held, never a decision. The
    hook is a private method, replaced on this instance only (a subclass would wrap every
    storage method a second time); should limits rename it, the storage keeps its own
    behaviour.
    """
    storage = MemoryStorage()
    sweep = getattr(storage, _SWEEP_HOOK, None)
    if sweep is None:
        return storage
    next_sweep = 0.0

    async def schedule_expiry() -> None:
        nonlocal next_sweep
        now = time.monotonic()
        if now >= next_sweep:
            next_sweep = now + MEMORY_SWEEP_SECONDS
            await sweep()

    setattr(storage, _SWEEP_HOOK, schedule_expiry)
    return storage


def _redact(url: str) -> str:
    """``url`` without its password (:func:`hivemem.config.redact_url`)."""
    return redact_url(url)


def _bad_store(url: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"rate_limit_store {_redact(url)!r}: {why}; expected memory://, "
        "redis://host:port[/db], rediss://... or redis+cluster://host:port,host:port",
        field="rate_limit_store",
    )


def _make_storage(url: str) -> Storage:
    """The limits storage for ``rate_limit_store`` (no I/O: Redis connects on first use).

    Raises:
        InvalidInput: unknown scheme or malformed URL (field ``rate_limit_store``).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _bad_store(url, "not a URL")
    if scheme == "memory":
        return _memory_storage()
    if scheme not in ("redis", "rediss", "redis+cluster"):
        raise _bad_store(url, f"unknown scheme {scheme!r}")
    # redis-py retries 3 times with up to 1+2+4 s of backoff by default: far too long to
    # hold a request for a rate-limit check. One immediate retry covers a stale pooled
    # connection; anything longer is an outage, and we fail open.
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 1),
    }
    try:
        if scheme == "redis+cluster":
            netloc, _, query = rest.partition("?")
            netloc = netloc.partition("/")[0]
            ssl = urllib.parse.parse_qs(query).get("ssl", ["false"])[-1].lower()
            if ssl in ("1", "true", "yes"):
                options["ssl"] = True
            hosts = netloc.rpartition("@")[2]
            if not hosts or any(not h.rpartition(":")[2].isdigit() for h in hosts.split(",")):
                raise _bad_store(url, "every node needs host:port")
            # Keys on the slots still served keep being limited while some are not.
            options["require_full_coverage"] = False
            return RedisClusterStorage(
                f"async+redis+cluster://{netloc}",
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                **options,
            )
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port  # raises ValueError on a bad port
        db = parsed.path.strip("/")
        if not parsed.hostname or "," in parsed.netloc or (db and not db.isdigit()):
            raise _bad_store(url, "expected one host and an optional numeric db")
        if port is None:  # limits insists on an explicit port
            parsed = parsed._replace(netloc=f"{parsed.netloc}:6379")
        return RedisStorage(
            f"async+{parsed.geturl()}", implementation="redispy", key_prefix=KEY_PREFIX, **options
        )
    except (ValueError, ConfigurationError) as exc:
        raise _bad_store(url, str(exc)) from None


class RateLimiter:
    """Counts each agent's requests per action class and refuses those over its limit.

    Args:
        settings: ``rate_limit_<action>`` (one per action class; empty: unlimited) and
            ``rate_limit_store`` (``memory://`` or a Redis URL shared by replicas).

    Raises:
        InvalidInput: a limit string cannot be parsed (field ``rate_limit_<action>``) or
            the store URL is not one of the supported kinds (field ``rate_limit_store``).

    **Strategy: sliding window counter** (limits' ``SlidingWindowCounterRateLimiter``).
    Each limit keeps two counters per agent and action class, the current fixed window's
    and the previous one's; a hit is allowed while ``previous * (share of the previous
    window still inside the sliding window) + current`` stays within the limit. Every
    hit is O(1) time and memory, and on Redis one ``EVALSHA`` (one round trip, the two
    keys share a hash slot so it works on a cluster, and the window is measured by the
    server's TTLs, so replicas' clocks need not agree). The moving window, the exact
    alternative, keeps one timestamp per allowed hit (a ``1000/minute`` limit holds up to
    1,000 entries per agent, in a Redis list or a Python list that every hit inserts
    into), and limits' in-process moving window hands each key to a thread on every
    expiry sweep; neither is worth it for a check that runs on every request. The price
    is approximation: the previous window's hits are assumed evenly spread, so when they
    bunched at its end, a true sliding period can see more than the limit (at most about
    twice it, at window edges); with real traffic the difference is small.

    With several limits for one class (``"1000/minute;50/second"``) each is hit in turn,
    shortest window first, and the first refusal stops: a refused hit is charged to the
    limits before the refusing one only (a burst refused by ``50/second`` does not use up
    the minute's allowance).

    **Failing open.** When the storage cannot be reached (Redis down, refusing, timing
    out after :data:`REDIS_TIMEOUT_SECONDS`), :meth:`hit` lets the request through:
    rate limiting protects the service, and an outage of its counters should not become
    an outage of the service. Requests then pass without asking the storage for
    :data:`OUTAGE_BYPASS_SECONDS`, after which it is tried again; a warning is logged
    (logger ``hivemem.limits``) at most once every :data:`WARN_INTERVAL_SECONDS`.

    Cost: nothing when no limit is set (:attr:`enabled` is false: no storage is even
    made); about 10 µs per limit with ``memory://``; one Redis round trip per limit
    otherwise.
    """

    def __init__(self, settings: Settings) -> None:
        limits: dict[str, tuple[RateLimitItem, ...]] = {}
        for action in ACTIONS:
            name = f"rate_limit_{action}"
            raw = str(getattr(settings, name, "") or "").strip()
            if not raw:
                limits[action] = ()
                continue
            try:
                items = parse_many(raw)
            except ValueError:
                raise InvalidInput(
                    f"{name}: cannot parse {raw!r}; expected limits such as '100/second' "
                    "or '1000/minute;50/second'",
                    field=name,
                ) from None
            if any(item.amount <= 0 for item in items):
                raise InvalidInput(
                    f"{name}: {raw!r} allows nothing; leave it empty for no limit", field=name
                )
            limits[action] = tuple(sorted(items, key=lambda item: item.get_expiry()))
        self._limits = limits
        self._enabled = any(limits.values())
        self._store_url = settings.rate_limit_store
        self._storage: Storage | None = None
        self._strategy: SlidingWindowCounterRateLimiter | None = None
        if self._enabled:
            self._storage = _make_storage(settings.rate_limit_store)
            self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self._bypass_until = 0.0
        self._last_warning = -math.inf

    @property
    def enabled(self) -> bool:
        """Whether any action class has a limit (if not, :meth:`hit` does nothing)."""
        return self._enabled

    def limits(self, action: str) -> tuple[RateLimitItem, ...]:
        """The limits of an action class, shortest window first; empty: unlimited.

        Raises:
            ValueError: ``action`` is not an action class.
        """
        try:
            return self._limits[action]
        except KeyError:
            raise ValueError(f"unknown action class {action!r}; one of {ACTIONS}") from None

    async def hit(self, agent: str, action: str) -> None:
        """Count one request of ``agent`` in ``action``'s class, or refuse it.

        Raises:
            RateLimited: the agent is over a limit of this action class; the refused
                request counts only against the limits checked before the refusing one
                (shorter windows). ``retry_after`` is the seconds until the refusing
                limit's window has room again.
            ValueError: ``action`` is not an action class.
        """
        items = self._limits.get(action)
        if not items:
            if items is None:
                raise ValueError(f"unknown action class {action!r}; one of {ACTIONS}")
            return
        if self._bypass_until:
            if time.monotonic() < self._bypass_until:
                return
            self._bypass_until = 0.0
        strategy = self._strategy
        assert strategy is not None
        for item in items:
            try:
                allowed = await strategy.hit(item, agent, action)
            except Exception as exc:
                self._storage_failed(exc)
                return
            if not allowed:
                retry_after = await self._retry_after(strategy, item, agent, action)
                raise RateLimited(
                    f"agent {agent!r} is over its {action} rate limit ({item}); "
                    f"retry in {retry_after:.2f} s",
                    retry_after=retry_after,
                )

    async def _retry_after(
        self, strategy: SlidingWindowCounterRateLimiter, item: RateLimitItem, *ids: str
    ) -> float:
        """Seconds until ``item``'s window for ``ids`` has room for one more hit."""
        try:
            stats = await strategy.get_window_stats(item, *ids)
            seconds = stats.reset_time - time.time()
        except Exception as exc:
            self._storage_failed(exc)
            seconds = float(item.get_expiry())
        return max(MIN_RETRY_AFTER_SECONDS, math.ceil(seconds * 100) / 100)

    def _storage_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._bypass_until = now + OUTAGE_BYPASS_SECONDS
        if now - self._last_warning >= WARN_INTERVAL_SECONDS:
            self._last_warning = now
            log.warning(
                "rate limits not enforced: store %s failed (%s: %s); requests are let "
                "through until it answers again",
                _redact(self._store_url),
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        """Release the storage (Redis connections, the in-process sweep task)."""
        storage, self._storage = self._storage, None
        if isinstance(storage, MemoryStorage):
            timer = storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
        elif isinstance(storage, RedisStorage):
            client = getattr(storage.bridge, "storage", None)
            if client is not None:
                await client.aclose()
