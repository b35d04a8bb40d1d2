"""Commands for items and the change feed: put, get, ls, ns, rm, history, watch, search,
publish. Each is a :func:`~hivemem.cli.common.client` command; ``hivemem.cli`` registers
them."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import anyio
import typer
from rich.markup import escape

import hivemem
from hivemem.cli.common import (
    Limit,
    Run,
    client,
    err,
    loading_model,
    pages,
    parse,
    preview,
    table,
    ts,
)
from hivemem.errors import InvalidInput, NotFound
from hivemem.models import Event, Item

__all__ = [
    "get",
    "history",
    "index",
    "list_items",
    "namespaces",
    "publish",
    "put",
    "remove",
    "search",
    "watch",
]

Ns = Annotated[
    str, typer.Argument(help="Namespace: 1-8 segments joined by '/', e.g. team/research.")
]
Key = Annotated[str, typer.Argument(help="Key inside the namespace.")]
Prefix = Annotated[str, typer.Argument(help="Namespace to look at or under; empty: all.")]


def _read_value(value: str | None, value_file: str | None) -> Any:
    """The value of ``put``: the VALUE argument or the content of --value-file (``-``: stdin).

    Raises:
        InvalidInput: both or neither given (field ``value``), or the file is unreadable
            or not UTF-8 (field ``value_file``).
    """
    if (value is None) == (value_file is None):
        raise InvalidInput("give exactly one of VALUE and --value-file", field="value")
    if value_file is None:
        return parse(str(value))
    try:
        raw = sys.stdin.read() if value_file == "-" else Path(value_file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {value_file}: {exc}", field="value_file") from exc
    return parse(raw.removesuffix("\n"))


def _parse_meta(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--meta k=v`` pairs as a dict; each value parsed as JSON when it parses.

    Raises:
        InvalidInput: a pair without ``=`` or without a name (field ``meta``).
    """
    if not pairs:
        return None
    meta: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"expected KEY=VALUE, got {pair!r}", field="meta")
        meta[name] = parse(raw)
    return meta


def _items_table(items: list[Item]) -> None:
    cols = ["namespace", "key", "version", "author", "updated", "value"]
    rows = [
        [i.namespace, i.key, i.version, i.author, ts(i.updated_at), preview(i.value)] for i in items
    ]
    table(cols, rows)


@client
def put(
    run: Run,
    namespace: Ns,
    key: Key,
    value: Annotated[
        str | None, typer.Argument(help="The value: JSON when it parses, else a string.")
    ] = None,
    value_file: Annotated[
        str | None,
        typer.Option(help="Read the value from this file ('-': stdin) instead of VALUE."),
    ] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds until the item expires.")] = None,
    if_version: Annotated[
        int | None, typer.Option(help="Write only if at this version (0: only if absent).")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text for search to index.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option(help="Metadata KEY=VALUE (VALUE as JSON if it parses).")
    ] = None,
) -> None:
    """Create or replace the item at NAMESPACE KEY and print its new version."""
    data, metadata = _read_value(value, value_file), _parse_meta(meta)

    def embeds() -> bool:  # only a sync-indexed put embeds before it returns
        from hivemem.core.items import searchable_text

        settings = getattr(run.hive.hive, "settings", None)
        if getattr(settings, "index_mode", "sync") != "sync":
            return False
        return searchable_text(text, data) is not None

    with loading_model(run, embeds):
        item = run.hive.put(
            namespace, key, data, if_version=if_version, ttl=ttl, text=text, metadata=metadata
        )
    run.emit(item, lambda: typer.echo(f"{item.namespace} {item.key}: version {item.version}"))


@client
def get(run: Run, namespace: Ns, key: Key) -> None:
    """Print the value at NAMESPACE KEY (--json: the whole item); exit 1 when absent."""
    item = run.hive.get(namespace, key)
    if item is None:
        raise NotFound(f"no item at {namespace} {key}")
    shown = item.value if isinstance(item.value, str) else json.dumps(item.value, indent=2)
    run.emit(item, lambda: typer.echo(shown))


@client
def list_items(
    run: Run,
    prefix: Prefix = "",
    key_prefix: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Only items whose key starts with this. PREFIX is then one namespace, "
            "not a prefix: items of namespaces under it are not listed.",
        ),
    ] = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Fetch every page, not just one.")] = False,
) -> None:
    """List items at or under PREFIX, ordered by namespace and key."""
    items, nxt = pages(
        lambda c: run.hive.list(prefix, key_prefix=key_prefix, limit=limit, cursor=c),
        cursor,
        all_,
    )

    def human() -> None:
        _items_table(items)
        if nxt:
            err.print(f"more: --cursor {escape(nxt)}", style="dim", soft_wrap=True)

    run.emit({"items": items, "next_cursor": nxt}, human)


@client
def namespaces(
    run: Run,
    prefix: Prefix = "",
    depth: Annotated[int | None, typer.Option(min=1, help="Cut names to N segments.")] = None,
) -> None:
    """List the namespaces holding live items at or under PREFIX, one per line."""
    names, _ = pages(lambda c: run.hive.list_namespaces(prefix, max_depth=depth, cursor=c))
    run.emit(names, lambda: typer.echo("\n".join(names)) if names else None)


@client
def remove(
    run: Run,
    namespace: Ns,
    key: Key,
    if_version: Annotated[int | None, typer.Option(help="Delete only if at this version.")] = None,
) -> None:
    """Delete the item at NAMESPACE KEY and its history; exit 1 when absent."""
    if not run.hive.delete(namespace, key, if_version=if_version):
        raise NotFound(f"no item at {namespace} {key}")
    run.emit({"deleted": True}, lambda: typer.echo(f"deleted {namespace} {key}"))


@client
def history(run: Run, namespace: Ns, key: Key, limit: Limit = 100) -> None:
    """Show the stored versions of an item, newest first."""
    versions = run.hive.history(namespace, key, limit=limit)
    run.emit(versions, lambda: _items_table(versions))


def _event_line(ev: Event) -> str:
    target = ev.namespace + (f" {ev.key}" if ev.key is not None else "")
    version = f" v{ev.version}" if ev.version is not None else ""
    data = f" {preview(ev.data)}" if ev.data is not None else ""
    return f"{ts(ev.at)} {ev.type:<16} {target}{version} by {ev.author}{data}"


@client
def watch(
    run: Run,
    prefix: Prefix = "",
    after: Annotated[str | None, typer.Option(help="Replay events after this cursor.")] = None,
    from_start: Annotated[bool, typer.Option(help="Replay from the oldest kept event.")] = False,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after N events.")] = None,
) -> None:
    """Print change-feed events under PREFIX as they happen (--json: one object per line).

    Without --after or --from-start only new events are shown. Ctrl-C stops.
    """
    if after is not None and from_start:
        raise InvalidInput("give --after or --from-start, not both", field="after")

    # The async API, so that Ctrl-C cancels the pending wait and the hive closes cleanly
    # (SyncHive.watch cannot close a subscription that is blocked waiting for an event).
    start = (
        "from the oldest kept event"
        if from_start
        else f"after cursor {after}"
        if after is not None
        else "new events only"
    )
    where = f"under {prefix!r}" if prefix else "in every namespace"

    async def follow() -> None:
        async with hivemem.connect(run.url, agent=run.agent) as hive:
            events = hive.watch(prefix, after="0" if from_start else after)
            # On stderr, so that stdout (--json: one event per line) holds events only.
            err.print(
                f"waiting for events {escape(where)} ({escape(start)}); Ctrl-C to stop",
                style="dim",
                soft_wrap=True,
            )
            async with aclosing(cast(AsyncGenerator[Event, None], events)) as feed:
                seen = 0
                async for ev in feed:
                    typer.echo(ev.model_dump_json() if run.json else _event_line(ev))
                    seen += 1
                    if seen == count:
                        return

    with suppress(KeyboardInterrupt):
        anyio.run(follow)


@client
def search(
    run: Run,
    prefix: Prefix,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    mode: Annotated[
        Literal["hybrid", "vector", "lexical"],
        typer.Option(help="hybrid: BM25 and vectors fused by rank; or one of them alone."),
    ] = "hybrid",
    limit: Annotated[int, typer.Option(min=1, max=100, help="Most hits, 1..100.")] = 10,
    filter_json: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help='Metadata conditions as JSON, e.g. \'{"kind": "note", "n": {"$gte": 3}}\'.',
        ),
    ] = None,
    author: Annotated[str | None, typer.Option(help="Only items written by this agent.")] = None,
    consistency: Annotated[
        Literal["eventual", "indexed"],
        typer.Option(
            help="eventual: rank what is indexed now (a write's vector follows it within "
            "moments); indexed: first wait for the vectors of every earlier write."
        ),
    ] = "eventual",
) -> None:
    """Search items at or under PREFIX by meaning and by words, best first."""
    conditions = None if filter_json is None else parse(filter_json)
    if filter_json is not None and not isinstance(conditions, dict):
        raise InvalidInput("--filter must be a JSON object", field="filter")
    with loading_model(run, lambda: mode != "lexical"):
        hits = run.hive.search(
            prefix,
            query,
            filter=conditions,
            author=author,
            mode=mode,
            limit=limit,
            consistency=consistency,
        )
    run.emit(
        [h.model_dump(mode="json") for h in hits],
        lambda: table(
            ["score", "lexical", "vector", "namespace", "key", "text / value"],
            [
                [
                    f"{h.score:.4f}",
                    h.lexical_rank or "",
                    h.vector_rank or "",
                    h.item.namespace,
                    h.item.key,
                    preview(h.item.text if h.item.text is not None else h.item.value),
                ]
                for h in hits
            ],
        ),
    )


@client
def index(
    run: Run,
    wait: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="First wait up to this many seconds for the vectors of every earlier write "
            "(exit 1 if they are not all stored by then).",
        ),
    ] = None,
) -> None:
    """Show how far the search vectors lag behind the writes.

    Writes commit at once with their words searchable; the indexer (in the service, or in
    an embedded hive that searches) embeds them in batches soon after. Shows the entries
    waiting for a vector and the age of the oldest.
    """
    indexed = True
    if wait is not None:
        with loading_model(run):
            indexed = run.hive.wait_indexed(timeout=wait)
    status = run.hive.index_status()

    def show() -> None:
        lag = "-" if status.lag_seconds is None else f"{status.lag_seconds:.1f} s"
        typer.echo(
            f"mode {status.mode} · model {status.model or 'none (lexical only)'} · "
            f"waiting {status.pending} · oldest {lag}"
        )

    run.emit(status, show)
    if not indexed:
        typer.echo(f"vectors still waiting after {wait:g} s", err=True)
        raise typer.Exit(1)


@client
def publish(
    run: Run,
    channel: Annotated[str, typer.Argument(help="Channel (a namespace) to publish on.")],
    payload: Annotated[str, typer.Argument(help="Payload: JSON when it parses, else a string.")],
) -> None:
    """Publish an event on CHANNEL for watchers; nothing is stored as an item."""
    ev = run.hive.publish(channel, parse(payload))
    run.emit(ev, lambda: typer.echo(f"published on {ev.namespace} (cursor {ev.cursor})"))
