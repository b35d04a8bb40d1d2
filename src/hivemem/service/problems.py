"""RFC 9457 problem+json responses for every error the service can return.

The body and headers of a :class:`~hivemem.errors.HivememError` are the wire contract's
(:func:`hivemem.wire.problem_body`, :func:`hivemem.wire.problem_headers`); the client
reads them back with :func:`hivemem.wire.error_from_response`. Request validation errors
become :class:`~hivemem.errors.InvalidInput` by :func:`hivemem.validation.invalid_input`,
the one translation of pydantic errors, naming the field.
"""

from __future__ import annotations

import logging
from typing import cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from hivemem.errors import Conflict, HivememError
from hivemem.validation import invalid_input
from hivemem.wire import PROBLEM_MEDIA_TYPE, problem_body, problem_headers

__all__ = ["PreconditionFailed", "install", "problem"]

log = logging.getLogger("hivemem.service")


class PreconditionFailed(Conflict):
    """A Conflict from an If-Match / If-None-Match header: HTTP 412, as RFC 9110 requires
    (the client reads a 412 back as ``Conflict``)."""

    status = 412


def problem(error: HivememError, instance: str | None = None) -> Response:
    """The problem+json response for ``error``; ``instance`` is the request's path."""
    return Response(
        orjson.dumps(problem_body(error, instance)),
        status_code=error.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem_headers(error),
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(HivememError)
    async def hivemem_error(request: Request, exc: HivememError) -> Response:
        return problem(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        # invalid_input reads only errors(), which FastAPI's error has in pydantic's shape.
        return problem(invalid_input(cast(ValidationError, exc)), request.url.path)

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
            media_type=PROBLEM_MEDIA_TYPE,
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
        return Response(orjson.dumps(body), status_code=500, media_type=PROBLEM_MEDIA_TYPE)


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
