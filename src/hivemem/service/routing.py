"""JSON in and out of the routes: the strict route class every hivemem router uses, and
the JSON responses they answer with.

FastAPI reads a JSON body with :meth:`starlette.requests.Request.json`, which calls
:func:`json.loads`; that accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON,
RFC 8259 section 6) and numbers such as ``1e400`` that become infinite floats. Such a
body then reaches the hive with a float no store can hold and no client can read back.

:class:`JSONRoute` (FastAPI's "custom Request and APIRoute class" pattern) hands each
route a :class:`JSONRequest`, whose ``json()`` parses with :func:`orjson.loads`, which
refuses those tokens, invalid UTF-8 and lone surrogates. ``orjson.JSONDecodeError`` is
a subclass of :class:`json.JSONDecodeError`, so FastAPI turns it into a
``json_invalid`` validation error, which the service answers with 422 naming ``body``
(see :mod:`hivemem.service.problems`).

orjson reads an integer beyond 2**64 - 1 as a float; to keep such a number exact (so that
the hive refuses it, naming its field, rather than storing a rounded float), a body with
a run of 20 or more digits is parsed again with :func:`json.loads`.

Responses are serialised once, by orjson or by the pydantic model itself
(:func:`json_response`, :func:`model_response`): FastAPI's own encoding would validate
the returned model again against the route's ``response_model``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import orjson
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from hivemem.wire import JSON_MEDIA_TYPE

__all__ = ["JSONRequest", "JSONRoute", "json_response", "loads", "model_response"]

#: Digits map to b"0", every other byte to b"x": a run of 20 digits is then a substring.
_DIGIT_MAP = bytes(48 if 48 <= i <= 57 else 120 for i in range(256))
_LONG_RUN = b"0" * 20


def loads(body: bytes) -> Any:
    """Parse a JSON request body strictly.

    Args:
        body: the raw body, UTF-8.

    Returns:
        The decoded value; integers are exact at any size.

    Raises:
        json.JSONDecodeError: (as ``orjson.JSONDecodeError``) the body is not JSON: a
            syntax error, ``NaN``/``Infinity``, a number too large for a float, invalid
            UTF-8 or a lone surrogate.
    """
    value = orjson.loads(body)
    if _LONG_RUN in body.translate(_DIGIT_MAP):
        # Valid JSON per orjson; json.loads keeps integers beyond 64 bits exact.
        try:
            value = json.loads(body)
        except RecursionError:
            raise json.JSONDecodeError("JSON nested too deeply", body.decode(), 0) from None
    return value


class JSONRequest(Request):
    """A request whose :meth:`json` parses the body with :func:`loads` (strict)."""

    async def json(self) -> Any:
        """The body as JSON.

        Raises:
            json.JSONDecodeError: the body is not strict JSON (see :func:`loads`).
        """
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """An :class:`~fastapi.routing.APIRoute` whose endpoint sees a :class:`JSONRequest`.

    Use it as the ``route_class`` of an :class:`~fastapi.APIRouter` (before routes are
    declared on it): FastAPI builds each route's handler from :meth:`get_route_handler`,
    also when the router is included in an app.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            if not isinstance(request, JSONRequest):
                request = JSONRequest(request.scope, request.receive)
            return await handler(request)

        return strict_json_handler


def json_response(
    content: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``content`` (JSON types, dataclasses) as a JSON response, serialised by orjson."""
    return Response(
        orjson.dumps(content), status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers
    )


def model_response(
    model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A pydantic model as a JSON response, serialised by the model."""
    return Response(
        model.model_dump_json(), status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers
    )


def models_response(models: Sequence[BaseModel]) -> Response:
    """A JSON array of pydantic models, each serialised by the model."""
    return Response(
        b"[" + b",".join(m.model_dump_json().encode() for m in models) + b"]",
        media_type=JSON_MEDIA_TYPE,
    )


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path`` convertor, but also matching newlines, so a key with a
    control character reaches validation (a 422 naming ``key``) instead of a 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())
