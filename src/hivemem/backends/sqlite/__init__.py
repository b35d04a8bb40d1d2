"""SQLite backend: the embedded and service default (see engine.py for how it runs)."""

from hivemem.backends.sqlite.backend import SqliteBackend

__all__ = ["SqliteBackend"]
