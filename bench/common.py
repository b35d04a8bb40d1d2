"""Shared pieces of the benchmark: latency statistics, timed loops and subprocesses.

Every figure the benchmark reports is a :class:`Result`: operations completed in a
measured window, their rate (operations per second) and latency percentiles in
milliseconds. Loops are bounded twice, by a deadline and by an operation cap, so a
runaway fast path cannot grow memory without limit.

Subprocesses (servers, writers, watchers) are started through :class:`Procs`, which
puts each in its own process group and terminates every one it started (SIGTERM,
then SIGKILL after a grace period) when the benchmark ends, also on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_OPS",
    "Procs",
    "Result",
    "free_port",
    "locomo_path",
    "percentile",
    "process_cpu_seconds",
    "run_async_clients",
    "run_async_loop",
    "run_sync_loop",
    "summarize",
    "wait_http_ready",
]

#: Cap on operations recorded by one measurement (bounds memory and run time).
MAX_OPS = 2_000_000

#: The root of the repository (this file is ``bench/common.py``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Environment variable naming the LoCoMo-format file the benchmarks read.
LOCOMO_ENV = "HIVEMEM_LOCOMO"
#: Where that file is looked for last, relative to :data:`REPO_ROOT`.
LOCOMO_FALLBACK = Path("..", "shared", "data", "locomo-dev.json")
#: What ``--data`` help texts say about the default.
LOCOMO_HELP = (
    f"LoCoMo-format file (default: ${LOCOMO_ENV}, else {LOCOMO_FALLBACK} relative to the "
    "repository root; see examples/README.md)"
)


def locomo_path(given: Path | str | None = None) -> Path:
    """The LoCoMo-format file to read: ``given`` (a ``--data`` argument), else the file
    ``$HIVEMEM_LOCOMO`` names, else ``../shared/data/locomo-dev.json`` relative to the
    repository root. The file is read where it is, never copied.

    Raises:
        SystemExit: the file does not exist (the message says how to name one).
    """
    if given is not None and str(given):
        path = Path(given).expanduser()
    elif os.environ.get(LOCOMO_ENV, "").strip():
        path = Path(os.environ[LOCOMO_ENV].strip()).expanduser()
    else:
        path = Path(os.path.normpath(REPO_ROOT / LOCOMO_FALLBACK))
    if not path.is_file():
        raise SystemExit(
            f"no LoCoMo file at {path}: pass --data PATH or set {LOCOMO_ENV} (the public "
            "file is data/locomo10.json of https://github.com/snap-research/locomo, "
            "CC BY-NC 4.0; see examples/README.md)"
        )
    return path


@dataclass
class Result:
    """One measured figure.

    Attributes:
        name: short identifier, e.g. ``embedded.async.get``.
        label: human description for the table.
        ops: operations completed inside the measured window.
        errors: operations that raised (not counted in ``ops``).
        seconds: length of the measured window (s).
        ops_per_s: ``ops / seconds``.
        p50_ms, p90_ms, p99_ms, max_ms, mean_ms: latency of one operation (ms);
            ``None`` when the tool does not report it.
        concurrency: concurrent clients (1 for a single loop).
        cpu_ms_per_op: CPU time (user + system, all threads) spent per operation by
            what is measured: this process for embedded and sqlite3 figures, the
            server process for HTTP figures. Less sensitive than ops/s to other load
            on the machine.
        client_cpu_ms_per_op: for HTTP figures, CPU per request of the load
            generator (this process, or wrk).
        extra: anything else worth keeping (tool output, notes).
    """

    name: str
    label: str
    ops: int
    errors: int
    seconds: float
    ops_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    concurrency: int = 1
    cpu_ms_per_op: float | None = None
    client_cpu_ms_per_op: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (floats rounded to 4 decimals)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4)
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values.

    Args:
        sorted_values: ascending values, at least one.
        q: percentile in [0, 100].

    Returns:
        The smallest value with at least ``q`` percent of the values at or below it.
    """
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return float(sorted_values[int(min(rank, len(sorted_values))) - 1])


def summarize(
    name: str,
    label: str,
    latencies_ns: Sequence[int],
    seconds: float,
    *,
    errors: int = 0,
    concurrency: int = 1,
    extra: dict[str, Any] | None = None,
) -> Result:
    """Build a :class:`Result` from per-operation latencies.

    Args:
        latencies_ns: latency of each successful operation, nanoseconds.
        seconds: length of the measured window (s), > 0.
    """
    n = len(latencies_ns)
    if n == 0:
        return Result(
            name=name,
            label=label,
            ops=0,
            errors=errors,
            seconds=seconds,
            ops_per_s=0.0,
            p50_ms=None,
            p90_ms=None,
            p99_ms=None,
            max_ms=None,
            mean_ms=None,
            concurrency=concurrency,
            extra=extra or {},
        )
    ms = sorted(v / 1e6 for v in latencies_ns)
    return Result(
        name=name,
        label=label,
        ops=n,
        errors=errors,
        seconds=seconds,
        ops_per_s=n / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1],
        mean_ms=sum(ms) / n,
        concurrency=concurrency,
        extra=extra or {},
    )


# Timed loops ---------------------------------------------------------------------------


async def run_async_loop(
    name: str,
    label: str,
    op: Callable[[int], Awaitable[Any]],
    duration: float,
    warmup: float,
) -> Result:
    """Await ``op(i)`` for i = 0, 1, ... one at a time (a single task).

    Runs ``warmup`` seconds unmeasured, then ``duration`` seconds measured.
    Exceptions raised by ``op`` are counted as errors; the first is kept in ``extra``.
    """
    pc = time.perf_counter_ns
    i = 0
    end = time.perf_counter() + warmup
    while time.perf_counter() < end and i < MAX_OPS:
        await op(i)
        i += 1
    lat: list[int] = []
    errors = 0
    first_error: str | None = None
    cpu0 = time.process_time()
    start = time.perf_counter()
    end = start + duration
    while i < 2 * MAX_OPS and len(lat) < MAX_OPS:
        t0 = pc()
        try:
            await op(i)
        except Exception as exc:  # counted, reported
            errors += 1
            first_error = first_error or repr(exc)
        else:
            lat.append(pc() - t0)
        i += 1
        if (i & 15) == 0 and time.perf_counter() >= end:
            break
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    extra = {"first_error": first_error} if first_error else {}
    result = summarize(name, label, lat, seconds, errors=errors, extra=extra)
    result.cpu_ms_per_op = cpu * 1e3 / max(1, len(lat) + errors)
    return result


def run_sync_loop(
    name: str, label: str, op: Callable[[int], Any], duration: float, warmup: float
) -> Result:
    """Call ``op(i)`` for i = 0, 1, ... in this thread; see :func:`run_async_loop`."""
    pc = time.perf_counter_ns
    i = 0
    end = time.perf_counter() + warmup
    while time.perf_counter() < end and i < MAX_OPS:
        op(i)
        i += 1
    lat: list[int] = []
    errors = 0
    first_error: str | None = None
    cpu0 = time.process_time()
    start = time.perf_counter()
    end = start + duration
    while i < 2 * MAX_OPS and len(lat) < MAX_OPS:
        t0 = pc()
        try:
            op(i)
        except Exception as exc:  # counted, reported
            errors += 1
            first_error = first_error or repr(exc)
        else:
            lat.append(pc() - t0)
        i += 1
        if (i & 15) == 0 and time.perf_counter() >= end:
            break
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    extra = {"first_error": first_error} if first_error else {}
    result = summarize(name, label, lat, seconds, errors=errors, extra=extra)
    result.cpu_ms_per_op = cpu * 1e3 / max(1, len(lat) + errors)
    return result


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) used so far by process ``pid``, in seconds.

    Read from ``/proc/<pid>/stat``; ``None`` where that is not available.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" closing the command name, utime and stime are fields 12 and 13.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_async_clients(
    name: str,
    label: str,
    op: Callable[[int, int], Awaitable[Any]],
    clients: int,
    duration: float,
    warmup: float,
    server_pid: int | None = None,
) -> Result:
    """Run ``clients`` concurrent tasks, each awaiting ``op(client, i)`` back to back.

    All tasks run ``warmup`` seconds unmeasured, then ``duration`` seconds measured;
    latencies count only operations that start and finish inside the measured window.
    CPU per operation is sampled at the window's edges, for this process and for
    ``server_pid`` if given, and divided by the operations completed in the window.
    """
    pc = time.perf_counter_ns
    loop_start = time.perf_counter_ns()
    measure_from = loop_start + int(warmup * 1e9)
    measure_to = measure_from + int(duration * 1e9)
    per_client_cap = MAX_OPS // max(1, clients)
    lats: list[list[int]] = [[] for _ in range(clients)]
    errors = [0] * clients
    completed = [0] * clients  # operations finishing inside the window, for CPU per op
    first_error: list[str] = []
    cpu: dict[str, float | None] = {}

    async def client(c: int) -> None:
        i = 0
        mine = lats[c]
        while len(mine) < per_client_cap and i < 4 * per_client_cap:
            t0 = pc()
            if t0 >= measure_to:
                return
            try:
                await op(c, i)
            except Exception as exc:  # counted, reported
                t1 = pc()
                if t0 >= measure_from and t1 <= measure_to:
                    errors[c] += 1
                    if not first_error:
                        first_error.append(repr(exc))
                # Back off a little so a failing server does not turn into a busy loop.
                await asyncio.sleep(0.001)
            else:
                t1 = pc()
                if t0 >= measure_from and t1 <= measure_to:
                    mine.append(t1 - t0)
            if measure_from <= t1 <= measure_to:
                completed[c] += 1
            i += 1

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, (measure_from - pc()) / 1e9))
        cpu["client0"] = time.process_time()
        cpu["server0"] = None if server_pid is None else process_cpu_seconds(server_pid)
        await asyncio.sleep(max(0.0, (measure_to - pc()) / 1e9))
        cpu["client1"] = time.process_time()
        cpu["server1"] = None if server_pid is None else process_cpu_seconds(server_pid)

    # The deadline bounds the whole run even if an operation hangs.
    async with asyncio.timeout(warmup + duration + 60):
        await asyncio.gather(sampler(), *(client(c) for c in range(clients)))
    flat = [v for lst in lats for v in lst]
    extra = {"first_error": first_error[0]} if first_error else {}
    result = summarize(
        name, label, flat, duration, errors=sum(errors), concurrency=clients, extra=extra
    )
    done = max(1, sum(completed))
    c0, c1 = cpu.get("client0"), cpu.get("client1")
    s0, s1 = cpu.get("server0"), cpu.get("server1")
    if c0 is not None and c1 is not None:
        result.client_cpu_ms_per_op = (c1 - c0) * 1e3 / done
    if s0 is not None and s1 is not None:
        result.cpu_ms_per_op = (s1 - s0) * 1e3 / done
    return result


# Processes and ports ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers 2xx.

    Raises:
        RuntimeError: the process exited, or ``timeout`` seconds passed; the message
            carries the tail of the process's log.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before {url} answered:\n" + tail(log)
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s ({last}):\n" + tail(log))


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Procs:
    """Starts subprocesses and guarantees they are all terminated.

    Each child runs in its own session (process group), so stopping it also stops
    anything it started (e.g. uvicorn workers). Use as a context manager.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        args: Sequence[str],
        log_name: str,
        *,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``args``; stderr (and stdout unless piped) go to ``log_dir/log_name``."""
        log = open(self.log_dir / log_name, "ab")  # closed below, once Popen has it
        try:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """Terminate one child (its process group): SIGTERM, then SIGKILL after ``grace`` s."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        else:
            # The leader is gone; make sure nothing it started lingers in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Terminate every child still tracked, newest first."""
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc!r}", file=sys.stderr)
