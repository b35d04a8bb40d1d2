"""Sections 3 and 4: the service and a minimal FastAPI endpoint under 32 concurrent clients.

Servers run as subprocesses on free 127.0.0.1 ports, one uvicorn worker each; the
load comes from this process, a single asyncio loop running ``clients`` tasks that
each send one request at a time, back to back, for a fixed duration.

Pairs of figures separate the server's cost from the client's:

* our service driven by RemoteHive vs. by raw aiohttp: RemoteHive's own overhead;
* the minimal endpoint driven by raw aiohttp vs. by RemoteHive: the same, with a
  server that does almost nothing;
* our service vs. the minimal endpoint, both with raw aiohttp (and with wrk): the
  service's overhead over the least a FastAPI route can do.
"""

from __future__ import annotations

import asyncio
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from common import (
    Procs,
    Result,
    free_port,
    process_cpu_seconds,
    run_async_clients,
    wait_http_ready,
)
from embedded import NAMESPACE, key_of, make_value

__all__ = [
    "AIOHTTP_LIMIT",
    "CLIENTS",
    "Servers",
    "bench_minimal",
    "bench_service",
    "bench_wrk",
]

#: Concurrent client tasks for every HTTP figure.
CLIENTS = 32
#: Connection-pool size of the raw aiohttp client: the same as RemoteHive's
#: ``TCPConnector(limit=256)``; 32 clients never reach it, so each keeps its own connection.
AIOHTTP_LIMIT = 256
#: Identity header sent by the raw clients (RemoteHive sends the same one).
AGENT_HEADER = {"X-Hivemem-Agent": "bench"}

BENCH_DIR = Path(__file__).resolve().parent


class Servers:
    """Starts the servers on first use and keeps them for the rest of the run.

    Args:
        log_level: uvicorn log level of both servers; ``info`` is ``hivemem serve``'s
            default and logs every request, ``warning`` turns the access log off.

    Attributes:
        service_url: ``http://127.0.0.1:PORT`` of ``hivemem serve`` (after :meth:`service`).
        minimal_url: the same for the minimal endpoint (after :meth:`minimal`).
    """

    def __init__(self, procs: Procs, tmp: Path, log_level: str = "info") -> None:
        self.procs = procs
        self.tmp = tmp
        self.log_level = log_level
        self.service_url: str | None = None
        self.minimal_url: str | None = None
        self.service_cmd: list[str] = []
        self.minimal_cmd: list[str] = []
        self.service_pid: int | None = None
        self.minimal_pid: int | None = None

    def service(self) -> str:
        """Start ``python -m hivemem serve`` over ``sqlite:///<tmp>/svc.db``; return its URL."""
        if self.service_url is None:
            port = free_port()
            self.service_cmd = [
                sys.executable, "-m", "hivemem", "serve",
                "--store", f"sqlite:///{self.tmp / 'svc.db'}",
                "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            if self.log_level != "info":
                self.service_cmd += ["--log-level", self.log_level]
            proc = self.procs.start(self.service_cmd, "service.log")
            url = f"http://127.0.0.1:{port}"
            wait_http_ready(f"{url}/readyz", proc, 60, self.tmp / "service.log")
            self.service_url, self.service_pid = url, proc.pid
        return self.service_url

    def minimal(self) -> str:
        """Start the minimal endpoint (bench/minimal_app.py) under uvicorn; return its URL.

        uvicorn gets the settings ``hivemem serve`` gives it: one worker, the same log
        level (``info`` by default, so one access-log line per request), ``loop`` and
        ``http`` ``auto``.
        """
        if self.minimal_url is None:
            port = free_port()
            self.minimal_cmd = [
                sys.executable, "-m", "uvicorn", "minimal_app:app",
                "--app-dir", str(BENCH_DIR),
                "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--log-level", self.log_level,
                "--loop", "auto", "--http", "auto",
            ]  # fmt: skip
            proc = self.procs.start(self.minimal_cmd, "minimal.log")
            url = f"http://127.0.0.1:{port}"
            wait_http_ready(f"{url}/healthz", proc, 60, self.tmp / "minimal.log")
            self.minimal_url, self.minimal_pid = url, proc.pid
        return self.minimal_url


def _item_url(base: str, key: str) -> str:
    return f"{base}/v1/items/{NAMESPACE}/{key}"


def _key(client: int, i: int, keys: int) -> str:
    return key_of((client + CLIENTS * i) % keys)


# Drivers ---------------------------------------------------------------------------------


async def _drive_remote(
    base: str,
    target: str,
    keys: int,
    duration: float,
    warmup: float,
    preload: bool,
    server_pid: int | None,
) -> list[Result]:
    """GET then PUT with one RemoteHive shared by CLIENTS tasks.

    Results are named ``<target>.remote.get|put``, labelled ``<target> GET|PUT, RemoteHive``.
    """
    import hivemem

    results: list[Result] = []
    async with hivemem.connect(base, agent="bench") as hive:
        if preload:
            from hivemem import PutOp

            for start in range(0, keys, 100):
                await hive.batch(
                    [
                        PutOp(namespace=NAMESPACE, key=key_of(i), value=make_value(i))
                        for i in range(start, min(keys, start + 100))
                    ]
                )
            if target == "service":  # its indexer embeds the preloaded texts first
                began = time.perf_counter()
                while not await hive.wait_indexed(timeout=10):
                    if time.perf_counter() - began > 300:
                        break

        async def get(c: int, i: int) -> None:
            if await hive.get(NAMESPACE, _key(c, i, keys)) is None:
                raise AssertionError("missing item")

        async def put(c: int, i: int) -> None:
            await hive.put(NAMESPACE, _key(c, i, keys), make_value(i))

        for verb, op in (("get", get), ("put", put)):
            results.append(
                await run_async_clients(
                    f"{target}.remote.{verb}",
                    f"{target} {verb.upper()}, RemoteHive",
                    op,
                    CLIENTS,
                    duration,
                    warmup,
                    server_pid,
                )
            )
    return results


async def _drive_aiohttp(
    base: str,
    target: str,
    keys: int,
    duration: float,
    warmup: float,
    preload: bool,
    server_pid: int | None,
) -> list[Result]:
    """GET then PUT with one raw aiohttp.ClientSession shared by CLIENTS tasks.

    Each response body is read and parsed with orjson, as RemoteHive does before it
    builds its models. Results are named ``<target>.aiohttp.get|put``.
    """
    put_headers = {**AGENT_HEADER, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=AIOHTTP_LIMIT)
    results: list[Result] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def put_raw(url: str, value: Any) -> Any:
            body = orjson.dumps({"value": value})
            async with session.put(url, data=body, headers=put_headers) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"PUT {resp.status}: {data[:200]!r}")
                return orjson.loads(data)

        if preload:
            sem = asyncio.Semaphore(CLIENTS)

            async def one(i: int) -> None:
                async with sem:
                    await put_raw(_item_url(base, key_of(i)), make_value(i))

            await asyncio.gather(*(one(i) for i in range(keys)))

        async def get(c: int, i: int) -> None:
            async with session.get(_item_url(base, _key(c, i, keys)), headers=AGENT_HEADER) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"GET {r.status}: {data[:200]!r}")
                orjson.loads(data)

        async def put(c: int, i: int) -> None:
            await put_raw(_item_url(base, _key(c, i, keys)), make_value(i))

        for verb, op in (("get", get), ("put", put)):
            results.append(
                await run_async_clients(
                    f"{target}.aiohttp.{verb}",
                    f"{target} {verb.upper()}, aiohttp",
                    op,
                    CLIENTS,
                    duration,
                    warmup,
                    server_pid,
                )
            )
    return results


async def _settle(url: str, limit: float = 300.0) -> float:
    """Wait until the service's indexer has stored the vectors of every write so far
    (the PUTs write texts), so that its work does not run into the next figures (the
    next client, or the minimal endpoint measured on the same two cores). Returns the
    seconds waited."""
    import hivemem

    began = time.perf_counter()
    async with hivemem.connect(url, agent="bench") as hive:
        while time.perf_counter() - began < limit:
            if await hive.wait_indexed(timeout=10):
                break
    return time.perf_counter() - began


def bench_service(servers: Servers, keys: int, duration: float, warmup: float) -> list[Result]:
    """Section 3: ``hivemem serve`` driven by RemoteHive, then by raw aiohttp; after
    each, the indexer is let catch up (:func:`_settle`) before anything else runs."""
    url = servers.service()
    pid = servers.service_pid
    results = asyncio.run(_drive_remote(url, "service", keys, duration, warmup, True, pid))
    print(f"  the indexer caught up in {asyncio.run(_settle(url)):.1f} s")
    results += asyncio.run(_drive_aiohttp(url, "service", keys, duration, warmup, False, pid))
    print(f"  the indexer caught up in {asyncio.run(_settle(url)):.1f} s")
    return results


def bench_minimal(servers: Servers, keys: int, duration: float, warmup: float) -> list[Result]:
    """Section 4: the minimal FastAPI endpoint driven by raw aiohttp, then by RemoteHive."""
    url = servers.minimal()
    pid = servers.minimal_pid
    results = asyncio.run(_drive_aiohttp(url, "minimal", keys, duration, warmup, True, pid))
    try:
        results += asyncio.run(_drive_remote(url, "minimal", keys, duration, warmup, False, pid))
    except Exception as exc:
        # RemoteHive may need routes the minimal app does not have; the rest still counts.
        print(f"  RemoteHive against the minimal endpoint failed: {exc!r}")
    return results


# wrk -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"bad wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, request count, non-2xx count and latency percentiles (ms) from wrk output."""
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    out["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*", output)
    out["socket_errors"] = m.group(0) if m else ""
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", output, re.M)
        out[f"p{q}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    if m:
        out["mean_ms"], out["max_ms"] = _ms(m.group(1)), _ms(m.group(3))
    return out


def run_wrk(
    name: str,
    label: str,
    url: str,
    duration: float,
    server_pid: int | None = None,
    threads: int = 1,
) -> Result:
    """GET ``url`` with wrk: CLIENTS connections, ``threads`` threads, ``duration`` seconds.

    CPU per request is measured over wrk's whole run: the server's from
    ``/proc/<server_pid>/stat``, wrk's own from this process's child rusage.
    """
    secs = max(1, round(duration))
    cmd = [
        "wrk", f"-t{threads}", f"-c{CLIENTS}", f"-d{secs}s", "--latency",
        "-H", f"X-Hivemem-Agent: {AGENT_HEADER['X-Hivemem-Agent']}", url,
    ]  # fmt: skip
    server0 = None if server_pid is None else process_cpu_seconds(server_pid)
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30, check=False)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server1 = None if server_pid is None else process_cpu_seconds(server_pid)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    p = parse_wrk(proc.stdout)
    ok = max(0, p["requests"] - p["non_2xx"])
    n = max(1, p["requests"])
    wrk_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    return Result(
        name=name,
        label=label,
        ops=ok,
        errors=p["non_2xx"],
        seconds=float(secs),
        ops_per_s=p["rps"] * (ok / p["requests"] if p["requests"] else 0.0),
        p50_ms=p["p50_ms"],
        p90_ms=p["p90_ms"],
        p99_ms=p["p99_ms"],
        max_ms=p.get("max_ms"),
        mean_ms=p.get("mean_ms"),
        concurrency=CLIENTS,
        cpu_ms_per_op=None if server0 is None or server1 is None else (server1 - server0) * 1e3 / n,
        client_cpu_ms_per_op=wrk_cpu * 1e3 / n,
        extra={
            "wrk_requests_per_s": p["rps"],
            "socket_errors": p["socket_errors"],
            "command": " ".join(cmd),
        },
    )


async def _ensure_item(base: str, key: str) -> None:
    headers = {**AGENT_HEADER, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        body = orjson.dumps({"value": make_value(0)})
        async with session.put(_item_url(base, key), data=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"PUT {resp.status}: {(await resp.read())[:200]!r}")


def bench_wrk(servers: Servers, keys: int, duration: float) -> tuple[list[Result], str | None]:
    """wrk GET against the minimal endpoint and our GET /v1/items/{ns}/{key}.

    Returns:
        The results and, when wrk is not installed, the reason it was skipped.
    """
    if shutil.which("wrk") is None:
        return [], "wrk is not installed (apt-get install -y wrk); wrk figures skipped"
    results: list[Result] = []
    minimal = servers.minimal()
    service = servers.service()
    key = key_of(0)
    # The key must exist in both (an earlier section may already have written it).
    for base in (minimal, service):
        asyncio.run(_ensure_item(base, key))
    results.append(
        run_wrk(
            "minimal.wrk.get",
            "minimal GET, wrk",
            _item_url(minimal, key),
            duration,
            servers.minimal_pid,
        )
    )
    results.append(
        run_wrk(
            "service.wrk.get",
            "service GET, wrk",
            _item_url(service, key),
            duration,
            servers.service_pid,
        )
    )
    return results, None
