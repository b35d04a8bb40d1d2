"""Opaque pagination cursors: URL-safe base64 of a small JSON document."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from hivemem.errors import InvalidInput


def encode(position: Any) -> str:
    """Encode a JSON-serialisable position as an opaque URL-safe string."""
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode("ascii").rstrip("=")


def decode(cursor: str | None, field: str = "cursor") -> Any:
    """Decode a cursor made by :func:`encode`; ``None`` stays ``None``.

    Raises:
        InvalidInput: the cursor was not made by :func:`encode`.
    """
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise InvalidInput(f"{cursor!r} is not a valid cursor", field=field) from None
