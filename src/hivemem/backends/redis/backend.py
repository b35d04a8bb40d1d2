"""The Redis backend: items, sessions, task queues and the feed as Lua scripts over
partitions.

See the package docstring for durability and :mod:`.layout` for the keys. Every
change is one script (see :mod:`.scripts`; the task queues' in :mod:`.task_scripts`)
that checks, writes, appends its feed event and stores its request-id result in one
atomic step, within one partition (one hash slot in a cluster).

:class:`RedisBackend` is composed of one class per area, each over
:class:`~.engine.RedisEngine` (the client, retries, request ids, the change
listener): :mod:`.items`, :mod:`.sessions`, :mod:`.feed` (and its cursors),
:mod:`.search` and :mod:`.tasks`.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, ClassVar

from hivemem.backends.base import Backend
from hivemem.backends.redis.engine import redact
from hivemem.backends.redis.feed import RedisFeed
from hivemem.backends.redis.items import RedisItems
from hivemem.backends.redis.search import RedisSearch
from hivemem.backends.redis.sessions import RedisSessions
from hivemem.backends.redis.tasks import RedisTasks
from hivemem.config import Settings
from hivemem.errors import InvalidInput

__all__ = ["RedisBackend"]


class RedisBackend(RedisItems, RedisSessions, RedisFeed, RedisSearch, RedisTasks, Backend):
    """Items, sessions, task queues and the feed in Redis 7 (standalone or Redis Cluster).

    Args:
        url: the store URL (see :meth:`from_url`).
        settings: ``request_retention_seconds``, ``feed_poll_seconds`` and
            ``redis_retry_seconds`` apply.
        nodes: the cluster's startup nodes (host, port), or ``None`` for a standalone
            server at ``url``.
        cluster_options: username, password and ssl of a cluster URL.
    """

    #: Change notifications name every task event (see ``feed_done`` in scripts.py).
    task_hints: ClassVar[bool] = True
    #: No full-text search on stock Redis 7: the core ranks in process.
    native_lexical: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"RedisBackend({self._where!r})"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisBackend:
        """Build from ``redis://[user:pw@]host:port[/db]``, ``rediss://...`` (TLS) or
        ``redis+cluster://[user:pw@]host:port,host:port,...[?ssl=true]`` (a cluster,
        given by some of its nodes).

        Raises:
            InvalidInput: the URL is malformed (field ``url``).
        """
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("redis", "rediss", "redis+cluster"):
            raise _bad_url(url)
        if scheme in ("redis", "rediss"):
            try:
                parsed = urllib.parse.urlsplit(url)
                parsed.port  # noqa: B018 (raises ValueError on a bad port)
            except ValueError:
                raise _bad_url(url) from None
            db = parsed.path.strip("/")
            if not parsed.hostname or "," in parsed.netloc or (db and not db.isdigit()):
                raise _bad_url(url)
            return cls(url, settings)
        netloc, _, tail = rest.partition("/")
        netloc, _, query = netloc.partition("?")
        if not query and "?" in tail:
            query = tail.split("?", 1)[1]
        options: dict[str, Any] = {}
        creds, at, hosts = netloc.rpartition("@")
        if at:
            user, colon, password = creds.partition(":")
            if user:
                options["username"] = urllib.parse.unquote(user)
            if colon:
                options["password"] = urllib.parse.unquote(password)
        params = urllib.parse.parse_qs(query)
        if params.get("ssl", ["false"])[-1].lower() in ("1", "true", "yes"):
            options["ssl"] = True
        nodes = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            host = host.strip("[]")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad_url(url)
            nodes.append((host, int(port)))
        if not nodes:
            raise _bad_url(url)
        return cls(url, settings, nodes=nodes, cluster_options=options)


def _bad_url(url: str) -> InvalidInput:
    return InvalidInput(
        f"bad Redis URL {redact(url)!r}: use redis://host:port[/db], rediss://host:port[/db] "
        "or redis+cluster://host:port,host:port,...",
        field="url",
    )
