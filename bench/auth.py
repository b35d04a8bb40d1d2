"""What a layer of the service costs, on vs off: the trust layer (authentication + a
permission policy + rate limits; ``--layer auth``, the default) or telemetry (the
Prometheus metrics: every request and store call counted and timed; ``--layer
telemetry``).

Usage::

    python bench/auth.py                       # 2 rounds x GET,PUT x on,off, 5 s each: ~1.5 min
    python bench/auth.py --quick               # 1 s per figure
    python bench/auth.py --duration 10 --rounds 2 --json /tmp/auth.json
    python bench/auth.py --layer telemetry     # metrics on (the default) vs metrics=false

``--layer telemetry``: both services run ``--no-auth`` and name their agent with
``X-Hivemem-Agent``; "on" has the default settings (metrics on, GET /metrics answers),
"off" adds ``--set metrics=false`` (no request or store timing, /metrics is 404), which
each side is checked for before measuring. The target ratio is 0.95 (the cost at most
5 %); the rest below describes the trust layer's run, which is otherwise the same.

Two ``hivemem serve`` subprocesses run side by side for the whole run, each over its
own SQLite file in a temporary directory, both with ``HIVEMEM_EMBEDDER=none`` (the
trust layer is measured, not embedding):

* **on**: ``--auth --policy <tmp>/policy.toml --rate-limit-store memory:// --set
  rate_limit_read=1000000/second --set rate_limit_write=1000000/second``. Its agents
  (``--agents``, default 8: ``agent0`` ..) are made beforehand with ``python -m hivemem
  agents add agentN --role bench --store sqlite:///<tmp>/on.db``, whose last stdout line
  is the API key. ``bench`` is not a built-in role, so only the policy grants access::

      [[rules]]
      actions = ["read", "write", "search", "watch", "publish", "sessions"]
      namespaces = ["bench/{agent}/**"]
      agents = ["*"]

  The limits are far above what the machine can do, so they never refuse a request, but
  every request is counted (one sliding-window hit on the in-process storage).
  Requests carry ``Authorization: Bearer <key>``. The API-key cache keeps its default
  (``auth_cache_seconds`` = 5 s), so each key is looked up in the store again every 5 s.
* **off**: ``--no-auth``, no policy, no limits. Requests carry ``X-Hivemem-Agent: agentN``.

Client task ``c`` (of ``--concurrency``, default 32, as in ``bench/run.py``) acts as
agent ``c mod --agents`` and reads and writes ``bench/agentN/k<i>``. Every key exists
(each store is preloaded with ``--keys`` items spread over the agents, through the
service's own PUT), so a GET that does not answer 200 is an error, and so is a PUT that
answers neither 200 nor 201. One raw ``aiohttp.ClientSession`` per service drives the load, as
``bench/http_bench.py`` does; each body is read and parsed with ``orjson``.

Order: ``--rounds`` rounds (default 2). Each round measures GET then PUT, each on both
services, on first in odd rounds and off first in even ones (on, off, off, on ...), so
a drift of the machine's load over the run weighs on both sides alike. Each figure runs
a warm-up (20 % of ``--duration``, at most 1 s) and then ``--duration`` seconds, with
:func:`common.run_async_clients`. Before measuring, the "on" service is checked to
refuse a request without credentials (401) and an agent reading another agent's
namespace (403), so the layer measured is really in force.

Reported per figure: ops/s, p50/p90/p99/max latency (ms), server and client CPU ms per
request (see bench/README.md). The summary pairs on with off per verb: ops/s is the
total of the rounds' requests ÷ their total time, latencies and CPU per request are the
mean of the rounds' figures; **ratio** = on ÷ off (ops/s: below 1 means on is slower;
latency and CPU: above 1 means on costs more). The per-round ratios show how much the
pairs disagree. The target is an ops/s ratio of at least 0.9. The load average at the
start and the end, the commands and every figure go to the JSON (default
``bench/results/auth.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import Procs, Result, free_port, run_async_clients, wait_http_ready  # noqa: E402
from embedded import key_of, make_value  # noqa: E402
from http_bench import AIOHTTP_LIMIT, CLIENTS  # noqa: E402
from run import _fmt_ms, _fmt_rate, console, machine_info, print_results  # noqa: E402

#: The policy of the "on" service: every agent may do anything under bench/<itself>.
POLICY = """\
[[rules]]
actions = ["read", "write", "search", "watch", "publish", "sessions"]
namespaces = ["bench/{agent}/**"]
agents = ["*"]
"""
#: Role given to the agents: not a built-in role, so the policy's rule is what allows.
ROLE = "bench"
#: Limits high enough never to refuse, but checked (and counted) on every request.
RATE_LIMIT = "1000000/second"
#: Both services: no embedding model (items have no text to embed anyway).
SERVICE_ENV = {"HIVEMEM_EMBEDDER": "none"}
CONFIGS = ("on", "off")
VERBS = ("get", "put")
#: The layer measured (``--layer``): its target on ÷ off ops/s ratio, and its output file.
TARGETS = {"auth": 0.9, "telemetry": 0.95}
TARGET_RATIO = TARGETS["auth"]
DEFAULT_JSON = BENCH_DIR / "results" / "auth.json"


def agent_name(n: int) -> str:
    return f"agent{n}"


def namespace_of(agent: str) -> str:
    return f"bench/{agent}"


@dataclass
class Service:
    """One running ``hivemem serve`` and the headers its clients send, per agent."""

    config: str
    url: str
    pid: int
    cmd: list[str]
    #: agent name -> the identity header(s) of that agent's requests.
    identity: dict[str, dict[str, str]] = field(default_factory=dict)


# Services --------------------------------------------------------------------------------


def add_agents(db: Path, agents: list[str]) -> dict[str, str]:
    """``python -m hivemem agents add NAME --role bench --store sqlite:///db`` per agent;
    returns agent -> API key (the last stdout line)."""
    keys: dict[str, str] = {}
    for name in agents:
        cmd = [
            sys.executable, "-m", "hivemem", "agents", "add", name,
            "--role", ROLE, "--store", f"sqlite:///{db}",
        ]  # fmt: skip
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **SERVICE_ENV},
            check=False,
        )
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
        keys[name] = lines[-1].strip()
    return keys


def start_service(
    procs: Procs,
    tmp: Path,
    config: str,
    agents: list[str],
    log_level: str,
    layer: str = "auth",
    tracing: str | None = None,
    tracing_ratio: float | None = None,
) -> Service:
    """Start the "on" or "off" service over ``<tmp>/<config>.db``; wait for /readyz.

    ``layer`` ``telemetry``: neither has auth; "on" has the defaults (metrics on), "off"
    ``--set metrics=false``."""
    db = tmp / f"{config}.db"
    port = free_port()
    cmd = [
        sys.executable, "-m", "hivemem", "serve",
        "--store", f"sqlite:///{db}",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if log_level != "info":
        cmd += ["--log-level", log_level]
    env = dict(SERVICE_ENV)
    if layer == "telemetry":
        cmd += ["--no-auth"] + ([] if config == "on" else ["--set", "metrics=false"])
        if config == "on" and tracing is not None:
            # Spans made (and sampled as asked) but exported nowhere: what tracing costs
            # the service itself; an exporter's cost is its batch thread's.
            cmd += ["--tracing"]
            env |= {"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER": tracing}
            if tracing_ratio is not None:
                cmd += ["--set", f"tracing_sample_ratio={tracing_ratio}"]
        identity = {a: {"X-Hivemem-Agent": a} for a in agents}
    elif config == "on":
        policy = tmp / "policy.toml"
        policy.write_text(POLICY)
        keys = add_agents(db, agents)
        cmd += [
            "--auth", "--policy", str(policy), "--rate-limit-store", "memory://",
            "--set", f"rate_limit_read={RATE_LIMIT}", "--set", f"rate_limit_write={RATE_LIMIT}",
        ]  # fmt: skip
        identity = {a: {"Authorization": f"Bearer {keys[a]}"} for a in agents}
    else:
        cmd += ["--no-auth"]
        identity = {a: {"X-Hivemem-Agent": a} for a in agents}
    log = f"service-{config}.log"
    proc = procs.start(cmd, log, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http_ready(f"{url}/readyz", proc, 60, tmp / log)
    return Service(config, url, proc.pid, cmd, identity)


# Load ------------------------------------------------------------------------------------


class Driver:
    """GET and PUT of ``bench/agentN/k<i>`` against one service, through one aiohttp session.

    Client ``c`` acts as agent ``c mod agents``; its i-th request uses key
    ``(c div agents + stride * i) mod keys_per_agent``, where ``stride`` is the number of
    clients per agent, so the clients of one agent walk its keys from different offsets.
    """

    def __init__(
        self, service: Service, session: aiohttp.ClientSession, keys: int, clients: int
    ) -> None:
        self.service = service
        self.session = session
        self.agents = list(service.identity)
        self.per_agent = max(1, keys // len(self.agents))
        self.clients = clients
        self.stride = max(1, -(-clients // len(self.agents)))
        self.get_headers = [
            service.identity[self.agents[c % len(self.agents)]] for c in range(clients)
        ]
        self.put_headers = [{**h, "Content-Type": "application/json"} for h in self.get_headers]

    def url(self, agent: str, i: int) -> str:
        return f"{self.service.url}/v1/items/{namespace_of(agent)}/{key_of(i)}"

    def _url_of(self, c: int, i: int) -> str:
        agent = self.agents[c % len(self.agents)]
        k = (c // len(self.agents) + self.stride * i) % self.per_agent
        return self.url(agent, k)

    async def put_raw(self, url: str, headers: dict[str, str], value: Any) -> Any:
        body = orjson.dumps({"value": value})
        async with self.session.put(url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status not in (200, 201):  # 201: the item was created
                raise RuntimeError(f"PUT {resp.status}: {data[:200]!r}")
            return orjson.loads(data)

    async def get(self, c: int, i: int) -> None:
        async with self.session.get(self._url_of(c, i), headers=self.get_headers[c]) as r:
            data = await r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {r.status}: {data[:200]!r}")
            orjson.loads(data)

    async def put(self, c: int, i: int) -> None:
        await self.put_raw(self._url_of(c, i), self.put_headers[c], make_value(i))

    async def preload(self) -> None:
        """Write every key of every agent (as that agent), CLIENTS writes at a time."""
        sem = asyncio.Semaphore(CLIENTS)

        async def one(agent: str, k: int) -> None:
            async with sem:
                headers = {**self.service.identity[agent], "Content-Type": "application/json"}
                await self.put_raw(self.url(agent, k), headers, make_value(k))

        await asyncio.gather(*(one(a, k) for a in self.agents for k in range(self.per_agent)))

    async def check_telemetry(self, on: bool) -> dict[str, int]:
        """The "on" service must answer /metrics with its request counters, the "off" one
        404; returns the statuses seen.

        Raises:
            RuntimeError: otherwise.
        """
        async with self.session.get(f"{self.service.url}/metrics") as r:
            body = await r.text()
            seen = {"metrics": r.status}
        if (r.status == 200 and "hivemem_http_requests_total" in body) != on or (
            not on and r.status != 404
        ):
            raise RuntimeError(f"/metrics answered {r.status} on the {self.service.config} side")
        return seen

    async def check_enforced(self) -> dict[str, int]:
        """The "on" service must refuse a request without credentials (401), an agent
        writing in another agent's namespace (403), and must not show it another agent's
        items (404, though the item exists); returns the statuses seen.

        Raises:
            RuntimeError: any other status.
        """
        a, b = self.agents[0], self.agents[-1]
        seen: dict[str, int] = {}
        expected = {"get_without_credentials": 401}
        async with self.session.get(self.url(a, 0)) as r:
            seen["get_without_credentials"] = r.status
        if a != b:
            expected |= {"put_other_agents_namespace": 403, "get_other_agents_item": 404}
            headers = {**self.service.identity[a], "Content-Type": "application/json"}
            body = orjson.dumps({"value": make_value(0)})
            async with self.session.put(self.url(b, 0), data=body, headers=headers) as r:
                seen["put_other_agents_namespace"] = r.status
            async with self.session.get(self.url(b, 0), headers=self.service.identity[a]) as r:
                seen["get_other_agents_item"] = r.status
        if seen != expected:
            raise RuntimeError(
                f"the 'on' service does not enforce auth and policy: {seen}, expected {expected}"
            )
        return seen


# Summary ---------------------------------------------------------------------------------


def _mean(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def combine(results: list[Result]) -> dict[str, Any]:
    """One side (a verb on one service) over every round: total ops ÷ total seconds; the
    mean of the rounds' latencies and CPU per request."""
    ops = sum(r.ops for r in results)
    secs = sum(r.seconds for r in results)
    return {
        "ops": ops,
        "errors": sum(r.errors for r in results),
        "ops_per_s": ops / secs if secs else 0.0,
        "p50_ms": _mean([r.p50_ms for r in results]),
        "p99_ms": _mean([r.p99_ms for r in results]),
        "cpu_ms_per_op": _mean([r.cpu_ms_per_op for r in results]),
        "client_cpu_ms_per_op": _mean([r.client_cpu_ms_per_op for r in results]),
    }


def summary(
    results: dict[str, Result], rounds: int, layer: str = "auth"
) -> dict[str, dict[str, Any]]:
    """Per verb: both sides combined, the ratios on ÷ off, and the per-round ops/s ratios."""
    out: dict[str, dict[str, Any]] = {}
    for verb in VERBS:
        names = {cfg: [fig_name(cfg, verb, r, layer) for r in range(rounds)] for cfg in CONFIGS}
        sides = {cfg: [results[n] for n in names[cfg] if n in results] for cfg in CONFIGS}
        if not all(sides.values()):
            continue
        on, off = combine(sides["on"]), combine(sides["off"])
        per_round = [
            _ratio(results[a].ops_per_s, results[b].ops_per_s)
            for a, b in zip(names["on"], names["off"], strict=True)
            if a in results and b in results
        ]
        out[verb] = {
            "on": on,
            "off": off,
            "ratio": {
                k: _ratio(on[k], off[k])
                for k in ("ops_per_s", "p50_ms", "p99_ms", "cpu_ms_per_op", "client_cpu_ms_per_op")
            },
            "per_round_ops_ratio": per_round,
        }
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_summary(rows: dict[str, dict[str, Any]]) -> None:
    t = Table(
        title=f"Summary: ratio = on ÷ off (ops/s: <1 slower, target ≥ {TARGET_RATIO}; "
        "latency, CPU: >1 costlier)",
        title_justify="left",
    )
    cols = ["verb", "on ops/s", "off ops/s", "ops/s ratio", "per round", "on p50", "off p50"]
    cols += ["p50 ratio", "on p99", "off p99", "p99 ratio", "on srv cpu ms/op"]
    cols += ["off srv cpu ms/op", "cpu ratio", "errors on/off"]
    for col in cols:
        t.add_column(col, justify="left" if col == "verb" else "right")
    for verb, row in rows.items():
        on, off, ratio = row["on"], row["off"], row["ratio"]
        t.add_row(
            verb.upper(),
            _fmt_rate(on["ops_per_s"]),
            _fmt_rate(off["ops_per_s"]),
            _x(ratio["ops_per_s"]),
            " ".join(_x(v) for v in row["per_round_ops_ratio"]),
            _fmt_ms(on["p50_ms"]),
            _fmt_ms(off["p50_ms"]),
            _x(ratio["p50_ms"]),
            _fmt_ms(on["p99_ms"]),
            _fmt_ms(off["p99_ms"]),
            _x(ratio["p99_ms"]),
            _fmt_ms(on["cpu_ms_per_op"]),
            _fmt_ms(off["cpu_ms_per_op"]),
            _x(ratio["cpu_ms_per_op"]),
            f"{on['errors']}/{off['errors']}",
        )
    console.print(t)
    for verb, row in rows.items():
        r = row["ratio"]["ops_per_s"]
        ok = r is not None and r >= TARGET_RATIO
        colour = "green" if ok else "red"
        verdict = "met" if ok else "NOT met"
        shown = "-" if r is None else f"{r:.3f}x"
        console.print(
            f"[{colour}]{verb.upper()}: ops/s on ÷ off = {shown} (target ≥ {TARGET_RATIO}: "
            f"{verdict}); server CPU per request on ÷ off = {_x(row['ratio']['cpu_ms_per_op'])}"
        )


# Run -------------------------------------------------------------------------------------


def fig_name(config: str, verb: str, rnd: int, layer: str = "auth") -> str:
    return f"{layer}.{config}.{verb}.r{rnd + 1}"


async def measure(
    services: dict[str, Service],
    args: argparse.Namespace,
    results: dict[str, Result],
    checks: dict[str, Any],
) -> None:
    """Preload both stores, check the "on" service enforces, then every figure in order."""
    sessions = {
        cfg: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=AIOHTTP_LIMIT))
        for cfg in services
    }
    try:
        drivers = {
            cfg: Driver(svc, sessions[cfg], args.keys, args.concurrency)
            for cfg, svc in services.items()
        }
        for cfg, d in drivers.items():
            t0 = time.perf_counter()
            await d.preload()
            console.print(
                f"preloaded {cfg}: {d.per_agent * len(d.agents):,} items "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        if args.layer == "telemetry":
            for cfg, d in drivers.items():
                checks[cfg] = await d.check_telemetry(cfg == "on")
            console.print(f"/metrics: {checks}")
        else:
            checks["on"] = await drivers["on"].check_enforced()
            console.print(f"'on' service enforces: {checks['on']}")
        for rnd in range(args.rounds):
            order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
            for verb in VERBS:
                for cfg in order:
                    d = drivers[cfg]
                    op: Callable[[int, int], Awaitable[None]] = d.get if verb == "get" else d.put
                    name = fig_name(cfg, verb, rnd, args.layer)
                    r = await run_async_clients(
                        name,
                        f"{verb.upper()}, {args.layer} {cfg}, round {rnd + 1}",
                        op,
                        args.concurrency,
                        args.duration,
                        args.warmup,
                        d.service.pid,
                    )
                    r.extra["loadavg"] = [round(x, 2) for x in os.getloadavg()]
                    results[name] = r
                    console.print(
                        f"  {name}: {_fmt_rate(r.ops_per_s)} ops/s p50 {_fmt_ms(r.p50_ms)} "
                        f"p99 {_fmt_ms(r.p99_ms)} ms, server {_fmt_ms(r.cpu_ms_per_op)} ms/op, "
                        f"errors {r.errors}, load {r.extra['loadavg'][0]}"
                    )
    finally:
        for s in sessions.values():
            await s.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        description="hivemem service with auth + policy + rate limits on vs off, GET and PUT "
        "(see bench/README.md)"
    )
    p.add_argument("--quick", action="store_true", help="1 s per figure")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per figure (default 5, --quick 1); warm-up 20 %% of it, at most 1 s",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of GET and PUT on both services, alternating which goes first "
        "(default %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=CLIENTS,
        help="concurrent client tasks, one connection each (default %(default)s)",
    )
    p.add_argument(
        "--agents",
        type=int,
        default=8,
        help="agents (API keys) spread over the clients (%(default)s)",
    )
    p.add_argument(
        "--keys",
        type=int,
        default=1000,
        help="items per store, split among the agents (%(default)s)",
    )
    p.add_argument(
        "--server-log-level",
        default="info",
        choices=["info", "warning"],
        help="uvicorn log level of both services (access log off either way; %(default)s)",
    )
    p.add_argument(
        "--layer",
        choices=sorted(TARGETS),
        default="auth",
        help="what is on in the 'on' service: auth (auth + policy + rate limits) or "
        "telemetry (metrics; the 'off' one runs with metrics=false) (%(default)s)",
    )
    p.add_argument(
        "--tracing",
        default=None,
        metavar="SAMPLER",
        help="--layer telemetry: the 'on' service also traces (--tracing, spans not "
        "exported), with this OTEL_TRACES_SAMPLER (e.g. always_on, or "
        "parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG in the environment)",
    )
    p.add_argument(
        "--tracing-ratio",
        type=float,
        default=None,
        metavar="R",
        help="with --tracing: also hivemem's own tracing_sample_ratio=R (requests without "
        "trace context left out before the SDK), e.g. with --tracing parentbased_always_on",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="output file (default bench/results/<layer>.json)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (stores, logs)")
    a = p.parse_args(argv)
    if a.duration is None:
        a.duration = 1.0 if a.quick else 5.0
    if not 0.1 <= a.duration <= 600:
        p.error("--duration must be within 0.1..600 seconds")
    if not 1 <= a.rounds <= 20:
        p.error("--rounds must be within 1..20")
    if not 1 <= a.concurrency <= 150:
        p.error("--concurrency must be within 1..150")
    if not 1 <= a.agents <= 100:
        p.error("--agents must be within 1..100")
    if a.tracing_ratio is not None and (a.tracing is None or not 0 <= a.tracing_ratio <= 1):
        p.error("--tracing-ratio needs --tracing and must be within 0..1")
    if not a.agents <= a.keys <= 100_000:
        p.error("--keys must be within --agents..100000")
    a.warmup = min(1.0, a.duration * 0.2)
    if a.json is None:
        a.json = BENCH_DIR / "results" / f"{a.layer}.json"
    return a


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run every figure; returns the exit code (1 if the run failed)."""
    args = parse_args(argv)
    global TARGET_RATIO
    TARGET_RATIO = TARGETS[args.layer]
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.perf_counter()
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix=f"hivemem-{args.layer}-"))
    console.print(
        f"[bold]hivemem {args.layer} bench[/] {args.rounds} rounds x GET,PUT x on,off; "
        f"{args.duration} s per figure after {args.warmup} s warm-up; "
        f"{args.concurrency} clients, {args.agents} agents, {args.keys:,} keys; tmp {tmp}\n"
        f"nproc={info['nproc']} python={info['python']} cpu={info['cpu_model']!r} "
        f"load average={info['loadavg_start']}"
    )
    notes: list[str] = []
    if info["loadavg_start"][0] > 0.5 * (info["nproc"] or 1):
        notes.append(
            f"the machine was busy at the start (1-min load average {info['loadavg_start'][0]} "
            f"on {info['nproc']} CPUs): ops/s figures are unreliable, on ÷ off ratios less so"
        )
        console.print(f"[yellow]warning: {notes[-1]}")
    stray = sorted(k for k in os.environ if k.startswith("HIVEMEM_") and k not in SERVICE_ENV)
    if stray:
        notes.append(f"HIVEMEM_* variables in the environment apply to both services: {stray}")
        console.print(f"[yellow]warning: {notes[-1]}")
    agents = [agent_name(n) for n in range(args.agents)]
    results: dict[str, Result] = {}
    checks: dict[str, Any] = {}
    services: dict[str, Service] = {}
    failed = False
    try:
        with Procs(tmp) as procs:
            for cfg in CONFIGS:
                services[cfg] = start_service(
                    procs,
                    tmp,
                    cfg,
                    agents,
                    args.server_log_level,
                    args.layer,
                    args.tracing,
                    args.tracing_ratio,
                )
                console.print(f"{cfg}: {' '.join(services[cfg].cmd)}")
            asyncio.run(measure(services, args, results, checks))
    except (KeyboardInterrupt, SystemExit):
        console.print("[yellow]interrupted; every service was stopped")
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception:
        import traceback

        failed = True
        console.print(f"[red]run failed:\n{traceback.format_exc()}")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    ordered = sorted(results.values(), key=lambda r: (r.name.split(".")[2], r.name))
    if ordered:
        print_results("All figures (server cpu ms/op = the service process)", ordered)
    rows = summary(results, args.rounds, args.layer)
    if rows:
        print_summary(rows)
    elapsed = time.perf_counter() - started
    console.print(
        f"load average start {info['loadavg_start']} end {info['loadavg_end']}; "
        f"total {elapsed:.0f} s"
    )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": {
            "layer": args.layer,
            "tracing_sampler": args.tracing,
            "tracing_sample_ratio": args.tracing_ratio,
            "target_ratio": TARGET_RATIO,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "agents": args.agents,
            "keys": args.keys,
            "rate_limit": RATE_LIMIT,
            "policy": POLICY,
            "service_env": SERVICE_ENV,
            "server_log_level": args.server_log_level,
        },
        "machine": info,
        "services": {cfg: " ".join(s.cmd) for cfg, s in services.items()},
        "checks": checks,
        "results": {name: r.to_json() for name, r in results.items()},
        "summary": rows,
        "notes": notes,
        "failed": failed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    if args.keep_tmp or failed:
        console.print(f"kept {tmp} (stores, policy and service logs)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
