"""The service's app factory: one LocalHive, a view of it per calling agent."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response

import hivemem
from hivemem.config import Settings, redact_url
from hivemem.core import LocalHive
from hivemem.core.hive import backend_kind
from hivemem.errors import HivememError, InvalidInput
from hivemem.service import (
    coordination,
    events,
    guards,
    items,
    mcp,
    openapi,
    problems,
    search,
    sessions,
    tasks,
    ui,
)
from hivemem.service.auth import ServiceState
from hivemem.service.routing import json_response
from hivemem.service.telemetry import RequestTelemetry, serve_metrics
from hivemem.wire import AGENT_HEADER

__all__ = ["create_app", "redact_url"]


def freeze_gc() -> None:
    """Collect, then move every object alive now out of the cyclic garbage collector's
    generations (:func:`gc.freeze`), so that later full collections do not traverse them.

    A serving process holds some 150,000 objects after start (modules, FastAPI's routes,
    pydantic's validators), and objects of requests in flight survive into the oldest
    generation fast enough that CPython collects it about once a second: each full
    collection stopped the service for about 110 ms (measured with ``gc.callbacks``
    under 32 clients writing), which was the p99 of a PUT. Frozen objects are still
    freed by reference counting; only a cycle among them is never collected.
    (The technique is the one :func:`gc.freeze`'s documentation describes for servers.)
    """
    gc.collect()
    gc.freeze()


def create_app(
    store: str | None = None, settings: Settings | None = None, *, serving: bool = False
) -> FastAPI:
    """Build the service app over the store at ``store`` (default ``settings.store``).

    Args:
        store: a store URL accepted by :func:`hivemem.connect` other than ``http(s)``.
        settings: limits and tuning; by default from ``HIVEMEM_*`` variables.
        serving: the app is the process's whole work (``hivemem serve``): once started,
            and again once its in-process search indexes are loaded, the objects alive
            are frozen out of the garbage collector (:func:`freeze_gc`). Leave it false
            where the app shares its process (tests, an app mounted in another).

    Raises:
        InvalidInput: the store URL is not a local store (field ``store``).
    """
    settings = settings or Settings()
    url = store or settings.store
    hive = hivemem.connect(url, agent="hivemem", settings=settings)
    if not isinstance(hive, LocalHive):
        raise InvalidInput(
            f"the service needs a local store URL, not {redact_url(url)!r}", field="store"
        )
    state = ServiceState(hive, settings)
    beat = ui.ReplicaBeat(hive)
    mcp_run: list[Callable[[], contextlib.AbstractAsyncContextManager[None]]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await hive.open()
        tools = contextlib.AsyncExitStack()
        for run in mcp_run:
            await tools.enter_async_context(run())
        warming = asyncio.create_task(hive.warm(), name="hivemem-warm")
        if serving:
            warming.add_done_callback(lambda t: None if t.cancelled() else freeze_gc())
        with contextlib.suppress(HivememError):  # the store may be away; run() retries
            await beat.beat()
        beating = asyncio.create_task(beat.run(), name="hivemem-replica-beat")
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            task = loop.create_task(state.reload_policy(), name="hivemem-policy-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        hup = False
        if state.policy is not None and state.policy.path:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, on_sighup)
                hup = True
            await state.admin_event(
                "policy.loaded",
                {"source": state.policy.path, "rules": len(state.policy.policy.rules)},
            )
        if serving:
            freeze_gc()
        try:
            yield
        finally:
            await tools.aclose()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            warming.cancel()
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await beat.stop()
            await state.close()
            await hive.close()

    app = FastAPI(
        title="hivemem",
        version=hivemem.__version__,
        summary="Shared memory, sessions and a change feed for AI agents.",
        description=(
            "With `--auth`, send `Authorization: Bearer <API key or JWT>` on every route but "
            f"/healthz and /readyz; without it, name the calling agent with `{AGENT_HEADER}`. "
            "Errors are RFC 9457 "
            "`application/problem+json` bodies whose `field` names the input at fault. Item "
            'versions are ETags (`"3"`); send `If-Match` for compare-and-set and '
            "`If-None-Match: *` for create-only."
        ),
        lifespan=lifespan,
        docs_url=None,  # ui.install serves /docs and /redoc from the wheel's own files
        redoc_url=None,
        **_no_native_telemetry(),
    )
    app.state.hivemem = state
    problems.install(app)
    app.include_router(items.router)
    app.include_router(search.router)
    app.include_router(sessions.router)
    app.include_router(events.router)
    app.include_router(tasks.router)
    app.include_router(coordination.router)
    run = mcp.mount(app)
    if run is not None:
        mcp_run.append(run)
    ui.install(app, backend_kind(hive.backend), beat)
    openapi.install(app, settings)

    @app.get("/healthz", tags=["health"], summary="The process is alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The store answers; 503 otherwise.")
    async def readyz() -> Response:
        try:
            await hive.ping()
        except HivememError as exc:
            return problems.problem(exc)
        return json_response({"status": "ready", "store": url.split("://", 1)[0]})

    if settings.metrics:

        @app.get(
            "/metrics",
            tags=["health"],
            summary="Prometheus metrics of this replica (text exposition format).",
            description="With --auth, needs a key or token whose agent has the role `admin` "
            "or `metrics`. See hivemem.metrics for the list.",
            response_class=Response,
        )
        async def metrics_route(request: Request) -> Response:
            return await serve_metrics(request, state)

    hosts = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    if hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    guards.install(app, settings)  # header size, UTF-8, body size and time
    if settings.metrics or settings.access_log or settings.tracing:
        # Outermost: counts and logs every request, the guards' refusals included.
        app.add_middleware(
            RequestTelemetry,
            metrics=hive.metrics,
            log_format=settings.log_format if settings.access_log else None,
            count=settings.metrics,
            tracer=hive._shared.tracer,
            sample_ratio=settings.tracing_sample_ratio,
        )
    return app


def _no_native_telemetry() -> dict[str, Any]:
    """FastAPI 0.16x traces and measures requests on its own whenever the process has
    OpenTelemetry providers; the service's own spans and metrics (the settings ``tracing``
    and ``metrics``) are the one switch, so FastAPI's are turned off where it has them."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}
