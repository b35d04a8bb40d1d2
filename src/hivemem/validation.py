"""Input rules shared by every area: names, sizes, TTLs, limits, numbers.

Every check raises :class:`~hivemem.errors.InvalidInput` or
:class:`~hivemem.errors.TooLarge` naming the field, before anything is written.

Numbers: every integer a hive stores or compares must fit a signed 64-bit integer
(SQLite's INTEGER, PostgreSQL's bigint), and every float must be finite (JSON has no
NaN or Infinity; orjson would silently write them as ``null``). This module does not
import numpy: the client imports it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError

from hivemem.config import Settings
from hivemem.errors import InvalidInput, TooLarge

#: The range of a signed 64-bit integer, the widest integer any store keeps.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SEGMENT = re.compile(r"[A-Za-z0-9_.:@+\-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: orjson writes NaN and Infinity as ``null`` and integers up to 2**64 - 1. Encoding
#: first with this option (integers within ±2**53 only; a value without larger ones
#: encodes the same) tells at no cost that no integer can be outside int64, so only an
#: encoding holding ``null`` (or a value with a large integer) is walked for bad numbers.
_SMALL_INTS = orjson.OPT_STRICT_INTEGER


def _default(name: str) -> Any:
    """The default of setting ``name`` (not read from the environment)."""
    return Settings.model_fields[name].default


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


#: hivemem's own namespaces whose feed events a prefix may select: sessions' events,
#: task state changes and the agent registry's events.
FEEDS = ("_sessions", "_tasks", "_agents")


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
    for i, part in enumerate(parts):
        if part == "":
            raise InvalidInput(f"{field} {value!r} has an empty segment", field=field)
        segment(part, field, settings, reserved_ok=allow_empty and i == 0 and part in FEEDS)
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


def key_prefix(value: object, settings: Settings, *, field: str = "key_prefix") -> str:
    """Check a key prefix: as :func:`key`, but it may be empty (every key)."""
    if value == "":
        return ""
    return key(value, settings, field=field)


def to_json(value: Any, field: str, limit: int | None = None) -> bytes:
    """Encode a JSON value with orjson, enforcing a size limit in bytes.

    Args:
        value: any JSON value (dicts with string keys, lists, strings, numbers, booleans,
            None; what orjson serialises).
        field: the input's name, for the error.
        limit: the largest encoding accepted, in bytes; None: no limit.

    Returns:
        The UTF-8 JSON encoding.

    Raises:
        InvalidInput: the value is not JSON-serialisable (e.g. a set, an int beyond
            2**64; field ``field``), or holds a float that is not finite (NaN, Infinity)
            or an integer outside the signed 64-bit range anywhere inside it (field: its
            dotted path from ``field``, e.g. ``value.scores.2`` or ``metadata.score``).
        TooLarge: the encoding is longer than ``limit`` bytes.
    """
    large_ints = False
    try:
        data = orjson.dumps(value, option=_SMALL_INTS)
    except (TypeError, orjson.JSONEncodeError):
        large_ints = True  # an integer beyond ±2**53, or not JSON at all
        try:
            data = orjson.dumps(value)
        except (TypeError, orjson.JSONEncodeError) as exc:
            if _has_bad_number(value):  # an integer beyond 2**64: name where it is
                _refuse_bad_number(value, field)
            raise InvalidInput(f"{field} is not a JSON value: {exc}", field=field) from None
    # Cheap screen: only a large integer or a "null" in the encoding can be a bad number.
    if (large_ints or b"null" in data) and _has_bad_number(value):
        _refuse_bad_number(value, field)
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{field} is {len(data)} bytes as JSON; the limit is {limit}", field=field)
    return data


def _refuse_bad_number(value: Any, field: str) -> NoReturn:
    where, bad = _find_bad_number(value, field)
    raise InvalidInput(
        f"{where} is {bad}; numbers must be finite, integers within -2**63..2**63-1",
        field=where,
    )


def _bad(v: Any) -> bool:
    """Whether ``v`` is a non-finite float or an integer outside int64 (bools are fine)."""
    if isinstance(v, float):
        return not math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX


def _children(v: Any) -> list[tuple[str, Any]] | None:
    """The members of a container orjson serialises, labelled; None for a leaf."""
    if isinstance(v, dict):
        return [(f".{k}", x) for k, x in v.items()]
    if isinstance(v, list | tuple):
        return [(f".{i}", x) for i, x in enumerate(v)]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [(f".{f.name}", getattr(v, f.name)) for f in dataclasses.fields(v)]
    if isinstance(v, enum.Enum):
        return [("", v.value)]
    return None


def _has_bad_number(value: Any) -> bool:
    """Whether a bad number (see :func:`_bad`) is anywhere inside ``value``; fast path for
    the plain types JSON decoding makes, without building positions."""
    stack = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is dict:
            push(v.values())
        elif t is list or t is tuple:
            push(v)
        elif t is float:
            if v - v != 0.0:  # NaN and ±Infinity give NaN
                return True
        elif t is int:
            if not INT64_MIN <= v <= INT64_MAX:
                return True
        elif _bad(v):
            return True
        else:
            members = _children(v)
            if members is not None:
                push(x for _, x in members)
    return False


def _find_bad_number(value: Any, field: str) -> tuple[str, str]:
    """The dotted path (e.g. ``value.scores.2``) and repr of the first bad number found."""
    stack = [(field, value)]
    while stack:
        where, v = stack.pop()
        if _bad(v):
            return where, repr(v)
        members = _children(v)
        if members is not None:
            stack.extend((where + label, x) for label, x in reversed(members))
    return field, "not a JSON number"


def json_object(value: Any, field: str, limit: int | None = None) -> bytes:
    """Encode a JSON object (dict with string keys), enforcing a size limit in bytes.

    Raises:
        InvalidInput: not a dict, or what :func:`to_json` refuses.
        TooLarge: the encoding is longer than ``limit`` bytes.
    """
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


def ttl(
    value: object,
    *,
    field: str = "ttl",
    settings: Settings | None = None,
    max_seconds: float | None = None,
) -> float:
    """Check a TTL: a finite number of seconds, > 0 and at most the longest TTL.

    Args:
        value: the TTL in seconds (int or float, not bool).
        field: the input's name, for the error.
        settings: its ``max_ttl_seconds`` is the longest TTL accepted.
        max_seconds: the longest TTL accepted, in seconds; wins over ``settings``. With
            neither, the default ``max_ttl_seconds`` (10 years).

    Returns:
        The TTL in seconds, as a float.

    Raises:
        InvalidInput: not a number, not finite, <= 0, or over the longest TTL.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number of seconds", field=field)
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a float's range
        raise InvalidInput(f"{field} must be a finite number of seconds", field=field) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"{field} must be a positive number of seconds", field=field)
    if max_seconds is None:
        max_seconds = (
            settings.max_ttl_seconds if settings is not None else _default("max_ttl_seconds")
        )
    if seconds > max_seconds:
        raise InvalidInput(f"{field} must be at most {max_seconds:g} seconds", field=field)
    return seconds


def int64(value: object, field: str) -> int:
    """Check an integer that fits a signed 64-bit integer (-2**63 .. 2**63 - 1).

    Args:
        value: the integer (not bool).
        field: the input's name, for the error.

    Returns:
        ``value``.

    Raises:
        InvalidInput: not an int (or a bool), or outside the 64-bit range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer", field=field)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInput(f"{field} must be between -2**63 and 2**63-1", field=field)
    return value


def finite(value: object, field: str) -> float | int:
    """Check a JSON number: a finite float, or an integer in the signed 64-bit range.

    Args:
        value: an int (not bool) or a float.
        field: the input's name, for the error.

    Returns:
        ``value`` unchanged.

    Raises:
        InvalidInput: not a number, a NaN or Infinity, or an integer outside int64.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number", field=field)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{field} must be a finite number, not {value!r}", field=field)
        return value
    return int64(value, field)


def version(value: object, *, field: str = "if_version") -> int:
    """Check an expected version: an integer in 0..2**63 - 1.

    Raises:
        InvalidInput: not an int (or a bool), negative, or over 2**63 - 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be an integer >= 0", field=field)
    return int64(value, field)


def limit(value: object, settings: Settings, *, field: str = "limit") -> int:
    """Check a page size: an integer in 1..max_page_size.

    Raises:
        InvalidInput: not an int (or a bool), or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer", field=field)
    if not 1 <= value <= min(settings.max_page_size, INT64_MAX):
        raise InvalidInput(f"{field} must be between 1 and {settings.max_page_size}", field=field)
    return value


def count(value: object, *, field: str) -> int:
    """Check a non-negative integer such as a sequence number: 0..2**63 - 1.

    Raises:
        InvalidInput: not an int (or a bool), negative, or over 2**63 - 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be an integer >= 0", field=field)
    return int64(value, field)


def seconds(value: object, field: str, *, low: float, high: float, zero_ok: bool = False) -> float:
    """Check a number of seconds in [low, high] (or exactly 0 when ``zero_ok``).

    Raises:
        InvalidInput: not a finite number, or out of range (naming ``field``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number of seconds", field=field)
    try:
        number = float(value)
    except OverflowError:
        raise InvalidInput(f"{field} must be a finite number of seconds", field=field) from None
    if not math.isfinite(number):
        raise InvalidInput(f"{field} must be a finite number of seconds", field=field)
    if zero_ok and number == 0:
        return 0.0
    if not low <= number <= high:
        lowest = "0" if zero_ok else f"{low:g}"
        raise InvalidInput(f"{field} must be between {lowest} and {high:g} seconds", field=field)
    return number


def integer(value: object, field: str, low: int, high: int) -> int:
    """Check an integer in [low, high] (3.0 counts as 3).

    Raises:
        InvalidInput: not an integer, or out of range (naming ``field``).
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer", field=field)
    if not low <= value <= high:
        raise InvalidInput(f"{field} must be between {low} and {high}", field=field)
    return value


def optional_wait(value: object, field: str = "wait") -> float:
    """A wait in seconds (``None`` = 0), at most a day.

    Raises:
        InvalidInput: negative, not finite or not a number (naming ``field``).
    """
    if value is None:
        return 0.0
    return seconds(value, field, low=0.0, high=86400.0, zero_ok=True)


def error_field(loc: Sequence[Any], prefix: str = "") -> str:
    """The field a pydantic error location names, dotted: ``('ops', 0, 'ttl')`` ->
    ``ops.0.ttl``. FastAPI's request part comes first and is dropped (``('body', 'ttl')``
    -> ``ttl``); a header keeps its canonical name (``X-Hivemem-Agent``). ``prefix`` goes
    before it (``messages.3`` + ``role`` -> ``messages.3.role``); an empty location names
    ``prefix``, else ``body``."""
    parts = [str(p) for p in loc]
    if len(parts) == 2 and parts[0] == "header":
        return "-".join(word.capitalize() for word in parts[1].split("-"))
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    name = ".".join(parts)
    if prefix:
        return f"{prefix}.{name}" if name else prefix
    return name or "body"


def invalid_input(exc: ValidationError, *, prefix: str = "", what: str = "") -> InvalidInput:
    """The :class:`~hivemem.errors.InvalidInput` for a pydantic ``ValidationError``: its
    first error, the field named by :func:`error_field` (``prefix`` before it), the
    message after ``what`` (e.g. ``"invalid setting: "``) when given, else after the
    field's name. A malformed JSON body (``json_invalid``) names field ``body``."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return InvalidInput(f"malformed JSON body: {err.get('msg')}", field="body")
    field = error_field(err.get("loc", ()), prefix)
    return InvalidInput(f"{what or field + ': '}{err.get('msg')}", field=field)
