"""Request ids: the stored result of a write and the fingerprint that binds an id to its
request (see :class:`hivemem.backends.base.Backend`)."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, overload

import orjson

from hivemem.backends.rows import EventRow, ItemRow, MessageRow, SessionRow, TaskRow
from hivemem.errors import InvalidInput

__all__ = [
    "RequestIdReused",
    "WriteResult",
    "decode_result",
    "decode_stored_result",
    "encode_result",
    "encode_stored_result",
    "split_request_id",
]


#: What a write method returns; what a request id's stored result decodes to.
WriteResult = Any

_ROW_TYPES: dict[str, type] = {
    "item": ItemRow,
    "session": SessionRow,
    "message": MessageRow,
    "event": EventRow,
    "task": TaskRow,
}
_ROW_TAGS = {cls: tag for tag, cls in _ROW_TYPES.items()}


def _encode_value(value: Any) -> Any:
    tag = _ROW_TAGS.get(type(value))
    if tag is not None:
        fields = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if isinstance(v, bytes):
                v = {"b": base64.b64encode(v).decode("ascii")}
            fields[f.name] = v
        return {"t": tag, "f": fields}
    if isinstance(value, list | tuple):
        return {"t": "list", "v": [_encode_value(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"t": "plain", "v": value}
    raise TypeError(f"cannot encode a write result of type {type(value).__name__}")


def _decode_value(doc: Any) -> Any:
    tag = doc["t"]
    if tag == "list":
        return [_decode_value(v) for v in doc["v"]]
    if tag == "plain":
        return doc["v"]
    fields = {
        name: base64.b64decode(v["b"]) if isinstance(v, dict) else v for name, v in doc["f"].items()
    }
    return _ROW_TYPES[tag](**fields)


def encode_result(result: WriteResult) -> bytes:
    """Encode what a write method returned (rows of this module, bools, None, lists
    of these) as bytes, to store under a request id in the write's transaction."""
    return orjson.dumps(_encode_value(result))


def decode_result(data: bytes) -> WriteResult:
    """The write result :func:`encode_result` encoded."""
    return _decode_value(orjson.loads(data))


class RequestIdReused(InvalidInput):
    """Raised when a request id comes with a different request than the one it was first
    used for (another operation or other arguments): nothing was written (HTTP 422,
    field ``request_id``)."""

    def __init__(
        self,
        message: str = (
            "this request id was already used for a different request (another operation "
            "or other arguments); use a new request id for a new request"
        ),
        *,
        field: str | None = "request_id",
    ) -> None:
        super().__init__(message, field=field)


@overload
def split_request_id(request_id: str) -> tuple[str, str | None]: ...
@overload
def split_request_id(request_id: None) -> tuple[None, None]: ...
@overload
def split_request_id(request_id: str | None) -> tuple[str | None, str | None]: ...
def split_request_id(request_id: str | None) -> tuple[str | None, str | None]:
    """(id, fingerprint) of a ``request_id`` a backend primitive was given.

    The core may append ``#<fingerprint>`` (hex) to the id; the part before the last
    ``#`` is the id (what the stored result is kept under), the rest the fingerprint
    of the request (``None`` when absent or empty). ``None`` gives ``(None, None)``.
    """
    if request_id is None:
        return None, None
    rid, sep, fp = request_id.rpartition("#")
    if not sep:
        return request_id, None
    return rid, fp or None


def encode_stored_result(result: WriteResult, fingerprint: str | None) -> bytes:
    """What a SQL backend stores under a request id: :func:`encode_result` of ``result``,
    prefixed with ``#<fingerprint>\\n`` when there is a fingerprint (a plain encoded
    result starts with ``{``, so results stored without one still read back)."""
    encoded = encode_result(result)
    if not fingerprint:
        return encoded
    return b"#" + fingerprint.encode("utf-8") + b"\n" + encoded


def decode_stored_result(data: bytes, fingerprint: str | None) -> WriteResult:
    """The result :func:`encode_stored_result` stored, for a repeat with ``fingerprint``.

    Raises:
        RequestIdReused: both the stored result and the repeat have a fingerprint and
            they differ.
    """
    stored_fp: bytes | None = None
    if data[:1] == b"#":
        end = data.index(b"\n")
        stored_fp, data = data[1:end], data[end + 1 :]
    if stored_fp and fingerprint and stored_fp != fingerprint.encode("utf-8"):
        raise RequestIdReused()
    return decode_result(data)
