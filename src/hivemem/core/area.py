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

    def _now(self) -> float:
        """The time stamped on writes and used for TTLs: UNIX seconds."""
        return time.time()

    async def _ready(self) -> None:
        """Open the backend on first use."""
        raise NotImplementedError
