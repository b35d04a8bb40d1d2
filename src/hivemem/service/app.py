"""The service's app factory: one LocalHive, a view of it per calling agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, Header, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import hivemem
from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.errors import HivememError, InvalidInput, TooLarge
from hivemem.service import problems

AGENT_HEADER = "X-Hivemem-Agent"
_MAX_VIEWS = 10_000


class _BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before anything reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await problems.problem(self._error())(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> TooLarge:
        return TooLarge(f"request body is over {self.limit} bytes", field="body")


class ServiceState:
    """The hive behind the service and its per-agent views."""

    def __init__(self, hive: LocalHive) -> None:
        self.hive = hive
        self.views: dict[str, LocalHive] = {}

    def view(self, agent: str | None) -> LocalHive:
        name = agent or "anonymous"
        view = self.views.get(name)
        if view is None:
            try:
                view = self.hive.as_agent(name)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, field="agent") from None
            if len(self.views) >= _MAX_VIEWS:
                self.views.clear()
            self.views[name] = view
        return view


async def hive_for(
    request: Request,
    x_hivemem_agent: Annotated[
        str | None, Header(description="Identity of the calling agent (author of its writes).")
    ] = None,
    x_hivemem_request_id: Annotated[
        str | None,
        Header(
            description="Idempotency key of a write (1-128 letters, digits, _ - . :). A write "
            "repeated with the same request id by the same agent, on any replica, within "
            "request_retention_seconds, is applied once; the repeat gets the first result."
        ),
    ] = None,
) -> LocalHive:
    """FastAPI dependency: the hive view acting for the caller (async, so FastAPI does not
    send it to its thread pool)."""
    state: ServiceState = request.app.state.hivemem
    view = state.view(x_hivemem_agent)
    if x_hivemem_request_id is not None:
        view = view.with_request_id(x_hivemem_request_id)
    return view


HiveDep = Annotated[LocalHive, Depends(hive_for)]


def json_response(
    content: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response serialised with orjson (pydantic models via model_dump)."""
    return Response(
        orjson.dumps(content), status_code=status, media_type="application/json", headers=headers
    )


def create_app(store: str | None = None, settings: Settings | None = None) -> FastAPI:
    """Build the service app over the store at ``store`` (default ``settings.store``).

    Args:
        store: a store URL accepted by :func:`hivemem.connect` other than ``http(s)``.
        settings: limits and tuning; by default from ``HIVEMEM_*`` variables.

    Raises:
        InvalidInput: the store URL is not a local store (field ``store``).
    """
    settings = settings or Settings()
    url = store or settings.store
    hive = hivemem.connect(url, agent="hivemem", settings=settings)
    if not isinstance(hive, LocalHive):
        raise InvalidInput(f"the service needs a local store URL, not {url!r}", field="store")
    state = ServiceState(hive)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await hive.open()
        warming = asyncio.create_task(hive.warm(), name="hivemem-warm")
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await hive.close()

    app = FastAPI(
        title="hivemem",
        version=hivemem.__version__,
        summary="Shared memory, sessions and a change feed for AI agents.",
        description=(
            f"Identify the calling agent with the `{AGENT_HEADER}` header. Errors are RFC 9457 "
            "`application/problem+json` bodies whose `field` names the input at fault. Item "
            'versions are ETags (`"3"`); send `If-Match` for compare-and-set and '
            "`If-None-Match: *` for create-only."
        ),
        lifespan=lifespan,
    )
    app.state.hivemem = state
    problems.install(app)

    from hivemem.service import events, items, search, sessions

    app.include_router(items.router)
    app.include_router(search.router)
    app.include_router(sessions.router)
    app.include_router(events.router)

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

    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)
    return app
