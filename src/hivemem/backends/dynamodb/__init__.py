"""DynamoDB backend (``dynamodb://TABLE_PREFIX?region=...&endpoint=...``).

One table, ``hivemem_<prefix>``, created on open with on-demand billing and DynamoDB
TTL on attribute ``ttl`` (see :mod:`.layout` for its rows). Needs the ``aws`` extra
(aiobotocore); credentials come from the usual AWS chain (environment, profile,
instance or task role).

Ordering of the feed, and what it costs: every write is one ``TransactWriteItems``
conditioned on the generation of one head row, which it moves on (see
:mod:`.engine`). A write that loses the race reads again and retries. So writes
are serializable, each commit's events get the next sequence numbers in the same
transaction as the change, and a reader that reads the head first and then the feed
up to it never passes an event that is not committed yet: a feed without gaps, the
promise the PostgreSQL backend keeps with its commit-ordered sequence. The cost is
that all writes to one store go through one row: throughput is bounded by how fast
one item can be transacted (DynamoDB: about 1,000 writes per second to one item,
less under contention, since each lost race is another round trip), and every write
is at least two round trips (the head's read, the transaction). Reads do not touch
the head, except feed reads.

Search: DynamoDB has no full-text or vector search, so ``native_lexical`` is False
and the core ranks in process, as on Redis; each item row carries its index text,
vector and model. Other processes' writes reach this process's watchers by the
feed poll (``feed_poll_seconds``): DynamoDB has no notification channel hivemem
uses (Streams would need a consumer per shard).

Limits: DynamoDB takes at most 100 actions per transaction, so a batch whose writes
need more (about 2 to 4 per put) is refused (InvalidInput, field ``ops``); rows over
400 KB are split into chunk rows (values up to ``max_value_bytes`` fit, within
DynamoDB's 4 MB per transaction). Task queues: see :mod:`.tasks`.

IAM: the role needs, on ``arn:aws:dynamodb:REGION:ACCOUNT:table/hivemem_PREFIX``:
``dynamodb:DescribeTable``, ``CreateTable`` and ``UpdateTimeToLive`` (the first start
only), ``GetItem``, ``BatchGetItem``, ``Query``, ``PutItem``, ``UpdateItem``,
``DeleteItem``, ``BatchWriteItem`` and ``ConditionCheckItem`` (a
``TransactWriteItems`` call needs the permissions of the actions it carries).
"""

from hivemem.backends.dynamodb.backend import DynamoBackend

__all__ = ["DynamoBackend"]
