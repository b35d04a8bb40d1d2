"""The ``hivemem`` command line: run the service, and read and write a hive from a shell.

Every client command opens the hive that ``--url`` names (a ``sqlite:///`` file or an
``http://`` service), acts as ``--agent``, and prints a rich rendering for people or,
with ``--json``, one JSON document for programs (``watch``: one JSON object per line).
A :class:`~hivemem.errors.HivememError` becomes one red line on stderr and exit code 2
(1 for :class:`~hivemem.errors.NotFound`); user errors never print a traceback.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import sys
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, cast

import anyio
import typer
from pydantic import ValidationError
from pydantic_core import to_json
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import hivemem
from hivemem.config import Settings
from hivemem.errors import Conflict, HivememError, InvalidInput, NotFound
from hivemem.models import Event, Item, Page, Session, Task
from hivemem.sync import SyncHive

__all__ = ["app", "main"]

T = TypeVar("T")
DEFAULT_URL = "sqlite:///hive.db"
EPILOG = (
    "[bold]Examples[/]\n\n"
    "  [cyan]hivemem put team/research findings '{\"papers\": 3}' --ttl 3600[/]\n\n"
    "  [cyan]hivemem --url http://127.0.0.1:8765 ls team --all[/]\n\n"
    "  [cyan]hivemem watch team --from-start --count 10 --json[/]"
)

app = typer.Typer(
    name="hivemem",
    help="Shared memory and coordination for AI agents: store, list, watch and serve a hive.",
    epilog=EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
session_app = typer.Typer(
    help="Create, inspect and append to conversation sessions.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(session_app, name="session")
eval_app = typer.Typer(
    help="Measure retrieval quality on public benchmarks.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
agents_app = typer.Typer(
    help="Manage agent identities and their API keys (stored, hashed, in the store itself, "
    "so every replica sees them). Used by `hivemem serve --auth`.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(agents_app, name="agents")

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)

# Arguments and options used by several commands.
Ns = Annotated[
    str, typer.Argument(help="Namespace: 1-8 segments joined by '/', e.g. team/research.")
]
Key = Annotated[str, typer.Argument(help="Key inside the namespace.")]
Prefix = Annotated[str, typer.Argument(help="Namespace to look at or under; empty: all.")]
SessionId = Annotated[str, typer.Argument(help="Session id.")]
Limit = Annotated[int, typer.Option(min=1, help="Most records to return.")]


@dataclass(frozen=True)
class _Options:
    """The options of the top-level command, defaults for every client command."""

    url: str = DEFAULT_URL
    agent: str = "cli"
    json: bool = False


@dataclass
class _Run:
    """What a client command works with: where the hive is, who acts, the output mode."""

    url: str
    agent: str
    json: bool

    @functools.cached_property
    def hive(self) -> SyncHive:
        """The blocking hive, opened on first use and closed when the command ends."""
        return hivemem.connect_sync(self.url, agent=self.agent)

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        """Print ``data`` as one JSON document with --json, else call ``human``."""
        if self.json:
            typer.echo(to_json(data, indent=2).decode())
        else:
            human()


def _fail(exc: HivememError) -> NoReturn:
    """Print ``exc`` as one red line on stderr; exit 1 for NotFound, 2 otherwise.

    A :class:`Conflict` states the version it found once: the stores' messages already
    say it ("is at version 3, not 2"), so it is added only to a message that does not.
    """
    detail = f" (field: {exc.field})" if exc.field else ""
    current = exc.current_version if isinstance(exc, Conflict) else None
    if current is not None and not re.search(rf"\bversion {current}\b", exc.message):
        detail += f" (current version: {current})"
    _err.print(f"[red]error:[/] {escape(exc.message + detail)}", soft_wrap=True)
    raise typer.Exit(1 if isinstance(exc, NotFound) else 2)


@contextmanager
def _loading_model(run: _Run, embeds: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Show "loading the search model…" on stderr while the block runs, when it will load
    the MiniLM model of an embedded hive (1-1.5 s at its first use) and stderr is a
    terminal. ``embeds()``: whether the call embeds any text (asked only then). The
    library itself loads the model silently; only the command line shows this, and never
    on stdout.
    """
    embedder = getattr(run.hive.hive, "embedder", None) if _err.is_terminal else None
    if embedder is None:
        yield
        return
    from rich.live import Live
    from rich.spinner import Spinner

    from hivemem.embedders.minilm import MiniLMEmbedder

    if not isinstance(embedder, MiniLMEmbedder) or not embeds():
        yield
        return
    spinner = Spinner("dots", Text("loading the search model…", style="dim"))
    with Live(spinner, console=_err, transient=True, redirect_stdout=False, redirect_stderr=False):
        yield


@contextmanager
def _guard() -> Iterator[None]:
    """Turn a HivememError raised inside the block into :func:`_fail`."""
    try:
        yield
    except HivememError as exc:
        _fail(exc)


UrlOpt = Annotated[
    str | None,
    typer.Option(
        show_default=False,
        help="Hive: sqlite:///rel.db, sqlite:////abs.db or http://host:port[,http://...]. "
        f"Default: the global --url, env HIVEMEM_URL, else {DEFAULT_URL}.",
    ),
]
AgentOpt = Annotated[
    str | None,
    typer.Option(
        show_default=False,
        help="Agent identity stamped on writes. Default: the global --agent, env "
        "HIVEMEM_AGENT, else cli.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine output: one JSON document.")]
_COMMON = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
    for name, ann, default in [
        ("url", UrlOpt, None),
        ("agent", AgentOpt, None),
        ("as_json", JsonOpt, False),
        ("ctx", typer.Context, inspect.Parameter.empty),
    ]
]


def _client(group: typer.Typer, name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``func(run, ...)`` as command ``name`` of ``group``.

    The command gains --url, --agent and --json (falling back to the top-level options);
    ``run`` is a :class:`_Run` whose hive opens on first use and closes when the command
    ends; any HivememError raised meanwhile is printed by :func:`_fail`.
    """

    def register(func: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(func, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "run"] + _COMMON

        @functools.wraps(func)
        def command(
            *args: Any,
            url: str | None,
            agent: str | None,
            as_json: bool,
            ctx: typer.Context,
            **kwargs: Any,
        ) -> None:
            root = ctx.find_root().obj
            base = root if isinstance(root, _Options) else _Options()
            run = _Run(url or base.url, agent or base.agent, as_json or base.json)
            with _guard():
                try:
                    func(run, *args, **kwargs)
                finally:
                    if "hive" in run.__dict__:
                        run.hive.close()

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        group.command(name)(command)
        return func

    return register


def _parse(raw: str) -> Any:
    """``raw`` as JSON when it parses, otherwise the string itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _read_value(value: str | None, value_file: str | None) -> Any:
    """The value of ``put``: the VALUE argument or the content of --value-file (``-``: stdin)."""
    if (value is None) == (value_file is None):
        raise InvalidInput("give exactly one of VALUE and --value-file", field="value")
    if value_file is None:
        return _parse(str(value))
    try:
        raw = sys.stdin.read() if value_file == "-" else Path(value_file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {value_file}: {exc}", field="value_file") from exc
    return _parse(raw.removesuffix("\n"))


def _parse_meta(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--meta k=v`` pairs as a dict; each value parsed as JSON when it parses."""
    if not pairs:
        return None
    meta: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"expected KEY=VALUE, got {pair!r}", field="meta")
        meta[name] = _parse(raw)
    return meta


def _pages(
    fetch: Callable[[str | None], Page[T]], cursor: str | None = None, every: bool = True
) -> tuple[list[T], str | None]:
    """One page from ``cursor``, or every page when ``every``; returns (items, next cursor)."""
    page = fetch(cursor)
    items = list(page.items)
    while every and page.next_cursor:
        page = fetch(page.next_cursor)
        items.extend(page.items)
    return items, page.next_cursor


def _ts(at: datetime | None) -> str:
    """A UTC timestamp to the second, or an empty string."""
    return at.strftime("%Y-%m-%d %H:%M:%SZ") if at else ""


def _preview(value: Any, width: int = 60) -> str:
    """``value`` on one line (strings raw, others compact JSON), cut to ``width`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """Print a table; cells are shown literally (no rich markup)."""
    table = Table(*columns, title=title, header_style="bold")
    for row in rows:
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    _out.print(table)


def _items_table(items: list[Item]) -> None:
    cols = ["namespace", "key", "version", "author", "updated", "value"]
    rows = [
        [i.namespace, i.key, i.version, i.author, _ts(i.updated_at), _preview(i.value)]
        for i in items
    ]
    _table(cols, rows)


def _show_session(s: Session) -> None:
    fields = s.model_dump(exclude={"id", "state", "metadata"})
    rows = [[k, _ts(v) if isinstance(v, datetime) else v] for k, v in fields.items()]
    _table(["session", s.id], rows)


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="HIVEMEM_URL", help="Hive the client commands use.")
    ] = DEFAULT_URL,
    agent: Annotated[
        str, typer.Option(envvar="HIVEMEM_AGENT", help="Agent identity stamped on writes.")
    ] = "cli",
    as_json: Annotated[bool, typer.Option("--json", help="Machine output for every command.")] = (
        False
    ),
) -> None:
    """Shared memory and coordination for AI agents: store, list, watch and serve a hive."""
    ctx.obj = _Options(url, agent, as_json)


LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


@app.command()
def serve(
    store: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help=f"Store URL to serve. Default: env HIVEMEM_STORE, else {DEFAULT_URL}.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 for all.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="HIVEMEM_PORT", min=1, max=65535, help="TCP port to listen on.")
    ] = 8765,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log/--no-access-log",
            help="Log one line per request (costs about a third of the throughput).",
        ),
    ] = False,
    config: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="TOML file of settings (`field = value`, top level or under \\[hivemem]). "
            "Default: env HIVEMEM_CONFIG. Environment variables HIVEMEM_<FIELD> override it; "
            "--set overrides both.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            show_default=False,
            help="A setting as FIELD=VALUE (repeatable), e.g. --set lexical_index=engine.",
        ),
    ] = None,
    auth: Annotated[
        bool | None,
        typer.Option(
            "--auth/--no-auth",
            show_default=False,
            help="Require an API key (hivemem agents add) or a JWT on every route but "
            "/healthz and /readyz. Default: setting auth (off).",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Permission rules file (TOML or YAML), reloaded on SIGHUP. Setting policy_file.",
        ),
    ] = None,
    rate_limit_store: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Rate-limit counters: memory:// (this process) or redis://host:port shared "
            "by replicas. Limits themselves: --set rate_limit_write=100/second etc.",
        ),
    ] = None,
    ssl_certfile: Annotated[
        str | None, typer.Option(show_default=False, help="Serve HTTPS with this certificate.")
    ] = None,
    ssl_keyfile: Annotated[
        str | None, typer.Option(show_default=False, help="Private key of --ssl-certfile.")
    ] = None,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Comma-separated Host header values to answer (e.g. hive.example.com); "
            "others get 400. Default: any.",
        ),
    ] = None,
) -> None:
    """Run the hivemem HTTP service (HTTP API, /docs, /healthz) over a store until Ctrl-C.

    Stores: sqlite:///file.db (default), postgresql://user:pw@host:port/db,
    redis://host:port/0, redis+cluster://host:port,host:port. Several replicas may serve
    one PostgreSQL or Redis store; clients list them all: http://a:8765,http://b:8765.
    """
    overrides: dict[str, str] = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            _fail(InvalidInput(f"--set needs FIELD=VALUE, got {item!r}", field="set"))
        if name.strip() not in Settings.model_fields:
            _fail(InvalidInput(f"unknown setting {name.strip()!r}", field=f"set.{name.strip()}"))
        overrides[name.strip()] = value
    flags: dict[str, object] = {
        "auth": auth,
        "policy_file": policy,
        "rate_limit_store": rate_limit_store,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
        "allowed_hosts": allowed_hosts,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})  # type: ignore[misc]
    try:
        settings = Settings.load(config, overrides)
    except InvalidInput as exc:
        _fail(exc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        _fail(InvalidInput(f"invalid setting: {first['msg']}", field=loc))
    import uvicorn

    from hivemem.service.app import create_app, redact_url

    store_url = store or settings.store
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        _fail(InvalidInput("--ssl-certfile and --ssl-keyfile go together", field="ssl_keyfile"))
    with _guard():
        service = create_app(store_url, settings)
    scheme = "https" if settings.ssl_certfile else "http"
    base = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    mode = "auth on" if settings.auth else "auth off: X-Hivemem-Agent names the caller"
    typer.echo(
        f"hivemem serving {base} (API docs: {base}/docs; store: {redact_url(store_url)}; {mode})"
    )
    uvicorn.run(
        service,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        loop="auto",
        http="auto",
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


@_client(app, "put")
def put(
    run: _Run,
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

    def embeds() -> bool:
        from hivemem.core.items import searchable_text

        return searchable_text(text, data) is not None

    with _loading_model(run, embeds):
        item = run.hive.put(
            namespace, key, data, if_version=if_version, ttl=ttl, text=text, metadata=metadata
        )
    run.emit(item, lambda: typer.echo(f"{item.namespace} {item.key}: version {item.version}"))


@_client(app, "get")
def get(run: _Run, namespace: Ns, key: Key) -> None:
    """Print the value at NAMESPACE KEY (--json: the whole item); exit 1 when absent."""
    item = run.hive.get(namespace, key)
    if item is None:
        raise NotFound(f"no item at {namespace} {key}")
    shown = item.value if isinstance(item.value, str) else json.dumps(item.value, indent=2)
    run.emit(item, lambda: typer.echo(shown))


@_client(app, "ls")
def list_items(
    run: _Run,
    prefix: Prefix = "",
    limit: Limit = 100,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Fetch every page, not just one.")] = False,
) -> None:
    """List items at or under PREFIX, ordered by namespace and key."""
    items, nxt = _pages(lambda c: run.hive.list(prefix, limit=limit, cursor=c), cursor, all_)

    def human() -> None:
        _items_table(items)
        if nxt:
            _err.print(f"more: --cursor {escape(nxt)}", style="dim", soft_wrap=True)

    run.emit({"items": items, "next_cursor": nxt}, human)


@_client(app, "ns")
def namespaces(
    run: _Run,
    prefix: Prefix = "",
    depth: Annotated[int | None, typer.Option(min=1, help="Cut names to N segments.")] = None,
) -> None:
    """List the namespaces holding live items at or under PREFIX, one per line."""
    names, _ = _pages(lambda c: run.hive.list_namespaces(prefix, max_depth=depth, cursor=c))
    run.emit(names, lambda: typer.echo("\n".join(names)) if names else None)


@_client(app, "rm")
def remove(
    run: _Run,
    namespace: Ns,
    key: Key,
    if_version: Annotated[int | None, typer.Option(help="Delete only if at this version.")] = None,
) -> None:
    """Delete the item at NAMESPACE KEY and its history; exit 1 when absent."""
    if not run.hive.delete(namespace, key, if_version=if_version):
        raise NotFound(f"no item at {namespace} {key}")
    run.emit({"deleted": True}, lambda: typer.echo(f"deleted {namespace} {key}"))


@_client(app, "history")
def history(run: _Run, namespace: Ns, key: Key, limit: Limit = 100) -> None:
    """Show the stored versions of an item, newest first."""
    versions = run.hive.history(namespace, key, limit=limit)
    run.emit(versions, lambda: _items_table(versions))


def _event_line(ev: Event) -> str:
    target = ev.namespace + (f" {ev.key}" if ev.key is not None else "")
    version = f" v{ev.version}" if ev.version is not None else ""
    data = f" {_preview(ev.data)}" if ev.data is not None else ""
    return f"{_ts(ev.at)} {ev.type:<16} {target}{version} by {ev.author}{data}"


@_client(app, "watch")
def watch(
    run: _Run,
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
            _err.print(
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


@_client(app, "search")
def search(
    run: _Run,
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
) -> None:
    """Search items at or under PREFIX by meaning and by words, best first."""
    conditions = None if filter_json is None else _parse(filter_json)
    if filter_json is not None and not isinstance(conditions, dict):
        raise InvalidInput("--filter must be a JSON object", field="filter")
    with _loading_model(run, lambda: mode != "lexical"):
        hits = run.hive.search(
            prefix, query, filter=conditions, author=author, mode=mode, limit=limit
        )
    run.emit(
        [h.model_dump(mode="json") for h in hits],
        lambda: _table(
            ["score", "lexical", "vector", "namespace", "key", "text / value"],
            [
                [
                    f"{h.score:.4f}",
                    h.lexical_rank or "",
                    h.vector_rank or "",
                    h.item.namespace,
                    h.item.key,
                    _preview(h.item.text if h.item.text is not None else h.item.value),
                ]
                for h in hits
            ],
        ),
    )


@app.command()
def reindex(
    store: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help=f"Local store to reindex. Default: env HIVEMEM_STORE, else {DEFAULT_URL}.",
        ),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, max=1024, help="Texts per model call.")] = 64,
) -> None:
    """Build the search index anew where it is missing, stale or by another model.

    Run it after changing the embedder (HIVEMEM_EMBEDDER, the model's name is kept
    with every vector) or on a store written before search existed. Items written
    while it runs keep the entry their own write made.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from hivemem.core import LocalHive
    from hivemem.service.app import redact_url

    url = store or Settings().store

    async def run() -> int:
        hive = hivemem.connect(url, agent="reindex")
        if not isinstance(hive, LocalHive):
            raise InvalidInput("reindex works on a local store (sqlite://...)", field="store")
        async with hive:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=_err,
            ) as bar:
                task = bar.add_task("reindexing", total=None)

                def progress(scanned: int, done: int, total: int) -> None:
                    bar.update(task, completed=scanned, total=total)

                return await hive.reindex(batch=batch, progress=progress)

    with _guard():
        done = anyio.run(run)
    typer.echo(f"reindexed {done} items in {redact_url(url)}")


@_client(app, "publish")
def publish(
    run: _Run,
    channel: Annotated[str, typer.Argument(help="Channel (a namespace) to publish on.")],
    payload: Annotated[str, typer.Argument(help="Payload: JSON when it parses, else a string.")],
) -> None:
    """Publish an event on CHANNEL for watchers; nothing is stored as an item."""
    ev = run.hive.publish(channel, _parse(payload))
    run.emit(ev, lambda: typer.echo(f"published on {ev.namespace} (cursor {ev.cursor})"))


@_client(session_app, "create")
def session_create(
    run: _Run,
    app_name: Annotated[str, typer.Option("--app", help="Application of the session.")],
    user: Annotated[str | None, typer.Option(help="End user of the conversation.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Agent owning the conversation.")] = None,
    session_id: Annotated[str | None, typer.Option("--id", help="Your own id; else new.")] = None,
) -> None:
    """Create a session and show it."""
    s = run.hive.create_session(app=app_name, user=user, agent=agent_id, session_id=session_id)
    run.emit(s, lambda: _show_session(s))


@_client(session_app, "get")
def session_get(run: _Run, session_id: SessionId) -> None:
    """Show a session's identity and counters; exit 1 when absent."""
    s = run.hive.get_session(session_id)
    run.emit(s, lambda: _show_session(s))


@_client(session_app, "ls")
def session_list(
    run: _Run,
    app_name: Annotated[str | None, typer.Option("--app", help="Only this application.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this end user.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Only this owning agent.")] = None,
) -> None:
    """List sessions matching every given filter, oldest first."""
    found, _ = _pages(
        lambda c: run.hive.list_sessions(app=app_name, user=user, agent=agent_id, cursor=c)
    )
    cols = ["id", "app", "user", "agent", "messages", "turns", "last activity"]
    rows = [
        [s.id, s.app, s.user, s.agent, s.messages, s.turns, _ts(s.last_activity_at)] for s in found
    ]
    run.emit(found, lambda: _table(cols, rows))


@_client(session_app, "rm")
def session_remove(run: _Run, session_id: SessionId) -> None:
    """Delete a session and its messages; exit 1 when absent."""
    if not run.hive.delete_session(session_id):
        raise NotFound(f"no session {session_id}")
    run.emit({"deleted": True}, lambda: typer.echo(f"deleted session {session_id}"))


@_client(session_app, "append")
def session_append(
    run: _Run,
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


@_client(session_app, "messages")
def session_messages(
    run: _Run,
    session_id: SessionId,
    after: Annotated[int, typer.Option(min=0, help="Only messages numbered above N.")] = 0,
    limit: Limit = 100,
) -> None:
    """Show a session's messages in order."""
    msgs = run.hive.get_messages(session_id, after=after, limit=limit)
    cols = ["seq", "role", "author", "at", "content"]
    rows = [[m.seq, m.role, m.author, _ts(m.created_at), _preview(m.content, 10**6)] for m in msgs]
    run.emit(msgs, lambda: _table(cols, rows))


@_client(session_app, "state")
def session_state(
    run: _Run,
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
    parsed = _parse(state)
    if not isinstance(parsed, dict):
        raise InvalidInput(f"expected a JSON object, got {state!r}", field="state")
    s = run.hive.save_state(session_id, parsed, if_version=if_version)
    run.emit(s, lambda: typer.echo(f"saved state of {s.id}: version {s.state_version}"))


def _parse_ks(raw: str) -> tuple[int, ...]:
    """``--k`` as sorted distinct cut-offs, e.g. ``"5,10"`` -> (5, 10)."""
    try:
        ks = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or not all(1 <= k <= 100 for k in ks):
        raise InvalidInput("--k takes comma-separated cut-offs between 1 and 100", field="k")
    return tuple(ks)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@eval_app.command("locomo")
def eval_locomo(
    file: Annotated[
        Path | None,
        typer.Argument(
            show_default=False,
            help="LoCoMo-format JSON file (e.g. locomo10.json). Default: env HIVEMEM_LOCOMO, "
            "else ../shared/data/locomo-dev.json relative to the hivemem source checkout.",
        ),
    ] = None,
    k: Annotated[str, typer.Option("--k", help="Cut-offs, comma-separated (1..100).")] = "5,10",
    mode: Annotated[
        Literal["hybrid", "vector", "lexical", "all"],
        typer.Option(help="Search mode to measure; all: each of the three."),
    ] = "hybrid",
    limit_conversations: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N conversations.")
    ] = None,
    embedder: Annotated[
        Literal["minilm", "openai", "none"] | None,
        typer.Option(
            show_default=False, help="Embedder. Default: env HIVEMEM_EMBEDDER, else minilm."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")
    ] = None,
) -> None:
    """Retrieval recall on LoCoMo-format conversations, in a fresh temporary hive.

    Each dialog turn becomes one item in namespace locomo/<sample_id> (key: its dialog
    id; text: "[<session date>] <speaker>: <text>", plus " \\[shares <caption>]" when it
    shared an image; metadata: dia_id, session, turn). Every question whose evidence
    names turns of its conversation is searched in that conversation's namespace
    (malformed evidence ids are normalised, unknown ones dropped).

    [bold]recall@k[/] of a question is the share of its evidence turns among the first
    k hits; per category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop,
    5 adversarial) and overall it is the mean over the questions. Timings: loading
    (writing and embedding every turn) in seconds and items/s, and the latency of each
    search call (query embedding included) at p50 and p99 in ms. Search settings come
    from HIVEMEM_* variables as usual.

    The data is LoCoMo's data/locomo10.json (github.com/snap-research/locomo, CC BY-NC
    4.0), not shipped with hivemem; see examples/README.md.
    """
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from hivemem import evaluation

    with _guard():
        ks = _parse_ks(k)
        if file is None:
            file = evaluation.default_locomo_path()
            if not file.is_file():
                raise InvalidInput(
                    f"no LoCoMo file at {file}: pass FILE or set {evaluation.LOCOMO_ENV} "
                    "(the public file is data/locomo10.json of github.com/snap-research/locomo)",
                    field="file",
                )
        conversations = evaluation.load_locomo(file)[:limit_conversations]
        try:
            settings = Settings() if embedder is None else Settings(embedder=embedder)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise InvalidInput(f"invalid HIVEMEM_* setting: {first['msg']}", field=loc) from None
        modes: tuple[evaluation.Mode, ...] = (
            ("hybrid", "vector", "lexical") if mode == "all" else (mode,)
        )
        if settings.embedder == "none":
            if mode == "vector":
                raise InvalidInput("vector mode needs an embedder (embedder=none)", field="mode")
            modes = tuple(m for m in modes if m != "vector")
        turns = sum(len(c.turns) for c in conversations)
        questions = sum(len(c.questions) for c in conversations)

        async def run(path: str) -> evaluation.Report:
            async with hivemem.connect(
                f"sqlite:///{path}", agent="eval", settings=settings
            ) as hive:
                with Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=_err,
                ) as bar:
                    loading = bar.add_task("loading turns", total=turns)
                    asking = bar.add_task("asking questions", total=questions * len(modes))
                    return await evaluation.evaluate(
                        hive,
                        conversations,
                        modes,
                        ks,
                        on_load=lambda n: bar.update(loading, advance=n),
                        on_question=lambda n: bar.update(asking, advance=n),
                    )

        with tempfile.TemporaryDirectory(prefix="hivemem-eval-") as tmp:
            report = anyio.run(run, str(Path(tmp) / "locomo.db"))

    search = {
        name.removeprefix("search_"): value
        for name, value in settings.model_dump().items()
        if name.startswith("search_")
    }
    doc = {"file": str(file), "embedder": settings.embedder, "search": search}
    doc.update(report.to_json())
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    counts = report.questions_by_category
    _out.print(
        f"{report.conversations} conversations, {report.items} turns, "
        f"{sum(counts.values())} questions ({report.skipped_questions} without evidence "
        f"skipped); embedder {settings.embedder}",
        soft_wrap=True,
    )
    for name, result in report.modes.items():
        columns = ["category", "questions"] + [f"recall@{n}" for n in ks]
        rows: list[list[Any]] = [
            [f"{c} {evaluation.CATEGORIES.get(c, '')}".strip(), counts[c]]
            + [_fmt(result.recall(n, c)) for n in ks]
            for c in sorted(counts)
        ]
        rows.append(["overall", sum(counts.values())] + [_fmt(result.recall(n)) for n in ks])
        _table(columns, rows, title=f"{name} search")
        _out.print(
            f"{name}: query p50 {result.latency_ms(50):.1f} ms, p99 {result.latency_ms(99):.1f} ms",
            soft_wrap=True,
        )
    _out.print(f"load: {report.load_seconds:.1f} s ({report.items_per_second:.0f} items/s)")


StoreOpt = Annotated[
    str | None,
    typer.Option(
        show_default=False,
        help=f"Store URL (not http): the store the service serves. Default: env "
        f"HIVEMEM_STORE, else {DEFAULT_URL}.",
    ),
]


def _with_keys(store: str | None, work: Callable[[Any], Any]) -> Any:
    """Open the local store ``store``, run ``await work(KeyStore)``, close it."""
    from hivemem.core import LocalHive
    from hivemem.policy.keys import KeyStore

    settings = Settings()
    url = store or settings.store
    if url.split(":", 1)[0].lower() in ("http", "https"):
        _fail(InvalidInput("agents commands need the store URL, not the service's", field="store"))

    async def run() -> Any:
        hive = hivemem.connect(
            url, agent="cli", settings=settings.model_copy(update={"embedder": "none"})
        )
        assert isinstance(hive, LocalHive)
        async with hive:
            await hive.ping()
            return await work(KeyStore(hive.backend, settings, cache_seconds=0))

    with _guard():
        return anyio.run(run)


@agents_app.command("add")
def agents_add(
    name: Annotated[str, typer.Argument(help="Agent name (one namespace segment).")],
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            show_default=False,
            help="A role (repeatable): admin, writer, reader, or one your policy names.",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Add an agent and print its new API key, once, alone on the last line of stdout.

    Only a hash of the key is stored. Keep the key in a secret store; clients send it as
    HIVEMEM_API_KEY or hivemem.connect(url, api_key=...).
    """
    key = _with_keys(store, lambda keys: keys.add(name, role or [], by="cli"))
    _err.print(
        f"added agent [bold]{escape(name)}[/] with roles "
        f"{', '.join(role or []) or '(none)'}; its key:"
    )
    typer.echo(key)


@agents_app.command("ls")
def agents_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the agents with their roles and key ids (never the keys)."""
    records = _with_keys(store, lambda keys: keys.list())
    if as_json:
        typer.echo(
            to_json(
                [
                    {
                        "name": r.name,
                        "roles": list(r.roles),
                        "keys": list(r.keys),
                        "created_at": r.created_at,
                    }
                    for r in records
                ],
                indent=2,
            ).decode()
        )
        return
    if not records:
        _err.print("no agents; add one with: hivemem agents add NAME --role writer")
        return
    _table(
        ["name", "roles", "key ids", "created"],
        [
            [
                r.name,
                ", ".join(r.roles),
                ", ".join(r.keys),
                _ts(datetime.fromtimestamp(r.created_at).astimezone()),
            ]
            for r in records
        ],
    )


@agents_app.command("revoke")
def agents_revoke(
    name: Annotated[str, typer.Argument(help="Agent whose keys stop working.")],
    store: StoreOpt = None,
) -> None:
    """Remove an agent and every key it has. Replicas stop accepting its keys within
    auth_cache_seconds (5 s by default)."""
    if not _with_keys(store, lambda keys: keys.revoke(name, by="cli")):
        _fail(NotFound(f"no agent {name!r}", field="name"))
    _err.print(f"revoked agent [bold]{escape(name)}[/] and its keys")


# Tasks, workers and the agent registry ---------------------------------------------

tasks_app = typer.Typer(
    help="Inspect and operate task queues: list, show, stats, requeue dead tasks, cancel.",
    rich_markup_mode="rich",
    no_args_is_help=True,
)
app.add_typer(tasks_app, name="tasks")
Queue = Annotated[str, typer.Argument(help="Queue name, e.g. research/summaries.")]
TaskId = Annotated[str, typer.Argument(help="Task id (from submit, ls or the feed).")]


def _task_rows(tasks: list[Task]) -> list[list[Any]]:
    return [
        [
            t.id,
            t.state,
            t.attempt,
            t.max_attempts,
            t.priority,
            t.claimed_by or "",
            _ts(t.created_at),
            _preview(t.payload, 40),
        ]
        for t in tasks
    ]


def _show_task(t: Task) -> None:
    fields = t.model_dump(exclude={"id", "errors", "payload", "result"})
    rows = [[k, _ts(v) if isinstance(v, datetime) else v] for k, v in fields.items()]
    rows.append(["payload", _preview(t.payload, 200)])
    rows.append(["result", _preview(t.result, 200)])
    _table(["task", t.id], rows)
    if t.errors:
        _table(
            ["attempt", "at", "worker", "error"],
            [[e.attempt, _ts(e.at), e.worker, e.error] for e in t.errors],
            title="errors",
        )


@_client(tasks_app, "ls")
def tasks_list(
    run: _Run,
    queue: Queue,
    state: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Only tasks in this state: ready, delayed, running, completed, dead, cancelled.",
        ),
    ] = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, typer.Option(show_default=False, help="Continue here.")] = None,
) -> None:
    """List a queue's tasks in submission order (one page; --cursor continues)."""
    page = run.hive.list_tasks(queue, state=state, limit=limit, cursor=cursor)

    def human() -> None:
        _table(
            ["id", "state", "attempt", "max", "priority", "worker", "submitted", "payload"],
            _task_rows(list(page.items)),
        )
        if page.next_cursor:
            _err.print(f"more: --cursor {page.next_cursor}")

    run.emit(page.model_dump(mode="json"), human)


@_client(tasks_app, "show")
def tasks_show(run: _Run, task_id: TaskId) -> None:
    """Show one task: its state, payload, result and each failed attempt's error."""
    task = run.hive.get_task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}", field="task_id")
    run.emit(task.model_dump(mode="json"), lambda: _show_task(task))


@_client(tasks_app, "stats")
def tasks_stats(run: _Run, queue: Queue) -> None:
    """Count a queue's tasks by state and say how long the oldest due one has waited."""
    stats = run.hive.queue_stats(queue)
    oldest = stats.oldest_ready_seconds
    run.emit(
        stats.model_dump(mode="json"),
        lambda: _table(
            ["ready", "delayed", "running", "completed", "dead", "cancelled", "oldest ready"],
            [
                [
                    stats.ready,
                    stats.delayed,
                    stats.running,
                    stats.completed,
                    stats.dead,
                    stats.cancelled,
                    "" if oldest is None else f"{oldest:.1f} s",
                ]
            ],
            title=f"queue {queue}",
        ),
    )


@_client(tasks_app, "requeue")
def tasks_requeue(
    run: _Run,
    task_id: TaskId,
    delay: Annotated[float, typer.Option(min=0, help="Seconds before it may be claimed.")] = 0,
) -> None:
    """Put a dead or cancelled task back on its queue with fresh attempts."""
    task = run.hive.requeue(task_id, delay=delay)
    run.emit(task.model_dump(mode="json"), lambda: _err.print(f"task {task.id} is {task.state}"))


@_client(tasks_app, "cancel")
def tasks_cancel(run: _Run, task_id: TaskId) -> None:
    """Cancel a ready, delayed or running task (its worker is refused on its next heartbeat)."""
    task = run.hive.cancel(task_id)
    run.emit(task.model_dump(mode="json"), lambda: _err.print(f"task {task.id} is {task.state}"))


@_client(agents_app, "status")
def agents_status(
    run: _Run,
    capability: Annotated[
        str | None, typer.Option(show_default=False, help="Only agents with this capability.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Include agents that are down.")] = False,
) -> None:
    """Show registered agents: who is alive, their capabilities and last heartbeat."""
    records = run.hive.agents(capability=capability, healthy=None if every else True)
    run.emit(
        [r.model_dump(mode="json") for r in records],
        lambda: _table(
            ["name", "status", "capabilities", "endpoint", "last seen", "ttl"],
            [
                [
                    r.name,
                    "up" if r.healthy else "down",
                    ", ".join(r.capabilities),
                    r.endpoint or "",
                    _ts(r.last_seen),
                    f"{r.ttl:g} s",
                ]
                for r in records
            ],
        ),
    )


def _load_handler(target: str) -> Callable[..., Any]:
    """The function ``module:function`` names (a Worker's handler when it is one)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"expected module:function, got {target!r}", field="target")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules of the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"cannot import {module_name!r}: {exc}", field="target") from exc
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise InvalidInput(f"{module_name!r} has no {attr!r}", field="target")
    from hivemem.worker import Worker

    if isinstance(found, Worker):
        found = found.fn
    if not callable(found):
        raise InvalidInput(f"{target!r} is not callable", field="target")
    return cast(Callable[..., Any], found)


@app.command()
def worker(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="The handler, module:function (sync or async; gets a Task).")
    ],
    queue: Annotated[str, typer.Option(help="Queue to take tasks from.")],
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="Tasks run at once.")] = 1,
    lease: Annotated[
        float, typer.Option(min=0.1, max=86400, help="Seconds a claim holds a task (renewed).")
    ] = 30.0,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds tasks in hand may finish after SIGTERM.")
    ] = 10.0,
    url: UrlOpt = None,
    agent: Annotated[
        str | None,
        typer.Option(show_default=False, help="Agent identity (default: worker-<host>-<pid>)."),
    ] = None,
) -> None:
    """Run a worker: claim tasks of --queue and run the handler on each, --concurrency at
    a time, with automatic heartbeats. The handler's return value completes the task, an
    exception fails the attempt (retried after the task's backoff). SIGTERM or Ctrl-C
    stops claiming; tasks in hand get --grace seconds, then go back to the queue. One log
    line per task on stderr.

    [cyan]hivemem worker myapp.jobs:summarise --queue summaries --concurrency 4 --url http://hive:8765[/]
    """
    import asyncio
    import logging
    import os
    import socket

    from hivemem.worker import Worker

    root = ctx.find_root().obj
    base = root if isinstance(root, _Options) else _Options()
    name = agent or (base.agent if base.agent != "cli" else None)
    if name is None:
        host = re.sub(r"[^A-Za-z0-9_.:@+-]", "-", socket.gethostname())[:80] or "host"
        name = f"worker-{host}-{os.getpid()}"
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        handler = _load_handler(target)
        async with hivemem.connect(url or base.url, agent=name) as hive:
            await Worker(
                hive, queue, handler, concurrency=concurrency, lease=lease, grace=grace
            ).run()

    with _guard():
        asyncio.run(main())


def main() -> None:
    """Entry point of the ``hivemem`` command."""
    app()
