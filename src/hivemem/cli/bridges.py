"""Commands that forward the change feed to other systems: ``hivemem bridge sns``,
``hivemem bridge webhook`` and ``hivemem bridge redis-pubsub`` (:mod:`hivemem.bridges`).

Each command builds its sink from its own options; :func:`_bridge_command` gives it the
options every bridge shares (the hive, the consumer name, the prefix, where a first run
starts, the dead-letter file, retries, how often the cursor is recorded) and runs the
:class:`~hivemem.bridges.Bridge` until SIGTERM or Ctrl-C. ``hivemem.cli`` registers
:data:`app` as the ``bridge`` group.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import hivemem
from hivemem.cli.common import fail, guard, root_options
from hivemem.errors import CursorExpired, InvalidInput

if TYPE_CHECKING:  # hivemem.bridges loads when a bridge runs, not with every command
    from hivemem.bridges.base import Bridge, Sink

__all__ = ["app", "bridge_redis_pubsub", "bridge_sns", "bridge_webhook"]

EPILOG = (
    "[bold]Examples[/]\n\n"
    "  [cyan]hivemem --url sqlite:///hive.db bridge webhook https://example.com/hook "
    "--secret $SECRET --name crm --prefix orders --from-start[/]\n\n"
    "  [cyan]hivemem bridge sns --topic arn:aws:sns:eu-west-1:123456789012:hive "
    "--name to-sns --url http://hive:8765[/]\n\n"
    "  [cyan]hivemem bridge redis-pubsub --redis-url redis://cache:6379/0 --channel "
    "hive:events --name live[/]\n\n"
    "Delivery is at-least-once; each message carries an event id that is the same on "
    "every redelivery. See docs/bridges.md."
)

app = typer.Typer(
    help="Forward the hive's change feed to other systems (a webhook, an SNS topic, a Redis "
    "channel), as a durable consumer: it resumes from a cursor kept in the hive, retries, "
    "and writes events that fail for good to a dead-letter file.",
    epilog=EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
)

_Timeout = Annotated[
    float, typer.Option("--timeout", min=0.001, help="Seconds one delivery may take.")
]

#: The options every bridge command shares: (name, annotation, default).
_SHARED: list[tuple[str, Any, Any]] = [
    (
        "name",
        Annotated[
            str,
            typer.Option(
                "--name",
                help="The consumer's name: the key its cursor is kept under in the hive. "
                "Bridges of one name share a cursor; the newest takes it over.",
            ),
        ],
        inspect.Parameter.empty,
    ),
    (
        "prefix",
        Annotated[str, typer.Option(help="Namespace prefix to forward; empty: every one.")],
        "",
    ),
    (
        "from_start",
        Annotated[
            bool,
            typer.Option(
                "--from-start/--from-head",
                help="Where a first run (no stored cursor, or --reset) starts: at the oldest "
                "kept event, or at the feed's head (only new events).",
            ),
        ],
        False,
    ),
    (
        "reset",
        Annotated[
            bool,
            typer.Option(help="Discard the stored cursor; start as a first run does."),
        ],
        False,
    ),
    (
        "dead_letter",
        Annotated[
            Path | None,
            typer.Option(
                show_default=False,
                help="JSON Lines file for events that failed for good. Default: "
                "./bridge-<name>.dead-letter.jsonl.",
            ),
        ],
        None,
    ),
    (
        "max_attempts",
        Annotated[int, typer.Option(min=1, help="Tries per event before it is dead-lettered.")],
        8,
    ),
    (
        "backoff",
        Annotated[
            float,
            typer.Option(min=0, help="Seconds before the first retry; doubled at each one."),
        ],
        0.5,
    ),
    (
        "max_backoff",
        Annotated[float, typer.Option(min=0, help="Longest wait between retries (seconds).")],
        30.0,
    ),
    (
        "save_every",
        Annotated[
            int,
            typer.Option(
                min=1,
                max=1_000_000,
                help="Record the cursor after this many events (a crash delivers again at "
                "most this many, plus those in flight) ...",
            ),
        ],
        100,
    ),
    (
        "save_seconds",
        Annotated[
            float,
            typer.Option(min=0.001, help="... or this many seconds after the last record."),
        ],
        1.0,
    ),
    (
        "concurrency",
        Annotated[
            int,
            typer.Option(
                min=1, max=1000, help="Deliveries in flight at once; 1 keeps the feed's order."
            ),
        ],
        1,
    ),
    (
        "url",
        Annotated[
            str | None,
            typer.Option(
                show_default=False,
                help="Hive to follow: sqlite:///rel.db or http://host:port[,http://...]. "
                "Default: the global --url, env HIVEMEM_URL.",
            ),
        ],
        None,
    ),
    (
        "store",
        Annotated[
            str | None,
            typer.Option(
                show_default=False,
                help="An embedded store to open instead (sqlite:///./hive.db, "
                "postgresql://..., redis://...).",
            ),
        ],
        None,
    ),
    (
        "agent",
        Annotated[
            str | None,
            typer.Option(
                show_default=False,
                help="Agent identity of its cursor writes. Default: the global --agent, "
                "else bridge-<name>.",
            ),
        ],
        None,
    ),
    (
        "cursor_namespace",
        Annotated[
            str | None,
            typer.Option(
                show_default=False,
                help="Over http:// only: the namespace of the cursor item (never forwarded). "
                "Default: hivemem-bridges. An embedded store keeps it in _hivemem/bridges.",
            ),
        ],
        None,
    ),
]
_SHARED_PARAMS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
    for name, ann, default in _SHARED
] + [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]


def _bridge_command(make: Callable[..., Sink]) -> Callable[..., None]:
    """A bridge command from ``make(**its options) -> Sink``: it gains the shared options
    (see :data:`_SHARED`) and runs a :class:`~hivemem.bridges.Bridge` to that sink until
    SIGTERM or Ctrl-C, logging a line per cursor record on stderr. Errors become a red
    line and exit code 2 (:func:`~hivemem.cli.common.fail`)."""
    # The return annotation (Sink) is for type checkers; typer reads the parameters only.
    sig = inspect.signature(make, eval_str=True, locals={"Sink": object})
    params = list(sig.parameters.values()) + _SHARED_PARAMS

    @functools.wraps(make)
    def command(*args: Any, **kwargs: Any) -> None:
        shared = {name: kwargs.pop(name) for name, _, _ in _SHARED}
        ctx: typer.Context = kwargs.pop("ctx")
        base = root_options(ctx)
        name: str = shared["name"]
        agent = shared["agent"] or (base.agent if base.agent != "cli" else f"bridge-{name}"[:64])
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
        from hivemem.bridges.base import REMOTE_CURSORS, Bridge, Retry

        with guard():
            sink = make(*args, **kwargs)
            bridge = Bridge(
                hivemem.connect(shared["store"] or shared["url"] or base.url, agent=agent),
                sink,
                name=name,
                prefix=shared["prefix"],
                from_start=shared["from_start"],
                reset=shared["reset"],
                dead_letter=shared["dead_letter"] or Path(f"bridge-{name}.dead-letter.jsonl"),
                retry=Retry(shared["max_attempts"], shared["backoff"], shared["max_backoff"]),
                save_every=shared["save_every"],
                save_seconds=shared["save_seconds"],
                concurrency=shared["concurrency"],
                cursor_namespace=shared["cursor_namespace"] or REMOTE_CURSORS,
            )
            _run(bridge)

    command.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=None
    )
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _run(bridge: Bridge) -> None:
    """Run ``bridge`` until a signal stops it; close its hive.

    Raises:
        HivememError: what stopped it (a cursor taken over or expired, a store away).
    """
    import asyncio

    async def main() -> None:
        try:
            await bridge.run(handle_signals=True)
        finally:
            await bridge.hive.close()

    try:
        asyncio.run(main())
    except CursorExpired as exc:
        raise CursorExpired(
            f"{exc.message}; restart with --reset --from-start (replay what the feed still "
            "keeps) or --reset --from-head (new events only)",
            field="name",
        ) from None
    except OSError as exc:
        fail(InvalidInput(f"cannot write the dead-letter file: {exc}", field="dead_letter"))


def _headers(pairs: list[str] | None) -> dict[str, str]:
    """``--header 'Name: value'`` pairs as a dict.

    Raises:
        InvalidInput: a pair without ``:`` or without a name (field ``header``).
    """
    headers: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise InvalidInput(f"expected 'Name: value', got {pair!r}", field="header")
        headers[name.strip()] = value.strip()
    return headers


@_bridge_command
def bridge_webhook(
    endpoint: Annotated[
        str, typer.Argument(metavar="URL", help="The receiver: http(s)://host/path.")
    ],
    secret: Annotated[
        str,
        typer.Option(
            envvar="HIVEMEM_WEBHOOK_SECRET",
            show_default=False,
            help="HMAC key shared with the receiver (env HIVEMEM_WEBHOOK_SECRET keeps it out "
            "of the process list).",
        ),
    ],
    timeout: _Timeout = 10.0,
    header: Annotated[
        list[str] | None,
        typer.Option(show_default=False, help="Extra header 'Name: value' (repeatable)."),
    ] = None,
) -> Sink:
    """POST each event to URL as JSON, signed: headers X-Hivemem-Event-Id, X-Hivemem-Timestamp
    and X-Hivemem-Signature (sha256= HMAC of "<timestamp>.<body>" with --secret). 2xx is
    delivered; 408, 429, 5xx, timeouts and connection errors are retried; other answers
    send the event to the dead-letter file.

    [cyan]hivemem bridge webhook https://example.com/hook --secret $SECRET --name crm[/]
    """
    from hivemem.bridges.webhook import WebhookSink

    return WebhookSink(endpoint, secret, timeout_seconds=timeout, headers=_headers(header))


@_bridge_command
def bridge_sns(
    topic: Annotated[
        str,
        typer.Option(show_default=False, help="Topic ARN: arn:aws:sns:<region>:<account>:<name>."),
    ],
    region: Annotated[
        str | None, typer.Option(show_default=False, help="AWS region. Default: the ARN's.")
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(show_default=False, help="Another SNS endpoint (moto, LocalStack)."),
    ] = None,
    group_id: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="MessageGroupId on a .fifo topic. Default: the event's namespace.",
        ),
    ] = None,
    timeout: _Timeout = 10.0,
) -> Sink:
    """Publish each event to an SNS topic: the event as JSON, with message attributes
    event_id, event_type and namespace. Needs the aws extra (pip install 'hivemem\\[aws]')
    and sns:Publish on the topic; credentials from the usual AWS sources.

    [cyan]hivemem bridge sns --topic arn:aws:sns:eu-west-1:123456789012:hive --name to-sns[/]
    """
    from hivemem.bridges.sns import SnsSink

    return SnsSink(
        topic, region=region, endpoint_url=endpoint_url, timeout_seconds=timeout, group_id=group_id
    )


@_bridge_command
def bridge_redis_pubsub(
    redis_url: Annotated[
        str,
        typer.Option(show_default=False, help="Redis to publish on: redis://host:port/db."),
    ],
    channel: Annotated[str, typer.Option(help="Channel to publish on.")] = "hivemem:events",
    require_subscriber: Annotated[
        bool,
        typer.Option(help="Count a PUBLISH that reached no subscriber as failed (retried)."),
    ] = False,
    timeout: _Timeout = 5.0,
) -> Sink:
    """PUBLISH each event on a Redis channel as JSON (its "id" field is the event id).
    Pub/sub keeps nothing: only clients subscribed at that moment receive it.

    [cyan]hivemem bridge redis-pubsub --redis-url redis://cache:6379/0 --name live[/]
    """
    from hivemem.bridges.redis_pubsub import RedisPubSubSink

    return RedisPubSubSink(
        redis_url, channel, require_subscriber=require_subscriber, timeout_seconds=timeout
    )


app.command("webhook")(bridge_webhook)
app.command("sns")(bridge_sns)
app.command("redis-pubsub")(bridge_redis_pubsub)
