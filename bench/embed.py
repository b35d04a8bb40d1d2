"""Embedding throughput: the model alone versus 32 concurrent writers through micro-batching.

Two figures per setting, both in sentences per second:

- **own**: the model's own throughput, calling ``MiniLMEmbedder.embed_batch`` (one model
  call, no batcher) back to back on consecutive batches of 32 texts;
- **concurrent**: ``--writers`` asyncio tasks (default 32) each embed one text at a time
  with ``MiniLMEmbedder.embed``, so every text goes through the :class:`MicroBatcher`.

The ratio concurrent/own is the share of the model's throughput that micro-batching
keeps (target: at least 80 %). The texts are the dialog turns of LoCoMo
(``--data``, else ``$HIVEMEM_LOCOMO``, else ``../shared/data/locomo-dev.json`` beside
the checkout; read at run time), formatted as the hive indexes them: ``"[session date]
speaker: text"``. Both figures walk the same texts in the same order.

The two figures are measured in ``--rounds`` alternating slices (own, concurrent, own,
...) on the same loaded model, so a change of machine load hits both alike. Columns:
``own/s`` and ``conc/s`` (all rounds), ``ratio`` (conc/s over own/s), ``median`` (the
median of the per-round ratios, the figure least moved by other load), ``cpu`` (the
ratio of sentences per CPU-second of this process), ``batch`` (mean texts per model
call of the batcher), ``p50 ms``/``p99 ms`` (latency of one writer's call).

Each of ``--batch-size``, ``--wait-ms`` and ``--threads`` takes a comma-separated list;
every combination is measured.

Usage::

    python bench/embed.py                                  # default settings, 10 s each
    python bench/embed.py --seconds 5 --wait-ms 0,2,10 --threads 1,2 --json /tmp/e.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import LOCOMO_HELP, locomo_path, percentile

from hivemem.config import Settings
from hivemem.embedders import MiniLMEmbedder

#: Texts in one call of the model for the "own" figure.
OWN_BATCH = 32


def load_texts(path: Path) -> list[str]:
    """Every dialog turn of a LoCoMo-format file as ``"[date] speaker: text"``."""
    texts: list[str] = []
    for sample in json.loads(path.read_text()):
        conversation = sample["conversation"]
        for n in itertools.count(1):
            turns = conversation.get(f"session_{n}")
            if turns is None:
                break
            date = conversation.get(f"session_{n}_date_time", "")
            texts.extend(f"[{date}] {t['speaker']}: {t['text']}" for t in turns)
    if not texts:
        raise SystemExit(f"no dialog turns in {path}")
    return texts


def cpu_seconds() -> float:
    """CPU time of this process, all threads (s)."""
    return time.process_time()


async def measure_own(
    embedder: MiniLMEmbedder, batches: list[list[str]], seconds: float
) -> dict[str, Any]:
    """Back-to-back model calls (``embed_batch``) on consecutive batches of 32 texts."""
    done = calls = 0
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    deadline = started + seconds
    for batch in itertools.cycle(batches):
        await embedder.embed_batch(batch)
        done += len(batch)
        calls += 1
        if time.perf_counter() >= deadline:
            break
    return {
        "sentences": done,
        "calls": calls,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu0,
        "latencies": [],
    }


async def measure_concurrent(
    embedder: MiniLMEmbedder, texts: list[str], seconds: float, writers: int
) -> dict[str, Any]:
    """``writers`` tasks each embedding one text at a time through the micro-batcher."""
    batcher = embedder.batcher
    calls0, texts0 = batcher.calls, batcher.texts
    latencies: list[float] = []
    next_text = itertools.cycle(texts)
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    deadline = started + seconds

    async def writer() -> None:
        while time.perf_counter() < deadline:
            text = next(next_text)
            t0 = time.perf_counter()
            await embedder.embed([text])
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(writer() for _ in range(writers)))
    return {
        "sentences": len(latencies),
        "calls": batcher.calls - calls0,
        "batched_texts": batcher.texts - texts0,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu0,
        "latencies": latencies,
    }


def total(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum rounds of one figure into rates: per_s (wall clock) and per_cpu_s."""
    sentences = sum(r["sentences"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["cpu_seconds"] for r in rounds)
    out: dict[str, Any] = {
        "sentences": sentences,
        "seconds": seconds,
        "per_s": sentences / seconds,
        "per_cpu_s": sentences / cpu if cpu else 0.0,
    }
    latencies = sorted(x for r in rounds for x in r["latencies"])
    if latencies:
        calls = sum(r["calls"] for r in rounds)
        out["mean_batch"] = sum(r["batched_texts"] for r in rounds) / calls
        out["p50_ms"] = percentile(latencies, 50) * 1000
        out["p99_ms"] = percentile(latencies, 99) * 1000
    return out


def int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def float_list(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


async def measure_setting(
    settings: Settings, texts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Own and concurrent throughput of one setting, in alternating rounds."""
    embedder = MiniLMEmbedder(settings)
    await embedder.load()
    batches = [texts[i : i + OWN_BATCH] for i in range(0, len(texts) - OWN_BATCH + 1, OWN_BATCH)]
    for batch in batches[:2]:  # warm-up
        await embedder.embed_batch(batch)
    await asyncio.gather(*(embedder.embed([t]) for t in texts[: args.writers]))
    slice_seconds = args.seconds / args.rounds
    own_rounds: list[dict[str, Any]] = []
    conc_rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        own_rounds.append(await measure_own(embedder, batches, slice_seconds))
        conc_rounds.append(await measure_concurrent(embedder, texts, slice_seconds, args.writers))
    await embedder.close()
    pair_ratios = sorted(
        (c["sentences"] / c["seconds"]) / (o["sentences"] / o["seconds"])
        for o, c in zip(own_rounds, conc_rounds, strict=True)
    )
    own, conc = total(own_rounds), total(conc_rounds)
    return {
        "threads": settings.embed_threads,
        "batch_size": settings.embed_batch_size,
        "wait_ms": settings.embed_batch_wait_ms,
        "writers": args.writers,
        "rounds": args.rounds,
        "own": own,
        "concurrent": conc,
        "ratio": conc["per_s"] / own["per_s"],
        "median_round_ratio": pair_ratios[len(pair_ratios) // 2],
        "cpu_ratio": conc["per_cpu_s"] / own["per_cpu_s"],
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    texts = load_texts(args.data)
    rows: list[dict[str, Any]] = []
    for threads, batch_size, wait_ms in itertools.product(
        args.threads, args.batch_size, args.wait_ms
    ):
        settings = Settings(
            embed_threads=threads, embed_batch_size=batch_size, embed_batch_wait_ms=wait_ms
        )
        row = await measure_setting(settings, texts, args)
        rows.append(row)
        print_row(row, header=len(rows) == 1)
    return rows


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"{'threads':>7} {'batch':>5} {'wait ms':>7} {'own/s':>7} {'conc/s':>7} "
            f"{'ratio':>6} {'median':>6} {'cpu':>6} {'batch':>5} {'p50 ms':>7} {'p99 ms':>7}"
        )
    own, conc = row["own"], row["concurrent"]
    print(
        f"{row['threads']:>7} {row['batch_size']:>5} {row['wait_ms']:>7g} "
        f"{own['per_s']:>7.1f} {conc['per_s']:>7.1f} {row['ratio']:>6.1%} "
        f"{row['median_round_ratio']:>6.1%} {row['cpu_ratio']:>6.1%} "
        f"{conc['mean_batch']:>5.1f} {conc['p50_ms']:>7.1f} {conc['p99_ms']:>7.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per figure (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations own/concurrent (5)")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writers (32)")
    parser.add_argument("--batch-size", type=int_list, default=[32], help="e.g. 16,32")
    parser.add_argument("--wait-ms", type=float_list, default=[2.0], help="e.g. 0,2,10")
    parser.add_argument("--threads", type=int_list, default=[2], help="onnxruntime threads")
    parser.add_argument("--data", type=Path, default=None, help=LOCOMO_HELP)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    args.data = locomo_path(args.data)
    load1 = os.getloadavg()[0]
    print(
        f"embedding throughput: {args.writers} writers, {args.seconds:g} s per figure, "
        f"{os.cpu_count()} CPUs, load {load1:.2f}, texts from {args.data}",
        file=sys.stderr,
    )
    rows = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"load_start": load1, "load_end": os.getloadavg()[0], "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
