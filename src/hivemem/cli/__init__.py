"""The ``hivemem`` command line: run the service, and read and write a hive from a shell.

Every client command opens the hive that ``--url`` names (a ``sqlite:///`` file or an
``http://`` service), acts as ``--agent``, and prints a rich rendering for people or,
with ``--json``, one JSON document for programs (``watch``: one JSON object per line).
A :class:`~hivemem.errors.HivememError` becomes one red line on stderr and exit code 2
(1 for :class:`~hivemem.errors.NotFound`); user errors never print a traceback.

The commands live in one module per audience: :mod:`~hivemem.cli.items` (items and the
feed), :mod:`~hivemem.cli.sessions`, :mod:`~hivemem.cli.coordination` (tasks, workers,
the agent registry), :mod:`~hivemem.cli.operations` (serving, reindexing, API keys) and
:mod:`~hivemem.cli.eval`; :mod:`~hivemem.cli.common` holds what they share. This module
builds the command tree from them, in the order ``hivemem --help`` lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from hivemem.cli import bridges, coordination, items, operations, sessions, top
from hivemem.cli.common import DEFAULT_URL, Options
from hivemem.cli.eval import eval_locomo

__all__ = ["app", "main"]

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


def _group(description: str) -> typer.Typer:
    return typer.Typer(help=description, rich_markup_mode="rich", no_args_is_help=True)


session_app = _group("Create, inspect and append to conversation sessions.")
eval_app = _group("Measure retrieval quality on public benchmarks.")
agents_app = _group(
    "Manage agent identities and their API keys (stored, hashed, in the store itself, "
    "so every replica sees them). Used by `hivemem serve --auth`."
)
tasks_app = _group(
    "Inspect and operate task queues: list, show, stats, requeue dead tasks, cancel."
)

#: Every command: its group, its name, its function; each group lists them in this order.
_COMMANDS: list[tuple[typer.Typer, str, Callable[..., Any]]] = [
    (app, "serve", operations.serve),
    (app, "put", items.put),
    (app, "get", items.get),
    (app, "ls", items.list_items),
    (app, "ns", items.namespaces),
    (app, "rm", items.remove),
    (app, "history", items.history),
    (app, "watch", items.watch),
    (app, "search", items.search),
    (app, "index", items.index),
    (app, "reindex", operations.reindex),
    (app, "publish", items.publish),
    (app, "worker", coordination.worker),
    (app, "mcp", operations.mcp),
    (app, "top", top.top),
    (session_app, "create", sessions.session_create),
    (session_app, "get", sessions.session_get),
    (session_app, "ls", sessions.session_list),
    (session_app, "rm", sessions.session_remove),
    (session_app, "append", sessions.session_append),
    (session_app, "messages", sessions.session_messages),
    (session_app, "state", sessions.session_state),
    (session_app, "export", sessions.session_export),
    (session_app, "import", sessions.session_import),
    (eval_app, "locomo", eval_locomo),
    (agents_app, "add", operations.agents_add),
    (agents_app, "ls", operations.agents_list),
    (agents_app, "revoke", operations.agents_revoke),
    (agents_app, "status", coordination.agents_status),
    (tasks_app, "ls", coordination.tasks_list),
    (tasks_app, "show", coordination.tasks_show),
    (tasks_app, "stats", coordination.tasks_stats),
    (tasks_app, "requeue", coordination.tasks_requeue),
    (tasks_app, "cancel", coordination.tasks_cancel),
]
for _group_app, _name, _command in _COMMANDS:
    _group_app.command(_name)(_command)
app.add_typer(session_app, name="session")
app.add_typer(eval_app, name="eval")
app.add_typer(agents_app, name="agents")
app.add_typer(tasks_app, name="tasks")
app.add_typer(bridges.app, name="bridge")


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
    ctx.obj = Options(url, agent, as_json)


def main() -> None:
    """Entry point of the ``hivemem`` command: parse ``sys.argv`` and run the command.

    Exits the process: 0 on success, 1 when what was asked for is absent, 2 on a usage or
    input error.
    """
    app()
