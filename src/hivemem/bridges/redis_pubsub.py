"""The Redis pub/sub sink: each event ``PUBLISH``-ed on a channel (redis-py asyncio).

The message is the event as JSON (:func:`~hivemem.bridges.base.event_body`), whose
``id`` field is the event id (the same on every redelivery: subscribers drop repeats by
it).

Redis pub/sub keeps nothing: a message reaches the clients subscribed at that moment and
no one else. "Delivered" therefore means Redis accepted the ``PUBLISH``; with
``require_subscriber`` a ``PUBLISH`` that reached no subscriber counts as failed and is
tried again (then dead-lettered), which suits a channel some consumer must always be
on. Connection errors, timeouts and error replies are tried again. redis-py's own
retries are off: the bridge retries (one retry mechanism).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hivemem.backends.redis.engine import redact
from hivemem.bridges.base import DeliveryFailed, Message, Sink
from hivemem.errors import InvalidInput

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["DEFAULT_CHANNEL", "RedisPubSubSink"]

#: The channel events are published on unless another is named.
DEFAULT_CHANNEL = "hivemem:events"


class RedisPubSubSink(Sink):
    """Publishes each event on ``channel`` of the Redis at ``url`` (see the module notes).

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS).
        channel: the channel (non-empty).
        require_subscriber: count a ``PUBLISH`` that reached no subscriber as failed.
        timeout_seconds: the most connecting, and then each command, may take (> 0).

    Raises:
        InvalidInput: a URL that is not redis(s):// (field ``redis_url``), an empty
            channel (field ``channel``), a timeout that is not positive (field
            ``timeout``).
    """

    kind = "redis-pubsub"

    def __init__(
        self,
        url: str,
        channel: str = DEFAULT_CHANNEL,
        *,
        require_subscriber: bool = False,
        timeout_seconds: float = 5.0,
    ) -> None:
        if not url.lower().startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInput(f"expected a redis:// URL, not {url!r}", field="redis_url")
        if not channel:
            raise InvalidInput("the channel must not be empty", field="channel")
        if not timeout_seconds > 0:
            raise InvalidInput("timeout must be more than 0 seconds", field="timeout")
        self.url = url
        self.channel = channel
        self.require_subscriber = require_subscriber
        self.timeout_seconds = float(timeout_seconds)
        self._client: aioredis.Redis | None = None

    @property
    def target(self) -> str:
        return f"{redact(self.url)} channel {self.channel}"

    async def open(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_seconds,
            socket_connect_timeout=self.timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, message: Message) -> None:
        """Publish one event.

        Raises:
            DeliveryFailed: Redis could not be reached, answered an error, or (with
                ``require_subscriber``) no client was subscribed.
        """
        from redis.exceptions import RedisError

        client = self._client
        assert client is not None, "open() first"
        try:
            receivers = await client.publish(self.channel, message.body)
        except (RedisError, OSError) as exc:
            raise DeliveryFailed(f"{self.target}: {type(exc).__name__}: {exc}") from None
        if self.require_subscriber and not receivers:
            raise DeliveryFailed(f"{self.target}: no subscriber received the message")
