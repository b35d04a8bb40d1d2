"""hivemem: shared memory and coordination for AI agents in separate processes.

Open a hive with :func:`connect` (async) or :func:`connect_sync` (blocking)::

    hive = hivemem.connect("sqlite:///hive.db", agent="researcher")   # embedded
    hive = hivemem.connect("http://localhost:8765", agent="researcher")  # service

The same methods, return types and exceptions work for every URL.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hivemem.config import Settings
from hivemem.errors import (
    Conflict,
    CursorExpired,
    HivememError,
    InvalidInput,
    NotFound,
    OnceFailed,
    PermissionDenied,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
)
from hivemem.hive import Hive
from hivemem.models import (
    AgentRecord,
    DeleteOp,
    Event,
    IndexStatus,
    Item,
    Lease,
    Message,
    MessageIn,
    NamespaceCount,
    OnceTicket,
    Page,
    PutOp,
    QueueStats,
    SearchHit,
    Session,
    Signal,
    Task,
    TaskError,
)
from hivemem.sync import SyncHive

if TYPE_CHECKING:
    from pydantic import SecretStr

    from hivemem.backends.base import Backend

__all__ = [
    "AgentRecord",
    "Conflict",
    "CursorExpired",
    "DeleteOp",
    "Event",
    "Hive",
    "HivememError",
    "IndexStatus",
    "InvalidInput",
    "Item",
    "Lease",
    "Message",
    "MessageIn",
    "NamespaceCount",
    "NotFound",
    "OnceFailed",
    "OnceTicket",
    "Page",
    "PermissionDenied",
    "PutOp",
    "QueueStats",
    "RateLimited",
    "SearchHit",
    "Session",
    "Settings",
    "Signal",
    "SyncHive",
    "Task",
    "TaskError",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "connect",
    "connect_sync",
    "open_backend",
]

__version__ = "0.1.0"


#: The store or service :func:`connect` opens when given no URL and ``HIVEMEM_URL`` is unset.
DEFAULT_URL = "sqlite:///hive.db"


def connect(
    url: str | None = None,
    *,
    agent: str = "anonymous",
    api_key: str | SecretStr | None = None,
    settings: Settings | None = None,
) -> Hive:
    """Open the async Hive that ``url`` names. Nothing is contacted until first use.

    Args:
        url: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
            ``sqlite://:memory:`` (private to this Hive object), ``http://host:port``,
            or several ``http://`` URLs separated by commas (replicas of one service).
            ``None`` (the default) takes the environment variable ``HIVEMEM_URL`` (what
            the ``hivemem`` command uses too), else :data:`DEFAULT_URL` (``./hive.db``).
        agent: the identity stamped as author of this hive's writes (one namespace
            segment: letters, digits, ``_ - . : @ +``).
        api_key: for ``http(s)`` URLs, the key sent as ``Authorization: Bearer <key>``
            with every request; None (the default) takes ``settings.api_key`` (env
            ``HIVEMEM_API_KEY``), ``""`` sends none. Ignored by embedded stores.
        settings: limits and tuning; by default read from ``HIVEMEM_*`` variables. Its
            ``embedder`` picks the search embedder of a local store (default: the
            offline all-MiniLM-L6-v2 model; ``none`` for lexical search only).

    Returns:
        A :class:`RemoteHive` for ``http(s)`` URLs, otherwise a :class:`LocalHive` over
        the backend :func:`open_backend` picks (SQLite, PostgreSQL, Redis).

    Raises:
        InvalidInput: unknown scheme (field ``url``), invalid agent (field ``agent``);
            for ``http(s)`` URLs an API key that cannot be sent in a header (field
            ``api_key``, the key is never shown) or an unreadable ``client_ca_file``.
    """
    settings = settings or Settings()
    url = url or os.environ.get("HIVEMEM_URL") or DEFAULT_URL
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        from hivemem.client.remote import RemoteHive

        return RemoteHive(url, agent=agent, api_key=api_key, settings=settings)
    from hivemem.core.hive import LocalHive
    from hivemem.embedders import make_embedder

    return LocalHive(
        open_backend(url, settings),
        agent=agent,
        settings=settings,
        embedder=make_embedder(settings),
    )


def open_backend(url: str, settings: Settings) -> Backend:
    """The (unopened) storage backend a store URL names.

    Args:
        url: ``sqlite:///path`` / ``sqlite://:memory:``; ``postgresql://user:pw@host:port/db``;
            ``redis://host:port/db``; ``redis+cluster://host:port,host:port``;
            ``dynamodb://TABLE_PREFIX?region=...&endpoint=...``.

    Raises:
        InvalidInput: unknown scheme or malformed URL (field ``url``).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from hivemem.backends.sqlite import SqliteBackend

        return SqliteBackend.from_url(url, settings)
    if scheme in ("postgresql", "postgres"):
        from hivemem.backends.postgres import PostgresBackend

        return PostgresBackend.from_url(url, settings)
    if scheme in ("redis", "rediss", "redis+cluster"):
        from hivemem.backends.redis import RedisBackend

        return RedisBackend.from_url(url, settings)
    if scheme == "dynamodb":
        from hivemem.backends.dynamodb import DynamoBackend

        return DynamoBackend.from_url(url, settings)
    raise InvalidInput(
        f"unsupported store URL {url!r}: expected sqlite:///path, sqlite://:memory:, "
        "postgresql://..., redis://..., redis+cluster://..., dynamodb://PREFIX or "
        "http://host:port",
        field="url",
    )


def connect_sync(
    url: str | None = None,
    *,
    agent: str = "anonymous",
    api_key: str | SecretStr | None = None,
    settings: Settings | None = None,
) -> SyncHive:
    """Open the blocking hive that ``url`` names: :func:`connect` without ``await``.

    It starts a background thread running an event loop; close the hive (``with`` or
    :meth:`SyncHive.close`) to stop it. Nothing is contacted until the first call.

    Args:
        url: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
            ``sqlite://:memory:`` (private to this hive), ``http://host:port``, several
            ``http://`` URLs separated by commas (replicas of one service), or a store URL
            (``postgresql://...``, ``redis://...``). ``None`` (the default) takes
            ``HIVEMEM_URL``, else :data:`DEFAULT_URL`.
        agent: the identity stamped as author of this hive's writes (one namespace
            segment: letters, digits, ``_ - . : @ +``).
        api_key: for ``http(s)`` URLs, the key sent as ``Authorization: Bearer <key>``;
            None takes ``settings.api_key`` (env ``HIVEMEM_API_KEY``), ``""`` sends none.
        settings: limits and tuning; by default read from ``HIVEMEM_*`` variables (its
            ``embedder`` picks the search embedder of a local store).

    Returns:
        A :class:`SyncHive` over the :class:`Hive` :func:`connect` returns.

    Raises:
        InvalidInput: unknown scheme (field ``url``), invalid agent (field ``agent``), or
            for ``http(s)`` URLs an API key that cannot be sent in a header (field
            ``api_key``) or an unreadable ``client_ca_file``.
    """
    return SyncHive(connect(url, agent=agent, api_key=api_key, settings=settings))
