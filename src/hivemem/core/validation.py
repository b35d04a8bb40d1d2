"""Input rules shared by every area: names, sizes, TTLs, limits.

Every check raises :class:`~hivemem.errors.InvalidInput` or
:class:`~hivemem.errors.TooLarge` naming the field, before anything is written.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

from hivemem.config import Settings
from hivemem.errors import InvalidInput, TooLarge

_SEGMENT = re.compile(r"[A-Za-z0-9_.:@+\-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def segment(value: object, field: str, settings: Settings, *, reserved_ok: bool = False) -> str:
    """Check one identifier segment (agent, app, user, session id, namespace segment)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    if not value:
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(value) > settings.max_segment_chars:
        raise InvalidInput(
            f"{field} is longer than {settings.max_segment_chars} characters", field=field
        )
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidInput(
            f"{field} {value!r} has characters outside letters, digits and _ - . : @ +",
            field=field,
        )
    if value.startswith("_") and not reserved_ok:
        raise InvalidInput(f"{field} {value!r} may not start with '_' (reserved)", field=field)
    return value


def namespace(
    value: object, settings: Settings, *, field: str = "namespace", allow_empty: bool = False
) -> str:
    """Check a namespace (or a prefix when ``allow_empty``): 1..max_namespace_depth segments."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    if value == "":
        if allow_empty:
            return value
        raise InvalidInput(f"{field} must not be empty", field=field)
    parts = value.split("/")
    if len(parts) > settings.max_namespace_depth:
        raise InvalidInput(
            f"{field} has {len(parts)} segments; at most {settings.max_namespace_depth} allowed",
            field=field,
        )
    for part in parts:
        if part == "":
            raise InvalidInput(f"{field} {value!r} has an empty segment", field=field)
        segment(part, field, settings, reserved_ok=allow_empty and part == "_sessions")
    return value


def key(value: object, settings: Settings, *, field: str = "key") -> str:
    """Check an item key: 1..max_key_bytes of UTF-8, no '/' and no control characters."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    if value == "":
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(value.encode("utf-8", "surrogatepass")) > settings.max_key_bytes:
        raise InvalidInput(f"{field} is longer than {settings.max_key_bytes} bytes", field=field)
    if "/" in value or _CONTROL.search(value):
        raise InvalidInput(f"{field} may not contain '/' or control characters", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field} is not valid UTF-8", field=field) from None
    return value


def to_json(value: Any, field: str, limit: int) -> bytes:
    """Encode a JSON value, enforcing a size limit in bytes.

    Raises:
        InvalidInput: the value is not JSON-serialisable (e.g. a set, NaN, a huge int).
        TooLarge: the encoding is longer than ``limit`` bytes.
    """
    try:
        data = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidInput(f"{field} is not a JSON value: {exc}", field=field) from None
    if len(data) > limit:
        raise TooLarge(f"{field} is {len(data)} bytes as JSON; the limit is {limit}", field=field)
    return data


def json_object(value: Any, field: str, limit: int) -> bytes:
    """Encode a JSON object (dict with string keys), enforcing a size limit in bytes."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a JSON object", field=field)
    return to_json(value, field, limit)


def text(value: object, settings: Settings, *, field: str = "text") -> str:
    """Check an optional search text: a string of at most max_text_bytes."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    if len(value.encode("utf-8", "surrogatepass")) > settings.max_text_bytes:
        raise TooLarge(f"{field} is longer than {settings.max_text_bytes} bytes", field=field)
    return value


def ttl(value: object, *, field: str = "ttl") -> float:
    """Check a TTL: a finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number of seconds", field=field)
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"{field} must be a positive number of seconds", field=field)
    return seconds


def version(value: object, *, field: str = "if_version") -> int:
    """Check an expected version: an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be an integer >= 0", field=field)
    return value


def limit(value: object, settings: Settings, *, field: str = "limit") -> int:
    """Check a page size: an integer in 1..max_page_size."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer", field=field)
    if not 1 <= value <= settings.max_page_size:
        raise InvalidInput(f"{field} must be between 1 and {settings.max_page_size}", field=field)
    return value


def count(value: object, *, field: str) -> int:
    """Check a non-negative integer such as a sequence number."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be an integer >= 0", field=field)
    return value
