"""Commands of ``hivemem session``: create, get, ls, rm, append, messages, state. Each is a
:func:`~hivemem.cli.common.client` command; ``hivemem.cli`` registers them."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from hivemem.cli.common import Limit, Run, client, pages, parse, preview, table, ts
from hivemem.errors import InvalidInput, NotFound
from hivemem.models import Session

__all__ = [
    "session_append",
    "session_create",
    "session_get",
    "session_list",
    "session_messages",
    "session_remove",
    "session_state",
]

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
