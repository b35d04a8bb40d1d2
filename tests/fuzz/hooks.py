"""Schemathesis hooks for the fuzz run of the service (``SCHEMATHESIS_HOOKS``).

Cursors and request ids are opaque tokens: the service hands cursors out, and a caller
makes each request id unique. A generator cannot make valid ones, and reusing one id
for two different requests is rightly refused (422), so before each call:

* a well-formed request id (``X-Hivemem-Request-Id`` / ``Idempotency-Key``) is replaced
  by a fresh one (malformed ones are left, so negative cases stay negative);
* a non-empty listing or feed cursor is dropped (an empty one is left: it is invalid).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis

_REQUEST_ID = re.compile(r'"?[A-Za-z0-9_.:\-]{1,128}"?')
_CURSORS = {"cursor", "after"}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    headers = case.headers or {}
    for name in list(headers):
        value = headers[name]
        if name.lower() in ("x-hivemem-request-id", "idempotency-key") and isinstance(value, str):
            if _REQUEST_ID.fullmatch(value):
                headers[name] = uuid.uuid4().hex
        elif name.lower() == "last-event-id":
            del headers[name]
    query = case.query or {}
    if case.path == "/v1/items" and "key_prefix" in query and not query.get("prefix"):
        del query["key_prefix"]  # lists one namespace: needs a prefix, which OpenAPI cannot say
    for name in list(query):
        value = query[name]
        if name in _CURSORS and isinstance(value, str) and value:
            if name == "after" and case.path != "/v1/events":
                continue  # messages' `after` is a sequence number, not a cursor
            del query[name]


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but one kind: an integer beyond 64 bits inside a free-form JSON
    value refused with 422. JSON Schema cannot tell the integer 2**70 from the float
    1.18e21 (both are "integers" to it), so the document cannot say that the first is
    refused and the second kept."""
    if response is None or response.status_code != 422:
        return True
    try:
        detail = response.json().get("detail", "")
    except Exception:
        return True
    return "integers within -2**63..2**63-1" not in str(detail)
