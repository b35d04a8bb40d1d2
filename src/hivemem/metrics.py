"""Prometheus metrics of a hive (prometheus-client).

Every :class:`~hivemem.core.LocalHive` family (a hive and its views) has one
:class:`Metrics` with a registry of its own, so several hives in one process never mix
their figures. The service exposes its hive's registry at ``GET /metrics``; an embedded
hive exposes it on a port of the agent's choosing with :func:`serve`::

    hive = hivemem.connect("sqlite:///hive.db", agent="planner")
    server, thread = hivemem.metrics.serve(hive, port=9464)

Names and units follow the Prometheus conventions (``_seconds``, ``_bytes``,
``_total``). Labels are bounded: routes are path templates (``/v1/items/{namespace}``,
never a key), and the names a client chooses (agents, apps, queues) are kept as labels
for the first :data:`MAX_LABEL_VALUES` seen per metric family, then counted as
``"other"``.

The metric list (label names in brackets):

- ``hivemem_http_requests_total`` [route, method, status],
  ``hivemem_http_request_duration_seconds`` [route, method] (histogram),
  ``hivemem_http_requests_in_flight``;
- ``hivemem_store_operation_duration_seconds`` [backend, operation] (histogram; every
  backend call, errors included), ``hivemem_store_errors_total`` [backend, operation,
  error];
- ``hivemem_feed_head_timestamp_seconds`` (commit time of the newest event this process
  has seen), ``hivemem_feed_watchers`` (open watches: SSE streams and ``watch``
  iterators), ``hivemem_feed_delivery_lag_seconds`` (histogram: commit to delivery to a
  watcher), ``hivemem_feed_tail_read_timestamp_seconds`` (the process's one feed reader's
  last successful read: at least every ``feed_poll_seconds`` while watches are open, so a
  stalled reader shows even when no event is delivered);
- ``hivemem_search_duration_seconds`` [mode, index] (histogram; index ``memory``: the
  in-process indexes, ``engine``: the store ranked);
- ``hivemem_embedding_batch_size`` (histogram of texts per model call),
  ``hivemem_embedding_duration_seconds`` (histogram),
  ``hivemem_embedding_queue_wait_seconds`` (histogram: a write's commit to its vector
  being embedded, deferred indexing);
- ``hivemem_index_entries`` [index], ``hivemem_index_memory_bytes`` [index] (the
  in-process BM25, vector and filter-row indexes, read at scrape time);
- ``hivemem_store_file_bytes`` [file] (SQLite stores: the database and its WAL),
  ``hivemem_store_disk_free_bytes`` and ``hivemem_store_disk_size_bytes`` (their file
  system); for PostgreSQL and Redis use those engines' own exporters;
- ``hivemem_tasks`` [queue, state] (ready, running, delayed, dead; refreshed at each
  scrape of ``/metrics``), ``hivemem_task_oldest_ready_age_seconds`` [queue],
  ``hivemem_task_claim_wait_seconds`` [queue] (histogram: a claim call's wait),
  ``hivemem_task_duration_seconds`` [queue, outcome] (histogram: from the attempt's
  stored claim time to its completion or failure, observed by whichever process ends it);
- ``hivemem_rate_limited_total`` [agent], ``hivemem_auth_failures_total`` [reason, agent]
  (``agent``: the agent a refused credential names where that can be trusted, an API key
  whose id is stored or a JWT whose signature verified; else ``unknown``);
- ``hivemem_session_tokens_total`` [app, kind] (input, output),
  ``hivemem_session_cost_total`` [app] (the unit the agents report, e.g. USD);
- ``hivemem_cache_requests_total`` [cache, result] (``rows``: the filter-row cache,
  ``hit`` when it knew an item, ``miss`` when the store had to be asked);
- prometheus-client's ``process_*`` (CPU seconds, resident memory, open files) and
  ``python_gc_*`` / ``python_info``.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from hivemem.hive import Hive

__all__ = [
    "CONTENT_TYPE",
    "MAX_LABEL_VALUES",
    "HotCounter",
    "HotHistogram",
    "Metrics",
    "exposition",
    "serve",
]

#: Distinct values a client-chosen label (agent, app, queue) keeps per metric family;
#: later ones are counted as ``"other"``.
MAX_LABEL_VALUES = 100
#: The text exposition format's content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Request and store latency buckets (seconds): 0.5 ms .. 10 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Waits that may last minutes: task claims (long polls), durations, embedding queue.
WAIT_BUCKETS = (0.005, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)


class _Bounded:
    """Keeps the first ``limit`` values of a client-chosen label, then ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or "none"
        if value in self.seen:
            return value
        with self.lock:
            if len(self.seen) < self.limit:
                self.seen.add(value)
                return value
        return "other"


class _HotCount:
    """One labelled series of a :class:`HotCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HotBuckets:
    """One labelled series of a :class:`HotHistogram`: a count per bucket (not
    cumulative; the last one is ``+Inf``) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, i.e. the bucket ``le`` that holds it
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


#: The series type of a :class:`_HotFamily`.
_S = TypeVar("_S", "_HotCount", "_HotBuckets")


class _HotFamily(Collector, Generic[_S]):
    """A labelled metric family kept in plain Python numbers and exposed through the
    registry as a collector. For the per-request paths (every HTTP request and store
    call): an observation is a dict lookup, a bisect and two additions, about 0.2 µs,
    where prometheus-client's takes a lock per updated value (1.1 µs a histogram
    observation, 0.5 µs a counter increment, measured here with ``timeit``).

    The series are updated without a lock: by one thread at a time, the hive's event
    loop, which is where requests are served and store calls awaited. A scrape from
    another thread (:func:`serve`) copies each series and may miss an observation in
    flight, never a whole one afterwards."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], _S] = {}
        registry.register(self)

    def labels(self, *values: str) -> _S:
        """The series of these label values (made at its first use)."""
        series = self._series.get(values)
        if series is None:
            series = self._series.setdefault(values, self._new_series())
        return series

    def _new_series(self) -> _S:
        raise NotImplementedError

    def describe(self) -> list[Any]:
        return [self._family()]

    def _family(self) -> Any:
        raise NotImplementedError


class HotCounter(_HotFamily[_HotCount]):
    """A labelled counter (exposed as ``<name>_total``) for the per-request paths; see
    :class:`_HotFamily`. ``labels(*values)`` returns the series, whose ``inc(amount=1)``
    adds."""

    def _new_series(self) -> _HotCount:
        return _HotCount()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Any]:
        family = self._family()
        for values, series in list(self._series.items()):
            family.add_metric(list(values), series.value, created=series.created)
        yield family


class HotHistogram(_HotFamily[_HotBuckets]):
    """A labelled histogram for the per-request paths; see :class:`_HotFamily`.
    ``labels(*values)`` returns the series, whose ``observe(amount)`` records one value.

    Args:
        buckets: the upper bounds, ascending, without ``+Inf`` (added).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        ascending = list(self.bounds) == sorted(set(self.bounds))
        if not ascending or not all(map(math.isfinite, self.bounds)):
            raise ValueError("buckets must be finite and strictly ascending")
        # the same ``le`` text as prometheus-client's own histograms
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_series(self) -> _HotBuckets:
        return _HotBuckets(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Any]:
        family = self._family()
        for values, series in list(self._series.items()):
            counts, total = list(series.counts), series.sum
            cumulative, seen = [], 0
            for le, n in zip(self._les, counts, strict=True):
                seen += n
                cumulative.append((le, float(seen)))
            family.add_metric(list(values), cumulative, total)
        yield family


class Metrics:
    """The metric families of one hive, in a registry of their own.

    Args:
        backend: the store kind (``sqlite``, ``postgres``, ``redis``), the ``backend``
            label of the store metrics.
        process: also collect the process and Python runtime figures (one registry per
            process should; the service's does).

    Attributes:
        registry: the :class:`prometheus_client.CollectorRegistry` holding them.
    """

    def __init__(self, backend: str, *, process: bool = True) -> None:
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.http_requests = HotCounter(
            "hivemem_http_requests",
            "HTTP requests answered.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_seconds = HotHistogram(
            "hivemem_http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte (SSE: to the stream's end).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            "hivemem_http_requests_in_flight", "HTTP requests being served.", registry=r
        )
        self.store_seconds = HotHistogram(
            "hivemem_store_operation_duration_seconds",
            "Time of each call into the store backend.",
            ["backend", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "hivemem_store_errors",
            "Store backend calls that raised, by error type.",
            ["backend", "operation", "error"],
            registry=r,
        )
        self.feed_head = Gauge(
            "hivemem_feed_head_timestamp_seconds",
            "Commit time (UNIX seconds) of the newest feed event this process has seen.",
            registry=r,
        )
        self.feed_read = Gauge(
            "hivemem_feed_tail_read_timestamp_seconds",
            "When (UNIX seconds) this process's feed reader last read the feed; it reads at "
            "least every feed_poll_seconds while watches are open.",
            registry=r,
        )
        self.feed_watchers = Gauge(
            "hivemem_feed_watchers",
            "Open feed watches (SSE streams, watch iterators).",
            registry=r,
        )
        self.feed_lag = Histogram(
            "hivemem_feed_delivery_lag_seconds",
            "Time from an event's commit to its delivery to a watcher.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.search_seconds = Histogram(
            "hivemem_search_duration_seconds",
            "Time of a search, by mode and by where it ranked (memory: in-process indexes; "
            "engine: the store).",
            ["mode", "index"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.embed_batch = Histogram(
            "hivemem_embedding_batch_size",
            "Texts per embedding model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.embed_seconds = Histogram(
            "hivemem_embedding_duration_seconds",
            "Time of one embedding model call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.embed_wait = Histogram(
            "hivemem_embedding_queue_wait_seconds",
            "Time from a write's commit to its text being embedded (deferred indexing).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.tasks = Gauge(
            "hivemem_tasks",
            "Tasks by queue and state (ready, running, delayed, dead), as of the last scrape.",
            ["queue", "state"],
            registry=r,
        )
        self.task_oldest = Gauge(
            "hivemem_task_oldest_ready_age_seconds",
            "Age of the oldest ready task of each queue, as of the last scrape.",
            ["queue"],
            registry=r,
        )
        self.task_claim_wait = Histogram(
            "hivemem_task_claim_wait_seconds",
            "Time a claim call waited (long poll included) before it returned.",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.task_seconds = Histogram(
            "hivemem_task_duration_seconds",
            "Time from a task's claim to its completion or failure.",
            ["queue", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "hivemem_rate_limited",
            "Requests refused by the rate limits, by agent.",
            ["agent"],
            registry=r,
        )
        self.auth_failures = Counter(
            "hivemem_auth_failures",
            "Requests refused for missing or invalid credentials, by reason and by the agent "
            "the credential names where that can be trusted (a stored key's id, a token "
            "whose signature verified), else 'unknown'.",
            ["reason", "agent"],
            registry=r,
        )
        self.session_tokens = Counter(
            "hivemem_session_tokens",
            "Tokens reported with session messages, by app and kind (input, output).",
            ["app", "kind"],
            registry=r,
        )
        self.session_cost = Counter(
            "hivemem_session_cost",
            "Cost reported with session messages, by app (the agents' unit, e.g. USD).",
            ["app"],
            registry=r,
        )
        self.cache = Counter(
            "hivemem_cache_requests",
            "Lookups in the in-process caches, by cache and result (hit, miss).",
            ["cache", "result"],
            registry=r,
        )
        #: session id -> its app's label (apps never change; cleared at 10,000)
        self.session_apps: dict[str, str] = {}
        self.agent_label = _Bounded()
        self.app_label = _Bounded()
        self.queue_label = _Bounded()
        self._index_sources: list[Callable[[], Iterable[tuple[str, int, int]]]] = []
        self._file_sources: list[Callable[[], Iterable[tuple[str, int]]]] = []
        r.register(_IndexCollector(self._index_sources, self._file_sources))

    def add_index_source(self, source: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Report ``source()``'s (index name, entries, bytes) at each scrape."""
        self._index_sources.append(source)

    def add_file_source(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Report ``source()``'s (file role, bytes) as ``hivemem_store_file_bytes`` at
        each scrape; the roles ``disk_free`` and ``disk_size`` go to the disk gauges."""
        self._file_sources.append(source)

    def observe_embedding(self, texts: int, seconds: float) -> None:
        """Record one embedding model call: its batch size (texts) and its seconds."""
        self.embed_batch.observe(texts)
        self.embed_seconds.observe(seconds)

    def observe_store(self, operation: str, seconds: float, error: BaseException | None) -> None:
        self.store_seconds.labels(self.backend, operation).observe(seconds)
        if error is not None:
            self.store_errors.labels(self.backend, operation, type(error).__name__).inc()

    def instrument_backend(
        self, backend: Any, operations: Iterable[str], *, tracer: Any = None, timed: bool = True
    ) -> None:
        """Time every call of ``backend``'s async ``operations`` (instance attributes
        replace the methods; the backend's type is unchanged); with an OpenTelemetry
        ``tracer``, each call is also a span ``hivemem.store <operation>``. One wrapper
        does both: each layer is one more coroutine per call, resumed at its every await.

        Args:
            timed: observe ``hivemem_store_operation_duration_seconds`` and count
                ``hivemem_store_errors_total`` (the setting ``metrics``).
        """
        for name in operations:
            method = getattr(backend, name, None)
            if method is None or not inspect.iscoroutinefunction(method):
                continue
            if tracer is not None:
                wrapped = _traced(method, name, self if timed else None, tracer)
            elif timed:
                wrapped = _timed(method, name, self)
            else:
                continue
            setattr(backend, name, wrapped)


def _timed(method: Callable[..., Any], name: str, metrics: Metrics) -> Callable[..., Any]:
    observe = metrics.store_seconds.labels(metrics.backend, name).observe

    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await method(*args, **kwargs)
        except BaseException as exc:
            observe(time.perf_counter() - start)
            if isinstance(exc, Exception):  # not a cancellation or an exit
                metrics.store_errors.labels(metrics.backend, name, type(exc).__name__).inc()
            raise
        observe(time.perf_counter() - start)
        return result

    return timed


#: OpenTelemetry's db.system of each backend kind.
_DB_SYSTEM = {
    "sqlite": "sqlite",
    "postgres": "postgresql",
    "redis": "redis",
    "redis-cluster": "redis",
}


def _traced(
    method: Callable[..., Any], name: str, metrics: Metrics | None, tracer: Any
) -> Callable[..., Any]:
    """``method`` timed (when ``metrics`` is given) and, inside a recorded span, traced."""
    from opentelemetry import context
    from opentelemetry.trace import (
        SpanKind,
        Status,
        StatusCode,
        get_current_span,
        set_span_in_context,
    )

    span_name = f"hivemem.store {name}"
    backend = metrics.backend if metrics is not None else ""
    attributes = {"db.system": _DB_SYSTEM.get(backend, backend), "db.operation.name": name}
    client = SpanKind.CLIENT
    observe = None if metrics is None else metrics.store_seconds.labels(backend, name).observe

    @functools.wraps(method)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        # Only inside a recorded span: a store call is a step of some traced work (a
        # request, an agent's span); alone, or under an unsampled span, it is skipped.
        span = token = None
        if get_current_span().is_recording():
            # start_span + attach by hand: start_as_current_span's two context managers
            # cost a fifth of the span again (about 4 µs of 18).
            span = tracer.start_span(span_name, kind=client, attributes=attributes)
            token = context.attach(set_span_in_context(span))
        try:
            return await method(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, Exception):
                if metrics is not None:
                    metrics.store_errors.labels(backend, name, type(exc).__name__).inc()
                if span is not None:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if observe is not None:
                observe(time.perf_counter() - start)
            if token is not None:
                context.detach(token)
            if span is not None:
                span.end()

    return traced


class _IndexCollector:
    """Reads the in-process indexes' sizes when scraped."""

    def __init__(
        self,
        sources: list[Callable[[], Iterable[tuple[str, int, int]]]],
        files: list[Callable[[], Iterable[tuple[str, int]]]],
    ) -> None:
        self.sources = sources
        self.files = files

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        entries = GaugeMetricFamily(
            "hivemem_index_entries", "Entries in each in-process index.", labels=["index"]
        )
        size = GaugeMetricFamily(
            "hivemem_index_memory_bytes",
            "Estimated memory of each in-process index.",
            labels=["index"],
        )
        for source in self.sources:
            for name, count, nbytes in source():
                entries.add_metric([name], count)
                size.add_metric([name], nbytes)
        yield entries
        yield size
        if self.files:
            stored = GaugeMetricFamily(
                "hivemem_store_file_bytes",
                "Size of the embedded store's files (SQLite: db, wal).",
                labels=["file"],
            )
            free = GaugeMetricFamily(
                "hivemem_store_disk_free_bytes",
                "Bytes free (for unprivileged users) on the file system of the store's files.",
            )
            total = GaugeMetricFamily(
                "hivemem_store_disk_size_bytes", "Size of the file system of the store's files."
            )
            for files in self.files:
                for role, nbytes in files():
                    if role == "disk_free":
                        free.add_metric([], nbytes)
                    elif role == "disk_size":
                        total.add_metric([], nbytes)
                    else:
                        stored.add_metric([role], nbytes)
            yield stored
            yield free
            yield total


def exposition(metrics: Metrics) -> bytes:
    """The registry in Prometheus's text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(metrics.registry)


def serve(hive: Hive, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Expose an embedded hive's metrics at ``http://addr:port/metrics`` from a daemon
    thread (prometheus-client's own server).

    Args:
        hive: a :class:`~hivemem.core.LocalHive` (or a SyncHive over one).
        port: TCP port; 0 picks a free one (read it from ``server.server_port``).
        addr: address to bind; ``0.0.0.0`` for all.

    Returns:
        The server (``server.shutdown()`` stops it) and its thread.

    Raises:
        TypeError: ``hive`` is remote (the service it talks to has ``/metrics``).
    """
    inner = getattr(hive, "hive", hive)
    metrics = getattr(inner, "metrics", None)
    if not isinstance(metrics, Metrics):
        raise TypeError("only an embedded hive has metrics here; a service has GET /metrics")
    return start_http_server(port, addr=addr, registry=metrics.registry)
