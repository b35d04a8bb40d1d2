"""``hivemem top``: the live figures of one or several replicas, read from their
``/metrics``.

Each refresh scrapes every replica (in threads, ``timeout`` seconds each) and shows, per
replica and in total, what moved since the previous scrape: requests and 5xx answers per
second, mean request time, store calls and store errors per second, CPU (% of a core),
resident memory, open watches, and the task queues' ready / running / dead counts (the
store's, so the total row shows one replica's figures, not a sum).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["Sample", "scrape", "top"]


@dataclass
class Sample:
    """What one scrape of one replica read (``error`` set when it could not)."""

    url: str
    at: float = 0.0
    requests: float = 0.0
    errors_5xx: float = 0.0
    request_seconds: float = 0.0
    request_count: float = 0.0
    store_calls: float = 0.0
    store_errors: float = 0.0
    cpu_seconds: float = 0.0
    rss_bytes: float = 0.0
    watchers: float = 0.0
    tasks: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def parse(url: str, text: str, at: float) -> Sample:
    """The figures of one exposition."""
    s = Sample(url, at)
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            name, labels, value = m.name, m.labels, m.value
            if name == "hivemem_http_requests_total":
                s.requests += value
                if labels.get("status", "").startswith("5"):
                    s.errors_5xx += value
            elif name == "hivemem_http_request_duration_seconds_sum":
                s.request_seconds += value
            elif name == "hivemem_http_request_duration_seconds_count":
                s.request_count += value
            elif name == "hivemem_store_operation_duration_seconds_count":
                s.store_calls += value
            elif name == "hivemem_store_errors_total":
                s.store_errors += value
            elif name == "process_cpu_seconds_total":
                s.cpu_seconds = value
            elif name == "process_resident_memory_bytes":
                s.rss_bytes = value
            elif name == "hivemem_feed_watchers":
                s.watchers = value
            elif name == "hivemem_tasks":
                state = labels.get("state", "")
                s.tasks[state] = s.tasks.get(state, 0.0) + value
    return s


def scrape(url: str, api_key: str | None, timeout: float) -> Sample:
    """One replica's ``/metrics`` (``url`` is its base URL)."""
    request = urllib.request.Request(url.rstrip("/") + "/metrics")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return Sample(url, time.monotonic(), error=f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:
        return Sample(url, time.monotonic(), error=type(exc).__name__)
    return parse(url, text, time.monotonic())


def _rate(new: float, old: float, seconds: float) -> float:
    return max(0.0, new - old) / seconds if seconds > 0 else 0.0


def table(before: list[Sample], after: list[Sample]) -> Table:
    """The figures between two rounds of scrapes."""
    t = Table(title="hivemem top", title_justify="left")
    for name in ("replica", "req/s", "5xx/s", "mean ms", "store/s", "store err/s", "cpu %",
                 "rss MiB", "watches", "ready", "running", "dead"):  # fmt: skip
        t.add_column(name, justify="left" if name == "replica" else "right")
    totals = [0.0] * 7
    queues: dict[str, float] = {}
    for old, new in zip(before, after, strict=True):
        if new.error is not None or old.error is not None:
            t.add_row(new.url, f"[red]{new.error or old.error}", *[""] * 10)
            continue
        dt = new.at - old.at
        count = new.request_count - old.request_count
        mean = (new.request_seconds - old.request_seconds) / count * 1000 if count > 0 else 0.0
        row = [
            _rate(new.requests, old.requests, dt),
            _rate(new.errors_5xx, old.errors_5xx, dt),
            _rate(new.store_calls, old.store_calls, dt),
            _rate(new.store_errors, old.store_errors, dt),
            _rate(new.cpu_seconds, old.cpu_seconds, dt) * 100,
            new.rss_bytes / 2**20,
            new.watchers,
        ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        for state, value in new.tasks.items():
            queues[state] = max(queues.get(state, 0.0), value)
        t.add_row(
            new.url,
            f"{row[0]:,.1f}",
            f"{row[1]:,.2f}",
            f"{mean:,.2f}",
            f"{row[2]:,.1f}",
            f"{row[3]:,.2f}",
            f"{row[4]:,.0f}",
            f"{row[5]:,.0f}",
            f"{row[6]:,.0f}",
            *(f"{new.tasks.get(s, 0):,.0f}" for s in ("ready", "running", "dead")),
        )
    if len(after) > 1:
        t.add_row(
            "[bold]all",
            f"{totals[0]:,.1f}",
            f"{totals[1]:,.2f}",
            "",
            f"{totals[2]:,.1f}",
            f"{totals[3]:,.2f}",
            f"{totals[4]:,.0f}",
            f"{totals[5]:,.0f}",
            f"{totals[6]:,.0f}",
            *(f"{queues.get(s, 0):,.0f}" for s in ("ready", "running", "dead")),
        )
    return t


def _round(
    pool: ThreadPoolExecutor, urls: Iterable[str], key: str | None, timeout: float
) -> list[Sample]:
    return list(pool.map(lambda u: scrape(u, key, timeout), urls))


def top(
    url: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Replica base URLs, comma-separated. Default: env HIVEMEM_URL, else "
            "http://127.0.0.1:8765.",
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option(min=0.2, max=3600, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[
        bool,
        typer.Option("--once", help="Print one table (two scrapes, INTERVAL apart) and exit."),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, max=60, help="Seconds to wait for each /metrics.")
    ] = 3.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="HIVEMEM_API_KEY",
            show_default=False,
            help="With --auth on the service: a key whose agent has the role metrics or admin.",
        ),
    ] = None,
) -> None:
    """Live figures of hivemem replicas from their /metrics: requests, errors, latency,
    store calls, CPU, memory, watches and task queues; Ctrl-C to stop."""
    raw = url or os.environ.get("HIVEMEM_URL") or "http://127.0.0.1:8765"
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    console = Console()
    with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
        before = _round(pool, urls, api_key, timeout)
        if all(s.error is not None for s in before):
            console.print(
                "[red]no replica answered /metrics: "
                + ", ".join(f"{s.url} ({s.error})" for s in before)
            )
            raise typer.Exit(1)
        if once:
            time.sleep(interval)
            console.print(table(before, _round(pool, urls, api_key, timeout)))
            return
        try:
            with Live(table(before, before), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    after = _round(pool, urls, api_key, timeout)
                    live.update(table(before, after))
                    before = after
        except KeyboardInterrupt:
            return
