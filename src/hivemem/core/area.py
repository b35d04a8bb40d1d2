"""The base of LocalHive's areas (items, sessions, events): what each one works with."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from hivemem.backends.base import Backend
from hivemem.config import Settings
from hivemem.embedders.base import Embedder


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

    def _scoped_request_id(self) -> str | None:
        """The request id as the backend stores it: scoped by agent, so two agents
        never share (or see) each other's results."""
        return None if self._request_id is None else f"{self.agent}/{self._request_id}"

    def _now(self) -> float:
        """The time stamped on writes and used for TTLs: UNIX seconds."""
        return time.time()

    async def _ready(self) -> None:
        """Open the backend on first use."""
        raise NotImplementedError
