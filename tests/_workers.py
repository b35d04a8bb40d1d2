"""Worker programs that tests/test_promises.py runs as separate processes.

Run as ``python tests/_workers.py <command> <args...>``:

- ``cas URL NS KEY N``: after a ``go`` line on stdin, add 1 to the integer item (NS, KEY) N
  times by compare-and-set (get, put with if_version, retry on Conflict); prints
  ``done <conflicts>``.
- ``writer URL NS PREFIX ACKFILE CONCURRENCY SECONDS``: PUT unique keys through raw HTTP with
  CONCURRENCY requests in flight; after each 2xx, appends the key to ACKFILE and flushes.
  Each request loop stops at its first failure (or after SECONDS).
- ``watcher STORE_URL NS``: watch NS from the current head; prints ``ready`` then one JSON
  line per event.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import TextIO

import hivemem


def cas(url: str, ns: str, key: str, n: int) -> None:
    import os

    with hivemem.connect_sync(url, agent=f"cas{os.getpid()}") as hive:
        hive.get(ns, key)  # connect before the start line, so workers start together
        print("ready", flush=True)
        sys.stdin.readline()
        conflicts = 0
        streak = 0
        done = 0
        while done < n:
            item = hive.get(ns, key)
            assert item is not None
            try:
                hive.put(ns, key, item.value + 1, if_version=item.version)
            except hivemem.Conflict:
                conflicts += 1
                streak += 1
                # Jittered exponential backoff, as any CAS loop under contention should do.
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2**streak)))
                continue
            streak = 0
            done += 1
        print(f"done {conflicts}", flush=True)


async def writer(
    url: str, ns: str, prefix: str, acks: TextIO, concurrency: int, secs: float
) -> None:
    import aiohttp

    deadline = time.monotonic() + secs
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def loop(slot: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                key = f"{prefix}-{slot}-{n}"
                body = {"value": {"key": key, "n": n}}
                try:
                    async with http.put(f"{url}/v1/items/{ns}/{key}", json=body) as resp:
                        await resp.read()
                        if resp.status not in (200, 201):
                            return
                except (TimeoutError, aiohttp.ClientError, OSError):
                    return
                acks.write(key + "\n")
                acks.flush()
                n += 1

        await asyncio.gather(*(loop(i) for i in range(concurrency)))


def watcher(store_url: str, ns: str) -> None:
    with hivemem.connect_sync(store_url, agent="watcher") as hive:
        cursor = hive.head()
        print("ready", flush=True)
        for event in hive.watch(ns, after=cursor):
            print(json.dumps({"key": event.key, "type": event.type, "t": time.time()}), flush=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "cas":
        cas(args[0], args[1], args[2], int(args[3]))
    elif command == "writer":
        with open(args[3], "a", encoding="utf-8") as acks:
            asyncio.run(writer(args[0], args[1], args[2], acks, int(args[4]), float(args[5])))
    elif command == "watcher":
        watcher(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
