"""The base of LocalHive's areas (items, sessions, events): what each one works with."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from hivemem.backends.base import Backend
from hivemem.backends.results import RequestIdReused
from hivemem.backends.rows import CheckWrite, ItemRow
from hivemem.config import Settings
from hivemem.core.blobs import Blobs, resolve
from hivemem.embedders.base import Embedder
from hivemem.errors import InvalidInput, PermissionDenied
from hivemem.hive import Heartbeats
from hivemem.metrics import Metrics
from hivemem.policy.rules import Access

T = TypeVar("T")


def timestamp(seconds: float) -> datetime:
    """UNIX seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


class Area:
    """Shared state of the area mixins; :class:`~hivemem.core.LocalHive` fills it in."""

    agent: str
    _backend: Backend
    _settings: Settings
    _embedder: Embedder | None
    #: The caller's request id for the next write (set on per-request views).
    _request_id: str | None = None
    #: hivemem's own view (the indexer): may use the reserved names ``_hivemem/...``.
    _system: bool = False
    #: The name of the request id in error messages (the HTTP header over HTTP).
    _request_field: str = "request_id"
    #: What this view's principal may do; None: everything (no policy in force).
    _access: Access | None = None
    #: The registry heartbeats this hive sends (shared by its views).
    _heartbeats: Heartbeats
    #: Where values and texts over ``blob_threshold_bytes`` go (None: ``blob_store`` unset).
    _blobs: Blobs | None = None

    def _scoped_request_id(self, *request: Any) -> str | None:
        """The request id as the backend stores it: scoped by agent, so two agents
        never share (or see) each other's results, and bound to ``request`` (the
        operation's name and checked arguments) by a SHA-256 fingerprint, so that the
        same id sent with a different request is refused instead of answered with the
        first one's result (``<agent>/<id>#<fingerprint>``)."""
        if self._request_id is None:
            return None
        return f"{self.agent}/{self._request_id}#{fingerprint(request)}"

    async def _once(self, write: Awaitable[T]) -> T:
        """Await a backend write, naming the request id field if the id was reused.

        Raises:
            InvalidInput: the request id was used before for a different request.
        """
        try:
            return await write
        except RequestIdReused:
            raise self._request_id_reused() from None

    def _request_id_reused(self) -> InvalidInput:
        """The error of a request id used before for a different request."""
        return InvalidInput(
            f"request id {self._request_id!r} was already used for a different request; "
            "send a new id for a new request",
            field=self._request_field,
        )

    async def _resolve(self, rows: list[ItemRow]) -> list[ItemRow]:
        """``rows`` with the values and texts kept in the blob store put back (see
        core/blobs.py).

        Raises:
            Unavailable: the blob store failed, or an object is missing or corrupt.
        """
        return await resolve(self._blobs, rows)

    # Permissions -----------------------------------------------------------------

    def _may(self, action: str, namespace: str) -> bool:
        """Whether this view's principal may ``action`` on ``namespace``."""
        return self._access is None or self._access.allows(action, namespace)

    def _must(self, action: str, namespace: str, field: str) -> None:
        """Refuse a write the policy does not allow.

        Raises:
            PermissionDenied: naming ``field``.
        """
        if self._access is not None and not self._access.allows(action, namespace):
            raise PermissionDenied(
                f"agent {self.agent!r} may not {action} in namespace {namespace!r}", field=field
            )

    def _roots(self, action: str, prefix: str) -> list[str]:
        """Prefixes at or under ``prefix`` that may hold something this principal may
        ``action`` (``[prefix]`` without a policy); see :meth:`Access.roots`."""
        return [prefix] if self._access is None else self._access.roots(action, prefix)

    def _now(self) -> float:
        """The time stamped on writes and used for TTLs: UNIX seconds."""
        return time.time()

    @property
    def metrics(self) -> Metrics:
        """The hive's Prometheus metrics (see :mod:`hivemem.metrics`)."""
        raise NotImplementedError

    async def _ready(self) -> None:
        """Open the backend on first use."""
        raise NotImplementedError

    def _opened(self) -> bool:
        """Whether the backend is open (so a read may run without :meth:`_ready`)."""
        raise NotImplementedError

    def _fence(self, fence: object) -> CheckWrite:
        """The check of a write fenced by a lease (see core/coordination.py)."""
        raise NotImplementedError


def fingerprint(parts: tuple[Any, ...]) -> str:
    """A SHA-256 fingerprint (32 hex digits) of an operation's name and arguments:
    strings, bytes, numbers, None and dataclasses of these (e.g. ``PutWrite``)."""
    h = hashlib.sha256()

    def add(part: Any) -> None:
        if dataclasses.is_dataclass(part) and not isinstance(part, type):
            h.update(b"D")
            for f in dataclasses.fields(part):
                add(getattr(part, f.name))
        elif isinstance(part, bytes):
            h.update(b"B%d:" % len(part))
            h.update(part)
        elif isinstance(part, list | tuple):
            h.update(b"L%d:" % len(part))
            for item in part:
                add(item)
        else:
            text = repr(part).encode("utf-8", "surrogatepass")
            h.update(b"R%d:" % len(text))
            h.update(text)

    add(parts)
    return h.hexdigest()[:32]
