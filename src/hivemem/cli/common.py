"""What every command of the ``hivemem`` command line shares.

The consoles (stdout for results, stderr for messages), the top-level options and the
:class:`Run` a client command works with, the :func:`client` wrapper that gives a
command --url, --agent and --json, the one place a
:class:`~hivemem.errors.HivememError` becomes a red line and an exit code
(:func:`fail`), and small parsing and rendering helpers.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic_core import to_json
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

import hivemem
from hivemem.errors import Conflict, HivememError, NotFound
from hivemem.models import Page
from hivemem.sync import SyncHive

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "DEFAULT_URL",
    "AgentOpt",
    "JsonOpt",
    "Limit",
    "Options",
    "Run",
    "UrlOpt",
    "client",
    "err",
    "fail",
    "guard",
    "loading_model",
    "out",
    "pages",
    "parse",
    "preview",
    "progress",
    "root_options",
    "table",
    "ts",
]

T = TypeVar("T")

#: The hive every command uses unless --url, HIVEMEM_URL or HIVEMEM_STORE names another.
DEFAULT_URL = hivemem.DEFAULT_URL

#: Results (tables, values, JSON documents) go to stdout ...
out = Console(highlight=False)
#: ... and messages (errors, progress, hints) to stderr, so stdout can be piped.
err = Console(stderr=True, highlight=False)

Limit = Annotated[int, typer.Option(min=1, help="Most records to return.")]


@dataclass(frozen=True)
class Options:
    """The options of the top-level command, defaults for every client command."""

    url: str = DEFAULT_URL
    agent: str = "cli"
    json: bool = False


def root_options(ctx: typer.Context) -> Options:
    """The top-level options of the running command (their defaults outside ``hivemem``)."""
    root = ctx.find_root().obj
    return root if isinstance(root, Options) else Options()


@dataclass
class Run:
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


def fail(exc: HivememError) -> NoReturn:
    """Print ``exc`` as one red line on stderr and end the command.

    A :class:`~hivemem.errors.Conflict` states the version it found once: the stores'
    messages already say it ("is at version 3, not 2"), so it is added only to a message
    that does not.

    Raises:
        typer.Exit: code 1 for :class:`~hivemem.errors.NotFound`, 2 for any other error.
    """
    detail = f" (field: {exc.field})" if exc.field else ""
    current = exc.current_version if isinstance(exc, Conflict) else None
    if current is not None and not re.search(rf"\bversion {current}\b", exc.message):
        detail += f" (current version: {current})"
    err.print(f"[red]error:[/] {escape(exc.message + detail)}", soft_wrap=True)
    raise typer.Exit(1 if isinstance(exc, NotFound) else 2)


@contextmanager
def guard() -> Iterator[None]:
    """Turn a HivememError raised inside the block into :func:`fail` (typer.Exit)."""
    try:
        yield
    except HivememError as exc:
        fail(exc)


@contextmanager
def loading_model(run: Run, embeds: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Show "loading the search model…" on stderr while the block runs, when it will load
    the MiniLM model of an embedded hive (1-1.5 s at its first use) and stderr is a
    terminal. ``embeds()``: whether the call embeds any text (asked only then). The
    library itself loads the model silently; only the command line shows this, and never
    on stdout.
    """
    embedder = getattr(run.hive.hive, "embedder", None) if err.is_terminal else None
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
    with Live(spinner, console=err, transient=True, redirect_stdout=False, redirect_stderr=False):
        yield


def progress() -> Progress:
    """A progress display on stderr: description, bar, done/total and time remaining."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    )


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


def client(func: Callable[..., None]) -> Callable[..., None]:
    """Make ``func(run, ...)`` a client command, to register with ``group.command(name)``.

    The command gains --url, --agent and --json (falling back to the top-level options);
    ``run`` is a :class:`Run` whose hive opens on first use and closes when the command
    ends; any HivememError raised meanwhile is printed by :func:`fail`.
    """
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
        base = root_options(ctx)
        run = Run(url or base.url, agent or base.agent, as_json or base.json)
        with guard():
            try:
                func(run, *args, **kwargs)
            finally:
                if "hive" in run.__dict__:
                    run.hive.close()

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def parse(raw: str) -> Any:
    """``raw`` as JSON when it parses, otherwise the string itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def pages(
    fetch: Callable[[str | None], Page[T]], cursor: str | None = None, every: bool = True
) -> tuple[list[T], str | None]:
    """One page from ``cursor``, or every page when ``every``; returns (items, next cursor)."""
    page = fetch(cursor)
    items = list(page.items)
    while every and page.next_cursor:
        page = fetch(page.next_cursor)
        items.extend(page.items)
    return items, page.next_cursor


def ts(at: datetime | None) -> str:
    """A timestamp to the second (``2024-05-01 12:00:00Z``), or an empty string for None."""
    return at.strftime("%Y-%m-%d %H:%M:%SZ") if at else ""


def preview(value: Any, width: int = 60) -> str:
    """``value`` on one line (strings raw, others compact JSON), cut to ``width`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """Print a table on stdout; cells are shown literally (no rich markup), None as empty.

    The first column (the key, id or name a user copies into the next command) is never
    cut or wrapped, up to 64 characters; the others share what width is left."""
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    first = min(64, max([len(columns[0]), *(len(row[0]) for row in cells if row)]))
    shown = Table(
        Column(columns[0], no_wrap=True, min_width=first),
        *columns[1:],
        title=title,
        header_style="bold",
    )
    for row in cells:
        shown.add_row(*(Text(cell) for cell in row))
    out.print(shown)
