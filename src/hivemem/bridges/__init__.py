"""Feed bridges: follow a hive's change feed and deliver each event to another system.

A bridge is a durable consumer of the feed: it reads ``hive.watch(prefix, after=cursor)``
from a cursor it keeps in the hive itself, delivers each event to a sink, and records
the cursor of what was delivered (at-least-once: deliver, then record). Events that
fail for good go to a dead-letter file (JSON Lines) and the bridge moves on. Every
message carries an event id that is the same on every redelivery, so a receiver that
drops ids it has seen handles each event exactly once.

Sinks:

- :class:`~hivemem.bridges.webhook.WebhookSink`: HMAC-signed HTTP POSTs
  (``hivemem bridge webhook``; :func:`~hivemem.bridges.webhook.verify_signature` for
  receivers);
- :class:`~hivemem.bridges.sns.SnsSink`: Amazon SNS ``Publish`` (``hivemem bridge sns``,
  the ``aws`` extra);
- :class:`~hivemem.bridges.redis_pubsub.RedisPubSubSink`: Redis ``PUBLISH``
  (``hivemem bridge redis-pubsub``).

The loop, the cursor store and the dead-letter file are in :mod:`hivemem.bridges.base`;
docs/bridges.md describes what each sink sends and the delivery guarantees. This package
imports no sink library until a sink is opened.
"""

from __future__ import annotations

from hivemem.bridges.base import (
    Bridge,
    BridgeStats,
    CursorRecord,
    CursorStore,
    CursorTaken,
    DeliveryFailed,
    Message,
    Retry,
    Sink,
    Undeliverable,
    cursor_store,
    event_body,
    event_id,
)

__all__ = [
    "Bridge",
    "BridgeStats",
    "CursorRecord",
    "CursorStore",
    "CursorTaken",
    "DeliveryFailed",
    "Message",
    "Retry",
    "Sink",
    "Undeliverable",
    "cursor_store",
    "event_body",
    "event_id",
]
