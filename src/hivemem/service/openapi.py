"""The OpenAPI document, made to tell the truth about what the service enforces.

FastAPI derives the document from the routes; this module completes it once, after
generation: every error status a route can answer, as ``application/problem+json``
(RFC 9457) with its schema; ``201`` where a route creates; the name patterns, ranges
and lengths the core checks (namespaces, keys, ids, page sizes, TTLs); response
headers (``ETag``, ``Retry-After``, ``WWW-Authenticate``); an example per request body.
The patterns are exact: a value that matches is accepted, one that does not is
refused with 422, so generated tests (schemathesis) can rely on them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from hivemem.config import Settings
from hivemem.core.coordination import MAX_CAPABILITIES
from hivemem.core.tasks import MAX_ERROR_CHARS
from hivemem.service.deps import bearer
from hivemem.service.routing import BODY_MODELS
from hivemem.validation import FEEDS
from hivemem.wire import (
    AGENT_HEADER,
    ETAG_HEADER,
    ETAG_PATTERN,
    IDEMPOTENCY_KEY_HEADER,
    IF_MATCH_HEADER,
    IF_NONE_MATCH_HEADER,
    JSON_MEDIA_TYPE,
    PROBLEM_MEDIA_TYPE,
    REQUEST_ID_HEADER,
    REQUEST_ID_PATTERN,
    RETRY_AFTER_HEADER,
    WWW_AUTHENTICATE_HEADER,
)

__all__ = ["install"]

INT64_MAX = 2**63 - 1

#: One namespace segment: 1-128 of letters, digits, ``_ - . : @ +``, not ``.`` or
#: ``..``, not starting with ``_`` (reserved). Written without look-arounds.
_SEG = (
    r"(?:[A-Za-z0-9:@+\-][A-Za-z0-9_.:@+\-]{0,127}"
    r"|\.[A-Za-z0-9_:@+\-][A-Za-z0-9_.:@+\-]{0,126}"
    r"|\.\.[A-Za-z0-9_.:@+\-]{1,126})"
)
#: A character of an item key: no '/', no control characters.
_KEY = r"[^/\x00-\x1f\x7f]"


def _key(max_chars: int) -> str:
    """A whole key: 1..max characters (the limit is in bytes; a generator's keys stay
    well below it)."""
    return rf"{_KEY}{{1,{max_chars}}}"


def _namespace(depth: int) -> str:
    return rf"{_SEG}(?:/{_SEG}){{0,{depth - 1}}}"


def _patterns(s: Settings) -> dict[str, str]:
    ns = _namespace(s.max_namespace_depth)
    # A prefix may start with one of hivemem's own feeds (_sessions, _tasks, _agents);
    # its further segments are ordinary ones.
    prefix_seg = rf"(?:{_SEG}|{'|'.join(FEEDS)})"
    prefix = rf"{prefix_seg}(?:/{_SEG}){{0,{s.max_namespace_depth - 1}}}"
    return {
        "segment": rf"^{_SEG}$",
        "namespace": rf"^{ns}$",
        "prefix": rf"^(?:{prefix})?$",
        "item_path": rf"^{ns}/{_key(s.max_key_bytes)}$",
        "key": rf"^{_key(s.max_key_bytes)}$",
        "key_prefix": rf"^(?:{_key(s.max_key_bytes)})?$",
        "task_id": r"^[0-9a-f]{1,64}$",
        "etag": rf"^{ETAG_PATTERN}$",
        "request_id": rf"^{REQUEST_ID_PATTERN}$",
        "idempotency_key": rf'^(?:"{REQUEST_ID_PATTERN}"|{REQUEST_ID_PATTERN})$',
    }


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details. `field` names the input at fault.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "e.g. /problems/invalid-input"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
        "instance": {"type": "string"},
        "current_version": {"type": "integer", "description": "409/412: the version found"},
        "retry_after": {"type": "number", "description": "429: seconds to wait"},
    },
}

_WHY = {
    401: "Missing, malformed, unknown, revoked, expired or wrongly signed credentials.",
    403: "The principal may not write in this namespace (says nothing of existence).",
    404: "Absent, expired, or not visible to this principal; or a path that names no "
    "resource (e.g. a session id with '/').",
    408: "The request body did not arrive within body_timeout_seconds.",
    409: "The expected version (if_version) did not match, a fence is stale, or a task, "
    "lease or once key is not (or no longer) held as the request says; nothing was written.",
    410: "The cursor points before the feed's retention window.",
    412: "If-Match / If-None-Match failed; nothing was written.",
    413: "A value, text, metadata or the body is over its size limit.",
    422: "Invalid input; `field` names it. Nothing was written.",
    429: "Over a rate limit or the watch-stream limit; wait Retry-After seconds.",
    431: "The request's headers are over max_header_bytes.",
    502: "The embedding provider answered something unusable (details in the log).",
    503: "The store or the embedding provider is unavailable, or a search ran over its "
    "time budget.",
}
#: Errors any data route can answer (credentials, input, limits, availability).
_COMMON = (401, 404, 408, 413, 422, 429, 431, 503)
_COMMON_WITHOUT_AUTH = (404, 408, 413, 422, 429, 431, 503)
#: Further errors by (method, path).
_EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("put", "/v1/items/{path}"): (403, 409, 412, 502),
    ("get", "/v1/items/{path}"): (404,),
    ("delete", "/v1/items/{path}"): (403, 404, 409),
    ("post", "/v1/batch"): (403, 409, 502),
    ("post", "/v1/search"): (502,),
    ("get", "/v1/events"): (410,),
    ("get", "/v1/watch"): (410,),
    ("post", "/v1/publish/{channel}"): (403,),
    ("post", "/v1/sessions"): (403, 409),
    ("get", "/v1/sessions/{session_id}"): (404,),
    ("delete", "/v1/sessions/{session_id}"): (404,),
    ("post", "/v1/sessions/{session_id}/messages"): (404,),
    ("get", "/v1/sessions/{session_id}/messages"): (404,),
    ("put", "/v1/sessions/{session_id}/state"): (404, 409),
    # Tasks (a queue the principal may not use: 403; a task id it may not see: 404).
    ("post", "/v1/queues/{queue}/tasks"): (403,),
    ("post", "/v1/queues/{queue}/claim"): (403,),
    ("get", "/v1/queues/{queue}/tasks"): (403,),
    ("get", "/v1/queues/{queue}/stats"): (403,),
    ("get", "/v1/tasks/{task_id}"): (404,),
    ("get", "/v1/tasks/{task_id}/result"): (404,),
    ("post", "/v1/tasks/{task_id}/heartbeat"): (404, 409),
    ("post", "/v1/tasks/{task_id}/complete"): (404, 409),
    ("post", "/v1/tasks/{task_id}/fail"): (404, 409),
    ("post", "/v1/tasks/{task_id}/release"): (404, 409),
    ("post", "/v1/tasks/{task_id}/cancel"): (404, 409),
    ("post", "/v1/tasks/{task_id}/requeue"): (404, 409),
    # Leases, signals, idempotent calls, the registry.
    ("post", "/v1/leases/{name}/acquire"): (403, 409),
    ("post", "/v1/leases/{name}/renew"): (403, 409),
    ("post", "/v1/leases/{name}/release"): (403,),
    ("put", "/v1/signals/{name}"): (403,),
    ("get", "/v1/signals/{name}"): (403, 404),
    ("post", "/v1/once/begin"): (403,),
    ("post", "/v1/once/renew"): (403, 409),
    ("post", "/v1/once/end"): (403, 409),
    ("put", "/v1/registry/{name}"): (403,),
    ("post", "/v1/registry/{name}/heartbeat"): (403, 404),
    ("delete", "/v1/registry/{name}"): (403,),
    ("get", "/v1/registry"): (403,),
    ("get", "/metrics"): (403,),
}
_PUBLIC = {"/healthz": (431,), "/readyz": (431, 503)}

_EXAMPLES: dict[tuple[str, str], Any] = {
    ("put", "/v1/items/{path}"): {
        "value": {"status": "draft", "papers": 3},
        "if_version": 0,
        "ttl": 3600,
        "text": "Q4 research plan: three papers on retrieval",
        "metadata": {"topic": "retrieval", "priority": 2},
    },
    ("post", "/v1/batch"): {
        "ops": [
            {"op": "put", "namespace": "team/research", "key": "a", "value": 1},
            {"op": "delete", "namespace": "team/research", "key": "old", "if_version": 2},
        ]
    },
    ("post", "/v1/search"): {
        "query": "why did customers leave",
        "prefix": "team/research",
        "filter": {"priority": {"$gte": 2}},
        "mode": "hybrid",
        "limit": 10,
    },
    ("post", "/v1/sessions"): {
        "app": "support",
        "user": "u42",
        "agent": "triage",
        "metadata": {"channel": "chat"},
        "state": {"step": 1},
        "ttl": 86400,
    },
    ("post", "/v1/sessions/{session_id}/messages"): {
        "messages": [
            {"role": "user", "content": "My order is late", "tokens_in": 6},
            {"role": "assistant", "content": "Let me check.", "tokens_out": 4, "cost": 0.0001},
        ]
    },
    ("put", "/v1/sessions/{session_id}/state"): {"state": {"step": 2}, "if_version": 1},
    ("post", "/v1/publish/{channel}"): {"payload": {"done": "summary", "by": "writer"}},
    ("post", "/v1/queues/{queue}/tasks"): {
        "payload": {"url": "https://example.org/paper.pdf"},
        "idempotency_key": "paper-17",
        "timeout": 300,
        "max_attempts": 3,
        "backoff": 5,
        "priority": 1,
    },
    ("post", "/v1/queues/{queue}/claim"): {"lease": 30, "wait": 10},
    ("post", "/v1/tasks/{task_id}/heartbeat"): {"attempt": 1, "lease": 30},
    ("post", "/v1/tasks/{task_id}/complete"): {"attempt": 1, "result": {"words": 420}},
    ("post", "/v1/tasks/{task_id}/fail"): {"attempt": 1, "error": "timeout", "retryable": True},
    ("post", "/v1/tasks/{task_id}/release"): {"attempt": 1},
    ("post", "/v1/tasks/{task_id}/requeue"): {"delay": 0},
    ("post", "/v1/tasks/{task_id}/cancel"): {},
    ("post", "/v1/index/wait"): {"cursor": "1742", "timeout": 5},
    ("post", "/v1/leases/{name}/acquire"): {"ttl": 30, "wait": 5},
    ("post", "/v1/leases/{name}/renew"): {"token": 7, "version": 1, "ttl": 30},
    ("post", "/v1/leases/{name}/release"): {"token": 7, "version": 1},
    ("put", "/v1/signals/{name}"): {"value": {"phase": "review"}, "ttl": 3600},
    ("post", "/v1/once/begin"): {"key": "s42:turn-3:send_email", "lease": 60, "wait": 30},
    ("post", "/v1/once/renew"): {"key": "s42:turn-3:send_email", "token": 12345, "lease": 60},
    ("post", "/v1/once/end"): {
        "key": "s42:turn-3:send_email",
        "token": 12345,
        "result": {"sent": True},
    },
    ("put", "/v1/registry/{name}"): {
        "capabilities": ["summarize", "translate"],
        "endpoint": "https://agents.example.org/writer",
        "metadata": {"model": "small"},
        "ttl": 15,
    },
}

_HEADERS = {
    RETRY_AFTER_HEADER: {"description": "Seconds to wait.", "schema": {"type": "integer"}},
    WWW_AUTHENTICATE_HEADER: {"description": "Bearer realm.", "schema": {"type": "string"}},
    ETAG_HEADER: {"description": 'The item\'s version, e.g. "3".', "schema": {"type": "string"}},
}


def _problem_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _WHY[status],
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status == 429:
        response["headers"] = {RETRY_AFTER_HEADER: _HEADERS[RETRY_AFTER_HEADER]}
    elif status == 401:
        response["headers"] = {WWW_AUTHENTICATE_HEADER: _HEADERS[WWW_AUTHENTICATE_HEADER]}
    return response


def _drop_null(param: dict[str, Any]) -> None:
    """An optional header or query parameter is absent, never JSON ``null``: keep only
    the non-null branch of FastAPI's ``anyOf [X, null]`` (a generator would otherwise
    send the text "null")."""
    schema = param.get("schema", {})
    options = schema.get("anyOf")
    if not options:
        return
    kept = [o for o in options if o.get("type") != "null"]
    if len(kept) == 1 and len(kept) < len(options):
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        param["schema"] = {**kept[0], **rest}


def _set(schema: dict[str, Any], **constraints: Any) -> None:
    """Put constraints on a schema that may be ``anyOf [X, null]`` (optional fields)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") != "null":
            option.update(constraints)


def _parameters(op: dict[str, Any], s: Settings, pattern: dict[str, str], path: str = "") -> None:
    examples = {
        "path": "team/research/q4-plan",
        "session_id": "s42",
        "channel": "team/alerts",
        "queue": "research/summaries",
        "task_id": "0640a1b2c3d4e5f60718293a",
        "name": "writer" if path.startswith("/v1/registry") else "team/research/index",
    }
    rules: dict[str, dict[str, Any]] = {
        "path": {"pattern": pattern["item_path"]},
        "session_id": {"pattern": pattern["segment"]},
        "channel": {"pattern": pattern["namespace"]},
        "prefix": {"pattern": pattern["prefix"]},
        "limit": {"minimum": 1, "maximum": s.max_page_size},
        "max_depth": {"minimum": 1, "maximum": INT64_MAX},
        "if_version": {"minimum": 0, "maximum": INT64_MAX},
        "after": {"minimum": 0, "maximum": INT64_MAX},
        IF_MATCH_HEADER.lower(): {"pattern": pattern["etag"]},
        IF_NONE_MATCH_HEADER.lower(): {"pattern": r"^\*$"},
        AGENT_HEADER.lower(): {"pattern": pattern["segment"]},
        "cursor": {"minLength": 1},
        "key_prefix": {"pattern": pattern["key_prefix"]},
        "app": {"pattern": pattern["segment"]},
        "user": {"pattern": pattern["segment"]},
        "agent": {"pattern": pattern["segment"]},
        "queue": {"pattern": pattern["namespace"]},
        "task_id": {"pattern": pattern["task_id"]},
        # Registry names are agent names (a segment); lease and signal names namespaces.
        "name": {"pattern": pattern["segment" if path.startswith("/v1/registry") else "namespace"]},
        "capability": {"pattern": pattern["segment"]},
        "changed_from": {"minimum": 0, "maximum": INT64_MAX},
        "wait": {"minimum": 0},
        REQUEST_ID_HEADER.lower(): {"pattern": pattern["request_id"]},
        IDEMPOTENCY_KEY_HEADER.lower(): {"pattern": pattern["idempotency_key"]},
    }
    if s.auth:  # the credential names the agent; the header is ignored, so not offered
        op["parameters"] = [
            p for p in op.get("parameters", []) if p["name"].lower() != AGENT_HEADER.lower()
        ]
    else:  # no credentials are asked for
        op.pop("security", None)
    for param in op.get("parameters", []):
        _drop_null(param)
        rule = rules.get(param["name"].lower())
        if rule is None:
            continue
        if param["name"] == "after" and param["in"] == "query":
            schema = param["schema"]
            if any(o.get("type") == "string" for o in schema.get("anyOf", [schema])):
                _set(schema, minLength=1)  # the feed's `after` is a cursor string
                continue
        _set(param["schema"], **rule)
        if param["in"] == "path" and param["name"] in examples:
            param["example"] = examples[param["name"]]


def _bodies(doc: dict[str, Any], s: Settings, pattern: dict[str, str]) -> None:
    schemas = doc.get("components", {}).get("schemas", {})

    def field(model: str, name: str, **constraints: Any) -> None:
        props = schemas.get(model, {}).get("properties", {})
        if name in props:
            _set(props[name], **constraints)

    field("PutBody", "if_version", minimum=0, maximum=INT64_MAX)
    field("PutBody", "ttl", exclusiveMinimum=0, maximum=s.max_ttl_seconds)
    if s.embedder == "none":  # vector search needs an embedder: refused (422)
        mode = schemas.get("SearchBody", {}).get("properties", {}).get("mode", {})
        if "vector" in mode.get("enum", []):
            mode["enum"] = [m for m in mode["enum"] if m != "vector"]
    field("StateBody", "if_version", minimum=0, maximum=INT64_MAX)
    for name in ("app", "user", "agent", "session_id"):
        field("CreateBody", name, pattern=pattern["segment"])
    field("CreateBody", "ttl", exclusiveMinimum=0, maximum=s.max_ttl_seconds)
    field("SearchBody", "prefix", pattern=pattern["prefix"])
    field("FenceBody", "lease", pattern=pattern["namespace"])
    field("FenceBody", "token", minimum=1, maximum=INT64_MAX)
    field("SubmitBody", "idempotency_key", pattern=pattern["key"])
    field("SubmitBody", "delay", maximum=s.max_ttl_seconds)
    field("RequeueBody", "delay", maximum=s.max_ttl_seconds)
    field("FailBody", "error", maxLength=MAX_ERROR_CHARS)
    field("SignalBody", "ttl", maximum=s.max_ttl_seconds)
    for model in ("BeginOnceBody", "RenewOnceBody", "EndOnceBody"):
        field(model, "key", pattern=pattern["key"])
    field("EndOnceBody", "ttl", maximum=s.max_ttl_seconds)
    register = schemas.get("RegisterBody", {}).get("properties", {})
    if "capabilities" in register:
        _set(register["capabilities"], maxItems=MAX_CAPABILITIES)
        for option in register["capabilities"].get("anyOf", [register["capabilities"]]):
            if option.get("type") == "array":
                option["items"] = {"type": "string", "pattern": pattern["segment"]}
    field("SearchBody", "limit", minimum=1, maximum=s.max_search_limit)
    field("SearchBody", "query", minLength=1, maxLength=4096, pattern=r"\S")
    field("SearchBody", "author", minLength=1)
    field("MessageIn", "role", pattern=pattern["segment"])
    field("AppendBody", "messages", minItems=1, maxItems=s.max_batch_ops)
    field("BatchBody", "ops", minItems=1, maxItems=s.max_batch_ops)
    ops = schemas.get("BatchBody", {}).get("properties", {}).get("ops")
    if ops is not None:
        ops["items"] = _batch_op(s, pattern)
    search = schemas.get("SearchBody", {}).get("properties", {})
    if "filter" in search:
        search["filter"] = {
            "anyOf": [_filter(s), {"type": "null"}],
            "description": search["filter"].get("description", ""),
        }


def _batch_op(s: Settings, pattern: dict[str, str]) -> dict[str, Any]:
    """The schema of one operation of a batch: a put or a delete, by ``op``."""
    key = {"type": "string", "pattern": rf"^{_key(s.max_key_bytes)}$"}
    namespace = {"type": "string", "pattern": pattern["namespace"]}
    version = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": INT64_MAX}, {"type": "null"}]}
    put = {
        "type": "object",
        "title": "PutOp",
        "required": ["op", "namespace", "key", "value"],
        "additionalProperties": False,
        "properties": {
            "op": {"const": "put"},
            "namespace": namespace,
            "key": key,
            "value": {"description": "Any JSON value."},
            "if_version": version,
            "ttl": {
                "anyOf": [
                    {"type": "number", "exclusiveMinimum": 0, "maximum": s.max_ttl_seconds},
                    {"type": "null"},
                ]
            },
            "text": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "description": f"At most max_text_bytes ({s.max_text_bytes}) bytes of UTF-8.",
            },
            "metadata": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        },
    }
    delete = {
        "type": "object",
        "title": "DeleteOp",
        "required": ["op", "namespace", "key"],
        "additionalProperties": False,
        "properties": {
            "op": {"const": "delete"},
            "namespace": namespace,
            "key": key,
            "if_version": version,
        },
    }
    return {"oneOf": [put, delete]}


def _filter(s: Settings) -> dict[str, Any]:
    """The schema of a search filter (see :func:`hivemem.core.search.parse_filter`)."""
    scalar = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    operators = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            **{op: scalar for op in ("$eq", "$gt", "$gte", "$lt", "$lte")},
            "$in": {
                "type": "array",
                "minItems": 1,
                "maxItems": s.max_filter_values,
                "items": scalar,
            },
        },
    }
    return {
        "type": "object",
        "maxProperties": s.max_filter_keys,
        "propertyNames": {"pattern": r"^[A-Za-z0-9_.:@+\-]{1,128}$"},
        "additionalProperties": {"anyOf": [*scalar["anyOf"], operators]},
    }


def _header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "description": description,
        "in": "header",
        "name": name,
        "required": False,
        "schema": {"description": description, "title": name, "type": "string", **schema},
    }


#: The headers every route but the probes reads (service/deps.py reads them itself, so
#: FastAPI does not list them).
_HIVE_HEADERS = [
    _header(
        AGENT_HEADER,
        "Identity of the calling agent when the service runs without --auth; ignored with "
        "--auth (the credential names the agent).",
        maxLength=128,
    ),
    _header(
        REQUEST_ID_HEADER,
        "Idempotency key of a write (1-128 letters, digits, _ - . :). A write repeated with "
        "the same request id by the same agent, on any replica, within "
        "request_retention_seconds, is applied once; the repeat gets the first result. The "
        "same id with a different request is refused (422).",
    ),
    _header(
        IDEMPOTENCY_KEY_HEADER,
        f"The IETF {IDEMPOTENCY_KEY_HEADER} header: the same as {REQUEST_ID_HEADER} (which "
        "wins when both are sent).",
    ),
]


def _route_read_bodies(doc: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Add the schemas of the bodies routes read themselves (:class:`JSONBody`) that the
    paths refer to and FastAPI did not generate: FastAPI generates them, for a probe app
    with one route per model taking it as its body, so they are what it would have put
    there (nested models under their own names)."""
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc["paths"])))
    wanted = [m for name, m in BODY_MODELS.items() if name in refs and name not in schemas]
    if not wanted:
        return
    probe = FastAPI()
    for model in wanted:

        async def endpoint(body: Any) -> None:
            """A route taking ``model`` as its body (never called)."""

        endpoint.__annotations__ = {"body": model, "return": None}
        probe.add_api_route(f"/{model.__name__}", endpoint, methods=["PUT"])
    for name, schema in probe.openapi()["components"]["schemas"].items():
        schemas.setdefault(name, schema)


def complete(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Complete FastAPI's generated document (see the module notes); returns it."""
    pattern = _patterns(settings)
    doc.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    if settings.auth:
        doc["components"]["securitySchemes"] = {
            bearer.scheme_name: bearer.model.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        }
    else:
        doc["components"].pop("securitySchemes", None)
    schemas = doc["components"]["schemas"]
    _route_read_bodies(doc, schemas)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            common = _COMMON if settings.auth else _COMMON_WITHOUT_AUTH
            statuses = _PUBLIC.get(path) or (common + _EXTRA.get((method, path), ()))
            for status in statuses:
                responses[str(status)] = _problem_response(status)
            if (method, path) == ("put", "/v1/items/{path}"):
                created = copy.deepcopy(responses["200"])
                created["description"] = "Created (version 1)."
                responses["201"] = created
                responses["200"]["description"] = "Replaced (version > 1)."
            if path == "/v1/items/{path}" and method in ("put", "get"):
                for code in ("200", "201"):
                    if code in responses:
                        responses[code]["headers"] = {ETAG_HEADER: _HEADERS[ETAG_HEADER]}
            if path not in _PUBLIC:
                op.setdefault("parameters", []).extend(copy.deepcopy(_HIVE_HEADERS))
                if settings.auth:
                    op["security"] = [{bearer.scheme_name: []}]
            _parameters(op, settings, pattern, path)
            example = _EXAMPLES.get((method, path))
            body = op.get("requestBody", {}).get("content", {}).get(JSON_MEDIA_TYPE)
            if example is not None and body is not None:
                body["example"] = example
    _bodies(doc, settings, pattern)
    return doc


def install(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` return the completed document (generated once)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
