"""Commands of ``hivemem session``: create, get, ls, rm, append, messages, state, export,
import. Each is a :func:`~hivemem.cli.common.client` command; ``hivemem.cli`` registers
them.

**Session archives** (``export`` / ``import``) are JSON Lines: per session, one line
``{"type": "session", "format": "hivemem.session/1", ...}`` with the session record as
the API returns it (identity, metadata, state and state_version, the counters, times,
ttl), then one line ``{"type": "message", ...}`` per message in sequence order (every
field of a message). An archive may hold several sessions, each followed by its
messages. See docs/blobs.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import orjson
import typer

from hivemem.cli.common import Limit, Run, client, err, pages, parse, preview, table, ts
from hivemem.errors import Conflict, InvalidInput, NotFound
from hivemem.models import Message, Session

__all__ = [
    "ARCHIVE_FORMAT",
    "session_append",
    "session_create",
    "session_export",
    "session_get",
    "session_import",
    "session_list",
    "session_messages",
    "session_remove",
    "session_state",
]

#: The ``format`` of a session line of an archive.
ARCHIVE_FORMAT = "hivemem.session/1"
#: Messages read, or appended, per call (the default ``limit`` and ``max_batch_ops``).
_ARCHIVE_PAGE = 100

SessionId = Annotated[str, typer.Argument(help="Session id.")]


def _cell(name: str, value: Any) -> Any:
    """A session field as a table cell: timestamps to the second, the ttl in seconds."""
    if isinstance(value, datetime):
        return ts(value)
    if name == "ttl" and value is not None:
        return f"{value:g} s"
    return value


def _show_session(s: Session) -> None:
    fields = s.model_dump(exclude={"id", "state", "metadata"})
    for unset in [name for name in ("ttl", "expires_at") if fields.get(name) is None]:
        del fields[unset]
    table(["session", s.id], [[k, _cell(k, v)] for k, v in fields.items()])


@client
def session_create(
    run: Run,
    app_name: Annotated[str, typer.Option("--app", help="Application of the session.")],
    user: Annotated[str | None, typer.Option(help="End user of the conversation.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Agent owning the conversation.")] = None,
    session_id: Annotated[str | None, typer.Option("--id", help="Your own id; else new.")] = None,
    ttl: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="Sliding expiry: seconds of inactivity (no append, no state save) after "
            "which the session and its messages expire. Default: never.",
        ),
    ] = None,
) -> None:
    """Create a session and show it."""
    s = run.hive.create_session(
        app=app_name, user=user, agent=agent_id, session_id=session_id, ttl=ttl
    )
    run.emit(s, lambda: _show_session(s))


@client
def session_get(run: Run, session_id: SessionId) -> None:
    """Show a session's identity and counters; exit 1 when absent."""
    s = run.hive.get_session(session_id)
    run.emit(s, lambda: _show_session(s))


@client
def session_list(
    run: Run,
    app_name: Annotated[str | None, typer.Option("--app", help="Only this application.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this end user.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Only this owning agent.")] = None,
) -> None:
    """List sessions matching every given filter, oldest first."""
    found, _ = pages(
        lambda c: run.hive.list_sessions(app=app_name, user=user, agent=agent_id, cursor=c)
    )
    cols = ["id", "app", "user", "agent", "messages", "turns", "last activity"]
    rows: list[list[Any]] = [
        [s.id, s.app, s.user, s.agent, s.messages, s.turns, ts(s.last_activity_at)] for s in found
    ]
    if any(s.expires_at is not None for s in found):
        cols.append("expires")
        for row, s in zip(rows, found, strict=True):
            row.append(ts(s.expires_at))
    run.emit(found, lambda: table(cols, rows))


@client
def session_remove(run: Run, session_id: SessionId) -> None:
    """Delete a session and its messages; exit 1 when absent."""
    if not run.hive.delete_session(session_id):
        raise NotFound(f"no session {session_id}")
    run.emit({"deleted": True}, lambda: typer.echo(f"deleted session {session_id}"))


@client
def session_append(
    run: Run,
    session_id: SessionId,
    role: Annotated[str, typer.Argument(help="user, assistant, system, tool or your own.")],
    content: Annotated[str, typer.Argument(help="Message text, stored as given.")],
    tokens_in: Annotated[int, typer.Option(min=0, help="Prompt tokens of the turn.")] = 0,
    tokens_out: Annotated[int, typer.Option(min=0, help="Completion tokens of the turn.")] = 0,
    cost: Annotated[float, typer.Option(min=0, help="Cost of the turn (your currency).")] = 0.0,
) -> None:
    """Append one message to a session and print its sequence number."""
    msg = run.hive.append_message(
        session_id, role, content, tokens_in=tokens_in, tokens_out=tokens_out, cost=cost
    )
    run.emit(msg, lambda: typer.echo(f"appended message {msg.seq} to session {session_id}"))


@client
def session_messages(
    run: Run,
    session_id: SessionId,
    after: Annotated[int, typer.Option(min=0, help="Only messages numbered above N.")] = 0,
    limit: Limit = 100,
) -> None:
    """Show a session's messages in order."""
    msgs = run.hive.get_messages(session_id, after=after, limit=limit)
    cols = ["seq", "role", "author", "at", "content"]
    rows = [[m.seq, m.role, m.author, ts(m.created_at), preview(m.content, 10**6)] for m in msgs]
    run.emit(msgs, lambda: table(cols, rows))


@client
def session_state(
    run: Run,
    session_id: SessionId,
    state: Annotated[str | None, typer.Argument(help="JSON object to save; omit to show.")] = None,
    if_version: Annotated[int | None, typer.Option(help="Save only if at this version.")] = None,
) -> None:
    """Show a session's state document, or replace it with STATE (a JSON object)."""
    if state is None:
        s = run.hive.get_session(session_id)
        doc = {"state": s.state, "state_version": s.state_version}
        run.emit(doc, lambda: typer.echo(json.dumps(s.state, indent=2, ensure_ascii=False)))
        return
    parsed = parse(state)
    if not isinstance(parsed, dict):
        raise InvalidInput(f"expected a JSON object, got {state!r}", field="state")
    s = run.hive.save_state(session_id, parsed, if_version=if_version)
    run.emit(s, lambda: typer.echo(f"saved state of {s.id}: version {s.state_version}"))


# Session archives ---------------------------------------------------------------------

_ARCHIVE_URL = "s3://bucket/key.jsonl\\[?endpoint=URL&region=NAME], a file, or - for "


def _snapshot(run: Run, session_id: str) -> tuple[Session, list[Message]]:
    """A session and exactly the messages its counters count: the messages are read to
    the end, then the record; messages appended meanwhile are read up to its count."""
    messages: list[Message] = []
    while True:
        after = messages[-1].seq if messages else 0
        page = run.hive.get_messages(session_id, after=after, limit=_ARCHIVE_PAGE)
        messages += page
        if len(page) < _ARCHIVE_PAGE:
            break
    session = run.hive.get_session(session_id)
    while len(messages) < session.messages:
        page = run.hive.get_messages(session_id, after=messages[-1].seq if messages else 0)
        if not page:
            break
        messages += page
    return session, messages[: session.messages]


@client
def session_export(
    run: Run,
    session_ids: Annotated[
        list[str], typer.Argument(metavar="SESSION_ID", help="Sessions to export.")
    ],
    to: Annotated[str, typer.Option("--to", help=f"Archive to write: {_ARCHIVE_URL}stdout.")],
) -> None:
    """Write sessions to an archive: per session a line with its record (state,
    counters), then a line per message (JSON Lines). The archive is written whole, at
    once (a file: to a temporary file renamed over it)."""
    lines: list[bytes] = []
    total = 0
    for session_id in session_ids:
        session, messages = _snapshot(run, session_id)
        record = {"type": "session", "format": ARCHIVE_FORMAT, **session.model_dump(mode="json")}
        lines.append(orjson.dumps(record) + b"\n")
        lines += [
            orjson.dumps({"type": "message", **m.model_dump(mode="json")}) + b"\n" for m in messages
        ]
        total += len(messages)
    data = b"".join(lines)
    if to == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        asyncio.run(_put_archive(to, data))
    summary = {"sessions": len(session_ids), "messages": total, "bytes": len(data), "to": to}
    line = f"exported {len(session_ids)} sessions, {total} messages ({len(data)} bytes) to {to}"
    if to == "-":
        err.print(line, soft_wrap=True, markup=False)
    else:
        run.emit(summary, lambda: typer.echo(line))


@client
def session_import(
    run: Run,
    source: Annotated[str, typer.Option("--from", help=f"Archive to read: {_ARCHIVE_URL}stdin.")],
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Delete a session of the same id before importing it. Without it, an "
            "archive naming an existing session is refused and nothing is imported.",
        ),
    ] = False,
) -> None:
    """Recreate the sessions of an archive: each with its id, app, user, agent, metadata,
    state and ttl, and its messages appended in order as their authors, so the counters
    come out as archived. Times start anew (started_at, created_at) and the state, when
    there is one, is at version 1. The whole archive is checked before anything is
    written."""
    data = sys.stdin.buffer.read() if source == "-" else asyncio.run(_get_archive(source))
    archive = list(_read_archive(data))
    if not replace:
        for record, _ in archive:
            try:
                run.hive.get_session(record["id"])
            except NotFound:
                continue
            raise Conflict(
                f"session {record['id']!r} exists; pass --replace to delete it and import "
                "the archived one (nothing was imported)",
                field="from",
            )
    total = 0
    for record, messages in archive:
        session_id = record["id"]
        if replace:
            run.hive.delete_session(session_id)
        run.hive.as_agent(record["created_by"]).create_session(
            app=record["app"],
            user=record.get("user"),
            agent=record.get("agent"),
            session_id=session_id,
            metadata=record.get("metadata") or {},
            state=record.get("state") if record.get("state_version") else None,
            ttl=record.get("ttl"),
        )
        for author, chunk in _by_author(messages):
            run.hive.as_agent(author).append_messages(session_id, chunk)
        total += len(messages)
    summary = {"sessions": len(archive), "messages": total, "from": source}
    run.emit(
        summary,
        lambda: typer.echo(f"imported {len(archive)} sessions, {total} messages from {source}"),
    )


def _by_author(messages: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Runs of consecutive messages by one author, at most ``_ARCHIVE_PAGE`` each, as
    the message bodies ``append_messages`` takes."""
    run: list[dict[str, Any]] = []
    author = ""
    for m in messages:
        if run and (m["author"] != author or len(run) == _ARCHIVE_PAGE):
            yield author, run
            run = []
        author = m["author"]
        run.append(
            {
                "role": m["role"],
                "content": m.get("content"),
                "tokens_in": m.get("tokens_in", 0),
                "tokens_out": m.get("tokens_out", 0),
                "cost": m.get("cost", 0.0),
                "metadata": m.get("metadata") or {},
            }
        )
    if run:
        yield author, run


def _read_archive(data: bytes) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The sessions of an archive, each with its messages, checked whole: the sequence
    numbers run 1..n and the record's counters are those of its messages.

    Raises:
        InvalidInput: naming the line at fault (field ``from``).
    """
    sessions: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"line {number} is not JSON: {exc}", field="from") from None
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "session":
            _check_record(doc, number)
            if any(r["id"] == doc["id"] for r, _ in sessions):
                raise InvalidInput(f"line {number}: session {doc['id']!r} again", field="from")
            sessions.append((doc, []))
        elif kind == "message":
            if not sessions:
                raise InvalidInput(f"line {number}: a message before any session", field="from")
            record, messages = sessions[-1]
            if doc.get("session_id") != record["id"] or doc.get("seq") != len(messages) + 1:
                raise InvalidInput(
                    f"line {number}: expected message {len(messages) + 1} of session "
                    f"{record['id']!r}, got {doc.get('seq')!r} of {doc.get('session_id')!r}",
                    field="from",
                )
            if not isinstance(doc.get("author"), str) or not isinstance(doc.get("role"), str):
                raise InvalidInput(f"line {number}: a message needs role and author", field="from")
            messages.append(doc)
        else:
            raise InvalidInput(
                f"line {number}: expected a session or message line (its 'type')", field="from"
            )
    if not sessions:
        raise InvalidInput("the archive holds no session", field="from")
    for record, messages in sessions:
        _check_counters(record, messages)
    yield from sessions


def _check_record(doc: dict[str, Any], number: int) -> None:
    if doc.get("format") != ARCHIVE_FORMAT:
        raise InvalidInput(
            f"line {number}: format {doc.get('format')!r} is not {ARCHIVE_FORMAT!r}", field="from"
        )
    for name in ("id", "app", "created_by"):
        if not isinstance(doc.get(name), str):
            raise InvalidInput(f"line {number}: the session has no {name}", field="from")


def _check_counters(record: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    """Refuse a session whose messages do not add up to its counters (a cut archive)."""
    found = {
        "messages": len(messages),
        "turns": sum(1 for m in messages if m["role"] == "user"),
        "tokens_in": sum(int(m.get("tokens_in") or 0) for m in messages),
        "tokens_out": sum(int(m.get("tokens_out") or 0) for m in messages),
    }
    for name, count in found.items():
        if record.get(name) != count:
            raise InvalidInput(
                f"session {record['id']!r} says {name} = {record.get(name)!r}, its messages "
                f"in the archive add up to {count} (a cut or edited archive?)",
                field="from",
            )
    cost = math.fsum(float(m.get("cost") or 0.0) for m in messages)
    if not math.isclose(float(record.get("cost") or 0.0), cost, rel_tol=1e-9, abs_tol=1e-9):
        raise InvalidInput(
            f"session {record['id']!r} says cost = {record.get('cost')!r}, its messages add "
            f"up to {cost!r}",
            field="from",
        )


async def _put_archive(url: str, data: bytes) -> None:
    from hivemem.core.objects import object_target

    store, name = object_target(url, field="to")
    try:
        await store.put(name, data)
    finally:
        await store.close()


async def _get_archive(url: str) -> bytes:
    from hivemem.core.objects import object_target

    store, name = object_target(url, field="from")
    try:
        data = await store.get(name)
    finally:
        await store.close()
    if data is None:
        raise NotFound(f"no archive at {url}", field="from")
    return data
