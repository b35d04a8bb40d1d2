"""What the service tells its operators: request metrics, one log line per request, and
``GET /metrics``.

:class:`RequestTelemetry` is a pure ASGI middleware (no ``BaseHTTPMiddleware``: it
neither buffers bodies nor runs the app in another task), outermost, so requests the
guards refuse are counted too. Per HTTP request it

- counts ``hivemem_http_requests_total`` by route template, method and status (the
  status :class:`~hivemem.service.guards.Guards`, the next layer in, saw go out: 500
  when none did), and
  observes ``hivemem_http_request_duration_seconds`` (arrival to the response's last
  byte; for an SSE stream, its whole life);
- writes one line to the ``hivemem.access`` logger when ``access_log`` is on: in
  ``json`` format ``{"time", "agent", "method", "route", "status", "duration_ms",
  "request_id", "trace_id"}`` (no values, no credentials, no query string); in ``text``
  format the same fields as ``key=value``.

The route label is the matched path template (``/v1/items/{namespace}/{key}``), the
mount for mounted apps (``/mcp``), or ``unmatched``: never a concrete key.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hivemem.errors import HivememError, PermissionDenied
from hivemem.metrics import CONTENT_TYPE, Metrics, exposition
from hivemem.service import problems
from hivemem.service.auth import ServiceState
from hivemem.service.guards import STATUS_KEY
from hivemem.wire import REQUEST_ID_HEADER, REQUEST_ID_PATTERN

__all__ = ["RequestTelemetry", "refresh_task_gauges", "serve_metrics"]

access = logging.getLogger("hivemem.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode("latin-1")
_TRACEPARENT = b"traceparent"
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_REQUEST_ID_TEXT = re.compile(REQUEST_ID_PATTERN)


def route_of(scope: Scope) -> str:
    """The bounded ``route`` label of a served request."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    root = scope.get("root_path") or ""
    if root:
        return str(root)
    return "unmatched"


class RequestTelemetry:
    """ASGI middleware counting, timing and (optionally) logging each HTTP request.

    Args:
        app: the wrapped application.
        metrics: where the counts go.
        log_format: ``json``, ``text``, or ``None`` for no access log.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        log_format: str | None = None,
        count: bool = True,
        tracer: Any = None,
        sample_ratio: float = 1.0,
    ) -> None:
        self.app = app
        self.tracer = tracer
        #: share of requests without a trace context handed to the tracer (the setting
        #: tracing_sample_ratio); the rest make no span at all
        self.sample_ratio = sample_ratio
        self.metrics = metrics
        self.log_format = log_format
        self.count = count
        self.requests = metrics.http_requests
        self.seconds = metrics.http_seconds
        #: requests being served; the gauge reads it at scrape time
        self.active = 0
        metrics.http_in_flight.set_function(lambda: self.active)
        #: (route, method, status) -> the counter and histogram children (labels() is
        #: a few microseconds; a dict lookup is not)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        if tracer is not None:
            from opentelemetry import context, propagate, trace
            from opentelemetry.trace import SpanKind, Status, StatusCode

            # Bound once: an import statement in the request path costs a microsecond.
            self._otel = (context, propagate, trace, SpanKind.SERVER, Status(StatusCode.ERROR))
            #: the parent of a request that brings no trace context: a new trace (never
            #: whatever context the serving task happened to inherit)
            self._root = context.Context()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One coroutine frame for everything: each frame between the server and the app
        # is resumed again at every await of the request, so a layer costs per await.
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        self.active += 1
        span = token = None
        if self.tracer is not None:
            span, token = self._start_span(scope)
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if token is not None and isinstance(exc, Exception):
                span.record_exception(exc)  # type: ignore[union-attr]
            raise
        finally:
            elapsed = time.perf_counter() - started
            status = scope.get(STATUS_KEY, 500)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = route_of(scope)
            self.active -= 1
            if self.count:
                children = self._children.get((route, method, status))
                if children is None:
                    children = (
                        self.requests.labels(route, method, str(status)),
                        self.seconds.labels(route, method),
                    )
                    if len(self._children) < 10_000:
                        self._children[(route, method, status)] = children
                children[0].inc()
                children[1].observe(elapsed)
            if span is not None:
                self._end_span(scope, span, token, method, route, status)
            if self.log_format is not None and access.isEnabledFor(logging.INFO):
                self._log(scope, method, route, status, elapsed)

    def _start_span(self, scope: Scope) -> tuple[Any, Any]:
        """A SERVER span continuing the caller's W3C trace context, and the context token
        when it is recorded (then it is made current: the store calls' spans go under
        it). An unsampled request costs this span's creation (4 µs with the SDK's
        samplers in a tight loop, about 20 µs inside the service) and nothing else; a
        request without trace context left out by ``tracing_sample_ratio`` costs one
        random draw and gets no span: ``(None, None)``."""
        context, propagate, trace, server, _ = self._otel
        parent = self._root
        carrier: dict[str, str] | None = None
        for k, v in scope.get("headers") or ():
            if k == b"traceparent" or k == b"tracestate":
                if carrier is None:
                    carrier = {}
                carrier[k.decode("latin-1")] = v.decode("latin-1")
        if carrier is not None:
            parent = propagate.extract(carrier, context=self._root)
        elif self.sample_ratio < 1.0 and random.random() >= self.sample_ratio:
            # A root request left out before the SDK: no span, no context, nothing
            # for the store calls under it (they trace only inside a recorded span).
            return None, None
        method = scope["method"] if scope["method"] in _METHODS else "other"
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=server,
            attributes={"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
        )
        if not span.is_recording():
            if self.log_format is not None:  # the access log names the trace all the same
                trace_id = span.get_span_context().trace_id
                scope.setdefault("state", {})["trace_id"] = format(trace_id, "032x")
            return span, None
        scope.setdefault("state", {})["trace_id"] = format(span.get_span_context().trace_id, "032x")
        return span, context.attach(trace.set_span_in_context(span))

    def _end_span(
        self, scope: Scope, span: Any, token: Any, method: str, route: str, status: int
    ) -> None:
        if token is not None:
            span.update_name(f"{method} {route}")
            attributes: dict[str, Any] = {"http.route": route, "http.response.status_code": status}
            principal = (scope.get("state") or {}).get("principal")
            if principal is not None:
                attributes["hivemem.agent"] = principal.agent
            span.set_attributes(attributes)  # one lock taken, not one per attribute
            if status >= 500:
                span.set_status(self._otel[4])
            self._otel[0].detach(token)
        span.end()

    def _log(self, scope: Scope, method: str, route: str, status: int, elapsed: float) -> None:
        headers = dict(scope.get("headers") or [])
        state = scope.get("state") or {}
        principal = state.get("principal")
        # Only well-formed ids are copied: a header is the caller's text, and in the text
        # format "x agent=admin" would forge a field.
        trace = headers.get(_TRACEPARENT, b"").decode("latin-1").split("-")
        if len(trace) != 4 or not _TRACE_ID.fullmatch(trace[1]):
            trace = []
        request_id = headers.get(_REQUEST_ID, b"").decode("latin-1")
        if not _REQUEST_ID_TEXT.fullmatch(request_id):
            request_id = ""
        fields: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "agent": getattr(principal, "agent", None),
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "request_id": request_id or None,
            "trace_id": state.get("trace_id") or (trace[1] if len(trace) == 4 else None),
        }
        if self.log_format == "json":
            access.info(json.dumps(fields, separators=(",", ":")))
        else:
            access.info(" ".join(f"{k}={v}" for k, v in fields.items() if v is not None))


async def refresh_task_gauges(metrics: Metrics, backend: Any) -> None:
    """Read the stats of every queue holding a task in the store (whichever replica its
    tasks went through), and of the queues this process saw before, into
    ``hivemem_tasks`` and ``hivemem_task_oldest_ready_age_seconds``: one store call to
    list the queues, then one per queue. Queues past the label bound add up under
    ``other`` (their oldest age is the oldest of them)."""
    now = time.time()
    queues = set(await backend.task_queues()) | metrics.queue_label.seen
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    for queue in sorted(queues):
        stats = await backend.task_stats(queue, now)
        label = metrics.queue_label(queue)
        into = counts.setdefault(label, dict.fromkeys(("ready", "running", "delayed", "dead"), 0))
        for state in into:
            into[state] += getattr(stats, state)
        age = 0.0 if stats.oldest_ready_at is None else max(0.0, now - stats.oldest_ready_at)
        oldest[label] = max(oldest.get(label, 0.0), age)
    for label, by_state in counts.items():
        for state, n in by_state.items():
            metrics.tasks.labels(label, state).set(n)
        metrics.task_oldest.labels(label).set(oldest[label])


async def serve_metrics(request: Request, state: ServiceState) -> Response:
    """``GET /metrics``: with auth on, only for a principal with the role ``admin`` or
    ``metrics`` (401 without valid credentials, 403 otherwise); refreshes the task
    gauges, then answers the exposition."""
    if state.auth:
        scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
        principal = await state.authenticate(
            credentials if scheme.lower() == "bearer" and credentials else None, None
        )
        if not principal.roles & {"admin", "metrics"}:
            return problems.problem(
                PermissionDenied(
                    f"agent {principal.agent!r} may not read metrics: it needs the role "
                    "'admin' or 'metrics'",
                    field="Authorization",
                )
            )
    hive = state.hive
    try:
        await refresh_task_gauges(hive.metrics, hive.backend)
    except HivememError:
        pass  # the figures of the last scrape stay; the store's errors are counted
    return Response(exposition(hive.metrics), media_type=CONTENT_TYPE)
