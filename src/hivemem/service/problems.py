"""RFC 9457 problem+json responses for every error the service can return."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from hivemem.errors import Conflict, HivememError, InvalidInput, RateLimited, Unauthenticated

log = logging.getLogger("hivemem.service")

PROBLEM = "application/problem+json"


class PreconditionFailed(Conflict):
    """A Conflict from an If-Match / If-None-Match header: HTTP 412, as RFC 9110 requires."""

    status = 412


def problem(error: HivememError, instance: str | None = None) -> Response:
    """The problem+json response for ``error``."""
    body = error.to_problem()
    if instance is not None:
        body["instance"] = instance
    headers = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    elif isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="hivemem"'  # RFC 6750 section 3
    return Response(
        orjson.dumps(body), status_code=error.status, media_type=PROBLEM, headers=headers
    )


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """Name the field of a pydantic error location: ('body','ttl') -> 'ttl'."""
    parts = [str(p) for p in loc]
    if len(parts) == 2 and parts[0] == "header":  # x-hivemem-agent -> X-Hivemem-Agent
        return "-".join(word.capitalize() for word in parts[1].split("-"))
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if len(parts) > 1 else parts
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(HivememError)
    async def hivemem_error(request: Request, exc: HivememError) -> Response:
        return problem(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            error = InvalidInput(f"malformed JSON body: {err.get('msg')}", field="body")
        else:
            field = _field(err.get("loc", ()))
            error = InvalidInput(f"{field}: {err.get('msg')}", field=field)
        return problem(error, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "instance": request.url.path,
        }
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return Response(
            orjson.dumps(body),
            status_code=exc.status_code,
            media_type=PROBLEM,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = {
            "type": "/problems/internal",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "unexpected server error; see the service log",
        }
        return Response(orjson.dumps(body), status_code=500, media_type=PROBLEM)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route that matched the path, but one path may have a route per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        found = getattr(route, "methods", None)
        if match != Match.NONE and found:
            methods.update(found)
        elif found:
            for method in found:
                match, _ = route.matches({**request.scope, "method": method})
                if match == Match.FULL:
                    methods.add(method)
    return sorted(methods)
