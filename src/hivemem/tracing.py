"""OpenTelemetry tracing (``pip install 'hivemem[otel]'``), off unless the setting
``tracing`` is on (``HIVEMEM_TRACING=true``, ``hivemem serve --tracing``).

With it on, hivemem uses the OpenTelemetry API (instrumentation scope ``hivemem``):

- the Python client (:class:`~hivemem.RemoteHive`) opens a CLIENT span per call,
  ``hivemem <METHOD>``, and sends its W3C trace context (``traceparent``) with the
  request;
- the service continues that trace: a SERVER span per request, ``<METHOD> <route>``
  (the route template), with the agent, method, route and status as attributes; of the
  requests that bring no trace context, only the share ``tracing_sample_ratio`` (default
  1) is handed to the tracer at all, the rest make no span and cost no SDK call;
- every store call made inside a recorded span (a request's, or the agent's own around
  embedded calls) is a CLIENT span below it, ``hivemem.store <operation>``, with
  ``db.system`` (sqlite, postgresql, redis); outside one it makes no span;
- a task submitted inside a span carries the trace context with it (kept beside the
  payload, never in it: the worker sees the payload it was given), and
  :func:`task_span` lets the worker that runs it open its span as a child, so a
  sub-agent's work joins its parent's trace (:mod:`hivemem.worker` does).

Where the spans go is the application's choice (the OpenTelemetry SDK's global tracer
provider). ``hivemem serve --tracing`` sets one up from the standard variables
(:func:`configure_sdk`): ``OTEL_TRACES_EXPORTER`` (``otlp``, the default, over
HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``; ``console``;
``none``), ``OTEL_SERVICE_NAME`` (default ``hivemem``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` / ``..._ARG`` (e.g. ``parentbased_traceidratio`` and ``0.1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import Any

__all__ = [
    "TRACE_KEY",
    "available",
    "configure_sdk",
    "current_traceparent",
    "inject",
    "task_span",
    "tracer",
]

#: The key under which a task's stored payload keeps its trace context (with the
#: payload itself under ``"payload"``); :func:`wrap_payload` / :func:`unwrap_payload`.
TRACE_KEY = "__hivemem_trace__"


def available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def tracer() -> Any:
    """hivemem's tracer from the global provider (a no-op one until the application
    sets a provider).

    Raises:
        ImportError: OpenTelemetry is not installed (``pip install 'hivemem[otel]'``).
    """
    from opentelemetry import trace

    import hivemem

    return trace.get_tracer("hivemem", hivemem.__version__)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's W3C trace context to ``headers`` (nothing when there is
    no valid current span)."""
    from opentelemetry import propagate

    propagate.inject(headers)


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` header value, or None (no OpenTelemetry, or no
    valid span)."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def task_span(task: Any, name: str | None = None) -> Iterator[Any]:
    """A CONSUMER span for running ``task`` (a :class:`~hivemem.models.Task`), child of
    the span that submitted it when the task carries a trace context; a no-op context
    without OpenTelemetry.

    Yields:
        The span (or None without OpenTelemetry).
    """
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        with nullcontext():
            yield None
        return
    parent = getattr(task, "traceparent", None)
    ctx = propagate.extract({"traceparent": parent}) if parent else None
    attributes = {
        "messaging.system": "hivemem",
        "messaging.destination.name": task.queue,
        "messaging.message.id": task.id,
        "hivemem.task.attempt": task.attempt,
    }
    with tracer().start_as_current_span(
        name or f"hivemem.task {task.queue}",
        context=ctx,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def wrap_payload(payload: bytes, traceparent: str | None) -> bytes:
    """The stored form of a task payload (JSON bytes): itself, or with a trace context
    ``{"__hivemem_trace__": traceparent, "payload": <payload>}``."""
    if traceparent is None:
        return payload
    head = b'{"' + TRACE_KEY.encode() + b'":"' + traceparent.encode() + b'","payload":'
    return head + payload + b"}"


def unwrap_payload(stored: Any) -> tuple[Any, str | None]:
    """(payload, traceparent) of a stored payload decoded from JSON (see
    :func:`wrap_payload`)."""
    if isinstance(stored, dict) and len(stored) == 2 and TRACE_KEY in stored:
        trace = stored[TRACE_KEY]
        if isinstance(trace, str) and "payload" in stored:
            return stored["payload"], trace
    return stored, None


def configure_sdk() -> bool:
    """Install an OpenTelemetry SDK tracer provider configured by the standard
    ``OTEL_*`` variables (see the module notes), unless one is installed already.

    Returns:
        Whether a provider was installed here.

    Raises:
        ImportError: the SDK or the OTLP exporter is not installed
            (``pip install 'hivemem[otel]'``).
        ValueError: ``OTEL_TRACES_EXPORTER`` names an exporter other than ``otlp``,
            ``console`` or ``none``.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return False
    exporters = [
        e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()
    ]
    unknown = set(exporters) - {"otlp", "console", "none"}
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: unknown exporter(s) {sorted(unknown)}; "
            "expected otlp, console or none"
        )
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "hivemem")})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    if "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
