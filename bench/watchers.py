"""Write throughput of ``hivemem serve`` with many SSE watchers open.

Usage::

    python bench/watchers.py [--watchers 0,200,1000] [--duration 5] [--warmup 1]
                             [--writers 8]

For each count N: N Server-Sent-Events streams are opened on ``/v1/watch`` by a
separate process (so their reading costs this process nothing), then ``--writers``
concurrent clients PUT small values for ``--duration`` seconds. Watchers either watch
another namespace (``idle``: the service filters every event out for them) or the one
written (``all``: every event goes to every watcher). The service runs on a fresh
SQLite file with ``embedder=none``. Each figure is printed beside the same run's
figure with no watcher open (the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import Procs, free_port, wait_http_ready  # noqa: E402


async def hold(url: str, prefix: str, n: int) -> None:
    """Open ``n`` SSE streams under ``prefix``, print ``ready``, read them until killed."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:
        opened = 0
        ready = asyncio.Event()

        async def one() -> None:
            nonlocal opened
            async with http.get(f"{url}/v1/watch", params={"prefix": prefix}) as resp:
                resp.raise_for_status()
                opened += 1
                if opened == n:
                    ready.set()
                async for _ in resp.content.iter_any():
                    pass

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await ready.wait()
        print("ready", flush=True)
        await asyncio.gather(*tasks)


async def write(url: str, ns: str, writers: int, duration: float, warmup: float) -> float:
    """PUTs per second over ``duration`` seconds after ``warmup``, by ``writers`` clients."""
    done = 0
    start = time.monotonic()
    measure_from, measure_to = start + warmup, start + warmup + duration
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < measure_to:
                async with http.put(f"{url}/v1/items/{ns}/c{c}-{i % 100}", json={"value": i}) as r:
                    r.raise_for_status()
                    await r.read()
                if measure_from <= time.monotonic() < measure_to:
                    done += 1
                i += 1

        await asyncio.gather(*(client(c) for c in range(writers)))
    return done / duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", default="0,200,1000", help="Counts, comma-separated.")
    parser.add_argument("--duration", type=float, default=5.0, help="Measured seconds.")
    parser.add_argument("--warmup", type=float, default=1.0, help="Unmeasured seconds first.")
    parser.add_argument("--writers", type=int, default=8, help="Concurrent writing clients.")
    parser.add_argument("--hold", nargs=3, metavar=("URL", "PREFIX", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        asyncio.run(hold(args.hold[0], args.hold[1], int(args.hold[2])))
        return
    counts = [int(c) for c in args.watchers.split(",")]
    with tempfile.TemporaryDirectory(prefix="hivemem-bench-") as tmp, Procs(Path(tmp)) as procs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        most = str(max(counts) + 10)  # the service's stream limits, raised for the run
        env = {
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_MAX_WATCH_STREAMS": most,
            "HIVEMEM_MAX_WATCH_STREAMS_PER_AGENT": most,
        }
        cmd = [sys.executable, "-m", "hivemem", "serve", "--store", f"sqlite:///{tmp}/svc.db",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
        server = procs.start(cmd, "service.log", env=env)
        wait_http_ready(f"{url}/readyz", server, 60, Path(tmp) / "service.log")
        floor = asyncio.run(write(url, "bench/w", args.writers, args.duration, args.warmup))
        print(f"no watcher: {floor:,.0f} PUT/s (the floor)")
        for n in (c for c in counts if c > 0):
            for mode, prefix in (("idle", "elsewhere"), ("all", "bench/w")):
                holder = procs.start(
                    [sys.executable, __file__, "--hold", url, prefix, str(n)],
                    f"hold-{n}-{mode}.log",
                    stdout_pipe=True,
                )
                assert holder.stdout is not None
                line = holder.stdout.readline()
                if line.strip() != b"ready":
                    raise SystemExit(f"the watchers did not open: {line!r}")
                rate = asyncio.run(write(url, "bench/w", args.writers, args.duration, args.warmup))
                print(
                    f"{n:>5} watchers ({mode:>4}): {rate:,.0f} PUT/s = {rate / floor:.2f}x "
                    f"the floor {floor:,.0f}"
                )
                procs.stop(holder)


if __name__ == "__main__":
    main()
