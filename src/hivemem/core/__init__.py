"""The embedded Hive: every rule of hivemem, over a storage backend."""

from hivemem.core.hive import LocalHive

__all__ = ["LocalHive"]
