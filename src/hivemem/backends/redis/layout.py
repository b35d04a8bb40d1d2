"""Key layout, record packing and feed cursors of the Redis backend.

Partitions: the store is split into :data:`PARTITIONS` partitions, each with its own
hash tag ``{hm:p<N>}`` (so, in a cluster, each partition is one hash slot). A
namespace belongs to the partition of its first segment (``crc32 % PARTITIONS``);
a session (and its events, namespace ``_sessions/<id>``) to the partition of
``_sessions/<id>``; a lease's namespace ``_leases/<a>/...`` to the partition of ``<a>``
(so a write to the tree ``<a>`` fenced by a lease named ``<a>/...`` is one partition).
So a namespace tree — its items, their versions and index entries, the events of its
writes — lives in one slot, and one script can write it atomically.

Keys of partition ``T = {hm:p<N>}`` (``m`` = ``namespace + "\\0" + key``):

==========================  ========================================================
``T:meta``                  hash: ``last`` (newest feed id), ``trim`` (newest trimmed id)
``T:feed``                  stream: the partition's events, ids ``<ts µs>-<seq>``
``T:i:<m>``                 hash: the item (value, version, author, times, text,
                            metadata) and its index entry (xv version, xt text,
                            xe vector, xm model)
``T:h:<m>``                 sorted set: stored versions (score = version)
``T:keys``                  sorted set (lex): every item's member
``T:exp``                   sorted set: members of items with an expiry, by expires_at
``T:idx``                   sorted set (lex): members of items with an index entry
``T:s:<id>``                hash: a session (fields of :data:`SESSION_FIELDS`;
                            ``ttl`` absent = never expires)
``T:msg:<id>``              sorted set: a session's messages (score = seq)
``T:sexp``                  sorted set: ids of sessions with a ttl, by the time they
                            expire (last_activity_at + ttl)
``T:req:<id>``              string: a write's result under its request id (PX expiry)
``{hm:sessions}:...``       sorted sets (lex) of session ids: ``all``, ``app:<a>``,
                            ``user:<u>``, ``agent:<a>``; and ``config`` (hash)
==========================  ========================================================

Task queues: every task key lives in :data:`TASK_PARTITION`, the partition of
``_tasks`` — where every task event (namespace ``_tasks/<queue>``) lands — so one
script changes a task, its queue's sets and the feed atomically, in one hash slot.
Keys of that partition ``T`` (``q`` = a queue name, ``<id>`` = a task id):

==========================  ========================================================
``T:t:<id>``                hash: the task, fields of :data:`TASK_FIELDS` (absent =
                            None: a task stored before ``claimed_at`` existed has
                            none until claimed); ``errors`` is the JSON array of
                            the TaskRow
``T:tr:<q>``                sorted set: due ready tasks in claim order: score
                            ``-priority``, member ``<run_at µs, 17 digits><id>``
``T:td:<q>``                sorted set: delayed ready tasks, by run_at (a claim moves
                            the ones that came due into ``tr``/``ta``)
``T:tl:<q>``                sorted set: running tasks, by lease_until
``T:tn:<q>``                sorted set (lex): every task id of the queue
``T:ts:<state>:<q>``        sorted set (lex): the queue's task ids in that state
                            (ready, completed, dead, cancelled; running ones are
                            those of ``tl``)
``T:tk:<q>``                hash: idempotency key -> task id
``T:tlease``                sorted set: running tasks of every queue, by lease_until
``T:tfin``                  sorted set: completed, dead and cancelled tasks of every
                            queue, by finished_at
==========================  ========================================================

Feed cursors are ``e<ts>.<seq>.<p>`` for an event (its stream id and partition) and
``w<ts>`` for a watermark (every event with ts <= the watermark), or ``"0"``. They
are ordered by (ts, seq, partition), the feed's order (see ``feed.read_events``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from hivemem.backends.rows import (
    EventRow,
    ItemRow,
    MessageRow,
    SessionRow,
    TaskRow,
    key_range,
    prefix_range,
)
from hivemem.errors import InvalidInput

#: Number of feed partitions (hash slots used by items, sessions and events). Fixed for
#: the life of a store: it decides where every key lives (recorded in the store's config).
PARTITIONS = 16
#: Hash tag of the global session indexes and the store's config.
SESSIONS_TAG = "{hm:sessions}"
#: Pub/sub channel every write script publishes on (wakes other processes' watchers).
CHANNEL = "hivemem:changes"
#: Layout version, recorded at open.
SCHEMA = "1"

#: The partition holding every task queue (that of ``_tasks``, task events' namespace).
TASK_PARTITION = zlib.crc32(b"_tasks") % PARTITIONS

_MAX_SEQ = 2**64 - 1
_EVENT = re.compile(r"e([0-9]{1,19})\.([0-9]{1,20})\.([0-9]{1,4})")
_WATERMARK = re.compile(r"w([0-9]{1,19})")


def tag(p: int) -> str:
    """The hash tag of partition ``p``."""
    return f"{{hm:p{p}}}"


def meta_key(p: int) -> str:
    return f"{tag(p)}:meta"


#: Reserved first segments whose namespaces live in the partition of what follows:
#: ``_sessions/<id>`` in that of ``_sessions/<id>`` itself, ``_leases/<a>/...`` (a lease
#: named ``<a>/...``) in that of ``<a>``, so that a write to the tree ``<a>`` fenced by
#: such a lease (a CheckWrite of it in the same batch) stays within one partition.
_ANCHORED = ("_sessions", "_leases")


def partition_of(namespace: str) -> int:
    """The partition holding ``namespace`` (an item namespace, a channel,
    ``_sessions/<id>`` or ``_leases/<name>``)."""
    parts = namespace.split("/", 2)
    if parts[0] == "_sessions":
        anchor = "/".join(parts[:2])
    elif parts[0] == "_leases" and len(parts) > 1:
        anchor = parts[1]
    else:
        anchor = parts[0]
    return zlib.crc32(anchor.encode("utf-8")) % PARTITIONS


def session_partition(session_id: str) -> int:
    return partition_of(f"_sessions/{session_id}")


def partitions_under(prefix: str) -> list[int]:
    """The partitions that can hold namespaces at or under ``prefix`` ("" = all)."""
    parts = prefix.split("/") if prefix else []
    if not parts or (parts[0] in _ANCHORED and len(parts) < 2):
        return list(range(PARTITIONS))
    return [partition_of(prefix)]


def member(namespace: str, key: str) -> bytes:
    """The member naming an item in the partition's sorted sets and keys."""
    return namespace.encode("utf-8") + b"\x00" + key.encode("utf-8")


def split_member(m: bytes) -> tuple[str, str]:
    ns, _, key = m.partition(b"\x00")
    return ns.decode("utf-8"), key.decode("utf-8")


def lex_ranges(prefix: str, after: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """ZRANGEBYLEX (min, max) ranges of the members at or under ``prefix`` (the
    namespaces of :func:`~hivemem.backends.rows.prefix_range`), after member ``after``
    (exclusive), in member order."""
    if not prefix:
        return _clip([(None, None)], after)
    own, low, high = (x.encode("utf-8") for x in prefix_range(prefix))
    return _clip([(own + b"\x00", own + b"\x01"), (low, high)], after)


def key_lex_ranges(
    namespace: str, key_prefix: str, after: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """The ZRANGEBYLEX (min, max) range of the members of ``namespace`` whose key starts
    with ``key_prefix`` (:func:`~hivemem.backends.rows.key_range`), after member
    ``after`` (exclusive): one range, or none when ``after`` is past it."""
    low, high = key_range(key_prefix)
    ns = namespace.encode("utf-8")
    top = ns + b"\x01" if high is None else member(namespace, high)
    return _clip([(member(namespace, low), top)], after)


def _clip(
    spans: list[tuple[bytes | None, bytes | None]], after: bytes | None
) -> list[tuple[bytes, bytes]]:
    """ZRANGEBYLEX (min, max) of half-open member spans ``[lo, hi)`` (None: unbounded),
    less what is not after ``after``."""
    out = []
    for lo, hi in spans:
        if after is not None and hi is not None and after >= hi:
            continue
        if after is not None and (lo is None or after >= lo):
            start = b"(" + after
        else:
            start = b"-" if lo is None else b"[" + lo
        out.append((start, b"+" if hi is None else b"(" + hi))
    return out


# Records ---------------------------------------------------------------------------


def unpack(data: bytes) -> list[bytes | None]:
    """The fields of a record packed by the scripts' ``enc``: ``<len>:<bytes>`` per field,
    ``~`` for a missing one."""
    out: list[bytes | None] = []
    i, n = 0, len(data)
    while i < n:
        if data[i] == 0x7E:  # ~
            out.append(None)
            i += 1
            continue
        j = data.index(b":", i)
        length = int(data[i:j])
        out.append(data[j + 1 : j + 1 + length])
        i = j + 1 + length
    return out


def _s(b: bytes | None) -> str:
    assert b is not None
    return b.decode("utf-8")


def _opt_s(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8")


def _f(b: bytes | None) -> float:
    assert b is not None
    return float(b)


def _i(b: bytes | None) -> int:
    assert b is not None
    return int(b)


def _opt_f(b: bytes | None) -> float | None:
    return None if b is None else float(b)


def item_from(fields: list[bytes | None]) -> ItemRow:
    """An item from a record (namespace, key, value, version, author, created_at,
    updated_at, expires_at, text, metadata)."""
    ns, key, value, ver, author, created, updated, expires, text, meta = fields
    assert value is not None
    return ItemRow(
        _s(ns),
        _s(key),
        value,
        _i(ver),
        _s(author),
        _f(created),
        _f(updated),
        None if expires is None else float(expires),
        _opt_s(text),
        meta,
    )


def item_from_hash(m: bytes, h: list[bytes | None]) -> ItemRow:
    """An item from its member and the values of its hash fields v, ver, a, c, u, e, t, m."""
    ns, key = split_member(m)
    return item_from([ns.encode(), key.encode(), *h])


def session_from(fields: list[bytes | None]) -> SessionRow:
    """A session from a record: id then the fields of :data:`SESSION_FIELDS` (a record
    stored before sessions had a ttl lacks the last one: no ttl)."""
    if len(fields) == len(SESSION_FIELDS):
        fields = [*fields, None]
    (
        sid,
        app,
        user,
        agent,
        created_by,
        metadata,
        state,
        state_version,
        messages,
        turns,
        tokens_in,
        tokens_out,
        cost,
        started_at,
        last_activity_at,
        ttl,
    ) = fields
    assert metadata is not None and state is not None
    return SessionRow(
        _s(sid),
        _s(app),
        _opt_s(user),
        _opt_s(agent),
        _s(created_by),
        metadata,
        state,
        _i(state_version),
        _i(messages),
        _i(turns),
        _i(tokens_in),
        _i(tokens_out),
        _f(cost),
        _f(started_at),
        _f(last_activity_at),
        _opt_f(ttl),
    )


#: Session hash fields, in SessionRow order (after the id).
SESSION_FIELDS = (
    "app",
    "user",
    "agent",
    "created_by",
    "metadata",
    "state",
    "state_version",
    "messages",
    "turns",
    "tokens_in",
    "tokens_out",
    "cost",
    "started_at",
    "last_activity_at",
    "ttl",
)
#: Item hash fields, in ItemRow order (after namespace and key).
ITEM_FIELDS = ("v", "ver", "a", "c", "u", "e", "t", "m")


def message_from(fields: list[bytes | None]) -> MessageRow:
    sid, seq, role, content, author, created, tin, tout, cost, meta = fields
    assert content is not None and meta is not None
    return MessageRow(
        _s(sid),
        _i(seq),
        _s(role),
        content,
        _s(author),
        _f(created),
        _i(tin),
        _i(tout),
        _f(cost),
        meta,
    )


#: Task hash fields, in TaskRow order (the order of a task record).
TASK_FIELDS = (
    "id",
    "queue",
    "state",
    "payload",
    "result",
    "priority",
    "run_at",
    "attempt",
    "max_attempts",
    "timeout",
    "backoff",
    "lease",
    "lease_until",
    "idempotency_key",
    "submitted_by",
    "claimed_by",
    "errors",
    "created_at",
    "updated_at",
    "finished_at",
    "claimed_at",
)


def task_from(fields: list[bytes | None]) -> TaskRow:
    """A task from a record: the values of :data:`TASK_FIELDS`, in order (a record of
    the 20 fields before ``claimed_at``, stored as a request's result by an older
    version, has no claim time)."""
    if len(fields) == len(TASK_FIELDS) - 1:
        fields = [*fields, None]
    (
        tid,
        queue,
        state,
        payload,
        result,
        priority,
        run_at,
        attempt,
        max_attempts,
        timeout,
        backoff,
        lease,
        lease_until,
        idempotency_key,
        submitted_by,
        claimed_by,
        errors,
        created_at,
        updated_at,
        finished_at,
        claimed_at,
    ) = fields
    assert payload is not None
    return TaskRow(
        _s(tid),
        _s(queue),
        _s(state),
        payload,
        result,
        _i(priority),
        _f(run_at),
        _i(attempt),
        _i(max_attempts),
        _opt_f(timeout),
        _f(backoff),
        _f(lease),
        _opt_f(lease_until),
        _opt_s(idempotency_key),
        _s(submitted_by),
        _opt_s(claimed_by),
        errors if errors is not None else b"[]",
        _f(created_at),
        _f(updated_at),
        _opt_f(finished_at),
        _opt_f(claimed_at),
    )


def task_args(row: TaskRow) -> list[str | bytes]:
    """The fields of ``row`` as script arguments (:data:`TASK_FIELDS` order), each
    ``""`` (None) or ``"=" + value`` (see :func:`opt`)."""
    out: list[str | bytes] = []
    for name in TASK_FIELDS:
        value = getattr(row, name)
        if value is None:
            out.append("")
        elif isinstance(value, bytes | str):
            out.append(opt(value))
        elif isinstance(value, float):
            out.append("=" + num(value))
        else:
            out.append(f"={int(value)}")
    return out


def pack(fields: Sequence[str | bytes]) -> bytes:
    """Script arguments packed into one: ``<len>:<bytes>`` per field (UTF-8 for
    strings), read by the scripts' ``dec``."""
    out = []
    for f in fields:
        b = f.encode("utf-8", "surrogatepass") if isinstance(f, str) else f
        out.append(b"%d:%b" % (len(b), b))
    return b"".join(out)


def num(x: float) -> str:
    """A float as the decimal string the scripts store (``repr`` round-trips)."""
    return repr(float(x))


def opt(value: str | bytes | None) -> str | bytes:
    """An optional string argument of a script: ``""`` or ``"=" + value``."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return b"=" + value
    return "=" + value


# Feed cursors ------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A point of the feed's order: (ts µs, seq, partition). A watermark has
    seq = 2**64 (after every event of its ts); the start is (0, 0, -1)."""

    ts: int
    seq: int
    p: int

    @property
    def is_start(self) -> bool:
        return self.p < 0

    @property
    def is_watermark(self) -> bool:
        return self.seq > _MAX_SEQ

    def encode(self) -> str:
        if self.is_start:
            return "0"
        if self.is_watermark:
            return f"w{self.ts}"
        return f"e{self.ts}.{self.seq}.{self.p}"

    def start_id(self, p: int) -> str:
        """The XRANGE start, in partition ``p``, of the events after this position."""
        if self.is_start:
            return "-"
        if self.is_watermark:
            return f"{self.ts + 1}-0"
        if p <= self.p:
            return f"({self.ts}-{self.seq}"
        return f"{self.ts}-{self.seq}"


START = Position(0, 0, -1)


def watermark(ts: int) -> Position:
    """The position after every event with a ts <= ``ts``."""
    return Position(ts, _MAX_SEQ + 1, PARTITIONS)


def event_position(stream_id: bytes | str, p: int) -> Position:
    """The position of the event with stream id ``ts-seq`` in partition ``p``."""
    text = stream_id.decode("ascii") if isinstance(stream_id, bytes) else stream_id
    ts, _, seq = text.partition("-")
    return Position(int(ts), int(seq), p)


def parse_cursor(cursor: str | None) -> Position:
    """The position a cursor names.

    Raises:
        InvalidInput: not a cursor of this backend (field ``after``).
    """
    if cursor is None or cursor == "0":
        return START
    m = _EVENT.fullmatch(cursor)
    if m is not None:
        ts, seq, p = (int(g) for g in m.groups())
        if p < PARTITIONS and seq <= _MAX_SEQ and ts > 0:
            return Position(ts, seq, p)
    else:
        w = _WATERMARK.fullmatch(cursor)
        if w is not None:
            return watermark(int(w.group(1)))
    raise InvalidInput(f"{cursor!r} is not a feed cursor of this store", field="after")


def event_from(stream_id: bytes, fields: list[bytes], p: int) -> EventRow:
    """An event row from a stream entry (flat field/value list) of partition ``p``."""
    doc = dict(zip(fields[::2], fields[1::2], strict=True))
    key = doc.get(b"k")
    version = doc.get(b"v")
    return EventRow(
        event_position(stream_id, p).encode(),
        doc[b"t"].decode(),
        doc[b"n"].decode("utf-8"),
        None if key is None else key.decode("utf-8"),
        None if version is None else int(version),
        doc[b"a"].decode("utf-8"),
        float(doc[b"at"]),
        doc.get(b"d"),
    )
