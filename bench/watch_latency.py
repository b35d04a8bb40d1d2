"""Section 5: write-to-event latency of watch(), across processes.

A writer process puts items at a steady rate; each put's key and value carry
``time.time_ns()`` taken just before the put is issued. A watcher process follows
the feed with ``watch()`` and, for each event, subtracts that timestamp from its own
``time.time_ns()`` on receipt. Both processes read the same host clock, so the
difference is the latency from "the writer starts the put" to "the watcher has the
event": the commit, the change notification and the delivery.

Run as a script this module is the writer or the watcher::

    python bench/watch_latency.py watcher --url URL --prefix P --count N --timeout S
    python bench/watch_latency.py writer  --url URL --prefix P --count N --rate R

The watcher prints ``READY`` once it is following the feed, and at the end one
JSON line with the latencies (ns). The writer prints one JSON line with its own
put latencies (ns).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["VARIANTS", "bench_watch"]

#: Events at the start of a run that are not counted (connection set-up, warm caches).
WARMUP_EVENTS = 10


def _sent_ns(event: Any) -> int | None:
    """The writer's timestamp carried by an event (from its data, else its key)."""
    data = event.data
    if isinstance(data, dict):
        for holder in (data, data.get("value")):
            if isinstance(holder, dict) and isinstance(holder.get("t_ns"), int):
                return int(holder["t_ns"])
    key = event.key or ""
    if key.startswith("e") and "-" in key:
        with contextlib.suppress(ValueError):
            return int(key.split("-", 1)[1])
    return None


async def _watcher(url: str, prefix: str, count: int, wait_s: float) -> None:
    import hivemem

    latencies: list[int] = []
    seen: set[str] = set()
    timed_out = False
    async with hivemem.connect(url, agent="bench-watcher") as hive:
        cursor = await hive.head()
        done = asyncio.Event()

        async def follow() -> None:
            async for event in hive.watch(prefix, after=cursor):
                now = time.time_ns()
                if event.type != "item.put" or event.key in seen:
                    continue
                sent = _sent_ns(event)
                if sent is None:
                    continue
                seen.add(event.key or "")
                latencies.append(now - sent)
                if len(seen) >= count:
                    done.set()
                    return

        task = asyncio.create_task(follow())
        # Give the subscription a moment to be established before the writer starts.
        await asyncio.sleep(0.5)
        print("READY", flush=True)
        try:
            async with asyncio.timeout(wait_s):
                await done.wait()
        except TimeoutError:
            timed_out = True
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    print(
        json.dumps({"latencies_ns": latencies, "received": len(seen), "timed_out": timed_out}),
        flush=True,
    )


async def _writer(url: str, prefix: str, count: int, rate: float) -> None:
    import hivemem

    put_ns: list[int] = []
    errors = 0
    async with hivemem.connect(url, agent="bench-writer") as hive:
        await hive.ping()
        start = time.perf_counter()
        for seq in range(count):
            delay = start + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t_ns = time.time_ns()
            t0 = time.perf_counter_ns()
            try:
                await hive.put(prefix, f"e{seq:06d}-{t_ns}", {"seq": seq, "t_ns": t_ns})
            except Exception as exc:
                errors += 1
                print(f"put failed: {exc!r}", file=sys.stderr)
            else:
                put_ns.append(time.perf_counter_ns() - t0)
        elapsed = time.perf_counter() - start
    print(json.dumps({"put_ns": put_ns, "errors": errors, "elapsed_s": elapsed}), flush=True)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline().decode().strip()
        if proc.poll() is not None:
            break
    raise RuntimeError(f"pid {proc.pid} printed nothing in {timeout}s (exit {proc.poll()})")


#: The two variants of section 5: (name, label).
VARIANTS = [
    ("embedded", "watch, embedded (2 procs, 1 file)"),
    ("service", "watch, service (RemoteHive)"),
]


def bench_watch(
    procs: Any, url: str, name: str, label: str, tmp: Path, duration: float, rate: float
) -> list[Any]:
    """Section 5, one variant: a writer and a watcher process over ``url``.

    Args:
        procs: the :class:`common.Procs` that owns the writer and watcher processes.
        url: the store both processes open (``sqlite:///...`` or ``http://...``).
        name: ``embedded`` or ``service`` (names the results and the feed prefix).
        duration: seconds of writing; the writer puts ``rate * duration`` items.
        rate: puts per second.

    Returns:
        Two :class:`common.Result`: the write-to-event latency (``watch.<name>``;
        ``errors`` counts events never received) and the writer's own put latency.

    Raises:
        RuntimeError: a process failed or printed nothing in time (logs stay in ``tmp``).
    """
    from common import summarize

    count = max(WARMUP_EVENTS + 20, int(rate * duration))
    script = str(Path(__file__).resolve())
    prefix = f"bench/watch/{name}"
    shared = ["--url", url, "--prefix", prefix, "--count", str(count)]
    timeout = duration * 3 + 30
    watcher = procs.start(
        [sys.executable, script, "watcher", *shared, "--timeout", str(timeout)],
        f"watch_{name}_watcher.log",
        stdout_pipe=True,
    )
    writer = None
    try:
        line = _read_line(watcher, 60)
        if line != "READY":
            raise RuntimeError(f"watcher said {line!r}")
        writer = procs.start(
            [sys.executable, script, "writer", *shared, "--rate", str(rate)],
            f"watch_{name}_writer.log",
            stdout_pipe=True,
        )
        w_out, _ = writer.communicate(timeout=timeout + 30)
        r_out, _ = watcher.communicate(timeout=timeout + 30)
    finally:
        procs.stop(watcher)
        if writer is not None:
            procs.stop(writer)
    if writer.returncode != 0 or watcher.returncode != 0:
        raise RuntimeError(
            f"watch {name}: writer exit {writer.returncode}, watcher exit "
            f"{watcher.returncode}; see logs in {tmp}"
        )
    w = json.loads(w_out.decode().strip().splitlines()[-1])
    r = json.loads(r_out.decode().strip().splitlines()[-1])
    lat = r["latencies_ns"][WARMUP_EVENTS:]
    extra = {
        "rate_per_s": rate,
        "written": len(w["put_ns"]),
        "received": r["received"],
        "missed": count - r["received"],
        "watcher_timed_out": r["timed_out"],
        "writer_elapsed_s": round(w["elapsed_s"], 3),
        "warmup_events_dropped": WARMUP_EVENTS,
    }
    res = summarize(f"watch.{name}", label, lat, w["elapsed_s"], extra=extra)
    res.ops_per_s = r["received"] / w["elapsed_s"] if w["elapsed_s"] > 0 else 0.0
    res.errors = count - r["received"]
    put = summarize(
        f"watch.{name}.writer_put",
        f"watch {name}: writer put",
        w["put_ns"],
        w["elapsed_s"],
        errors=w["errors"],
    )
    return [res, put]


def main() -> None:
    """Entry point of the writer and watcher processes."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=["writer", "watcher"])
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    if a.role == "watcher":
        asyncio.run(_watcher(a.url, a.prefix, a.count, a.timeout))
    else:
        asyncio.run(_writer(a.url, a.prefix, a.count, a.rate))


if __name__ == "__main__":
    main()
