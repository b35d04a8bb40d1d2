"""The PostgreSQL backend: items, sessions and the feed as SQL over :class:`PostgresEngine`.

The feed without gaps
---------------------
Several processes write to one database concurrently, and a reader that has
passed cursor ``c`` must never later find an event before ``c``. Ids from a
sequence are not enough: they are handed out when a row is inserted, but
transactions commit in another order, so a reader could see event 11 (committed)
while 10 is still in flight, move its cursor past 10 and miss it for good.

This backend makes feed order commit order. The ids of a transaction's events
come from the ``head`` row of ``hivemem_feed``: the transaction's last write is
``UPDATE hivemem_feed SET value = value + n ... RETURNING value`` together with
the events' INSERT (one statement), so the transaction holds that row lock until
its commit is visible. The next writer's UPDATE waits for it and then numbers its
events after it. Hence every snapshot sees exactly the events ``1..head`` (less
those trimmed by retention): the cursor is the event id, the head is the ``head``
value, and a reader can never see an id whose predecessors are not all visible.
``read_events`` reads its rows, the head and the trim point in one statement (one
snapshot). ``tests/test_postgres.py`` checks this with concurrent writers whose
commits are delayed while a reader follows the feed (and fails, as it should, on
a feed numbered by a sequence).

Why not the alternative (event rows stamped with ``pg_current_xact_id()`` and shown
once below ``pg_snapshot_xmin``): it orders events by when each transaction first
wrote (PostgreSQL assigns the id then), not by commit, so a transaction that wrote
anything before taking a key's lock (a request id's claim row does) would show its
write of that key before the one it waited for; it stalls the feed behind any long
transaction on the whole server (other databases included); and its head is not the
cursor of the newest event. Nor would it be faster here: ``bench/pg_feed_lock.py``
replaces the lock by a plain sequence (no guarantee at all) and measured the same
puts/s from two processes (median 3,835 with the lock, 3,614 without, on 2 cores):
the writers' client CPU bounds them. The price of this scheme is that commits of
event-appending transactions are serialised: each holds the head lock from its last
statement through its commit. Writes run in pipeline mode (see engine.py), so that
statement reaches the server in the same flight as the COMMIT and the lock is held for
its execution and one WAL flush, not for a client round trip (except a ``publish``
with a request id, whose stored result needs the new cursor). Single puts without a
request id commit in groups (:meth:`PostgresBackend._put_one`): the puts a process has
in flight, one per key, are one statement on an autocommit connection (its own
transaction: one round trip, one head lock, one WAL flush), which takes their key locks,
writes them, and moves the head and appends their events last, so the head is again
its last lock, held through its commit. On this project's test machine (2 shared cores,
local disk, fsync on) 8 concurrent writers in one process reach 4,500-5,400 puts/s per
database, where raw upserts reach 8-10k/s and LangGraph's AsyncPostgresStore 11-13k/s
in the same runs (the writers' client CPU and the server's share the cores).
Everything before the last statement runs concurrently; reads never wait.

Locks and atomicity
-------------------
Each write method is one transaction at READ COMMITTED: version check, row
changes, index entry, events, request-id result and NOTIFY commit together or not
at all. A write to items first takes a transaction-scoped advisory lock per
(namespace, key), in sorted order (so concurrent batches cannot deadlock, and an
absent key is locked too: two ``if_version=0`` creates cannot both succeed), then
locks the batch's existing rows with one ``SELECT ... FOR UPDATE`` and decides on
them (a group of single puts decides in its statement, on the rows its upserts and
updates lock; what it cannot decide it leaves to this transaction). ``set_index``
takes the same key locks and then the rows ``FOR SHARE``. The
sweeper skips rows others hold (``FOR UPDATE SKIP LOCKED``) and serialises with
other sweepers on the ``trimmed`` row of ``hivemem_feed``, never on ``head`` until
its own commit. Sessions are locked by their row (``UPDATE ... RETURNING`` moves a
session's counters and hands out consecutive message seqs atomically). A request
id is claimed by inserting its row first (``ON CONFLICT DO NOTHING``): a concurrent
retry with the same id waits for the first to commit (then returns its stored
result) or roll back (then runs itself). The request's fingerprint (``<id>#<fp>``)
is stored in front of the result (``#<fp>\\n``), so a repeat with another one is
refused (RequestIdReused) before anything is written.

Task queues (:mod:`hivemem.backends.postgres.tasks`): a claim settles expired
leases and takes a task with ``SELECT ... FOR UPDATE SKIP LOCKED`` (concurrent
claims skip each other's rows instead of waiting), and every task change appends its
event under the same head lock. Their hot operations run as one autocommit statement
that writes the task, moves the head and inserts the event (the head still the last
lock before the commit); the others as transactions of :meth:`PostgresBackend._write`.

Durability
----------
PostgreSQL's default ``synchronous_commit = on``: a commit is acknowledged only
after its WAL record is flushed to disk, so every write this backend acknowledged
survives a crash of the server or the machine (and with synchronous replication
configured, of the primary). The backend does not change that setting; a server,
database or role configured with ``synchronous_commit = off`` trades that away
(a crash may then lose the last acknowledged writes, never corrupt the feed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hivemem.backends.base import Backend
from hivemem.backends.groups import PutGroups
from hivemem.backends.postgres.engine import (
    CHANNEL,
    CONNECT_TIMEOUT_SECONDS,
    Conn,
    PostgresEngine,
    key_lock,
    lock_keys,
)
from hivemem.backends.postgres.schema import (
    EVENT_COLS,
    ITEM_COLS,
    LIVE,
    MESSAGE_COLS,
    SESSION_COLS,
    SESSION_LIVE,
    UNDER,
    index_text,
    item_row,
    meta_jsonb,
    migrate,
    session_row,
    text_to_db,
    under,
)
from hivemem.backends.postgres.search import (
    SearchMixin,
    Vector,
    configure_vectors,
    index_put,
)
from hivemem.backends.postgres.tasks import TaskMixin
from hivemem.backends.results import decode_stored_result, encode_stored_result, split_request_id
from hivemem.backends.rows import (
    CheckWrite,
    DeleteWrite,
    EventRow,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
    key_range,
    state_conflict,
    version_conflict,
)
from hivemem.backends.signals import ChangeSignal, task_hints
from hivemem.config import Settings
from hivemem.errors import Conflict, CursorExpired, InvalidInput, NotFound, Unavailable

__all__ = ["PostgresBackend"]

T = TypeVar("T")

#: Most expired items, and most expired sessions, one sweep removes.
SWEEP_BATCH = 1000


@dataclass(slots=True)
class Events:
    """Events a write transaction appends, in order, when it is about to commit."""

    rows: list[tuple[str, str, str | None, int | None, str, float, bytes | None]] = field(
        default_factory=list
    )

    def add(
        self,
        type_: str,
        namespace: str,
        key: str | None,
        version: int | None,
        author: str,
        at: float,
        data: bytes | None = None,
    ) -> None:
        self.rows.append((type_, namespace, key, version, author, at, data))


#: Delete up to ``%(batch)s`` sessions expired at ``%(now)s`` with their messages,
#: returning their ids. The expression and condition are those of the partial index
#: ``hivemem_sessions_expiry``, so it finds them without reading the others; rows a
#: concurrent append or save holds are skipped (that write may revive them).
EXPIRE_SESSIONS = (
    "WITH x AS (SELECT id FROM hivemem_sessions WHERE ttl IS NOT NULL "
    "AND last_activity_at + ttl <= %(now)s ORDER BY last_activity_at + ttl "
    "LIMIT %(batch)s FOR UPDATE SKIP LOCKED), "
    "m AS (DELETE FROM hivemem_messages g USING x WHERE g.session_id = x.id) "
    "DELETE FROM hivemem_sessions s USING x WHERE s.id = x.id RETURNING s.id"
)

#: ``(ns, key)`` pairs from the parameters ``k_ns`` and ``k_key`` (arrays).
_KEYS = "unnest(%(k_ns)s::text[], %(k_key)s::text[]) AS k(ns, key)"

_APPEND = f"""
WITH h AS (
    UPDATE hivemem_feed SET value = value + %(n)s WHERE name = 'head' RETURNING value
), ins AS (
    INSERT INTO hivemem_events ({EVENT_COLS})
    SELECT h.value - %(n)s + e.ord, e.type, e.ns, e.key, e.version, e.author, e.at, e.data
    FROM h, unnest(%(types)s::text[], %(nss)s::text[], %(keys)s::text[],
                   %(versions)s::bigint[], %(authors)s::text[], %(ats)s::float8[],
                   %(datas)s::bytea[])
            WITH ORDINALITY AS e(type, ns, key, version, author, at, data, ord)
)
SELECT value, pg_notify('{CHANNEL}', value::text || %(note)s) FROM h
"""


#: :data:`_APPEND` for one event, with scalar parameters (most writes append one
#: event, and arrays cost the client more to encode).
_APPEND_ONE = f"""
WITH h AS (
    UPDATE hivemem_feed SET value = value + 1 WHERE name = 'head' RETURNING value
), ins AS (
    INSERT INTO hivemem_events ({EVENT_COLS})
    SELECT h.value, %s::text, %s::text, %s::text, %s::bigint, %s::text, %s::float8, %s::bytea
    FROM h
)
SELECT value, pg_notify('{CHANNEL}', value::text || %s) FROM h
"""


#: Most bytes of task hints in one NOTIFY payload (PostgreSQL allows 8000).
NOTE_LIMIT = 7000


def _put_group_sql() -> str:
    """The statement of a group of single puts (:meth:`PostgresBackend._put_group`),
    run alone on an autocommit connection (it is its own transaction).

    Its parameters are arrays with one element per put, in the order of the puts' key
    locks (``%(lock)s``, sorted ascending; one put per key). It takes the key locks in
    that order, writes each put (an upsert without ``if_version``; an insert only if
    absent for ``if_version`` 0; an update of version n for ``if_version`` n), its
    history row and its index entry (or removes it), then moves the feed's head by the
    number of puts written, appends their events in lock order and NOTIFYs: the head
    is the last lock it takes, held through the commit. A put whose condition fails
    (the key exists for 0, another version for n, the item expired) writes nothing.

    Returns a row per put written: its ordinal (1-based, in lock order), the item's
    new version and its ``created_at``, and a last column of no use (the rest of the
    item is the put's). Whitespace is collapsed:
    psycopg caches the parsing of statements up to 4096 characters."""
    cols = ITEM_COLS
    # Each CTE that writes items joins ``lk`` (one row, once all key locks are held);
    # ``c`` counts every other write, and the head's UPDATE joins it, so the head is
    # locked after all of them. Typed: in INSERT ... SELECT a parameter's type is not
    # taken from the column.
    row = "ns, key, value, 1, author, now, now, exp, text, md, meta::jsonb"
    set_ = (
        "value = EXCLUDED.value, version = t.version + 1, author = EXCLUDED.author, "
        "updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at, "
        "text = EXCLUDED.text, metadata = EXCLUDED.metadata, meta = EXCLUDED.meta"
    )
    arrays = ", ".join(
        f"%({name})b::{type_}[]"
        for name, type_ in (
            ("ns", "text"), ("key", "text"), ("value", "bytea"), ("author", "text"),
            ("now", "float8"), ("exp", "float8"), ("text", "bytea"), ("md", "bytea"),
            ("meta", "text"), ("ifv", "int8"), ("hl", "int8"), ("itext", "text"),
            ("model", "text"), ("dim", "int"), ("vec", "vector"), ("type", "text"),
        )
    )  # fmt: skip
    sql = f"""
WITH a AS MATERIALIZED (
    SELECT * FROM unnest({arrays}) WITH ORDINALITY
    AS a(ns, key, value, author, now, exp, text, md, meta, ifv, hl, itext, model, dim, vec,
         type, ord)
), lk AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock(k)) AS n FROM unnest(%(lock)b::int8[]) AS k
), ins AS (
    INSERT INTO hivemem_items AS t ({cols}, meta)
    SELECT {row} FROM lk, a WHERE ifv IS NULL AND n > 0
    ON CONFLICT (ns, key) DO UPDATE SET {set_}
    WHERE t.expires_at IS NULL OR t.expires_at > EXCLUDED.updated_at RETURNING t.*
), cre AS (
    INSERT INTO hivemem_items AS t ({cols}, meta)
    SELECT {row} FROM lk, a WHERE ifv = 0 AND n > 0
    ON CONFLICT (ns, key) DO NOTHING RETURNING t.*
), upd AS (
    UPDATE hivemem_items AS t SET value = a.value, version = t.version + 1,
        author = a.author, updated_at = a.now, expires_at = a.exp, text = a.text,
        metadata = a.md, meta = a.meta::jsonb
    FROM lk, a WHERE a.ifv > 0 AND n > 0 AND t.ns = a.ns AND t.key = a.key
        AND t.version = a.ifv AND (t.expires_at IS NULL OR t.expires_at > a.now)
    RETURNING t.*
), w AS MATERIALIZED (
    SELECT i.*, ord, hl, itext, model, dim, vec, type
    FROM (SELECT * FROM ins UNION ALL SELECT * FROM cre UNION ALL SELECT * FROM upd) AS i
    JOIN a USING (ns, key)
), v AS (
    INSERT INTO hivemem_item_versions ({cols}) SELECT {cols} FROM w WHERE hl > 0
    ON CONFLICT (ns, key, version) DO UPDATE SET value = EXCLUDED.value,
        author = EXCLUDED.author, created_at = EXCLUDED.created_at,
        updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at,
        text = EXCLUDED.text, metadata = EXCLUDED.metadata
    RETURNING 1
), o AS (
    DELETE FROM hivemem_item_versions d USING w
    WHERE hl > 0 AND d.ns = w.ns AND d.key = w.key AND d.version <= w.version - hl
    RETURNING 1
), si AS (
    INSERT INTO hivemem_search (ns, key, version, text, model, dim, vec)
    SELECT ns, key, version, itext, model, dim, vec FROM w WHERE itext IS NOT NULL
    ON CONFLICT (ns, key) DO UPDATE SET version = EXCLUDED.version, text = EXCLUDED.text,
        model = EXCLUDED.model, dim = EXCLUDED.dim, vec = EXCLUDED.vec
    RETURNING 1
), sd AS (
    DELETE FROM hivemem_search d USING w
    WHERE itext IS NULL AND d.ns = w.ns AND d.key = w.key RETURNING 1
), c AS MATERIALIZED (
    SELECT (SELECT count(*) FROM w) AS n, (SELECT count(*) FROM v) + (SELECT count(*) FROM o)
        + (SELECT count(*) FROM si) + (SELECT count(*) FROM sd) AS m
), h AS (
    UPDATE hivemem_feed f SET value = value + n FROM c
    WHERE name = 'head' AND n > 0 AND m >= 0 RETURNING value AS head, n
), e AS (
    INSERT INTO hivemem_events ({EVENT_COLS})
    SELECT head - n + row_number() OVER (ORDER BY ord), type, ns, key, version, author,
        updated_at, NULL::bytea
    FROM h, w
)
SELECT ord, version, created_at, (
    SELECT count(pg_notify('{CHANNEL}', head::text || (
        SELECT CASE WHEN length(s) > {NOTE_LIMIT} THEN ' *' ELSE s END FROM (
            SELECT coalesce(string_agg(' ' || type || ' ' || substr(ns, 8) || ' ' || key, ''
                ORDER BY ord), '') AS s
            FROM w WHERE starts_with(ns, '_tasks/')) AS x
    ))) FROM h
) FROM w
"""
    return " ".join(sql.split())


_PUT_GROUP = _put_group_sql()

#: Most single puts one group commits together.
GROUP_MAX = 64
#: Most groups of single puts in flight at once (see :mod:`hivemem.backends.groups`):
#: one. Groups serialise on the feed head anyway, and two halved them: 8 callers'
#: client CPU per put rose from 88-112 to 149-160 us and puts/s did not rise.
GROUPS_IN_FLIGHT = 1


@dataclass
class _Put:
    """A single put waiting for its group (see :meth:`PostgresBackend._put_one`)."""

    write: PutWrite
    author: str
    now: float
    history_limit: int


async def append_events(conn: Conn, events: Events, *, fetch: bool = False) -> int | None:
    """Append ``events`` (ids head+1..head+n) and NOTIFY; returns the new head when
    ``fetch`` (otherwise the statement goes out with the COMMIT, in pipeline mode).

    Must be the transaction's last write: it holds the feed's head lock to commit.
    """
    rows = events.rows
    # The payload: the new head, then the task events it holds (task waiters of other
    # processes learn what changed without reading the feed).
    note = task_hints([(r[0], r[1], r[2]) for r in rows], NOTE_LIMIT)
    if len(rows) == 1:
        cur = await conn.execute(_APPEND_ONE, (*rows[0], note))
    else:
        cur = await conn.execute(
            _APPEND,
            {
                "note": note,
                "n": len(rows),
                "types": [r[0] for r in rows],
                "nss": [r[1] for r in rows],
                "keys": [r[2] for r in rows],
                "versions": [r[3] for r in rows],
                "authors": [r[4] for r in rows],
                "ats": [r[5] for r in rows],
                "datas": [r[6] for r in rows],
            },
        )
    if not fetch:
        return None
    found = await cur.fetchone()
    assert found is not None
    return int(found[0])


def _label(url: str) -> str:
    params = conninfo_to_dict(url)
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


class PostgresBackend(SearchMixin, TaskMixin, Backend):
    """Items, sessions, the feed and task queues in one PostgreSQL database (with pgvector).

    Args:
        url: a libpq URL, ``postgresql://user:password@host:port/database``.
        settings: ``feed_poll_seconds`` applies (watchers); pool sizes are the
            constants of :mod:`hivemem.backends.postgres.engine`.
    """

    task_hints = True

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.changes = ChangeSignal()
        params = conninfo_to_dict(url)
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        params.setdefault("application_name", "hivemem")
        self.label = _label(url)
        self._engine = PostgresEngine(
            make_conninfo("", **params),
            self.label,
            self.changes,
            configure=self._configure,
            pool_size=settings.postgres_pool_size,
            pool_timeout=settings.postgres_pool_timeout_seconds,
        )
        #: The oids of ``vector`` and ``vector[]``, once open.
        self._vector_oid: tuple[int, int] | None = None
        #: The group commit of single puts (see :meth:`_put_one`).
        self._put_groups = PutGroups(
            self._send_group,
            self._take_group,
            in_flight=GROUPS_IN_FLIGHT,
            name="hivemem-pg-puts",
        )

    def __repr__(self) -> str:
        return f"PostgresBackend({self.label!r})"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> PostgresBackend:
        """Build from ``postgresql://user:password@host:port/database`` (or ``postgres://``;
        any libpq URL parameter such as ``?sslmode=require`` is passed on).

        Raises:
            InvalidInput: not a PostgreSQL URL, or one libpq cannot parse (field ``url``).
        """
        scheme = url.split(":", 1)[0].lower()
        bad = f"bad PostgreSQL URL {url.split('@')[-1]!r}: use postgresql://user:password@host:port/db"
        if scheme not in ("postgresql", "postgres") or not url[len(scheme) :].startswith("://"):
            raise InvalidInput(bad, field="url")
        try:
            conninfo_to_dict(url)
            netloc = urlsplit(url).netloc
            if "," not in netloc:
                urlsplit(url).port  # noqa: B018 - raises ValueError on a bad port
        except (psycopg.ProgrammingError, ValueError):
            raise InvalidInput(bad, field="url") from None
        return cls(url, settings)

    async def _configure(self, conn: Conn) -> None:
        if self._vector_oid is not None:
            configure_vectors(conn, *self._vector_oid)

    async def open(self) -> None:
        """Connect, check the database, create or migrate the schema, start listening.

        Raises:
            Unavailable: the server cannot be reached, the database is not UTF8, or the
                schema cannot be created (e.g. the ``vector`` extension is missing and
                this role may not create it).
        """
        if self._engine.opened:
            return
        conn = await self._engine.connect()
        try:
            cur = await conn.execute("SHOW server_encoding")
            row = await cur.fetchone()
            if row is None or row[0].upper() not in ("UTF8", "UTF-8"):
                raise Unavailable(
                    f"PostgreSQL database {self.label} has encoding {row and row[0]!r}; "
                    "hivemem needs a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')"
                )
            try:
                await migrate(conn)
            except (
                pgerrors.InsufficientPrivilege,
                pgerrors.UndefinedFile,
                pgerrors.FeatureNotSupported,
            ) as exc:
                raise Unavailable(
                    f"cannot create the hivemem schema in {self.label}: {exc}. The pgvector "
                    "extension must be installed on the server and created in the database "
                    "(CREATE EXTENSION vector, by a role allowed to)."
                ) from exc
            except psycopg.DatabaseError as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                raise Unavailable(
                    f"cannot create or migrate the hivemem schema in {self.label}: {exc}"
                ) from exc
            cur = await conn.execute("SELECT 'vector'::regtype::oid, 'vector[]'::regtype::oid")
            row = await cur.fetchone()
            assert row is not None
            self._vector_oid = (int(row[0]), int(row[1]))
        except psycopg.OperationalError as exc:
            await conn.close()
            raise self._engine.unavailable(exc, "opening") from exc
        except BaseException:
            await conn.close()
            raise
        await self._engine.open(conn)

    async def close(self) -> None:
        await self._put_groups.drain(10.0)  # let the puts in flight commit
        await self._engine.close()

    async def ping(self) -> None:
        await self._engine.ping()

    # Writes ------------------------------------------------------------------------

    async def _write(
        self,
        request_id: str | None,
        now: float,
        run: Callable[[Conn, Events], Awaitable[T]],
        finish: Callable[[T, int], T] | None = None,
    ) -> T:
        """Run a write job in one transaction: claim the request id (or return its
        stored result), run ``run``, append its events (``finish(result, head)`` may
        then complete the result), store the result under the request id, commit.

        ``request_id`` may end in ``#<fingerprint>`` (see
        :func:`~hivemem.backends.results.split_request_id`): the row is keyed by the id and
        the fingerprint is stored in front of the result bytes; a repeat with another
        fingerprint raises RequestIdReused before anything is written."""
        rid, fingerprint = split_request_id(request_id)
        appended = False

        async def job(conn: Conn) -> T:
            nonlocal appended
            appended = False
            if rid is not None:
                cur = await conn.execute(
                    "INSERT INTO hivemem_requests (id, at) VALUES (%s, %s) "
                    "ON CONFLICT (id) DO NOTHING RETURNING 1",
                    (rid, now),
                )
                if await cur.fetchone() is None:
                    cur = await conn.execute(
                        "SELECT result FROM hivemem_requests WHERE id = %s", (rid,)
                    )
                    stored = await cur.fetchone()
                    if stored is not None and stored[0] is not None:
                        found: T = decode_stored_result(bytes(stored[0]), fingerprint)
                        return found
                    raise Unavailable(f"request id {rid!r} has no stored result")
            events = Events()
            result = await run(conn, events)
            if rid is not None and finish is None:
                await self._store_result(conn, rid, result, fingerprint)
            if events.rows:
                appended = True
                head = await append_events(conn, events, fetch=finish is not None)
                if finish is not None:
                    assert head is not None
                    result = finish(result, head)
            if rid is not None and finish is not None:
                await self._store_result(conn, rid, result, fingerprint)
            return result

        result = await self._engine.write(job, notify=False)
        if appended:  # the feed grew: wake this process's watchers
            self.changes.notify()
        return result

    @staticmethod
    async def _store_result(
        conn: Conn, request_id: str, result: Any, fingerprint: str | None = None
    ) -> None:
        """Store ``result`` under ``request_id`` (the id without fingerprint), prefixed
        with ``#<fingerprint>\\n`` when there is one (see
        :func:`~hivemem.backends.results.encode_stored_result`)."""
        await conn.execute(
            "UPDATE hivemem_requests SET result = %s WHERE id = %s",
            (encode_stored_result(result, fingerprint), request_id),
        )

    # Items -------------------------------------------------------------------------

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        async def run(c: Conn) -> ItemRow | None:
            cur = await c.execute(
                f"SELECT {ITEM_COLS} FROM hivemem_items WHERE ns = %(ns)s AND key = %(key)s "
                f"AND {LIVE}",
                {"ns": namespace, "key": key, "now": now},
                binary=True,
            )
            row = await cur.fetchone()
            return item_row(row) if row else None

        return await self._engine.read(run)

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        if request_id is None and len(writes) == 1 and isinstance(writes[0], PutWrite):
            fast = await self._put_one(writes[0], author, now, history_limit)
            if fast is not None:
                return [fast]

        async def run(c: Conn, events: Events) -> list[ItemRow | bool]:
            keys = list(dict.fromkeys((w.namespace, w.key) for w in writes))
            await lock_keys(c, keys)
            cur = await c.execute(
                "SELECT i.ns, i.key, i.version, i.created_at, i.expires_at "
                f"FROM hivemem_items i JOIN {_KEYS} ON i.ns = k.ns AND i.key = k.key "
                "FOR UPDATE OF i",
                {"k_ns": [k[0] for k in keys], "k_key": [k[1] for k in keys]},
            )
            # (version, created_at, expires_at) of each key, kept current through the batch.
            state: dict[tuple[str, str], tuple[int, float, float | None] | None] = {
                (r[0], r[1]): (int(r[2]), r[3], r[4]) for r in await cur.fetchall()
            }
            results: list[ItemRow | bool] = []
            for i, w in enumerate(writes):
                found = state.get((w.namespace, w.key))
                if isinstance(w, CheckWrite):
                    # Only checks: an expired item counts as absent but is left for a
                    # write (or the sweeper) to remove; the key lock serialises the check
                    # with concurrent writes of the key.
                    live = found is not None and (found[2] is None or found[2] > now)
                    current = int(found[0]) if live and found is not None else 0
                    if w.if_version != current:
                        raise version_conflict(w, current, i, len(writes))
                    results.append(True)
                    continue
                if found is not None and found[2] is not None and found[2] <= now:
                    await self._delete_item(c, w.namespace, w.key)
                    events.add("item.expired", w.namespace, w.key, found[0], "hivemem", now)
                    found = state[(w.namespace, w.key)] = None
                current = 0 if found is None else int(found[0])
                # A conditional delete needs something to delete: absent is a mismatch.
                mismatch = w.if_version is not None and (
                    w.if_version != current or (found is None and isinstance(w, DeleteWrite))
                )
                if mismatch:
                    raise version_conflict(w, current, i, len(writes))
                if isinstance(w, DeleteWrite):
                    if found is not None:
                        await self._delete_item(c, w.namespace, w.key)
                        kind = w.event or "item.deleted"
                        events.add(kind, w.namespace, w.key, current, author, now)
                        state[(w.namespace, w.key)] = None
                    results.append(found is not None)
                    continue
                row = ItemRow(
                    w.namespace,
                    w.key,
                    w.value,
                    current + 1,
                    author,
                    now if found is None else found[1],
                    now,
                    w.expires_at,
                    w.text,
                    w.metadata,
                )
                await self._put_item(c, row, w, history_limit)
                state[(w.namespace, w.key)] = (row.version, row.created_at, row.expires_at)
                events.add(w.event or "item.put", w.namespace, w.key, row.version, author, now)
                results.append(row)
            return results

        return await self._write(request_id, now, run)

    async def _put_one(
        self, w: PutWrite, author: str, now: float, history_limit: int
    ) -> ItemRow | None:
        """A put of one item in a group commit (:class:`~hivemem.backends.groups.PutGroups`):
        the single puts this process has in flight meanwhile (one per key in a group; a
        later put of a key waits for a later group) commit together as one statement
        (:func:`_put_group_sql`) on an autocommit connection: one round trip, one head
        lock and one WAL flush for the group, where each put alone held the head through
        a flush of its own; one group is in flight at a time (:data:`GROUPS_IN_FLIGHT`).
        Covers the common cases only, a new item or a new
        version of a live one that ``if_version`` allows; anything else (a version
        mismatch, an expired item to expire first) changes nothing and returns None:
        the caller runs the full transaction, which decides it. A group whose statement
        failed and was rolled back returns None to each put, which then runs alone; one
        whose outcome is unknown (Unavailable) fails each put with that error.

        The statement takes the group's key locks first, in key-lock order, as every
        item write does, and the head after all its other writes, so groups and
        transactions never wait on each other in a cycle. It computes each version from
        the row it conflicts with or updates, which PostgreSQL reads as committed after
        waiting for its lock, never from the statement's snapshot.
        """
        return await self._put_groups.put(_Put(w, author, now, history_limit))

    @staticmethod
    def _take_group(puts: list[_Put], share: int) -> list[int]:
        """The next group of waiting puts: in order, ``share`` of them and at most
        :data:`GROUP_MAX`, one per key (a later put of a key waits for a later group:
        one statement upserts a key once)."""
        want = min(GROUP_MAX, share)
        chosen: list[int] = []
        taken: set[tuple[str, str]] = set()
        for i, p in enumerate(puts):
            if len(chosen) >= want:
                break
            k = (p.write.namespace, p.write.key)
            if k not in taken:
                taken.add(k)
                chosen.append(i)
        return chosen

    async def _send_group(self, group: list[_Put]) -> list[ItemRow | None]:
        """Commit ``group`` as one statement: each put's row, or None where it wrote
        nothing (then it runs alone). Unavailable (the outcome may be unknown) fails
        each put with it: never run twice. Any other failure rolled the statement back:
        each put then runs alone and meets its own error."""

        async def run(c: Conn) -> list[ItemRow | None]:
            return await self._put_group(c, group)

        try:
            rows = await self._engine.write_alone(run)
        except Unavailable:
            raise
        except Exception:
            return [None] * len(group)
        if any(r is not None for r in rows):
            self.changes.notify()
        return rows

    @staticmethod
    async def _put_group(c: Conn, group: list[_Put]) -> list[ItemRow | None]:
        """Run the statement of ``group`` (puts of distinct keys) on ``c`` (autocommit);
        each put's row, or None where it wrote nothing."""
        locks = [key_lock(p.write.namespace, p.write.key) for p in group]
        order = sorted(range(len(group)), key=locks.__getitem__)
        ns: list[str] = []
        key: list[str] = []
        value: list[bytes] = []
        author: list[str] = []
        now: list[float] = []
        expires_at: list[float | None] = []
        text: list[bytes | None] = []
        metadata: list[bytes | None] = []
        meta: list[str | None] = []
        if_version: list[int | None] = []
        hl: list[int] = []
        itext: list[str | None] = []
        model: list[str | None] = []
        dim: list[int | None] = []
        vec: list[Vector | None] = []
        type_: list[str] = []
        for i in order:
            put = group[i]
            w = put.write
            ns.append(w.namespace)
            key.append(w.key)
            value.append(w.value)
            author.append(put.author)
            now.append(put.now)
            expires_at.append(w.expires_at)
            text.append(None if w.text is None else text_to_db(w.text))
            metadata.append(w.metadata)
            meta.append(None if w.metadata is None else meta_jsonb(w.metadata))
            if_version.append(w.if_version)
            hl.append(put.history_limit)
            type_.append(w.event or "item.put")
            if w.index_text is None:
                itext.append(None)
                model.append(None)
                dim.append(None)
                vec.append(None)
            else:
                itext.append(index_text(w.index_text))
                model.append(w.model)
                v = w.vector
                dim.append(None if v is None else len(v) // 4)
                vec.append(None if v is None else Vector(v))
        args: dict[str, list[Any] | None] = {
            "lock": [locks[i] for i in order],
            "ns": ns,
            "key": key,
            "value": value,
            "author": author,
            "now": now,
            "exp": expires_at,
            "text": text,
            "md": metadata,
            "meta": meta,
            "ifv": if_version,
            "hl": hl,
            "itext": itext,
            "model": model,
            "dim": dim,
            "vec": vec,
            "type": type_,
        }
        for name, column in args.items():
            # A column of NULLs is sent as a NULL array (unnest pads it with NULLs):
            # most of them are, and psycopg dumps an array element by element.
            if column is not None and all(x is None for x in column):
                args[name] = None
        cur = await c.execute(_PUT_GROUP, args, binary=True)
        rows: list[ItemRow | None] = [None] * len(group)
        for ordinal, version, created_at, _ in await cur.fetchall():
            i = order[ordinal - 1]
            put = group[i]
            w = put.write
            rows[i] = ItemRow(
                w.namespace,
                w.key,
                w.value,
                version,
                put.author,
                created_at,
                put.now,
                w.expires_at,
                w.text,
                w.metadata,
            )
        return rows

    @staticmethod
    async def _put_item(c: Conn, row: ItemRow, w: PutWrite, history_limit: int) -> None:
        """Store ``row``, its history entry and its index entry in one statement."""
        parts = [
            f"i AS (INSERT INTO hivemem_items ({ITEM_COLS}, meta) VALUES "
            "(%(ns)s, %(key)s, %(value)s, %(version)s, %(author)s, %(created_at)s, "
            "%(updated_at)s, %(expires_at)s, %(text)s, %(metadata)s, %(meta)s::jsonb) "
            "ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value, "
            "version = EXCLUDED.version, author = EXCLUDED.author, "
            "created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, "
            "expires_at = EXCLUDED.expires_at, text = EXCLUDED.text, "
            "metadata = EXCLUDED.metadata, meta = EXCLUDED.meta)"
        ]
        if history_limit > 0:
            parts.append(
                f"v AS (INSERT INTO hivemem_item_versions ({ITEM_COLS}) VALUES "
                "(%(ns)s, %(key)s, %(value)s, %(version)s, %(author)s, %(created_at)s, "
                "%(updated_at)s, %(expires_at)s, %(text)s, %(metadata)s) "
                "ON CONFLICT (ns, key, version) DO UPDATE SET value = EXCLUDED.value, "
                "author = EXCLUDED.author, created_at = EXCLUDED.created_at, "
                "updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at, "
                "text = EXCLUDED.text, metadata = EXCLUDED.metadata)"
            )
            parts.append(
                "t AS (DELETE FROM hivemem_item_versions WHERE ns = %(ns)s AND key = %(key)s "
                "AND version <= %(oldest)s)"
            )
        index_sql, index_args = index_put(w.index_text, w.vector, w.model)
        parts.append(index_sql)
        await c.execute(
            "WITH " + ", ".join(parts) + " SELECT 1",
            {
                "ns": row.namespace,
                "key": row.key,
                "value": row.value,
                "version": row.version,
                "author": row.author,
                "created_at": row.created_at,
                "updated_at": row.updated_at,
                "expires_at": row.expires_at,
                "text": text_to_db(row.text),
                "metadata": row.metadata,
                "meta": meta_jsonb(row.metadata),
                "oldest": row.version - history_limit,
                **index_args,
            },
        )

    @staticmethod
    async def _delete_item(c: Conn, namespace: str, key: str) -> None:
        await c.execute(
            "WITH i AS (DELETE FROM hivemem_items WHERE ns = %(ns)s AND key = %(key)s), "
            "v AS (DELETE FROM hivemem_item_versions WHERE ns = %(ns)s AND key = %(key)s), "
            "s AS (DELETE FROM hivemem_search WHERE ns = %(ns)s AND key = %(key)s) SELECT 1",
            {"ns": namespace, "key": key},
        )

    async def list_items(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        limit: int,
        now: float,
        *,
        key_prefix: str | None = None,
    ) -> list[ItemRow]:
        where, args = [LIVE], dict[str, Any](now=now, limit=limit)
        if key_prefix is not None:
            # One range of the (ns, key) primary key; both columns are COLLATE "C".
            low, high = key_range(key_prefix)
            where.append("ns = %(ns)s AND key >= %(k_lo)s")
            args.update(ns=prefix, k_lo=low)
            if high is not None:
                where.append("key < %(k_hi)s")
                args["k_hi"] = high
        elif prefix:
            where.append(UNDER)
            args.update(under(prefix))
        if after is not None:
            where.append("(ns, key) > (%(a_ns)s, %(a_key)s)")
            args.update(a_ns=after[0], a_key=after[1])
        sql = (
            f"SELECT {ITEM_COLS} FROM hivemem_items WHERE {' AND '.join(where)} "
            "ORDER BY ns, key LIMIT %(limit)s"
        )

        async def run(c: Conn) -> list[ItemRow]:
            cur = await c.execute(sql, args, binary=True)
            return [item_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        where, args = [LIVE], dict[str, Any](now=now)
        if prefix:
            where.append(UNDER)
            args.update(under(prefix))
        sql = f"SELECT DISTINCT ns FROM hivemem_items WHERE {' AND '.join(where)} ORDER BY ns"

        async def run(c: Conn) -> list[str]:
            cur = await c.execute(sql, args)
            return [r[0] for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def namespace_counts(self, prefix: str, now: float) -> list[tuple[str, int]]:
        where, args = [LIVE], dict[str, Any](now=now)
        if prefix:
            where.append(UNDER)
            args.update(under(prefix))
        sql = (
            f"SELECT ns, count(*) FROM hivemem_items WHERE {' AND '.join(where)} "
            "GROUP BY ns ORDER BY ns"
        )

        async def run(c: Conn) -> list[tuple[str, int]]:
            cur = await c.execute(sql, args)
            return [(r[0], r[1]) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        sql = (
            f"SELECT {ITEM_COLS} FROM hivemem_item_versions WHERE ns = %(ns)s AND key = %(key)s "
            "AND EXISTS (SELECT 1 FROM hivemem_items WHERE ns = %(ns)s AND key = %(key)s "
            f"AND {LIVE}) ORDER BY version DESC LIMIT %(limit)s"
        )

        async def run(c: Conn) -> list[ItemRow]:
            cur = await c.execute(
                sql, {"ns": namespace, "key": key, "now": now, "limit": limit}, binary=True
            )
            return [item_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        async def run(c: Conn, events: Events) -> tuple[int, int]:
            # Serialise sweepers (not writers) on the trim point's row.
            await c.execute("SELECT value FROM hivemem_feed WHERE name = 'trimmed' FOR UPDATE")
            cur = await c.execute(
                "WITH x AS (SELECT ns, key FROM hivemem_items WHERE expires_at IS NOT NULL "
                "AND expires_at <= %(now)s ORDER BY expires_at LIMIT %(batch)s "
                "FOR UPDATE SKIP LOCKED), "
                "d AS (DELETE FROM hivemem_items i USING x WHERE i.ns = x.ns AND i.key = x.key "
                "RETURNING i.ns, i.key, i.version), "
                "v AS (DELETE FROM hivemem_item_versions i USING x "
                "WHERE i.ns = x.ns AND i.key = x.key), "
                "s AS (DELETE FROM hivemem_search i USING x WHERE i.ns = x.ns AND i.key = x.key) "
                "SELECT ns, key, version FROM d ORDER BY ns, key",
                {"now": now, "batch": SWEEP_BATCH},
            )
            expired = await cur.fetchall()
            for ns, key, version in expired:
                events.add("item.expired", ns, key, version, "hivemem", now)
            cur = await c.execute(EXPIRE_SESSIONS, {"now": now, "batch": SWEEP_BATCH})
            sessions = sorted(r[0] for r in await cur.fetchall())
            for session_id in sessions:
                self._session_gone(events, session_id, "session.expired", "hivemem", now)
            cur = await c.execute(
                "WITH last AS (SELECT max(id) AS id FROM hivemem_events WHERE at < %s), "
                "d AS (DELETE FROM hivemem_events WHERE id <= (SELECT id FROM last) RETURNING 1), "
                "t AS (UPDATE hivemem_feed SET value = greatest(value, (SELECT id FROM last)) "
                "WHERE name = 'trimmed' AND (SELECT id FROM last) IS NOT NULL) "
                "SELECT count(*) FROM d",
                (events_before,),
            )
            trimmed = await cur.fetchone()
            await c.execute("DELETE FROM hivemem_requests WHERE at < %s", (requests_before,))
            return len(expired) + len(sessions), int(trimmed[0]) if trimmed else 0

        return await self._write(None, now, run)

    # Sessions ----------------------------------------------------------------------

    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        async def run(c: Conn, events: Events) -> SessionRow:
            try:
                cur = await c.execute(
                    f"INSERT INTO hivemem_sessions ({SESSION_COLS}) VALUES "
                    "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING 1",
                    (
                        row.id,
                        row.app,
                        row.user,
                        row.agent,
                        row.created_by,
                        row.metadata,
                        row.state,
                        row.state_version,
                        row.messages,
                        row.turns,
                        row.tokens_in,
                        row.tokens_out,
                        row.cost,
                        row.started_at,
                        row.last_activity_at,
                        row.ttl,
                    ),
                )
                await cur.fetchone()  # the duplicate key error surfaces here
            except pgerrors.UniqueViolation:
                raise Conflict(f"session {row.id!r} already exists", field="session_id") from None
            events.add(
                "session.created", f"_sessions/{row.id}", None, 0, row.created_by, row.started_at
            )
            return row

        return await self._write(request_id, row.started_at, run)

    @staticmethod
    def _no_session(session_id: str) -> NotFound:
        return NotFound(f"no session {session_id!r}", field="session_id")

    async def get_session(self, session_id: str) -> SessionRow | None:
        async def run(c: Conn) -> SessionRow | None:
            cur = await c.execute(
                f"SELECT {SESSION_COLS} FROM hivemem_sessions WHERE id = %s",
                (session_id,),
                binary=True,
            )
            row = await cur.fetchone()
            return session_row(row) if row else None

        return await self._engine.read(run)

    async def list_sessions(
        self,
        app: str | None,
        user: str | None,
        agent: str | None,
        after: str | None,
        limit: int,
        now: float,
    ) -> list[SessionRow]:
        where = [SESSION_LIVE]
        args: dict[str, Any] = {"now": now, "limit": limit}
        for column, value in (("app", app), ("user", user), ("agent", agent)):
            if value is not None:
                where.append(f'"{column}" = %({column})s')
                args[column] = value
        if after is not None:
            where.append("id > %(after)s")
            args["after"] = after
        sql = (
            f"SELECT {SESSION_COLS} FROM hivemem_sessions WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT %(limit)s"
        )

        async def run(c: Conn) -> list[SessionRow]:
            cur = await c.execute(sql, args, binary=True)
            return [session_row(r) for r in await cur.fetchall()]

        return await self._engine.read(run)

    async def delete_session(
        self, session_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> bool:
        async def run(c: Conn, events: Events) -> bool:
            # An expired session counts as absent: it is left for the sweeper.
            cur = await c.execute(
                "WITH s AS (DELETE FROM hivemem_sessions WHERE id = %(id)s "
                f"AND {SESSION_LIVE} RETURNING id), "
                "m AS (DELETE FROM hivemem_messages g USING s WHERE g.session_id = s.id) "
                "SELECT 1 FROM s",
                {"id": session_id, "now": now},
            )
            if await cur.fetchone() is None:
                return False
            self._session_gone(events, session_id, "session.deleted", author, now)
            return True

        return await self._write(request_id, now, run)

    @staticmethod
    def _session_gone(events: Events, session_id: str, type_: str, author: str, now: float) -> None:
        """Record the event of a deleted session (``type_``, on ``_sessions/<id>``)."""
        events.add(type_, f"_sessions/{session_id}", None, None, author, now)

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> list[MessageRow]:
        async def run(c: Conn, events: Events) -> list[MessageRow]:
            cur = await c.execute(
                "UPDATE hivemem_sessions SET messages = messages + %(n)s, "
                "turns = turns + %(turns)s, "
                "tokens_in = tokens_in + %(tin)s, tokens_out = tokens_out + %(tout)s, "
                "cost = cost + %(cost)s, last_activity_at = %(now)s "
                f"WHERE id = %(id)s AND {SESSION_LIVE} RETURNING messages",
                {
                    "n": len(messages),
                    "turns": sum(m.role == "user" for m in messages),
                    "tin": sum(m.tokens_in for m in messages),
                    "tout": sum(m.tokens_out for m in messages),
                    "cost": sum(m.cost for m in messages),
                    "now": now,
                    "id": session_id,
                },
            )
            found = await cur.fetchone()
            if found is None:
                raise self._no_session(session_id)
            last = int(found[0])
            first = last - len(messages) + 1
            rows = [
                MessageRow(
                    session_id,
                    first + i,
                    m.role,
                    m.content,
                    author,
                    now,
                    m.tokens_in,
                    m.tokens_out,
                    m.cost,
                    m.metadata,
                )
                for i, m in enumerate(messages)
            ]
            await c.execute(
                f"INSERT INTO hivemem_messages ({MESSAGE_COLS}) SELECT * FROM unnest("
                "%s::text[], %s::bigint[], %s::text[], %s::bytea[], %s::text[], %s::float8[], "
                "%s::bigint[], %s::bigint[], %s::float8[], %s::bytea[])",
                [[getattr(r, f) for r in rows] for f in MESSAGE_COLS.split(", ")],
            )
            events.add("session.messages", f"_sessions/{session_id}", None, last, author, now)
            return rows

        return await self._write(request_id, now, run)

    async def read_messages(
        self, session_id: str, after: int, limit: int, now: float
    ) -> list[MessageRow]:
        cols = ", ".join(f"m.{c}" for c in MESSAGE_COLS.split(", "))
        sql = (
            f"SELECT s.id, {cols} FROM hivemem_sessions s LEFT JOIN LATERAL ("
            f"SELECT {MESSAGE_COLS} FROM hivemem_messages WHERE session_id = s.id "
            "AND seq > %(after)s ORDER BY seq LIMIT %(limit)s) m ON true "
            f"WHERE s.id = %(id)s AND {SESSION_LIVE} ORDER BY m.seq"
        )
        args = {"after": after, "limit": limit, "id": session_id, "now": now}

        async def run(c: Conn) -> list[MessageRow]:
            cur = await c.execute(sql, args, binary=True)
            rows = await cur.fetchall()
            if not rows:
                raise self._no_session(session_id)
            return [
                MessageRow(
                    r[1],
                    r[2],
                    r[3],
                    bytes(r[4]),
                    r[5],
                    r[6],
                    r[7],
                    r[8],
                    r[9],
                    bytes(r[10]),
                )
                for r in rows
                if r[1] is not None
            ]

        return await self._engine.read(run)

    async def save_state(
        self,
        session_id: str,
        state: bytes,
        if_version: int | None,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> SessionRow:
        async def run(c: Conn, events: Events) -> SessionRow:
            cur = await c.execute(
                "UPDATE hivemem_sessions SET state = %(state)s, "
                "state_version = state_version + 1, last_activity_at = %(now)s "
                f"WHERE id = %(id)s AND {SESSION_LIVE} RETURNING {SESSION_COLS}",
                {"state": state, "now": now, "id": session_id},
                binary=True,
            )
            found = await cur.fetchone()
            if found is None:
                raise self._no_session(session_id)
            row = session_row(found)
            current = row.state_version - 1
            if if_version is not None and if_version != current:
                raise state_conflict(session_id, current, if_version)  # rolls the update back
            events.add(
                "session.state", f"_sessions/{session_id}", None, row.state_version, author, now
            )
            return row

        return await self._write(request_id, now, run)

    # Feed --------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        async def run(c: Conn, events: Events) -> EventRow:
            events.add("publish", channel, None, None, author, now, payload)
            return EventRow("", "publish", channel, None, None, author, now, payload)

        def finish(row: EventRow, head: int) -> EventRow:
            return EventRow(str(head), *_fields(row)[1:])

        return await self._write(request_id, now, run, finish)

    @staticmethod
    def _parse_cursor(after: str | None) -> int:
        if after is None:
            return 0
        if not after.isascii() or not after.isdigit() or len(after) > 18:
            raise InvalidInput(f"{after!r} is not a feed cursor of this store", field="after")
        return int(after)

    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        start = self._parse_cursor(after)
        where, args = ["id > %(start)s"], dict[str, Any](start=start, limit=limit)
        if prefix:
            where.append(UNDER)
            args.update(under(prefix))
        cols = ", ".join(f"e.{c}" for c in EVENT_COLS.split(", "))
        # One statement, one snapshot: the rows, the head and the trim point agree.
        sql = (
            "SELECT (SELECT value FROM hivemem_feed WHERE name = 'head'), "
            f"(SELECT value FROM hivemem_feed WHERE name = 'trimmed'), {cols} "
            "FROM (SELECT 1) AS one LEFT JOIN LATERAL ("
            f"SELECT {EVENT_COLS} FROM hivemem_events WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT %(limit)s) e ON true ORDER BY e.id"
        )

        async def run(c: Conn) -> tuple[list[EventRow], str]:
            cur = await c.execute(sql, args, binary=True)
            found = await cur.fetchall()
            head, trimmed = int(found[0][0]), int(found[0][1])
            if 0 < start < trimmed:
                raise CursorExpired(
                    f"events after cursor {start} were trimmed (retention); "
                    f"resume from {trimmed} or later",
                    field="after",
                )
            rows = [
                EventRow(
                    str(r[2]),
                    r[3],
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    r[8],
                    None if r[9] is None else bytes(r[9]),
                )
                for r in found
                if r[2] is not None
            ]
            if len(rows) == limit:
                return rows, rows[-1].cursor
            return rows, str(max(start, head))

        return await self._engine.read(run)

    async def head(self) -> str:
        async def run(c: Conn) -> str:
            cur = await c.execute("SELECT value FROM hivemem_feed WHERE name = 'head'")
            row = await cur.fetchone()
            return str(row[0]) if row else "0"

        return await self._engine.read(run)


def _fields(row: EventRow) -> tuple[Any, ...]:
    return (row.cursor, row.type, row.namespace, row.key, row.version, row.author, row.at, row.data)
