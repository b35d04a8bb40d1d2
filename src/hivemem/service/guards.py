"""Bounds on what an HTTP request may send, checked before any route runs.

:class:`Guards` is one pure ASGI middleware (no ``BaseHTTPMiddleware``: it neither
buffers bodies nor runs the app in another task). For each ``http`` request it refuses,
with an RFC 9457 problem+json body naming the field:

- headers whose names and values total more than ``max_header_bytes``: 431, field
  ``headers`` (:class:`HeadersTooLarge`);
- a path or a query string whose percent-decoded bytes are not UTF-8: 422, field
  ``path`` / ``query`` (servers decode them leniently, so the route would see U+FFFD);
- a body longer than ``max_request_bytes``: 413, field ``body``, at once when
  ``Content-Length`` says so, else as soon as the chunks read exceed it (with a
  ``blob_store``, the limit is at least one put of ``max_value_bytes``:
  :func:`body_limit`);
- a body that has not arrived in full ``body_timeout_seconds`` after the app first asked
  for it: 408, field ``body`` (:class:`RequestTimeout`), and the connection is closed.
  Each wait for the next chunk is cut at that deadline, so a client trickling a body
  holds no route for longer; other requests are served meanwhile.

A body refusal happens inside the app, while it reads: the guard answers for it if the
app has not started a response (a response the app starts after the refusal, such as
FastAPI's 400 for a body it could not read, is replaced by the refusal); once a response
has started the error propagates and the server drops the connection.

Wiring (see :func:`install`): ``install(app, settings)`` adds the middleware to a FastAPI
app; nothing is written for a refused request, because no route sees it whole.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hivemem.config import Settings
from hivemem.errors import HivememError, InvalidInput, TooLarge
from hivemem.service import problems

__all__ = ["STATUS_KEY", "Guards", "HeadersTooLarge", "RequestTimeout", "body_limit", "install"]

#: Scope key under which :class:`Guards` leaves the status of the response it let out
#: (the app's, or its own refusal): the request telemetry outside it counts by it
#: without wrapping ``send`` a second time.
STATUS_KEY = "hivemem.status"


class RequestTimeout(InvalidInput):
    """The request body did not arrive in full in time: HTTP 408 (field ``body``)."""

    status = 408


class HeadersTooLarge(TooLarge):
    """The request's headers are larger than ``max_header_bytes``: HTTP 431."""

    status = 431


def _utf8(raw: bytes) -> bool:
    """Whether the percent-decoded ``raw`` is valid UTF-8."""
    if b"%" not in raw and raw.isascii():
        return True
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Guards:
    """ASGI middleware enforcing the request bounds of the module notes.

    Args:
        app: the ASGI app to guard.
        settings: ``max_header_bytes`` (bytes), ``max_request_bytes`` (bytes) and
            ``body_timeout_seconds`` (seconds) apply.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_header_bytes = settings.max_header_bytes
        self.max_body_bytes = body_limit(settings)
        self.body_timeout = settings.body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check_head(scope)
        if error is not None:
            await _respond(error, scope, receive, send)
            return
        await _GuardedBody(self, scope, receive, send).run()

    def _check_head(self, scope: Scope) -> HivememError | None:
        """The refusal of a request by its head (headers, path, query), or None."""
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        size = 0
        length: bytes | None = None
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"content-length":
                length = value
        if size > self.max_header_bytes:
            return HeadersTooLarge(
                f"the request headers are {size} bytes; the limit is {self.max_header_bytes} "
                "(the setting max_header_bytes)",
                field="headers",
            )
        raw_path = scope.get("raw_path")
        if raw_path is not None and not _utf8(raw_path):
            return InvalidInput("the path is not UTF-8 once percent-decoded", field="path")
        if not _utf8(scope.get("query_string") or b""):
            return InvalidInput("the query string is not UTF-8 once percent-decoded", field="query")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> TooLarge:
        return TooLarge(
            f"request body is over {self.max_body_bytes} bytes (the setting max_request_bytes)",
            field="body",
        )


def body_limit(settings: Settings) -> int:
    """The largest request body accepted, in bytes: ``max_request_bytes``, raised with a
    ``blob_store`` to what one put of a value of ``max_value_bytes`` with a text and
    metadata of their largest sizes needs (the value is written to the blob store, so a
    large ``max_value_bytes`` is meant to be accepted), plus 64 KiB for the rest."""
    if not settings.blob_store:
        return settings.max_request_bytes
    put = settings.max_value_bytes + 2 * settings.max_text_bytes + settings.max_metadata_bytes
    return max(settings.max_request_bytes, put + 64 * 1024)


class _GuardedBody:
    """One request through the app with its body bounded in size and time."""

    def __init__(self, guards: Guards, scope: Scope, receive: Receive, send: Send) -> None:
        self.guards = guards
        self.scope = scope
        self.receive = receive
        self.send = send
        self.seen = 0
        self.body_done = False
        self.deadline: float | None = None
        self.error: HivememError | None = None
        self.started = False  # a response has started (the app's or ours)
        self.replaced = False  # the app's response is being dropped for ours

    async def run(self) -> None:
        try:
            await self.guards.app(self.scope, self.guarded_receive, self.guarded_send)
        except HivememError as exc:
            if exc is not self.error or self.started:
                raise
            await self.respond()

    async def guarded_receive(self) -> Message:
        if self.body_done:  # e.g. waiting for http.disconnect: no deadline
            return await self.receive()
        if self.error is not None:
            raise self.error
        if math.isinf(self.guards.body_timeout):
            return self._count(await self.receive())
        if self.deadline is None:
            self.deadline = asyncio.get_running_loop().time() + self.guards.body_timeout
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.receive()
        except TimeoutError:
            timeout = self.guards.body_timeout
            self.error = RequestTimeout(
                f"the request body did not arrive in full within {timeout:g} seconds "
                "(the setting body_timeout_seconds)",
                field="body",
            )
            raise self.error from None
        return self._count(message)

    def _count(self, message: Message) -> Message:
        """Add a body chunk to the bytes seen; raise TooLarge over the limit."""
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.guards.max_body_bytes:
                self.error = self.guards._too_large()
                raise self.error
            if not message.get("more_body", False):
                self.body_done = True
        else:  # http.disconnect
            self.body_done = True
        return message

    async def guarded_send(self, message: Message) -> None:
        if self.replaced:
            return
        if message["type"] == "http.response.start" and not self.started:
            if self.error is not None:
                # The app answers after a body refusal (FastAPI turns an error raised while
                # reading into a 400): answer with the refusal instead, and drop the rest.
                self.replaced = True
                await self.respond()
                return
            self.started = True
            self.scope[STATUS_KEY] = message["status"]
        await self.send(message)

    async def respond(self) -> None:
        assert self.error is not None
        self.started = True
        await _respond(self.error, self.scope, self.receive, self.send)


async def _respond(error: HivememError, scope: Scope, receive: Receive, send: Send) -> None:
    """Send the problem+json response of ``error``; close the connection after a 408."""
    response = problems.problem(error, scope.get("path"))
    if isinstance(error, RequestTimeout):
        response.headers["Connection"] = "close"
    scope[STATUS_KEY] = response.status_code
    await response(scope, receive, send)


def install(app: Any, settings: Settings) -> None:
    """Add :class:`Guards` to a Starlette or FastAPI ``app``, with the bounds of
    ``settings``. Call it after the app's other ``add_middleware`` calls so that it is
    the outermost of them (inside only Starlette's ServerErrorMiddleware).

    Args:
        app: a Starlette/FastAPI application (anything with ``add_middleware``).
        settings: ``max_header_bytes``, ``max_request_bytes`` and
            ``body_timeout_seconds`` (an infinite timeout turns the 408 off).
    """
    app.add_middleware(Guards, settings=settings)
