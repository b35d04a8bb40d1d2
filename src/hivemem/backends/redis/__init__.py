"""Redis backend: a standalone Redis 7 (``redis://``, ``rediss://``) or a Redis Cluster
(``redis+cluster://host:port,host:port,...``).

Layout and atomicity: the store is split into 16 partitions, each behind one hash tag
(one cluster slot); a namespace tree (everything under one first segment) lives in
one partition together with its feed events, so each write, its version check, its
event, its index entry and its request-id result are one Lua script, atomic on the
node that owns the slot (see :mod:`.layout`, :mod:`.scripts`). On a cluster, a batch
must stay within one partition (InvalidInput field ``ops`` otherwise); a standalone
server takes any batch.

Modules: :mod:`.engine` (client, retries, request ids, change listener), one per area
over it (:mod:`.items`, :mod:`.sessions`, :mod:`.feed`, :mod:`.search`, :mod:`.tasks`),
composed by :mod:`.backend`; :mod:`.layout` (keys, records, cursors) and the Lua of
:mod:`.scripts` and :mod:`.task_scripts`.

Durability — what an acknowledged write survives depends on the server, not on
hivemem:

* ``appendonly yes`` with ``appendfsync always``: Redis fsyncs the append-only file
  before it replies, so an acknowledged write survives a crash or power loss (the
  test fixtures run this way; it costs an fsync per write).
* ``appendfsync everysec`` (Redis's default when AOF is on): a crash can lose about
  the last second of acknowledged writes.
* RDB snapshots only (AOF off): a crash loses everything since the last snapshot
  (minutes); no persistence at all loses everything on restart.
* Replication is asynchronous: when a master dies and a replica is promoted (Redis
  Cluster failover, Sentinel), the writes the replica had not received yet are lost
  even though the clients got their acknowledgement. Only ``WAIT numreplicas
  timeout`` after a write narrows this (it still is not a consensus commit).

hivemem does not call WAIT today: a ``redis_wait_replicas`` setting (WAIT for that
many replicas after each write, raising Unavailable on timeout) is the planned way
to trade latency for surviving a failover. What hivemem does guarantee: a write is
applied at most once even when its reply is lost and it is retried (every write
carries a request id, the caller's or an internal one), and a reader never skips
an event that was committed (see :mod:`.feed`). After a failover that lost
writes, the feed simply lacks them, as does the data.

Search: stock Redis 7 (Debian's) has no full-text or vector search, so
``native_lexical`` is False and the core ranks in process (BM25 over
:meth:`~hivemem.backends.base.Backend.load_texts`, vectors over
:meth:`~hivemem.backends.base.Backend.load_vectors`); the index text and float32
vector of each item are stored in its hash, written by its write script. A server
with the Redis Query Engine (RediSearch) could rank in the engine; not used here.
"""

from hivemem.backends.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
