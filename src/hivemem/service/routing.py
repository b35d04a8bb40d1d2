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

:class:`JSONBody` reads and validates a route's body in the route itself, for the routes
where FastAPI's body and dependency resolution is a noticeable share of the request (the
item PUT); it keeps FastAPI's order and its errors, and the document lists the body as
FastAPI would have.

Responses are serialised once, by orjson or by the pydantic model itself
(:func:`json_response`, :func:`model_response`): FastAPI's own encoding would validate
the returned model again against the route's ``response_model``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Generic, TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from hivemem.wire import JSON_MEDIA_TYPE

__all__ = [
    "BODY_MODELS",
    "JSONBody",
    "JSONRequest",
    "JSONRoute",
    "json_response",
    "loads",
    "model_response",
]

M = TypeVar("M", bound=BaseModel)

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


#: The models of the bodies routes read through :class:`JSONBody`, by name:
#: service/openapi.py adds the schema of each one the document refers to (FastAPI adds
#: only the models of the parameters it resolves itself).
BODY_MODELS: dict[str, type[BaseModel]] = {}

#: What :meth:`JSONBody.read` returns for an empty body (FastAPI's "missing").
_NO_BODY: Any = object()


class JSONBody(Generic[M]):
    """A JSON request body that a route reads and validates itself, with the semantics
    of a FastAPI body parameter of type ``model`` (FastAPI 0.165, ``get_request_handler``
    and ``request_body_to_args``), for a route where FastAPI's resolution costs a
    noticeable share of the request.

    A route calls :meth:`read` first (FastAPI reads and parses a body before a route's
    dependencies run, so malformed JSON is a 422 before authentication), then resolves
    its dependencies, then calls :meth:`validate` (FastAPI validates the body after
    them, so an unauthenticated caller's invalid body is a 401). Errors are FastAPI's
    :class:`~fastapi.exceptions.RequestValidationError`, with the same ``loc`` (``body``
    first), which the service answers with 422 naming the field.

    Attributes:
        model: the body's pydantic model.
        openapi: the route's ``openapi_extra``: the request body as FastAPI lists a
            required body parameter of type ``model`` (its schema is added to the
            components by service/openapi.py).
    """

    def __init__(self, model: type[M]) -> None:
        self.model = model
        self._adapter: TypeAdapter[M] = TypeAdapter(model)
        BODY_MODELS[model.__name__] = model
        schema = {"$ref": f"#/components/schemas/{model.__name__}"}
        self.openapi: dict[str, Any] = {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        }

    async def read(self, request: Request) -> Any:
        """The body parsed as JSON when its ``Content-Type`` is ``application/json`` or
        ``application/*+json``; the raw bytes otherwise (which :meth:`validate` refuses,
        as FastAPI does with its default ``strict_content_type``); a marker for an empty
        body.

        Raises:
            RequestValidationError: the body is not strict JSON (:func:`loads`): type
                ``json_invalid`` at ``("body", position)``.
        """
        raw = await request.body()
        if not raw:
            return _NO_BODY
        content_type = request.headers.get("content-type")
        if content_type is None:
            return raw
        main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
        if main != "application" or not (sub == "json" or sub.endswith("+json")):
            return raw
        try:
            return loads(raw)
        except json.JSONDecodeError as exc:
            error = {
                "type": "json_invalid",
                "loc": ("body", exc.pos),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            raise RequestValidationError([error], body=exc.doc) from exc

    def validate(self, data: Any) -> M:
        """``data`` (from :meth:`read`) as the model.

        Raises:
            RequestValidationError: the body is missing (``missing`` at ``("body",)``)
                or does not validate (pydantic's errors, each ``loc`` under ``body``).
        """
        if data is _NO_BODY:
            missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            raise RequestValidationError([missing])
        try:
            return self._adapter.validate_python(data, from_attributes=True)
        except ValidationError as exc:
            errors = [
                {**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)
            ]
            raise RequestValidationError(errors, body=data) from None


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
