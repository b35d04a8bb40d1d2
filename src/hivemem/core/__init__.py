"""The embedded Hive: every rule of hivemem, over a storage backend.

``LocalHive`` is imported on first use, so that modules of this package that other
layers share (``validation``, ``cursors``) load without the search stack (numpy, the
stemmer, the embedders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivemem.core.hive import LocalHive

__all__ = ["LocalHive"]


def __getattr__(name: str) -> Any:
    if name == "LocalHive":
        from hivemem.core.hive import LocalHive

        return LocalHive
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
