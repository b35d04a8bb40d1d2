"""Search latency on 100,000 items, query embedding excluded: embedded and over HTTP.

What is measured: the latency of one ``search()`` call, one query at a time (no
concurrency), for each mode (``lexical``, ``vector``, ``hybrid``) and each scope:

- ``all``: prefix ``""`` (the whole store);
- ``prefix``: prefix ``bench/g3``, one of ten namespaces, so ~10 % of the items;
- ``filter``: the whole store with the metadata filter ``{"bucket": 3}`` (~10 %).

Each figure runs on the embedded hive (``LocalHive`` over the SQLite file, async API) and
over HTTP (``RemoteHive`` against the service app in a subprocess on 127.0.0.1). The
HTTP added cost is the HTTP p50 minus the embedded p50. A third, smaller set of figures
times ``VectorIndex.search`` alone (no SQLite, no fusion), which separates the index's
cost from the rest of the search. Targets (embedded): p50 <= 10 ms, p99 <= 30 ms.

The data: the items' texts are real sentences, built at run time from the dialog turns
of a LoCoMo-format file (``--data``, else ``$HIVEMEM_LOCOMO``, else
``../shared/data/locomo-dev.json`` relative to the repository root; read in place,
never copied anywhere; see examples/README.md for where the file comes from).
Item ``n`` joins turn ``n mod T`` (with its session date and speaker) and turn
``(n mod T + 1 + n div T) mod T``, which gives ``T * (T - 1)`` distinct texts. Items go
to ten namespaces ``bench/g0`` .. ``bench/g9`` (``n mod 10``) with metadata
``{"conv", "session", "bucket": (n div 10) mod 10}``. The queries are the file's
questions, in file order, cycled if ``--queries`` asks for more.

Embeddings: embedding 100k texts with MiniLM takes ~10 minutes on 2 cores and the
index's timing does not depend on the vector values, so the hive gets
:class:`HashEmbedder`: it implements the :class:`hivemem.embedders.base.Embedder`
protocol and returns a pseudo-random unit vector of dimension 384 seeded by a hash of
the text (the same text always gets the same vector, in every process). The vectors are
clustered like real embeddings are (each text is drawn around one of 64 random centres
picked by its hash); with no structure at all, HNSW's recall collapses, which real
embeddings never show, while the exact index does not care. Query embedding
is excluded this way: before timing starts, the vectors of every query text are computed
and kept in :attr:`HashEmbedder.precomputed`; ``embed([query])`` during the timed
searches is then one dict look-up (about a microsecond), in this process and in the
service process alike.

The HTTP service: ``create_app`` builds its hive from a store URL and the settings, so it
cannot be handed a hive with another embedder. This script, run with ``--serve``, builds
the app with ``create_app(url, Settings(embedder="none"))``, then swaps the app's hive
for a ``LocalHive`` over the same file with :class:`HashEmbedder` (opened and closed by
the app's lifespan), and runs it under uvicorn like ``hivemem serve`` does (no access
log). Every route is the service's own.

Usage::

    python bench/search.py                     # 100k items, 300 queries per figure
    python bench/search.py --quick             # 10k items
    python bench/search.py --items 100000 --db /tmp/search100k.db   # keep the store and
                                                # reuse it on the next run
    python bench/search.py --vector-index hnsw --only embedded --json /tmp/s.json

The store is built with ``batch()`` in chunks (``--chunk`` items each, progress shown),
in a temporary directory unless ``--db`` names a file. Every subprocess is stopped at
the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from common import (
    LOCOMO_HELP,
    Procs,
    Result,
    free_port,
    locomo_path,
    process_cpu_seconds,
    summarize,
    wait_http_ready,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

SCRIPT = Path(__file__).resolve()
DEFAULT_JSON = SCRIPT.parent / "results" / "search.json"
DIM = 384
#: HashEmbedder: random centres the vectors gather around, and the noise around them.
CLUSTERS = 64
NOISE = 0.8
NAMESPACES = 10
MODES = ("lexical", "vector", "hybrid")
#: scope name -> (prefix, filter, what it selects)
SCOPES: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "all": ("", None, "whole store"),
    "prefix": ("bench/g3", None, "1 of 10 namespaces, ~10 %"),
    "filter": ("", {"bucket": 3}, 'metadata {"bucket": 3}, ~10 %'),
}
WARMUP_QUERIES = 20
TARGET_P50_MS = 10.0
TARGET_P99_MS = 30.0

console = Console(width=160)


# Data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One dialog turn of the file."""

    conv: str
    session: int
    date: str
    speaker: str
    text: str


def load_corpus(path: Path) -> tuple[list[Turn], list[str]]:
    """Every dialog turn and every distinct question of a LoCoMo-format file."""
    turns: list[Turn] = []
    questions: list[str] = []
    for sample in json.loads(path.read_text()):
        conversation = sample["conversation"]
        for n in itertools.count(1):
            session = conversation.get(f"session_{n}")
            if session is None:
                break
            date = conversation.get(f"session_{n}_date_time", "")
            turns.extend(
                Turn(sample["sample_id"], n, date, t["speaker"], t["text"]) for t in session
            )
        questions.extend(q["question"] for q in sample.get("qa", ()) if q.get("question"))
    questions = list(dict.fromkeys(q.strip() for q in questions if q.strip()))
    if len(turns) < 2 or not questions:
        raise SystemExit(f"{path}: no dialog turns or no questions")
    return turns, questions


def item_of(n: int, turns: Sequence[Turn]) -> dict[str, Any]:
    """Item ``n`` of the store: namespace, key, value, text and metadata (see the module
    notes); distinct texts for every ``n < T * (T - 1)``, ``T = len(turns)``."""
    count = len(turns)
    a = turns[n % count]
    b = turns[(n % count + 1 + n // count) % count]
    return {
        "namespace": f"bench/g{n % NAMESPACES}",
        "key": f"t{n:07d}",
        "value": {"n": n, "conv": a.conv},
        "text": f"[{a.date}] {a.speaker}: {a.text} {b.text}",
        "metadata": {"conv": a.conv, "session": a.session, "bucket": (n // 10) % 10},
    }


# The embedder ----------------------------------------------------------------------------


class HashEmbedder:
    """An :class:`~hivemem.embedders.base.Embedder` returning pseudo-random unit vectors.

    The vector of a text is one of :data:`CLUSTERS` fixed random centres (picked by the
    text's BLAKE2b hash) plus standard normal noise seeded by that hash, scaled by
    :data:`NOISE`, L2-normalised (float32, ``dim`` values): deterministic across
    processes and runs, ~20 µs per text. Texts in :attr:`precomputed` are answered from
    that dict, which is how the benchmark excludes query embedding from the timed searches.
    """

    def __init__(self, dim: int = DIM) -> None:
        self.name = f"bench-hash-{dim}"
        self.dim = dim
        self.precomputed: dict[str, npt.NDArray[np.float32]] = {}
        self._centres = np.random.default_rng(0).standard_normal((CLUSTERS, dim), np.float32)

    def vector(self, text: str) -> npt.NDArray[np.float32]:
        """The unit vector of ``text``."""
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng(seed)
        row = self._centres[seed % CLUSTERS] + NOISE * rng.standard_normal(self.dim, np.float32)
        row /= np.float32(np.linalg.norm(row))
        return row

    def precompute(self, texts: Sequence[str]) -> None:
        """Compute and keep the vectors of ``texts`` (the queries), before timing."""
        for text in texts:
            self.precomputed[text] = self.vector(text)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """A ``(len(texts), dim)`` float32 array of unit rows."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            row = self.precomputed.get(text)
            out[i] = self.vector(text) if row is None else row
        return out

    async def close(self) -> None:
        """Nothing to release."""


# Hives -----------------------------------------------------------------------------------


def make_settings(vector_index: str, **extra: Any) -> Any:
    from hivemem.config import Settings

    return Settings(embedder="none", vector_index=vector_index, **extra)  # type: ignore[arg-type]


def make_hive(db: Path, settings: Any, embedder: HashEmbedder) -> Any:
    """A LocalHive over the SQLite file ``db`` whose embedder is ``embedder``, with the
    vector index kind ``settings.vector_index``."""
    from hivemem.backends.sqlite import SqliteBackend
    from hivemem.core import LocalHive

    return LocalHive(
        SqliteBackend(str(db), settings), agent="bench", settings=settings, embedder=embedder
    )


async def count_items(db: Path) -> int:
    """Live items in the store file ``db`` (0 if it has none or no schema yet)."""
    from hivemem.backends.sqlite import SqliteBackend

    backend = SqliteBackend(str(db), make_settings("exact"))
    await backend.open()
    try:
        return await backend.count_items(time.time())
    finally:
        await backend.close()


async def build_store(db: Path, items: int, turns: Sequence[Turn], chunk: int) -> float:
    """Write ``items`` items into ``db`` with ``batch()`` in chunks; returns seconds."""
    from hivemem import PutOp

    settings = make_settings(
        "exact", max_batch_ops=chunk, sqlite_synchronous="NORMAL", index_mode="sync"
    )  # vectors with each write: the timed searches find every item's vector at once
    hive = make_hive(db, settings, HashEmbedder())
    started = time.perf_counter()
    try:
        await hive.open()
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(f"building {db.name}", total=items)
            for start in range(0, items, chunk):
                ops = [PutOp(**item_of(n, turns)) for n in range(start, min(items, start + chunk))]
                await hive.batch(ops)
                progress.advance(task, len(ops))
    finally:
        await hive.close()
    return time.perf_counter() - started


# Timing ----------------------------------------------------------------------------------


def check_hits(hits: Sequence[Any], prefix: str, filter: dict[str, Any] | None) -> int:
    """How many hits break the scope (outside the prefix or not matching the filter)."""
    bad = 0
    for hit in hits:
        ns = hit.item.namespace
        if prefix and not (ns == prefix or ns.startswith(prefix + "/")):
            bad += 1
        elif filter and any((hit.item.metadata or {}).get(k) != v for k, v in filter.items()):
            bad += 1
    return bad


async def time_search(
    hive: Any,
    name: str,
    label: str,
    queries: Sequence[str],
    scope: str,
    mode: str,
    limit: int,
    server_pid: int | None = None,
) -> Result:
    """Run every query once, sequentially, after :data:`WARMUP_QUERIES` untimed ones."""
    prefix, filter, _ = SCOPES[scope]
    for query in queries[:WARMUP_QUERIES]:
        await hive.search(prefix, query, filter=filter, mode=mode, limit=limit)
    lat: list[int] = []
    hit_count = bad = errors = 0
    first_error: str | None = None
    cpu0 = time.process_time()
    server0 = None if server_pid is None else process_cpu_seconds(server_pid)
    started = time.perf_counter()
    pc = time.perf_counter_ns
    for query in queries:
        t0 = pc()
        try:
            hits = await hive.search(prefix, query, filter=filter, mode=mode, limit=limit)
        except Exception as exc:  # counted, reported
            errors += 1
            first_error = first_error or repr(exc)
            continue
        lat.append(pc() - t0)
        hit_count += len(hits)
        bad += check_hits(hits, prefix, filter)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    server1 = None if server_pid is None else process_cpu_seconds(server_pid)
    extra: dict[str, Any] = {
        "scope": scope,
        "mode": mode,
        "mean_hits": round(hit_count / max(1, len(lat)), 2),
        "hits_out_of_scope": bad,
    }
    if first_error:
        extra["first_error"] = first_error
    result = summarize(name, label, lat, seconds, errors=errors + bad, extra=extra)
    done = max(1, len(lat) + errors)
    if server0 is not None and server1 is not None:
        result.cpu_ms_per_op = (server1 - server0) * 1e3 / done
        result.client_cpu_ms_per_op = cpu * 1e3 / done
    else:
        result.cpu_ms_per_op = cpu * 1e3 / done
    return result


async def first_vector_search(hive: Any, query: str) -> float:
    """Seconds of the first vector search (it loads every vector into the index)."""
    started = time.perf_counter()
    await hive.search("", query, mode="vector", limit=10)
    return time.perf_counter() - started


async def first_lexical_search(hive: Any, query: str) -> float:
    """Seconds of the first lexical search (with ``lexical_index=memory`` it loads and
    tokenizes every text into the in-process BM25 index)."""
    started = time.perf_counter()
    await hive.search("", query, mode="lexical", limit=10)
    return time.perf_counter() - started


async def wait_for_graph(hive: Any, embedder: HashEmbedder) -> float:
    """Seconds until the HNSW graph build started by the first search is done (searches
    are exact until then)."""
    started = time.perf_counter()
    index = hive._vector_index(embedder.dim)
    await index.sync()
    await index.wait_built()
    return time.perf_counter() - started


async def time_index_alone(
    hive: Any, embedder: HashEmbedder, queries: Sequence[str], candidates: int
) -> list[Result]:
    """``VectorIndex.search`` alone (already synced), per scope, ``candidates`` rows."""
    from hivemem.core.search import parse_filter

    index = hive._vector_index(embedder.dim)
    await index.sync()
    results = []
    for scope, (prefix, filter, what) in SCOPES.items():
        allowed = None
        if filter is not None:
            conditions = parse_filter(filter, None, None, None)
            allowed = await hive.backend.matching_keys(prefix, conditions, time.time())
        vectors = [embedder.precomputed[q] for q in queries]
        for vec in vectors[:WARMUP_QUERIES]:
            index.search(vec, prefix, allowed, candidates)
        lat = []
        cpu0 = time.process_time()
        started = time.perf_counter()
        pc = time.perf_counter_ns
        for vec in vectors:
            t0 = pc()
            index.search(vec, prefix, allowed, candidates)
            lat.append(pc() - t0)
        seconds = time.perf_counter() - started
        result = summarize(
            f"index.{scope}",
            f"VectorIndex.search alone, top {candidates}, {what}",
            lat,
            seconds,
            extra={"scope": scope, "mode": "vector", "items_in_index": len(index)},
        )
        result.cpu_ms_per_op = (time.process_time() - cpu0) * 1e3 / max(1, len(lat))
        results.append(result)
    return results


async def bench_embedded(
    db: Path, queries: Sequence[str], limit: int, vector_index: str
) -> tuple[list[Result], dict[str, Any]]:
    """Every (scope, mode) figure on a LocalHive over ``db``, then the index alone."""
    embedder = HashEmbedder()
    embedder.precompute(queries)
    settings = make_settings(vector_index)
    hive = make_hive(db, settings, embedder)
    results: list[Result] = []
    info: dict[str, Any] = {}
    try:
        await hive.open()
        info["index_load_s"] = round(await first_vector_search(hive, queries[0]), 3)
        console.print(f"embedded: first vector search (loads the index) {info['index_load_s']} s")
        info["lexical_load_s"] = round(await first_lexical_search(hive, queries[0]), 3)
        console.print(f"embedded: first lexical search {info['lexical_load_s']} s")
        if vector_index == "hnsw":
            info["graph_build_s"] = round(await wait_for_graph(hive, embedder), 1)
            console.print(f"embedded: HNSW graph built {info['graph_build_s']} s later")
        for scope in SCOPES:
            for mode in MODES:
                r = await time_search(
                    hive,
                    f"embedded.{scope}.{mode}",
                    f"embedded {mode}, {SCOPES[scope][2]}",
                    queries,
                    scope,
                    mode,
                    limit,
                )
                console.print(f"  {r.name}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms")
                results.append(r)
        results += await time_index_alone(hive, embedder, queries, settings.search_candidates)
    finally:
        await hive.close()
    return results, info


async def bench_http(
    procs: Procs,
    db: Path,
    data: Path,
    queries: Sequence[str],
    limit: int,
    vector_index: str,
    log_level: str,
) -> tuple[list[Result], dict[str, Any]]:
    """Every (scope, mode) figure through RemoteHive against the service app (see the
    module notes) in a subprocess on a free loopback port."""
    import hivemem

    port = free_port()
    cmd = [sys.executable, str(SCRIPT), "--serve", "--db", str(db)]
    cmd += ["--port", str(port), "--data", str(data), "--vector-index", vector_index]
    cmd += ["--server-log-level", log_level]
    proc = procs.start(cmd, "search-service.log")
    url = f"http://127.0.0.1:{port}"
    ready_s = 60.0 if vector_index == "exact" else 1800.0  # hnsw: the graph is built first
    started = time.perf_counter()
    wait_http_ready(f"{url}/readyz", proc, ready_s, procs.log_dir / "search-service.log")
    console.print(f"http: service ready after {time.perf_counter() - started:.1f} s")
    info: dict[str, Any] = {"server": " ".join(cmd)}
    hive = hivemem.connect(url, agent="bench")
    results: list[Result] = []
    try:
        info["index_load_s"] = round(await first_vector_search(hive, queries[0]), 3)
        console.print(f"http: first vector search (loads the index) {info['index_load_s']} s")
        info["lexical_load_s"] = round(await first_lexical_search(hive, queries[0]), 3)
        console.print(f"http: first lexical search {info['lexical_load_s']} s")
        for scope in SCOPES:
            for mode in MODES:
                r = await time_search(
                    hive,
                    f"http.{scope}.{mode}",
                    f"http {mode}, {SCOPES[scope][2]}",
                    queries,
                    scope,
                    mode,
                    limit,
                    server_pid=proc.pid,
                )
                console.print(f"  {r.name}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms")
                results.append(r)
    finally:
        await hive.close()
        procs.stop(proc)
    return results, info


# The service launcher (--serve) ----------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run the service app over ``args.db`` with :class:`HashEmbedder` until stopped."""
    import uvicorn

    from hivemem.service.app import ServiceState, create_app

    _, questions = load_corpus(args.data)
    embedder = HashEmbedder()
    embedder.precompute(questions)
    settings = make_settings(args.vector_index)
    app = create_app(f"sqlite:///{args.db}", settings)
    hive = make_hive(args.db, settings, embedder)
    app.state.hivemem = ServiceState(hive)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            await hive.open()
            if args.vector_index == "hnsw":  # ready only once the graph is built
                await wait_for_graph(hive, embedder)
            try:
                yield state
            finally:
                await hive.close()

    app.router.lifespan_context = lifespan
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level=args.server_log_level,
        access_log=False,
        loop="auto",
        http="auto",
    )
    return 0


# Report ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def summary_rows(results: dict[str, Result]) -> list[dict[str, Any]]:
    """One row per (scope, mode): embedded and HTTP figures, the HTTP added cost and
    whether the embedded figure meets the targets."""
    rows = []
    for scope in SCOPES:
        for mode in MODES:
            emb = results.get(f"embedded.{scope}.{mode}")
            http = results.get(f"http.{scope}.{mode}")
            row: dict[str, Any] = {"scope": scope, "mode": mode}
            for tag, r in (("embedded", emb), ("http", http)):
                row[f"{tag}_p50_ms"] = None if r is None else r.p50_ms
                row[f"{tag}_p99_ms"] = None if r is None else r.p99_ms
                row[f"{tag}_mean_ms"] = None if r is None else r.mean_ms
            row["http_added_p50_ms"] = (
                None
                if emb is None or http is None or emb.p50_ms is None or http.p50_ms is None
                else http.p50_ms - emb.p50_ms
            )
            row["meets_target"] = (
                None
                if emb is None or emb.p50_ms is None or emb.p99_ms is None
                else emb.p50_ms <= TARGET_P50_MS and emb.p99_ms <= TARGET_P99_MS
            )
            row["errors"] = sum(r.errors for r in (emb, http) if r is not None)
            rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]], index: list[Result], title: str) -> None:
    """The summary table (rich), then the index-alone figures."""
    t = Table(title=title, title_justify="left")
    columns = ["scope", "mode", "emb p50", "emb p99", "emb mean", "http p50", "http p99"]
    columns += ["http mean", "http added p50", "target", "errors"]
    for col in columns:
        t.add_column(col, justify="left" if col in ("scope", "mode", "target") else "right")
    for row in rows:
        ok = row["meets_target"]
        t.add_row(
            row["scope"],
            row["mode"],
            _ms(row["embedded_p50_ms"]),
            _ms(row["embedded_p99_ms"]),
            _ms(row["embedded_mean_ms"]),
            _ms(row["http_p50_ms"]),
            _ms(row["http_p99_ms"]),
            _ms(row["http_mean_ms"]),
            _ms(row["http_added_p50_ms"]),
            "-" if ok is None else ("[green]ok" if ok else "[red]miss"),
            str(row["errors"]),
        )
    console.print(t)
    if index:
        t = Table(title="VectorIndex.search alone (ms)", title_justify="left")
        for col in ("figure", "p50", "p99", "mean", "max"):
            t.add_column(col, justify="left" if col == "figure" else "right")
        for r in index:
            t.add_row(r.label, _ms(r.p50_ms), _ms(r.p99_ms), _ms(r.mean_ms), _ms(r.max_ms))
        console.print(t)


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# Main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=None, help="items in the store (100000)")
    p.add_argument("--quick", action="store_true", help="10,000 items (unless --items)")
    p.add_argument("--queries", type=int, default=300, help="timed queries per figure (300)")
    p.add_argument("--limit", type=int, default=10, help="search limit (10)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output ({DEFAULT_JSON})")
    p.add_argument("--data", type=Path, default=None, help=LOCOMO_HELP)
    p.add_argument("--db", type=Path, default=None, help="store file to build or reuse (kept)")
    p.add_argument("--chunk", type=int, default=500, help="items per batch() when building")
    p.add_argument("--only", default="embedded,http", help="embedded,http (default both)")
    p.add_argument("--vector-index", choices=("exact", "hnsw"), default="exact")
    p.add_argument(
        "--lexical-index",
        choices=("engine", "memory"),
        default=None,
        help="BM25 in SQLite FTS5 (engine) or in process (memory); default: the setting's",
    )
    p.add_argument("--server-log-level", default="warning", choices=("info", "warning"))
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = locomo_path(args.data)
    if args.lexical_index is not None:  # read by Settings here and in the service subprocess
        os.environ["HIVEMEM_LEXICAL_INDEX"] = args.lexical_index
    if args.items is None:
        args.items = 10_000 if args.quick else 100_000
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - {"embedded", "http"}
    if unknown:
        p.error(f"unknown section(s) for --only: {', '.join(sorted(unknown))}")
    if args.items < NAMESPACES * 10 or args.queries < 1 or not 1 <= args.chunk <= 100_000:
        p.error("need --items >= 100, --queries >= 1 and 1 <= --chunk <= 100000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    tmp = Path(tempfile.mkdtemp(prefix="hivemem-search-bench-"))
    try:
        return asyncio.run(run(args, tmp))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every subprocess was stopped")
        return 130
    finally:
        if args.keep_tmp:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def run(args: argparse.Namespace, tmp: Path) -> int:
    started = time.perf_counter()
    info = machine_info()
    turns, questions = load_corpus(args.data)
    if args.items > len(turns) * (len(turns) - 1):
        raise SystemExit(f"{args.data} gives at most {len(turns) * (len(turns) - 1)} texts")
    queries = [q for q, _ in zip(itertools.cycle(questions), range(args.queries), strict=False)]
    db = args.db or tmp / "search.db"
    console.print(
        f"[bold]hivemem search bench[/] items={args.items:,} queries={len(queries)} "
        f"limit={args.limit} vector_index={args.vector_index} "
        f"lexical_index={os.environ.get('HIVEMEM_LEXICAL_INDEX', 'default')} db={db}\n"
        f"{len(turns)} turns and {len(questions)} questions from {args.data}; "
        f"nproc={info['nproc']} cpu={info['cpu_model']!r} load={info['loadavg_start']}"
    )
    build_s = None
    existing = await count_items(db) if db.exists() else 0
    if existing == args.items:
        console.print(f"reusing {db} ({existing:,} items)")
    elif existing:
        raise SystemExit(f"{db} holds {existing:,} items, not {args.items:,}: remove it first")
    else:
        build_s = await build_store(db, args.items, turns, args.chunk)
        console.print(f"built {args.items:,} items in {build_s:.1f} s")
    results: dict[str, Result] = {}
    index_results: list[Result] = []
    sections: dict[str, Any] = {}
    if "embedded" in args.sections:
        console.rule("embedded (LocalHive, async, one query at a time)")
        rs, sections["embedded"] = await bench_embedded(db, queries, args.limit, args.vector_index)
        for r in rs:
            results[r.name] = r
        index_results = [r for r in rs if r.name.startswith("index.")]
    if "http" in args.sections:
        console.rule("http (RemoteHive -> service subprocess, one query at a time)")
        with Procs(tmp) as procs:
            rs, sections["http"] = await bench_http(
                procs,
                db,
                args.data,
                queries,
                args.limit,
                args.vector_index,
                args.server_log_level,
            )
        for r in rs:
            results[r.name] = r
    rows = summary_rows(results)
    console.rule("Summary")
    print_summary(
        rows,
        index_results,
        f"Search latency (ms), {args.items:,} items, {len(queries)} sequential queries per "
        f"figure, limit {args.limit}, vector_index={args.vector_index}; "
        f"target: embedded p50 <= {TARGET_P50_MS:g}, p99 <= {TARGET_P99_MS:g}",
    )
    elapsed = time.perf_counter() - started
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": {
            "items": args.items,
            "queries": len(queries),
            "limit": args.limit,
            "vector_index": args.vector_index,
            "namespaces": NAMESPACES,
            "scopes": {k: {"prefix": v[0], "filter": v[1]} for k, v in SCOPES.items()},
            "embedder": "HashEmbedder (pseudo-random unit vectors, dim 384; query vectors "
            "precomputed, so query embedding is excluded)",
            "data": str(args.data),
            "build_s": None if build_s is None else round(build_s, 1),
        },
        "machine": {**info, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "sections": sections,
        "results": {name: r.to_json() for name, r in results.items()},
        "summary": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json} ({elapsed:.0f} s)")
    failed = any(r.errors for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
