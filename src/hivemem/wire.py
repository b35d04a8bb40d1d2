"""The HTTP contract between the service and the client, written once for both sides.

What a request and a response carry beyond their JSON bodies: the header names, the
ETag form of an item version, ``Retry-After``, the RFC 9457 problem+json body of an error
and its decoding back into the :mod:`hivemem.errors` class, how an item's namespace and
key make a URL path, and the small response envelopes both sides build and read.

The service (FastAPI) and the client (aiohttp) both import this module, so it imports
neither: only :mod:`hivemem.errors`, :mod:`hivemem.models`, pydantic and orjson.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import orjson
from pydantic import BaseModel

from hivemem.errors import (
    HivememError,
    InvalidInput,
    RateLimited,
    Unauthenticated,
    error_from_problem,
)
from hivemem.models import Item, Message, SearchHit

__all__ = [
    "AGENT_HEADER",
    "AUTHORIZATION_HEADER",
    "BEARER_CHALLENGE",
    "CURSOR_HEADER",
    "ETAG_HEADER",
    "ETAG_PATTERN",
    "HEALTHY",
    "IDEMPOTENCY_KEY_HEADER",
    "IF_MATCH_HEADER",
    "IF_NONE_MATCH_HEADER",
    "JSON_MEDIA_TYPE",
    "LAST_EVENT_ID_HEADER",
    "LOCATION_HEADER",
    "PROBLEM_MEDIA_TYPE",
    "REQUEST_ID_HEADER",
    "REQUEST_ID_PATTERN",
    "RETRY_AFTER_HEADER",
    "SSE_EVENT",
    "WWW_AUTHENTICATE_HEADER",
    "BatchResult",
    "Deleted",
    "Head",
    "Healthy",
    "HistoryResult",
    "Messages",
    "Released",
    "SearchResult",
    "error_from_response",
    "etag",
    "healthy_param",
    "item_path",
    "problem_body",
    "problem_headers",
    "retry_after_header",
    "retry_after_seconds",
    "split_item_path",
    "version_from_etag",
]

# Headers -----------------------------------------------------------------------------

#: The calling agent when the service runs without ``--auth`` (ignored with it).
AGENT_HEADER = "X-Hivemem-Agent"
#: ``Bearer <API key or JWT>``.
AUTHORIZATION_HEADER = "Authorization"
#: A write's request id: the same id, by the same agent, is applied once.
REQUEST_ID_HEADER = "X-Hivemem-Request-Id"
#: The IETF idempotency key (draft-ietf-httpapi-idempotency-key-header); the service
#: takes it as the request id when ``X-Hivemem-Request-Id`` is absent.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
#: On the watch response: the feed cursor the stream starts after.
CURSOR_HEADER = "X-Hivemem-Cursor"
#: The SSE resume cursor (WHATWG HTML, "Server-sent events"); wins over ``after``.
LAST_EVENT_ID_HEADER = "Last-Event-ID"
#: An item's version on its responses (RFC 9110 section 8.8.3), see :func:`etag`.
ETAG_HEADER = "ETag"
#: Compare-and-set by version (412 when it fails).
IF_MATCH_HEADER = "If-Match"
#: ``*``: create only (412 when the item exists).
IF_NONE_MATCH_HEADER = "If-None-Match"
#: On a 429: whole seconds to wait (RFC 9110 section 10.2.3).
RETRY_AFTER_HEADER = "Retry-After"
#: On a 401, with :data:`BEARER_CHALLENGE`.
WWW_AUTHENTICATE_HEADER = "WWW-Authenticate"
#: Where a 3xx points (the client never follows it).
LOCATION_HEADER = "Location"

#: The challenge of a 401 (RFC 6750 section 3).
BEARER_CHALLENGE = 'Bearer realm="hivemem"'
#: Request and response bodies.
JSON_MEDIA_TYPE = "application/json"
#: Error bodies (RFC 9457).
PROBLEM_MEDIA_TYPE = "application/problem+json"
#: The SSE event type of a feed event on the watch stream (other types are skipped).
SSE_EVENT = "hivemem"

#: A request id: 1-128 letters, digits or ``_ . : -`` (a UUID's hex fits).
REQUEST_ID_PATTERN = r"[A-Za-z0-9_.:\-]{1,128}"

# ETags -------------------------------------------------------------------------------

#: An item version as an ETag: ``"3"``, weak ``W/"3"`` or bare ``3``; 1-18 digits (below
#: 2**63). Group 1 or 2 holds the digits. No look-arounds, so JSON Schema can use it.
ETAG_PATTERN = r'(?:W/)?(?:"([0-9]{1,18})"|([0-9]{1,18}))'
_ETAG = re.compile(ETAG_PATTERN)


def etag(version: int) -> str:
    """The ETag of item version ``version``: ``3`` -> ``"3"`` (a strong ETag)."""
    return f'"{version}"'


def version_from_etag(value: str, header: str = IF_MATCH_HEADER) -> int:
    """The item version an ETag names: ``"3"``, ``W/"3"`` or ``3`` -> 3.

    Args:
        value: the header's value (surrounding spaces are ignored).
        header: the header it came in, named by the error.

    Raises:
        InvalidInput: anything else (field ``header``).
    """
    match = _ETAG.fullmatch(value.strip())
    if match is None:
        raise InvalidInput(f"{header} must be an item version ETag such as '\"3\"'", field=header)
    return int(match.group(1) or match.group(2))


# Retry-After -------------------------------------------------------------------------


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value for a wait of ``seconds``: whole seconds, at least 1
    (rounded up, so a client never comes back early)."""
    return str(max(1, math.ceil(seconds)))


def retry_after_seconds(headers: Mapping[str, str], fallback: float = 1.0) -> float:
    """Seconds to wait from a 429 answer's ``Retry-After`` header: delta-seconds or an
    HTTP date (RFC 9110 section 10.2.3; a date without a zone is UTC), else ``fallback``
    (e.g. the problem body's ``retry_after``; 1 s when it is not finite). Never negative.

    Args:
        headers: the response headers (a case-insensitive mapping such as aiohttp's).
        fallback: seconds to use when the header is absent or unreadable.
    """
    raw = headers.get(RETRY_AFTER_HEADER)
    if raw is not None:
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
    return max(0.0, fallback) if math.isfinite(fallback) else 1.0


# Problems ----------------------------------------------------------------------------


def problem_body(error: HivememError, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 problem+json body of ``error``: ``type`` (``/problems/<type>``),
    ``title`` (the class name), ``status``, ``detail``, ``field`` when set, the class's
    extension members (``current_version``, ``retry_after``) and ``instance`` (the
    request path) when given. :func:`error_from_response` reads it back."""
    body = error.to_problem()
    if instance is not None:
        body["instance"] = instance
    return body


def problem_headers(error: HivememError) -> dict[str, str]:
    """The headers a problem response of ``error`` carries: ``Retry-After`` on a 429,
    the bearer challenge on a 401, none otherwise."""
    if isinstance(error, RateLimited):
        return {RETRY_AFTER_HEADER: retry_after_header(error.retry_after)}
    if isinstance(error, Unauthenticated):
        return {WWW_AUTHENTICATE_HEADER: BEARER_CHALLENGE}
    return {}


def error_from_response(status: int, body: bytes) -> HivememError:
    """The :mod:`hivemem.errors` instance an error response stands for.

    Args:
        status: the HTTP status (4xx or 5xx).
        body: the raw body: a problem+json object names the class by its ``type`` (and
            carries ``detail``, ``field``, ``current_version``, ``retry_after``); anything
            else (empty, not JSON, not an object) is mapped by ``status`` alone.

    Returns:
        The class the problem's ``type`` or the status names (412 -> ``Conflict``, 400
        -> ``InvalidInput``); ``HivememError`` itself for an unknown status.
    """
    try:
        decoded = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        decoded = None
    return error_from_problem(status, decoded if isinstance(decoded, dict) else None)


# Paths -------------------------------------------------------------------------------


def item_path(namespace: str, key: str) -> str:
    """The URL path of an item below ``/v1/items/`` (and ``/v1/history/``):
    ``namespace/key``, percent-encoded; the last ``/`` separates namespace and key
    (:func:`split_item_path` is the inverse).

    Raises:
        InvalidInput: namespace or key is not a string (field ``namespace``), or the key
            holds a ``/`` (field ``key``).
    """
    if not isinstance(namespace, str) or not isinstance(key, str):
        raise InvalidInput("namespace and key must be strings", field="namespace")
    if "/" in key:
        raise InvalidInput("key may not contain '/' or control characters", field="key")
    return f"{quote(namespace, safe='/')}/{quote(key, safe='')}"


def split_item_path(path: str) -> tuple[str, str]:
    """``a/b/key`` -> ``("a/b", "key")``: the key is the last segment (the path as the
    router decoded it).

    Raises:
        InvalidInput: no namespace (field ``namespace``) or an empty key (field ``key``).
    """
    namespace, sep, key = path.rpartition("/")
    if not sep or not namespace:
        raise InvalidInput("the path must be /v1/items/{namespace}/{key}", field="namespace")
    if not key:
        raise InvalidInput("key must not be empty", field="key")
    return namespace, key


# Query values ------------------------------------------------------------------------

#: The registry listing's ``healthy`` query: healthy agents, down ones, or both.
Healthy = Literal["true", "false", "all"]
#: What each ``healthy`` value means to :meth:`~hivemem.Hive.agents`.
HEALTHY: dict[str, bool | None] = {"true": True, "false": False, "all": None}


def healthy_param(healthy: bool | None) -> Healthy:
    """The ``healthy`` query value of :meth:`~hivemem.Hive.agents`'s argument
    (``None``: every agent)."""
    if healthy is None:
        return "all"
    return "true" if healthy else "false"


# Response envelopes ------------------------------------------------------------------


class BatchResult(BaseModel):
    """Response of ``POST /v1/batch``: per operation, the item written or whether a
    delete removed one."""

    results: list[Item | bool]


class HistoryResult(BaseModel):
    """Response of ``GET /v1/history/{namespace}/{key}``: stored versions, newest first."""

    items: list[Item]


class SearchResult(BaseModel):
    """Response of ``POST /v1/search``: hits, best first."""

    hits: list[SearchHit]


class Messages(BaseModel):
    """Response of the session message routes: messages in sequence order."""

    messages: list[Message]


class Head(BaseModel):
    """Response of ``GET /v1/events/head``: the newest event's cursor."""

    cursor: str


class Released(BaseModel):
    """Response of ``POST /v1/leases/{name}/release``."""

    released: bool


class Deleted(BaseModel):
    """Response of ``DELETE /v1/registry/{name}``."""

    deleted: bool
