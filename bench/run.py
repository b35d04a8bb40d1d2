"""hivemem benchmark runner.

Usage::

    python bench/run.py [--quick] [--json PATH] [--only NAME,...] [--duration SECONDS]
                        [--keys N] [--watch-rate PUTS_PER_S] [--markdown PATH]
                        [--server-log-level info|warning] [--keep-tmp]

Sections (names for ``--only``):

    embedded  LocalHive get/put over a SQLite file: async (one task) and SyncHive
    sqlite    raw sqlite3 select/upsert on a comparable table (the floor)
    service   ``hivemem serve`` under 32 concurrent clients: RemoteHive and raw aiohttp
    minimal   a minimal FastAPI dict endpoint under the same clients (the HTTP floor)
    wrk       wrk GET against the minimal endpoint and our GET /v1/items route
    watch     write-to-event latency of watch(): embedded (2 processes) and service
    writes    embedded puts of text items (default deferred vectors with and without the
              indexer in the process, index_mode=sync, embedder=none; 1 and 8 callers)
              beside raw sqlite3 upserts from 1 and 8 threads, and put-to-vector latency
              while writing 200 items/s

Each section prints its figures; a final table puts ours beside the baselines with
ratios, and every figure is written as JSON (default ``bench/results/latest.json``).
All traffic stays on 127.0.0.1; every subprocess is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import Procs, Result  # noqa: E402
from embedded import bench_embedded, bench_sqlite  # noqa: E402
from http_bench import CLIENTS, Servers, bench_minimal, bench_service, bench_wrk  # noqa: E402
from watch_latency import VARIANTS as WATCH_VARIANTS  # noqa: E402
from watch_latency import bench_watch  # noqa: E402
from writes import bench_writes  # noqa: E402

SECTIONS = ("embedded", "sqlite", "service", "minimal", "wrk", "watch", "writes")

#: The final table: (ours, baseline, what the ratio shows, which CPU figure to compare).
#: CPU kinds: "cpu" = cpu_ms_per_op (this process, or the server), "client" =
#: client_cpu_ms_per_op (the load generator), "total" = both added.
COMPARISONS: list[tuple[str, str, str, str]] = [
    ("embedded.async.get", "sqlite.get", "embedded overhead", "cpu"),
    ("embedded.async.put", "sqlite.put", "embedded overhead", "cpu"),
    ("embedded.sync.get", "sqlite.get", "embedded overhead", "cpu"),
    ("embedded.sync.put", "sqlite.put", "embedded overhead", "cpu"),
    ("embedded.async.get", "sqlite.thread.get", "vs one thread hop", "cpu"),
    ("embedded.sync.get", "embedded.async.get", "SyncHive vs async get", "cpu"),
    ("service.remote.get", "minimal.aiohttp.get", "whole stack vs floor", "total"),
    ("service.remote.put", "minimal.aiohttp.put", "whole stack vs floor", "total"),
    ("service.aiohttp.get", "minimal.aiohttp.get", "server overhead", "cpu"),
    ("service.aiohttp.put", "minimal.aiohttp.put", "server overhead", "cpu"),
    ("service.wrk.get", "minimal.wrk.get", "server overhead (wrk)", "cpu"),
    ("service.remote.get", "service.aiohttp.get", "client overhead", "client"),
    ("service.remote.put", "service.aiohttp.put", "client overhead", "client"),
    ("minimal.remote.get", "minimal.aiohttp.get", "client overhead", "client"),
    ("minimal.remote.put", "minimal.aiohttp.put", "client overhead", "client"),
    ("minimal.aiohttp.get", "minimal.wrk.get", "python client vs wrk", "client"),
    ("writes.default.1", "writes.raw.1", "text put, default, writer only vs floor", "cpu"),
    ("writes.default.8", "writes.raw.8", "text put, default, writer only vs floor", "cpu"),
    ("writes.indexing.1", "writes.raw.1", "text put, indexer in process vs floor", "cpu"),
    ("writes.indexing.8", "writes.raw.8", "text put, indexer in process vs floor", "cpu"),
    ("writes.sync.1", "writes.raw.1", "text put, index_mode=sync vs floor", "cpu"),
    ("writes.none.1", "writes.raw.1", "put, embedder=none vs floor", "cpu"),
    ("writes.none.8", "writes.raw.8", "put, embedder=none vs floor", "cpu"),
    ("writes.synchive.1", "writes.raw.1", "text put, SyncHive, default vs floor", "cpu"),
    ("writes.job.1", "writes.raw.1", "the store's put job alone vs floor", "cpu"),
    ("writes.synchive.1", "writes.job.1", "text put, SyncHive vs the store's job alone", "cpu"),
    ("writes.synchive.1", "writes.langgraph-sqlite.1", "text put, SyncHive vs LangGraph", "cpu"),
    ("writes.none.1", "writes.langgraph-sqlite.1", "put, embedder=none vs LangGraph", "cpu"),
    ("writes.default.1", "writes.langgraph-sqlite.1", "text put, default vs LangGraph", "cpu"),
    ("writes.postgres.8", "writes.postgres-raw.8", "PostgreSQL put vs raw psycopg", "cpu"),
    ("writes.postgres.8", "writes.langgraph-postgres.8", "PostgreSQL put vs LangGraph", "cpu"),
    ("writes.redis.8", "writes.redis-raw.8", "Redis put vs raw redis-py SET", "cpu"),
]
LATENCY_ONLY = [
    "watch.embedded",
    "watch.service",
    "writes.indexed",
    "writes.bytes",
    "writes.vectors.memory",
    "writes.vectors.search",
]

console = Console(width=200)


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _cpu(r: Result, kind: str) -> float | None:
    if kind == "cpu":
        return r.cpu_ms_per_op
    if kind == "client":
        return r.client_cpu_ms_per_op
    if r.cpu_ms_per_op is None or r.client_cpu_ms_per_op is None:
        return None
    return r.cpu_ms_per_op + r.client_cpu_ms_per_op


def print_results(title: str, results: list[Result]) -> None:
    """One rich table of a section's figures."""
    t = Table(title=title, title_justify="left")
    cols = ["figure", "name", "conc", "ops", "err", "ops/s", "p50 ms", "p90 ms", "p99 ms"]
    cols += ["max ms", "cpu ms/op", "client cpu ms/op"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("figure", "name") else "right")
    for r in results:
        t.add_row(
            r.label,
            r.name,
            str(r.concurrency),
            f"{r.ops:,}",
            str(r.errors),
            _fmt_rate(r.ops_per_s),
            _fmt_ms(r.p50_ms),
            _fmt_ms(r.p90_ms),
            _fmt_ms(r.p99_ms),
            _fmt_ms(r.max_ms),
            _fmt_ms(r.cpu_ms_per_op),
            _fmt_ms(r.client_cpu_ms_per_op),
        )
    console.print(t)
    for r in results:
        if r.extra.get("first_error"):
            console.print(f"  [red]{r.name}: {r.errors} errors, first: {r.extra['first_error']}")


def comparisons(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The final table's rows.

    ``ratio`` = ours ops/s ÷ baseline ops/s (below 1: we are slower);
    ``cpu_ratio`` = ours CPU per op ÷ baseline CPU per op (above 1: we cost more).
    """
    rows: list[dict[str, Any]] = []
    for ours, base, what, kind in COMPARISONS:
        a, b = results.get(ours), results.get(base)
        if a is None or b is None:
            continue
        ca, cb = _cpu(a, kind), _cpu(b, kind)
        rows.append(
            {
                "ours": ours,
                "baseline": base,
                "meaning": what,
                "ours_ops_per_s": round(a.ops_per_s, 1),
                "ours_p50_ms": a.p50_ms,
                "ours_p99_ms": a.p99_ms,
                "baseline_ops_per_s": round(b.ops_per_s, 1),
                "baseline_p50_ms": b.p50_ms,
                "baseline_p99_ms": b.p99_ms,
                "ratio": round(a.ops_per_s / b.ops_per_s, 4) if b.ops_per_s else None,
                "cpu_kind": kind,
                "ours_cpu_ms_per_op": None if ca is None else round(ca, 4),
                "baseline_cpu_ms_per_op": None if cb is None else round(cb, 4),
                "cpu_ratio": round(ca / cb, 4) if ca is not None and cb else None,
            }
        )
    return rows


def _summary_rows(results: dict[str, Result], rows: list[dict[str, Any]]) -> list[list[str]]:
    out: list[list[str]] = []
    for row in rows:
        ratio, cpu_ratio = row["ratio"], row["cpu_ratio"]
        out.append(
            [
                results[row["ours"]].label,
                _fmt_rate(row["ours_ops_per_s"]),
                _fmt_ms(row["ours_p50_ms"]),
                _fmt_ms(row["ours_p99_ms"]),
                results[row["baseline"]].label,
                _fmt_rate(row["baseline_ops_per_s"]),
                _fmt_ms(row["baseline_p50_ms"]),
                _fmt_ms(row["baseline_p99_ms"]),
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if cpu_ratio is None else f"{cpu_ratio:.2f}x ({row['cpu_kind']})",
                row["meaning"],
            ]
        )
    for name in LATENCY_ONLY:
        r = results.get(name)
        if r is not None:
            out.append(
                [
                    r.label,
                    f"{r.extra['rate_per_s']:,.0f} w/s" if "rate_per_s" in r.extra else "-",
                    _fmt_ms(r.p50_ms),
                    _fmt_ms(r.p99_ms),
                    *["-"] * 6,
                    r.extra.get("meaning")
                    or f"write-to-event latency; missed {r.extra.get('missed')}",
                ]
            )
    return out


SUMMARY_COLUMNS = [
    "ours",
    "ops/s",
    "p50 ms",
    "p99 ms",
    "baseline",
    "base ops/s",
    "base p50",
    "base p99",
    "ops/s ratio",
    "CPU/op ratio",
    "what it shows",
]


def print_final(results: dict[str, Result], rows: list[dict[str, Any]]) -> None:
    """The summary table: ours beside its baseline, throughput and CPU ratios."""
    t = Table(
        title="Summary: ops/s ratio = ours ÷ baseline (<1 slower); "
        "CPU/op ratio = ours ÷ baseline (>1 costlier)",
        title_justify="left",
    )
    for col in SUMMARY_COLUMNS:
        left = col in ("ours", "baseline", "what it shows")
        t.add_column(col, justify="left" if left else "right")
    for cells in _summary_rows(results, rows):
        t.add_row(*cells)
    console.print(t)


def markdown_summary(results: dict[str, Result], rows: list[dict[str, Any]]) -> str:
    """The summary table, then every figure, as GitHub Markdown (for bench/README.md)."""
    left = ("ours", "baseline", "what it shows", "figure", "name")

    def table(columns: list[str], body: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(columns) + " |"]
        out.append("|" + "|".join("---" if c in left else "---:" for c in columns) + "|")
        out += ["| " + " | ".join(cells) + " |" for cells in body]
        return out

    every = [
        [
            r.label,
            f"`{r.name}`",
            str(r.concurrency),
            _fmt_rate(r.ops_per_s),
            _fmt_ms(r.p50_ms),
            _fmt_ms(r.p99_ms),
            _fmt_ms(r.cpu_ms_per_op),
            _fmt_ms(r.client_cpu_ms_per_op),
            str(r.errors),
        ]
        for r in results.values()
    ]
    lines = table(SUMMARY_COLUMNS, _summary_rows(results, rows))
    lines += ["", "All figures:", ""]
    lines += table(
        [
            "figure",
            "name",
            "conc",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "cpu ms/op",
            "client cpu ms/op",
            "err",
        ],
        every,
    )
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: CPUs, Python, library versions."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in (
        "hivemem",
        "fastapi",
        "starlette",
        "uvicorn",
        "aiohttp",
        "pydantic",
        "orjson",
        "uvloop",
        "httptools",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["sqlite"] = sqlite3.sqlite_version
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        versions["wrk"] = (out.stdout + out.stderr).strip().splitlines()[0]
    return {
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description="hivemem benchmarks (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="about 30 s in all (1 s per figure)")
    p.add_argument(
        "--json",
        type=Path,
        default=BENCH_DIR / "results" / "latest.json",
        help="where to write every figure as JSON (default: %(default)s)",
    )
    p.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per figure (default 5, --quick 1)",
    )
    p.add_argument("--keys", type=int, default=1000, help="key count (default %(default)s)")
    p.add_argument(
        "--watch-rate",
        type=float,
        default=200.0,
        help="puts per second of the watch writer (default %(default)s)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the summary and all figures as Markdown tables",
    )
    p.add_argument(
        "--server-log-level",
        default="info",
        choices=["info", "warning"],
        help="uvicorn log level of both servers: info (hivemem serve's default, one access-log "
        "line per request) or warning (no access log); default %(default)s",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (databases, logs)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = set(a.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if a.duration is None:
        a.duration = 1.0 if a.quick else 5.0
    if not 0.1 <= a.duration <= 600:
        p.error("--duration must be within 0.1..600 seconds")
    if not 1 <= a.keys <= 1_000_000:
        p.error("--keys must be within 1..1000000")
    if not 1 <= a.watch_rate <= 10_000:
        p.error("--watch-rate must be within 1..10000 puts per second")
    a.warmup = min(1.0, a.duration * 0.2)
    return a


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; returns the process exit code (1 if a section failed).

    The temporary directory (databases, server logs) is removed at the end unless a
    section failed or ``--keep-tmp`` was given; an interrupted run removes it too.
    """
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="hivemem-bench-"))
    keep = args.keep_tmp
    try:
        code, keep = _run(args, tmp)
    except (KeyboardInterrupt, SystemExit):
        console.print("[yellow]interrupted; every subprocess was stopped")
        raise
    finally:
        if keep:
            console.print(f"kept {tmp} (databases and server logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


def _run(args: argparse.Namespace, tmp: Path) -> tuple[int, bool]:
    """The body of :func:`main`; returns (exit code, whether to keep ``tmp``)."""
    started = time.perf_counter()
    info = machine_info()
    console.print(
        f"[bold]hivemem bench[/] sections={','.join(args.sections)} duration={args.duration}s "
        f"warmup={args.warmup}s keys={args.keys} clients={CLIENTS} tmp={tmp}\n"
        f"nproc={info['nproc']} python={info['python']} cpu={info['cpu_model']!r} "
        f"load average={info['loadavg_start']}"
    )
    results: dict[str, Result] = {}
    failures: dict[str, str] = {}
    notes: list[str] = []
    if info["loadavg_start"][0] > 0.5 * (info["nproc"] or 1):
        notes.append(
            f"the machine was busy at the start (1-min load average {info['loadavg_start'][0]} "
            f"on {info['nproc']} CPUs): ops/s figures are unreliable, CPU per op less so"
        )
        console.print(f"[yellow]warning: {notes[-1]}")
    d, w, k = args.duration, args.warmup, args.keys

    def record(title: str, rs: list[Result]) -> None:
        for r in rs:
            results[r.name] = r
        print_results(title, rs)

    with Procs(tmp) as procs:
        servers = Servers(procs, tmp, args.server_log_level)
        steps: list[tuple[str, str, Any]] = [
            (
                "embedded",
                "1. embedded (LocalHive over sqlite file)",
                lambda: bench_embedded(tmp, k, d, w),
            ),
            (
                "sqlite",
                "2. raw sqlite3 (WAL, synchronous=FULL), same process and dir",
                lambda: bench_sqlite(tmp, k, d, w),
            ),
            (
                "service",
                f"3. service (hivemem serve, sqlite), {CLIENTS} concurrent clients",
                lambda: bench_service(servers, k, d, w),
            ),
            (
                "minimal",
                f"4. minimal FastAPI dict endpoint, {CLIENTS} concurrent clients",
                lambda: bench_minimal(servers, k, d, w),
            ),
            (
                "writes",
                "6. writes: text puts beside raw sqlite3 upserts; put-to-vector latency",
                lambda: bench_writes(tmp, d, w),
            ),
        ]
        try:
            for name, title, fn in steps:
                if name not in args.sections:
                    continue
                console.rule(title)
                try:
                    record(title, fn())
                except Exception:
                    failures[name] = traceback.format_exc()
                    console.print(f"[red]section {name} failed:\n{failures[name]}")
            if "wrk" in args.sections:
                title = f"4b. wrk GET, {CLIENTS} connections, 1 thread"
                console.rule(title)
                try:
                    rs, skipped = bench_wrk(servers, k, d)
                    if skipped:
                        notes.append(skipped)
                        console.print(f"[yellow]skipped: {skipped}")
                    else:
                        record(title, rs)
                except Exception:
                    failures["wrk"] = traceback.format_exc()
                    console.print(f"[red]section wrk failed:\n{failures['wrk']}")
            if "watch" in args.sections:
                title = f"5. watch latency, writer at {args.watch_rate:.0f} puts/s"
                console.rule(title)
                for name, label in WATCH_VARIANTS:
                    try:
                        url = (
                            f"sqlite:///{tmp / 'watch.db'}"
                            if name == "embedded"
                            else servers.service()
                        )
                        rs = bench_watch(procs, url, name, label, tmp, max(1.0, d), args.watch_rate)
                        record(f"{title}: {name}", rs)
                    except Exception:
                        failures[f"watch.{name}"] = traceback.format_exc()
                        console.print(f"[red]watch {name} failed:\n{failures[f'watch.{name}']}")
        finally:
            procs.stop_all()
        service_cmd = " ".join(servers.service_cmd)
        minimal_cmd = " ".join(servers.minimal_cmd)

    rows = comparisons(results)
    console.rule("Summary")
    print_final(results, rows)
    elapsed = time.perf_counter() - started
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": {
            "duration_s": d,
            "warmup_s": w,
            "keys": k,
            "clients": CLIENTS,
            "watch_rate_per_s": args.watch_rate,
            "server_log_level": args.server_log_level,
            "sections": args.sections,
        },
        "machine": {**info, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "servers": {"service": service_cmd, "minimal": minimal_cmd},
        "results": {name: r.to_json() for name, r in results.items()},
        "comparisons": rows,
        "notes": notes,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json} ({elapsed:.0f} s)")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_summary(results, rows))
        console.print(f"wrote {args.markdown}")
    return (1 if failures else 0), bool(failures or args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main())
