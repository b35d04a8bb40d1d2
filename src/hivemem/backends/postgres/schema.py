"""The PostgreSQL schema: numbered migrations, applied under an advisory lock, and the
column lists and row builders.

Every table is prefixed ``hivemem_`` so a hive can share a database (and its
``public`` schema) with other applications; point the URL's ``options`` at another
``search_path`` to keep it in a schema of its own.

Column choices:

- Names, keys, identities and authors are ``text COLLATE "C"``: byte order of UTF-8,
  which is code point order, as SQLite's BINARY collation and Python's ``str``
  compare, so listings and ``(namespace, key)`` cursors agree across backends.
- Values, metadata, session state and message contents are the exact JSON bytes
  the core encoded (``bytea``); item ``text`` is ``bytea`` too (UTF-8), since
  ``text`` cannot hold NUL characters. Items also keep ``meta``, the metadata as
  ``jsonb``, for filters (see :func:`meta_jsonb`).
- Times are UNIX seconds (``double precision``), as the contract passes them.
- The feed: ``hivemem_events`` with ids assigned from the ``head`` row of
  ``hivemem_feed`` (see :mod:`hivemem.backends.postgres.backend` for why).
- Search: ``hivemem_search``, one row per searchable item: its index text, a
  generated ``tsvector`` (``to_tsvector('english', text)``, GIN index) and its
  vector as pgvector's ``vector`` (no fixed dimension, with ``dim`` and ``model``
  beside it). An HNSW index needs a fixed dimension; when one is wanted, make it a
  partial expression index per model, e.g. ``CREATE INDEX ... USING hnsw
  ((vec::vector(384)) vector_cosine_ops) WHERE model = 'all-MiniLM-L6-v2'``.
- Sessions: ``ttl`` (seconds of inactivity, NULL = never) and a partial expression
  index on ``last_activity_at + ttl`` (``WHERE ttl IS NOT NULL``) for the sweeper.
- Tasks: ``hivemem_tasks``, one row per task (see
  :mod:`hivemem.backends.postgres.tasks`), with a partial index per claim order
  (``state = 'ready'``), one for leases (``state = 'running'``) and a partial unique
  index on ``(queue, idempotency_key)``; ``claimed_at`` (added by migration 5) is
  when the current or last attempt was claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import psycopg

from hivemem.backends.rows import ItemRow, SessionRow, TaskRow, prefix_range

#: Advisory lock (class id, object id) serialising schema migrations across
#: processes: the two-int form, a lock space apart from the one-bigint item locks.
MIGRATION_LOCK = (0x68697665, 1)

MIGRATIONS: list[str] = [
    # 1: items, versions, sessions, messages, feed, request results, search.
    """
    CREATE EXTENSION IF NOT EXISTS vector;

    CREATE TABLE hivemem_items (
        ns text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        value bytea NOT NULL,
        version bigint NOT NULL,
        author text COLLATE "C" NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        expires_at double precision,
        text bytea,
        metadata bytea,
        meta jsonb,
        PRIMARY KEY (ns, key)
    );
    CREATE INDEX hivemem_items_expiry ON hivemem_items (expires_at)
        WHERE expires_at IS NOT NULL;

    CREATE TABLE hivemem_item_versions (
        ns text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        value bytea NOT NULL,
        author text COLLATE "C" NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        expires_at double precision,
        text bytea,
        metadata bytea,
        PRIMARY KEY (ns, key, version)
    );

    CREATE TABLE hivemem_sessions (
        id text COLLATE "C" PRIMARY KEY,
        app text COLLATE "C" NOT NULL,
        "user" text COLLATE "C",
        agent text COLLATE "C",
        created_by text COLLATE "C" NOT NULL,
        metadata bytea NOT NULL,
        state bytea NOT NULL,
        state_version bigint NOT NULL,
        messages bigint NOT NULL,
        turns bigint NOT NULL,
        tokens_in bigint NOT NULL,
        tokens_out bigint NOT NULL,
        cost double precision NOT NULL,
        started_at double precision NOT NULL,
        last_activity_at double precision NOT NULL
    );
    CREATE INDEX hivemem_sessions_app ON hivemem_sessions (app, id);
    CREATE INDEX hivemem_sessions_user ON hivemem_sessions ("user", id);
    CREATE INDEX hivemem_sessions_agent ON hivemem_sessions (agent, id);

    CREATE TABLE hivemem_messages (
        session_id text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        role text NOT NULL,
        content bytea NOT NULL,
        author text COLLATE "C" NOT NULL,
        created_at double precision NOT NULL,
        tokens_in bigint NOT NULL,
        tokens_out bigint NOT NULL,
        cost double precision NOT NULL,
        metadata bytea NOT NULL,
        PRIMARY KEY (session_id, seq)
    );

    CREATE TABLE hivemem_events (
        id bigint PRIMARY KEY,
        type text NOT NULL,
        ns text COLLATE "C" NOT NULL,
        key text COLLATE "C",
        version bigint,
        author text COLLATE "C" NOT NULL,
        at double precision NOT NULL,
        data bytea
    );
    CREATE INDEX hivemem_events_at ON hivemem_events USING brin (at);

    -- 'head': id of the newest event ever appended (its row lock orders commits);
    -- 'trimmed': newest id removed by retention (its row lock serialises sweeps).
    CREATE TABLE hivemem_feed (name text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO hivemem_feed (name, value) VALUES ('head', 0), ('trimmed', 0);

    CREATE TABLE hivemem_requests (
        id text COLLATE "C" PRIMARY KEY,
        result bytea,
        at double precision NOT NULL
    );
    CREATE INDEX hivemem_requests_at ON hivemem_requests (at);

    CREATE TABLE hivemem_search (
        ns text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        text text NOT NULL,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
        model text COLLATE "C",
        dim integer,
        vec vector,
        PRIMARY KEY (ns, key)
    );
    CREATE INDEX hivemem_search_tsv ON hivemem_search USING gin (tsv);
    """,
    # 2: task queues.
    """
    CREATE TABLE hivemem_tasks (
        id text COLLATE "C" PRIMARY KEY,
        queue text COLLATE "C" NOT NULL,
        state text COLLATE "C" NOT NULL,
        payload bytea NOT NULL,
        result bytea,
        priority bigint NOT NULL,
        run_at double precision NOT NULL,
        attempt bigint NOT NULL,
        max_attempts bigint NOT NULL,
        timeout double precision,
        backoff double precision NOT NULL,
        lease double precision NOT NULL,
        lease_until double precision,
        idempotency_key text COLLATE "C",
        submitted_by text COLLATE "C" NOT NULL,
        claimed_by text COLLATE "C",
        errors bytea NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        finished_at double precision
    );
    -- A claim: the best due ready task of one queue, in claim order.
    CREATE INDEX hivemem_tasks_ready ON hivemem_tasks (queue, priority DESC, run_at, id)
        WHERE state = 'ready';
    -- Settling expired leases (per queue, and across queues: running tasks are few).
    CREATE INDEX hivemem_tasks_running ON hivemem_tasks (queue, lease_until)
        WHERE state = 'running';
    -- list_tasks and task_stats.
    CREATE INDEX hivemem_tasks_queue ON hivemem_tasks (queue, state, id);
    -- sweep_tasks.
    CREATE INDEX hivemem_tasks_finished ON hivemem_tasks (finished_at)
        WHERE finished_at IS NOT NULL;
    CREATE UNIQUE INDEX hivemem_tasks_idempotency ON hivemem_tasks (queue, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 3: session TTL (seconds of inactivity, NULL = never; existing sessions never
    # expire). The sweeper finds expired sessions by the expression index, which a
    # query uses when it writes ``ttl IS NOT NULL AND last_activity_at + ttl <= ...``.
    """
    ALTER TABLE hivemem_sessions ADD COLUMN ttl double precision;
    CREATE INDEX hivemem_sessions_expiry ON hivemem_sessions ((last_activity_at + ttl))
        WHERE ttl IS NOT NULL;
    """,
    # 4: deferred embedding. An index entry written with its model named and no vector
    # waits for the indexer; this index finds those (the rows the indexer's work is).
    """
    CREATE INDEX hivemem_search_pending ON hivemem_search (ns, key)
        WHERE vec IS NULL AND model IS NOT NULL;
    """,
    # 5: when a task's current or last attempt was claimed (NULL: never claimed since
    # submitted or requeued), kept with the task so that any replica can measure an
    # attempt's duration when it ends. Adding a nullable column without a default
    # rewrites nothing.
    """
    ALTER TABLE hivemem_tasks ADD COLUMN claimed_at double precision;
    """,
]

ITEM_COLS = "ns, key, value, version, author, created_at, updated_at, expires_at, text, metadata"
SESSION_COLS = (
    'id, app, "user", agent, created_by, metadata, state, state_version, messages, turns, '
    "tokens_in, tokens_out, cost, started_at, last_activity_at, ttl"
)
MESSAGE_COLS = (
    "session_id, seq, role, content, author, created_at, tokens_in, tokens_out, cost, metadata"
)
EVENT_COLS = "id, type, ns, key, version, author, at, data"
#: The columns of ``hivemem_tasks`` in :class:`TaskRow` field order.
TASK_COLS = (
    "id, queue, state, payload, result, priority, run_at, attempt, max_attempts, timeout, "
    "backoff, lease, lease_until, idempotency_key, submitted_by, claimed_by, errors, "
    "created_at, updated_at, finished_at, claimed_at"
)
#: Rows not expired at the bound time (``%(now)s``).
LIVE = "(expires_at IS NULL OR expires_at > %(now)s)"
#: Sessions not expired at the bound time (``%(now)s``; see
#: :func:`~hivemem.backends.rows.session_expired`).
SESSION_LIVE = "(ttl IS NULL OR last_activity_at + ttl > %(now)s)"
#: Segment-aware prefix match on ``ns``; its parameters come from :func:`under`.
UNDER = "(ns = %(p)s OR (ns >= %(p_lo)s AND ns < %(p_hi)s))"


def under(prefix: str) -> dict[str, str]:
    """The named parameters of :data:`UNDER` (``p``, ``p_lo``, ``p_hi``) for ``prefix``:
    :func:`~hivemem.backends.rows.prefix_range`."""
    return dict(zip(("p", "p_lo", "p_hi"), prefix_range(prefix), strict=True))


def text_to_db(text: str | None) -> bytes | None:
    """An item's ``text`` as stored: UTF-8 (lone surrogates kept, as SQLite would fail)."""
    return None if text is None else text.encode("utf-8", "surrogatepass")


def item_row(row: Sequence[Any]) -> ItemRow:
    """An :class:`ItemRow` from the columns of :data:`ITEM_COLS`."""
    text = row[8]
    return ItemRow(
        row[0],
        row[1],
        bytes(row[2]),
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        None if text is None else bytes(text).decode("utf-8", "surrogatepass"),
        None if row[9] is None else bytes(row[9]),
    )


def session_row(row: Sequence[Any]) -> SessionRow:
    """A :class:`SessionRow` from the columns of :data:`SESSION_COLS` (``ttl`` last)."""
    return SessionRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        bytes(row[5]),
        bytes(row[6]),
        *row[7:],
    )


def task_row(row: Sequence[Any]) -> TaskRow:
    """A :class:`TaskRow` from the columns of :data:`TASK_COLS`."""
    return TaskRow(
        row[0],
        row[1],
        row[2],
        bytes(row[3]),
        None if row[4] is None else bytes(row[4]),
        int(row[5]),
        row[6],
        int(row[7]),
        int(row[8]),
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        row[15],
        bytes(row[16]),
        row[17],
        row[18],
        row[19],
        row[20],
    )


def index_text(text: str) -> str:
    """Index text as PostgreSQL ``text`` can hold it: NUL characters (which it cannot
    store) become spaces, lone surrogates become U+FFFD. Words are unchanged."""
    if "\x00" in text:
        text = text.replace("\x00", " ")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", " ")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def meta_jsonb(metadata: bytes | None) -> str | None:
    """The metadata as ``jsonb`` input for filters. ``jsonb`` refuses the escape
    ``\\u0000``; such strings are stored with spaces instead (only filter matching
    sees this copy; ``metadata`` keeps the exact bytes)."""
    if metadata is None:
        return None
    if b"\\u0000" in metadata:
        return orjson.dumps(_strip_nul(orjson.loads(metadata))).decode("utf-8")
    return metadata.decode("utf-8")


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Create or upgrade the schema; returns the schema version now in place.

    Runs in one transaction holding a transaction-scoped advisory lock, so replicas
    starting together apply each missing migration once, in order, all or nothing.
    A database newer than this code (a later version recorded) is left as it is.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATION_LOCK)
        cur = await conn.execute("SELECT to_regclass('hivemem_schema') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            await conn.execute(
                "CREATE TABLE hivemem_schema (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM hivemem_schema")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS, start=1):
            if number > current:
                await conn.execute(script)
                await conn.execute("INSERT INTO hivemem_schema (version) VALUES (%s)", (number,))
                current = number
        return current
