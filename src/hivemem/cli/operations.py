"""Commands for operators: ``hivemem serve``, ``hivemem reindex`` and the API keys of
``hivemem agents`` (add, ls, revoke). ``hivemem.cli`` registers them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
import typer
from pydantic import ValidationError
from pydantic_core import to_json
from rich.markup import escape

import hivemem
from hivemem.cli.common import (
    DEFAULT_URL,
    JsonOpt,
    err,
    fail,
    guard,
    progress,
    root_options,
    table,
    ts,
)
from hivemem.config import Settings
from hivemem.errors import InvalidInput, NotFound

__all__ = ["agents_add", "agents_list", "agents_revoke", "reindex", "serve"]

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


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
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            show_default=False,
            help="Log one line per request to stdout: time, agent, method, route, status, "
            "duration, request id, trace id (never values or credentials). Setting "
            "access_log (off).",
        ),
    ] = None,
    tracing: Annotated[
        bool | None,
        typer.Option(
            "--tracing/--no-tracing",
            show_default=False,
            help="OpenTelemetry spans per request and store call, exported as the OTEL_* "
            "variables say (default OTLP over HTTP to localhost:4318); needs hivemem[otel]. "
            "Setting tracing (off).",
        ),
    ] = None,
    log_format: Annotated[
        Literal["text", "json"] | None,
        typer.Option(
            show_default=False,
            help="Access log lines as key=value text or one JSON object per line. Setting "
            "log_format (text).",
        ),
    ] = None,
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
            fail(InvalidInput(f"--set needs FIELD=VALUE, got {item!r}", field="set"))
        if name.strip() not in Settings.model_fields:
            fail(InvalidInput(f"unknown setting {name.strip()!r}", field=f"set.{name.strip()}"))
        overrides[name.strip()] = value
    flags: dict[str, object] = {
        "auth": auth,
        "policy_file": policy,
        "rate_limit_store": rate_limit_store,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
        "allowed_hosts": allowed_hosts,
        "access_log": access_log,
        "log_format": log_format,
        "tracing": tracing,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})  # type: ignore[misc]
    try:
        settings = Settings.load(config, overrides)
    except InvalidInput as exc:
        fail(exc)
    except ValidationError as exc:
        from hivemem.validation import invalid_input

        fail(invalid_input(exc, what="invalid setting: "))
    import uvicorn

    from hivemem.service.app import create_app, redact_url

    store_url = store or settings.store
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        fail(InvalidInput("--ssl-certfile and --ssl-keyfile go together", field="ssl_keyfile"))
    if settings.tracing:
        from hivemem import tracing as otel

        try:
            otel.configure_sdk()
        except ImportError:
            fail(InvalidInput("--tracing needs pip install 'hivemem[otel]'", field="tracing"))
        except ValueError as exc:
            fail(InvalidInput(str(exc), field="OTEL_TRACES_EXPORTER"))
    with guard():
        service = create_app(store_url, settings, serving=True)
    scheme = "https" if settings.ssl_certfile else "http"
    base = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    mode = "auth on" if settings.auth else "auth off: X-Hivemem-Agent names the caller"
    typer.echo(
        f"hivemem serving {base} (console: {base}/ui; API docs: {base}/docs; "
        f"store: {redact_url(store_url)}; {mode})"
    )
    if settings.access_log:
        import logging
        import sys

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        lines = logging.getLogger("hivemem.access")
        lines.addHandler(handler)
        lines.setLevel(logging.INFO)
        lines.propagate = False
    uvicorn.run(
        service,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # the service's own line (hivemem.access) replaces uvicorn's
        loop="auto",
        http="auto",
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


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
    from hivemem.core import LocalHive
    from hivemem.service.app import redact_url

    url = store or Settings().store

    async def run() -> int:
        hive = hivemem.connect(url, agent="reindex")
        if not isinstance(hive, LocalHive):
            raise InvalidInput("reindex works on a local store (sqlite://...)", field="store")
        async with hive:
            with progress() as bar:
                task = bar.add_task("reindexing", total=None)

                def advance(scanned: int, done: int, total: int) -> None:
                    bar.update(task, completed=scanned, total=total)

                return await hive.reindex(batch=batch, progress=advance)

    with guard():
        done = anyio.run(run)
    typer.echo(f"reindexed {done} items in {redact_url(url)}")


StoreOpt = Annotated[
    str | None,
    typer.Option(
        show_default=False,
        help=f"Store URL (not http): the store the service serves. Default: env "
        f"HIVEMEM_STORE, else {DEFAULT_URL}.",
    ),
]


def _with_keys(store: str | None, work: Callable[[Any], Any]) -> Any:
    """Open the local store ``store``, run ``await work(KeyStore)``, close it; its result.

    Raises:
        typer.Exit: 2 when ``store`` is an http(s) URL or the store refuses (see
            :func:`~hivemem.cli.common.fail`).
    """
    from hivemem.core import LocalHive
    from hivemem.policy.keys import KeyStore

    settings = Settings()
    url = store or settings.store
    if url.split(":", 1)[0].lower() in ("http", "https"):
        fail(InvalidInput("agents commands need the store URL, not the service's", field="store"))

    async def run() -> Any:
        hive = hivemem.connect(
            url, agent="cli", settings=settings.model_copy(update={"embedder": "none"})
        )
        assert isinstance(hive, LocalHive)
        async with hive:
            await hive.ping()
            return await work(KeyStore(hive.backend, settings, cache_seconds=0))

    with guard():
        return anyio.run(run)


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
    err.print(
        f"added agent [bold]{escape(name)}[/] with roles "
        f"{', '.join(role or []) or '(none)'}; its key:"
    )
    typer.echo(key)


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
        err.print("no agents; add one with: hivemem agents add NAME --role writer")
        return
    table(
        ["name", "roles", "key ids", "created"],
        [
            [
                r.name,
                ", ".join(r.roles),
                ", ".join(r.keys),
                ts(datetime.fromtimestamp(r.created_at).astimezone()),
            ]
            for r in records
        ],
    )


def agents_revoke(
    name: Annotated[str, typer.Argument(help="Agent whose keys stop working.")],
    store: StoreOpt = None,
) -> None:
    """Remove an agent and every key it has. Replicas stop accepting its keys within
    auth_cache_seconds (5 s by default)."""
    if not _with_keys(store, lambda keys: keys.revoke(name, by="cli")):
        fail(NotFound(f"no agent {name!r}", field="name"))
    err.print(f"revoked agent [bold]{escape(name)}[/] and its keys")


def mcp(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="A hivemem service to act through (http://host:port). Default: the global "
            "--url, env HIVEMEM_URL.",
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="An embedded store to open instead (sqlite:///./hive.db, postgresql://..., "
            "redis://...).",
        ),
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Agent identity of the calls. Default: the global --agent (with --auth on "
            "the service, the API key's agent; env HIVEMEM_API_KEY).",
        ),
    ] = None,
) -> None:
    """Serve the hive's tools to an MCP client over stdio (for clients that start their
    server themselves: put this command in their configuration).

    Tools: memory_put/get/delete/list/search/history, session_create/append/get,
    publish, watch_since, task_submit, task_result, once_begin, once_end.
    Needs `pip install 'hivemem\\[mcp]'`. Nothing but the protocol is written to stdout;
    notes go to stderr.
    """
    import asyncio

    try:
        from hivemem.integrations.mcp import build_server
    except ImportError:
        err.print("[red]the MCP server needs the mcp package: pip install 'hivemem\\[mcp]'[/]")
        raise typer.Exit(2) from None
    base = root_options(ctx)
    target = store or url or base.url

    async def main() -> None:
        async with hivemem.connect(target, agent=agent or base.agent) as hive:
            await build_server(hive).run_stdio_async()

    with guard():
        asyncio.run(main())
