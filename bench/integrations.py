"""What each framework adapter adds to the hive operation under it.

Usage::

    python bench/integrations.py [--ops 1000] [--store sqlite|memory]

On an embedded hive (a SQLite file in a temporary directory, ``embedder=none``), one
caller runs each pair back to back, ``--ops`` times each, and prints the median and p99
latency of the adapter's call beside the plain hive call that does the same writes:

- MCP: ``call_tool("memory_put")`` through ``mcp.Client`` in process (JSON-RPC over
  in-memory streams, argument validation, structured result) vs ``hive.put``;
- LangGraph ``HivememStore.aput`` vs ``hive.batch`` of the one put it makes;
- LangGraph ``HivememSaver.aput`` of a checkpoint with two new channel values vs
  ``hive.batch`` of the three puts it makes (values serialized the same way);
- Strands ``store_shared_data`` called as a function (the tool body, as the agent loop
  runs it in a worker thread) vs ``SyncHive.put``.

Needs ``pip install 'hivemem[langgraph,mcp,strands]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hivemem
from hivemem import models


def _stats(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99) - 1] * 1e3


async def _timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    for i in range(min(50, n)):  # warm up
        await op(-1 - i)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        lat.append(time.perf_counter() - t0)
    return lat


async def async_rows(url: str, n: int) -> list[tuple[str, list[float], str, list[float]]]:
    from langgraph.checkpoint.base import empty_checkpoint
    from mcp import Client

    from hivemem.integrations.langgraph import HivememSaver, HivememStore
    from hivemem.integrations.mcp import build_server

    rows = []
    value = {"text": "the nightly build is green again", "n": 1}
    async with hivemem.connect(url, agent="bench", settings=hivemem.Settings(embedder="none")) as h:
        async with Client(build_server(h)) as client:

            async def tool(i: int) -> None:
                args = {"namespace": "mcp", "key": f"k{i % 500}", "value": value}
                result = await client.call_tool("memory_put", args)
                assert not result.is_error

            async def put(i: int) -> None:
                await h.put("plain", f"k{i % 500}", value)

            rows.append(
                (
                    "MCP call_tool memory_put",
                    await _timed(n, tool),
                    "hive.put",
                    await _timed(n, put),
                )
            )

        store = HivememStore(h, prefix="lgs")

        async def store_put(i: int) -> None:
            await store.aput(("users", "u1"), f"k{i % 500}", value)

        async def plain_batch(i: int) -> None:
            op = models.PutOp(namespace="plainb/users/u1", key=f"k{i % 500}", value=value, text="x")
            await h.batch([op])

        rows.append(
            (
                "LangGraph HivememStore.aput",
                await _timed(n, store_put),
                "hive.batch (1 put)",
                await _timed(n, plain_batch),
            )
        )

        saver = HivememSaver(h, prefix="lgc")
        config = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
        channels = {"messages": ["hello"] * 5, "step": 3}

        async def checkpoint(i: int) -> None:
            cp = empty_checkpoint()
            cp["channel_values"] = channels
            versions = {"messages": f"{i + 100:032}.1", "step": f"{i + 100:032}.1"}
            cp["channel_versions"] = versions
            await saver.aput(config, cp, {"source": "loop", "step": i}, versions)

        serde = saver.serde

        async def plain_three(i: int) -> None:
            blobs = [serde.dumps_typed(v) for v in channels.values()]
            ops = [
                models.PutOp(namespace="plainc/t1/+", key=f"b.{c}.{i}", value={"v": b[1].hex()})
                for c, b in zip(channels, blobs, strict=True)
            ]
            meta = serde.dumps_typed({"source": "loop", "step": i})[1].hex()
            ops.append(models.PutOp(namespace="plainc/t1/+", key=f"c.{i}", value={"m": meta}))
            await h.batch(ops)

        rows.append(
            (
                "LangGraph HivememSaver.aput (2 channels)",
                await _timed(n, checkpoint),
                "hive.batch (3 puts)",
                await _timed(n, plain_three),
            )
        )
    return rows


def strands_row(url: str, n: int) -> tuple[str, list[float], str, list[float]]:
    from hivemem.integrations.strands import shared_memory_tools

    value = {"text": "the nightly build is green again", "n": 1}
    with hivemem.connect_sync(url, agent="bench", settings=hivemem.Settings(embedder="none")) as h:
        store_shared_data = shared_memory_tools(h)[0]

        def timed(op: Callable[[int], Any]) -> list[float]:
            for i in range(min(50, n)):
                op(-1 - i)
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                op(i)
                lat.append(time.perf_counter() - t0)
            return lat

        tool = timed(lambda i: store_shared_data(key=f"k{i % 500}", value=value))
        plain = timed(lambda i: h.put("shared-plain", f"k{i % 500}", value))
    return ("Strands store_shared_data", tool, "SyncHive.put", plain)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db" if a.store == "sqlite" else "sqlite://:memory:"
        rows = asyncio.run(async_rows(url, a.ops))
        rows.append(strands_row(url if a.store == "sqlite" else f"sqlite:///{tmp}/s.db", a.ops))
    print(f"{a.ops} calls each, one caller, store {a.store}, embedder=none")
    print(
        f"{'adapter call':<42} {'p50 ms':>8} {'p99 ms':>8}   {'plain call':<22} {'p50 ms':>8}"
        f" {'p99 ms':>8}  {'overhead p50':>12}"
    )
    for name, ours, base_name, base in rows:
        (p50, p99), (b50, b99) = _stats(ours), _stats(base)
        print(
            f"{name:<42} {p50:8.3f} {p99:8.3f}   {base_name:<22} {b50:8.3f} {b99:8.3f}"
            f"  {p50 - b50:+9.3f} ms"
        )


if __name__ == "__main__":
    main()
