"""The SQLite schema (numbered migrations) and the column lists and row builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hivemem.backends.rows import EventRow, ItemRow, SessionRow

MIGRATIONS: list[str] = [
    # 1: items, versions, sessions, messages, feed.
    """
    CREATE TABLE items (
        ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,
        author TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        expires_at REAL, text TEXT, metadata BLOB,
        PRIMARY KEY (ns, key)
    );
    CREATE INDEX items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE item_versions (
        ns TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL,
        author TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        expires_at REAL, text TEXT, metadata BLOB,
        PRIMARY KEY (ns, key, version)
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, app TEXT NOT NULL, user TEXT, agent TEXT,
        created_by TEXT NOT NULL, metadata BLOB NOT NULL, state BLOB NOT NULL,
        state_version INTEGER NOT NULL, messages INTEGER NOT NULL, turns INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost REAL NOT NULL,
        started_at REAL NOT NULL, last_activity_at REAL NOT NULL
    );
    CREATE INDEX sessions_app ON sessions (app, id);
    CREATE INDEX sessions_user ON sessions (user, id);
    CREATE INDEX sessions_agent ON sessions (agent, id);
    CREATE TABLE messages (
        session_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
        content BLOB NOT NULL, author TEXT NOT NULL, created_at REAL NOT NULL,
        tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost REAL NOT NULL,
        metadata BLOB NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, ns TEXT NOT NULL,
        key TEXT, version INTEGER, author TEXT NOT NULL, at REAL NOT NULL, data BLOB
    );
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # 2: search. One row per indexed item (its text in FTS5, its vector as float32
    # bytes); ids are stable while the item lives, and are the FTS rowids.
    """
    CREATE TABLE search_docs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, key TEXT NOT NULL,
        version INTEGER NOT NULL, model TEXT, dim INTEGER, vec BLOB,
        UNIQUE (ns, key)
    );
    CREATE VIRTUAL TABLE search_fts USING fts5(
        text, tokenize = 'porter unicode61 remove_diacritics 2'
    );
    """,
    # 3: results of writes made with a request id (agent-scoped by the core).
    """
    CREATE TABLE requests (id TEXT PRIMARY KEY, result BLOB NOT NULL, at REAL NOT NULL);
    CREATE INDEX requests_at ON requests (at);
    """,
    # 4: the task queue. ``due`` orders a queue's ready tasks for claims; ``leases``
    # finds expired leases; ``finished`` serves retention; ``idem`` dedupes submits.
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY, queue TEXT NOT NULL, state TEXT NOT NULL, payload BLOB NOT NULL,
        result BLOB, priority INTEGER NOT NULL, run_at REAL NOT NULL, attempt INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL, timeout REAL, backoff REAL NOT NULL, lease REAL NOT NULL,
        lease_until REAL, idempotency_key TEXT, submitted_by TEXT NOT NULL, claimed_by TEXT,
        errors BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX tasks_due ON tasks (queue, priority DESC, run_at, id) WHERE state = 'ready';
    CREATE INDEX tasks_leases ON tasks (lease_until) WHERE state = 'running';
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX tasks_queue ON tasks (queue, id);
    CREATE UNIQUE INDEX tasks_idem ON tasks (queue, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 5: session TTL (seconds of inactivity, NULL = never; existing sessions never
    # expire). ``expiry`` finds expired sessions for the sweeper: its expression must
    # be written ``last_activity_at + ttl`` by queries that want it.
    """
    ALTER TABLE sessions ADD COLUMN ttl REAL;
    CREATE INDEX sessions_expiry ON sessions (last_activity_at + ttl) WHERE ttl IS NOT NULL;
    """,
    # 6: deferred embedding. An index entry written with its model named and no vector
    # waits for the indexer; this index finds those (the rows the indexer's work is).
    """
    CREATE INDEX search_docs_pending ON search_docs (id)
        WHERE vec IS NULL AND model IS NOT NULL;
    """,
    # 7: the current version lives in ``items`` alone; ``item_versions`` keeps the older
    # ones (it used to hold a copy of the current one too).
    """
    DELETE FROM item_versions WHERE EXISTS (
        SELECT 1 FROM items i
        WHERE i.ns = item_versions.ns AND i.key = item_versions.key
        AND i.version <= item_versions.version
    );
    """,
    # 8: when a task's current or last attempt was claimed (NULL: never claimed since
    # submitted or requeued), kept with the task so that any process can measure an
    # attempt's duration when it ends.
    """
    ALTER TABLE tasks ADD COLUMN claimed_at REAL;
    """,
    # 9: the lexical index lags the writes (backends/sqlite/search.py). An entry's text
    # moves to ``search_docs``; FTS5 indexes it there (external content) and keeps no
    # copy; ``lexical_pending`` lists the entries FTS5 has not caught up with, each with
    # the text FTS5 holds for it (NULL: none), which removing it from FTS5 needs.
    """
    ALTER TABLE search_docs ADD COLUMN text TEXT;
    UPDATE search_docs SET text = (SELECT f.text FROM search_fts f WHERE f.rowid = search_docs.id);
    DROP TABLE search_fts;
    CREATE VIRTUAL TABLE search_fts USING fts5(
        text, content = 'search_docs', content_rowid = 'id',
        tokenize = 'porter unicode61 remove_diacritics 2'
    );
    INSERT INTO search_fts (search_fts) VALUES ('rebuild');
    CREATE TABLE lexical_pending (id INTEGER PRIMARY KEY, old TEXT);
    """,
]

#: What an upgrade through a slow migration costs, by migration number: the engine says
#: it before the work (the process answers nothing meanwhile). Migration 9's rebuild of
#: the lexical index took 5 s of CPU for 200,000 entries of 12 words on a 2-core machine.
SLOW_MIGRATIONS: dict[int, str] = {
    9: "it rebuilds the lexical index: about 25 s of CPU per million search entries",
}

#: The columns of ``tasks`` in :class:`TaskRow` field order.
TASK_COLS = (
    "id, queue, state, payload, result, priority, run_at, attempt, max_attempts, timeout, "
    "backoff, lease, lease_until, idempotency_key, submitted_by, claimed_by, errors, "
    "created_at, updated_at, finished_at, claimed_at"
)
ITEM_COLS = "ns, key, value, version, author, created_at, updated_at, expires_at, text, metadata"
SESSION_COLS = (
    "id, app, user, agent, created_by, metadata, state, state_version, messages, turns, "
    "tokens_in, tokens_out, cost, started_at, last_activity_at, ttl"
)
MESSAGE_COLS = (
    "session_id, seq, role, content, author, created_at, tokens_in, tokens_out, cost, metadata"
)
#: Rows not expired at the bound time.
LIVE = "(expires_at IS NULL OR expires_at > ?)"
#: Sessions not expired at the bound time (see :func:`~hivemem.backends.rows.session_expired`).
SESSION_LIVE = "(ttl IS NULL OR last_activity_at + ttl > ?)"
#: Segment-aware prefix match, bound to :func:`~hivemem.backends.rows.prefix_range`.
UNDER = "(ns = ? OR (ns >= ? AND ns < ?))"


def item_row(row: Sequence[Any]) -> ItemRow:
    return ItemRow(*row)


def session_row(row: Sequence[Any]) -> SessionRow:
    """A :class:`SessionRow` from the columns of :data:`SESSION_COLS` (``ttl`` included)."""
    return SessionRow(*row)


def event_row(row: Sequence[Any]) -> EventRow:
    return EventRow(str(row[0]), *row[1:])
