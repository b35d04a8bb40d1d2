"""The MCP tools (:mod:`hivemem.integrations.mcp`) on the service at ``/mcp``.

Streamable HTTP, stateless (each POST is one JSON-RPC exchange answered as JSON, so any
replica can answer any call), behind the service's authentication: the request's
credentials are checked as on every other route (401 without valid ones when auth is
on; the ``X-Hivemem-Agent`` header names the agent when it is off), and each tool call
runs on the hive view of that agent, under its policy, counted against its rate limit
for the tool's action. Mounted only when the ``mcp`` package is installed
(``pip install 'hivemem[mcp]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hivemem.errors import HivememError
from hivemem.policy.principal import Principal
from hivemem.service import problems
from hivemem.service.auth import ServiceState
from hivemem.wire import AGENT_HEADER, AUTHORIZATION_HEADER

#: The (service state, principal) of the HTTP request a tool call belongs to.
_CALLER: ContextVar[tuple[ServiceState, Principal]] = ContextVar("hivemem_mcp_caller")


class _Endpoint:
    """The ASGI app of ``/mcp``: authenticate, then hand the request to MCP's transport."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        state: ServiceState = request.app.state.hivemem
        scheme, _, credentials = (request.headers.get(AUTHORIZATION_HEADER) or "").partition(" ")
        try:
            principal = await state.authenticate(
                credentials if scheme.lower() == "bearer" and credentials else None,
                request.headers.get(AGENT_HEADER),
            )
        except HivememError as exc:
            await problems.problem(exc, instance=request.url.path)(scope, receive, send)
            return
        token = _CALLER.set((state, principal))
        try:
            await self.inner(scope, receive, send)
        finally:
            _CALLER.reset(token)


def mount(app: FastAPI) -> Callable[[], AbstractAsyncContextManager[None]] | None:
    """Add ``/mcp`` to ``app``; returns what the app's lifespan must run (MCP's session
    manager), or None when the ``mcp`` package is not installed (no route is added)."""
    try:
        from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
        from mcp.server.transport_security import TransportSecuritySettings

        from hivemem.integrations.mcp import Action, build_server
    except ImportError:
        return None

    async def provider(action: Action) -> Any:
        state, principal = _CALLER.get()
        await state.limit(principal.agent, action)
        return state.view(principal)

    # Its session manager logs its start and stop at INFO: the service says what it serves.
    logging.getLogger("mcp.server.streamable_http_manager").setLevel(logging.WARNING)
    server = build_server(provider)
    # Host and Origin checks are the deployment's (TrustedHostMiddleware, a proxy):
    # MCP's own default would refuse every host but loopback.
    server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    endpoint = _Endpoint(StreamableHTTPASGIApp(server.session_manager))
    app.router.routes.append(
        Route("/mcp", endpoint=endpoint, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    )
    return server.session_manager.run
