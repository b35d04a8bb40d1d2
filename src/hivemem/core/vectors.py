"""An in-memory vector matrix per process, kept coherent with the store through the feed.

Vectors are stored durably beside their items (float32 BLOBs); each process
holds them in one numpy matrix and computes cosine similarity as a matrix-vector
product (rows are unit length). Before each search the index catches up: if the
backend's change signal moved (a local commit, or another process's commit seen
through its notification) or ``feed_poll_seconds`` passed, it reads the feed
from its cursor, collects the items that changed and reloads their vectors. A
cursor that fell out of the feed's retention makes it reload everything.

Two kinds of index (``Settings.vector_index``):

- ``exact`` (default): every selected row is scored. A prefix or filter that keeps
  a small share of the rows scores only those rows (gathered first); otherwise the
  whole matrix is scored and the rest masked out.
- ``hnsw``: an approximate HNSW graph (Malkov and Yashunin, 2018) from the optional
  ``usearch`` package gives candidates; every candidate is checked against the
  prefix and filter and re-scored exactly from the matrix. The graph is built in a
  worker thread and refreshed there after enough changes; rows changed since the
  last refresh are scored exactly, so a search never waits for a build and never
  misses a recent write. Small selections, and searches where too few candidates
  survive the filter, fall back to the exact path.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import math
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from hivemem.backends.base import Backend
from hivemem.core.mirror import FeedMirror, Namespaces
from hivemem.errors import InvalidInput

Key = tuple[str, str]
Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]

KINDS = ("exact", "hnsw")

log = logging.getLogger("hivemem")

_SYNC_BATCH = 1000
_MIN_ROWS = 1024


class VectorIndex(FeedMirror):
    """The vectors of one model, for every searchable item of a store.

    Args:
        backend: the store's backend.
        model: the embedder's name; vectors by other models are ignored.
        dim: the embedder's dimension.
        poll_seconds: catch up at least this often even without a change signal.
        kind: ``"exact"`` or ``"hnsw"`` (see the module notes).

    Raises:
        InvalidInput: an unknown ``kind``, or ``"hnsw"`` without the ``usearch``
            package installed (field ``vector_index``).
    """

    follows_indexed = True
    #: A selection of at most this share of the rows is scored by gathering just
    #: those rows; a larger one by scoring every row and masking the rest.
    gather_share = 0.25
    #: hnsw: selections of at most this many rows are searched exactly (cheaper
    #: than a graph search with the oversampling a small selection needs).
    exact_below = 10_000
    #: hnsw: the graph's expansion factor at search time (``ef``), at least.
    ef_search = 128
    #: hnsw: most graph candidates one search asks for; beyond, the exact path runs.
    max_candidates = 4096
    #: hnsw: refresh the graph once this many rows changed (or 2 % of the rows).
    refresh_after = 1000

    def __init__(
        self, backend: Backend, model: str, dim: int, poll_seconds: float, *, kind: str = "exact"
    ) -> None:
        if kind not in KINDS:
            raise InvalidInput(
                f"vector_index must be one of {', '.join(KINDS)}", field="vector_index"
            )
        super().__init__(backend, poll_seconds)
        self.model = model
        self.dim = dim
        self.kind = kind
        self._graph = _Graph(dim) if kind == "hnsw" else None
        self._keys: list[Key] = []
        self._pos: dict[Key, int] = {}
        self._matrix: Floats = np.zeros((0, dim), dtype=np.float32)
        self._ns_ids = np.zeros(0, dtype=np.int32)
        self._ns = Namespaces()
        # hnsw: the label of each row's vector in the graph, and each live label's row.
        self._labels: Ints = np.zeros(0, dtype=np.int64)
        self._label_pos: dict[int, int] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._keys)

    def memory_bytes(self) -> int:
        """Estimated memory (bytes): the matrix and label arrays exactly, about 150 bytes
        per key (Python objects), and the HNSW graph's own estimate when there is one."""
        graph = self._graph.memory_bytes() if self._graph is not None else 0
        arrays = self._matrix.nbytes + self._ns_ids.nbytes + self._labels.nbytes
        return arrays + 150 * len(self._keys) + graph

    # Coherence with the store ------------------------------------------------------------

    async def _apply(self, changed: list[Key]) -> None:
        found = await self.backend.vectors_of(changed, self.model)
        for key in changed:
            vec = found.get(key)
            if vec is None:
                self.remove(key)
            else:
                self.set(key, vec)

    def _synced(self) -> None:
        self.refresh_graph()

    async def _load_all(self) -> None:
        keys, matrix = await self.backend.load_vector_matrix(self.model, self.dim)
        self._keys, self._pos, self._ns = [], {}, Namespaces()
        size = max(_MIN_ROWS, len(keys))
        if matrix.shape[0] < size:  # room to grow by (at least) a few appends
            grown = np.zeros((size, self.dim), dtype=np.float32)
            grown[: len(keys)] = matrix
            matrix = grown
        self._matrix = matrix
        self._ns_ids = np.zeros(size, dtype=np.int32)
        self._labels = np.zeros(size, dtype=np.int64)
        self._label_pos = {}
        if self._graph is not None:
            self._graph.reset()
        for pos, key in enumerate(keys):  # the rows are in place: keys, namespaces, labels
            self._keys.append(key)
            self._pos[key] = pos
            self._ns_ids[pos] = self._ns.id_of(key[0])
            if self._graph is not None:
                label = self._next_label
                self._next_label += 1
                self._labels[pos] = label
                self._label_pos[label] = pos

    def set(self, key: Key, vector: bytes | Floats) -> None:
        """Store the vector of ``key`` (float32 bytes or array of ``dim`` values); one of
        another dimension removes the key instead. :meth:`sync` calls this for every
        changed item it reads from the feed."""
        row = (
            np.frombuffer(vector, dtype=np.float32)
            if isinstance(vector, bytes)
            else np.asarray(vector, dtype=np.float32).reshape(-1)
        )
        if row.shape[0] != self.dim:
            self.remove(key)
            return
        pos = self._pos.get(key)
        if pos is None:
            pos = len(self._keys)
            if pos == self._matrix.shape[0]:
                # A quarter more (not double): the index holds about the matrix, and a
                # copy every n/4 appends stays cheap per append.
                self._grow(pos + max(_MIN_ROWS, pos // 4))
            self._keys.append(key)
            self._pos[key] = pos
        elif self._graph is not None:
            if np.array_equal(self._matrix[pos], row):
                return  # same vector (e.g. only the value or metadata changed)
            self._retire(pos)
        self._matrix[pos] = row
        self._ns_ids[pos] = self._ns.id_of(key[0])
        if self._graph is not None:
            label = self._next_label
            self._next_label += 1
            self._labels[pos] = label
            self._label_pos[label] = pos

    def remove(self, key: Key) -> None:
        """Forget the vector of ``key`` (nothing if absent): the last row moves into
        its place, so rows stay contiguous."""
        pos = self._pos.pop(key, None)
        if pos is None:
            return
        if self._graph is not None:
            self._retire(pos)
        last = len(self._keys) - 1
        if pos != last:
            moved = self._keys[last]
            self._keys[pos] = moved
            self._pos[moved] = pos
            self._matrix[pos] = self._matrix[last]
            self._ns_ids[pos] = self._ns_ids[last]
            if self._graph is not None:
                label = int(self._labels[last])
                self._labels[pos] = label
                self._label_pos[label] = pos
        self._keys.pop()

    def _retire(self, pos: int) -> None:
        assert self._graph is not None
        label = int(self._labels[pos])
        del self._label_pos[label]
        self._graph.retire(label)

    def _grow(self, rows: int) -> None:
        n = len(self._keys)
        matrix = np.zeros((rows, self.dim), dtype=np.float32)
        matrix[:n] = self._matrix[:n]
        self._matrix = matrix
        self._ns_ids = np.concatenate([self._ns_ids[:n], np.zeros(rows - n, dtype=np.int32)])
        self._labels = np.concatenate([self._labels[:n], np.zeros(rows - n, dtype=np.int64)])

    # Search -------------------------------------------------------------------------------

    def search(
        self,
        query: npt.NDArray[np.float32],
        prefix: str,
        allowed: Iterable[Key] | None,
        k: int,
    ) -> list[tuple[Key, float]]:
        """The ``k`` most similar items at or under ``prefix`` (and in ``allowed`` when
        given): ((namespace, key), cosine similarity), best first.

        Exact for ``kind="exact"``; for ``"hnsw"`` the candidates are approximate
        but every result is in scope and carries its exact similarity.
        """
        n = len(self._keys)
        if n == 0 or k <= 0:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        selected = self._selection(prefix, allowed, n)
        count = n if selected is None else int(np.count_nonzero(selected))
        if count == 0:
            return []
        k = min(k, count)
        if self._graph is not None and self._graph.index is not None and count > self.exact_below:
            found = self._search_graph(q, selected, count, k)
            if found is not None:
                return found
        return self._search_exact(q, selected, count, k)

    def _selection(
        self, prefix: str, allowed: Iterable[Key] | None, n: int
    ) -> npt.NDArray[np.bool_] | None:
        """The rows in scope as a mask over the first ``n`` rows, or None for all."""
        mask = self._ns.mask(prefix, self._ns_ids[:n])
        if allowed is not None:
            keys = allowed if isinstance(allowed, list | tuple) else list(allowed)
            at = np.fromiter(
                map(self._pos.get, keys, itertools.repeat(-1)), dtype=np.intp, count=len(keys)
            )
            rows = at[at >= 0]
            if mask is None:
                mask = np.zeros(n, dtype=bool)
                mask[rows] = True
            else:
                keep = np.zeros(n, dtype=bool)
                keep[rows] = True
                mask &= keep
        return mask

    def _search_exact(
        self, q: Floats, selected: npt.NDArray[np.bool_] | None, count: int, k: int
    ) -> list[tuple[Key, float]]:
        n = len(self._keys)
        rows: npt.NDArray[np.intp] | None = None
        if selected is None:
            scores = _dot(self._matrix[:n], q)
        elif count <= self.gather_share * n:
            rows = np.flatnonzero(selected)
            scores = _dot(np.take(self._matrix, rows, axis=0), q)
        else:
            scores = _dot(self._matrix[:n], q)
            scores[~selected] = -np.inf
        top = _top(scores, k)
        picked = top if rows is None else rows[top]
        keys = self._keys
        return [
            (keys[p], float(scores[t]))
            for p, t in zip(picked.tolist(), top.tolist(), strict=True)
            if scores[t] > -np.inf
        ]

    def _search_graph(
        self, q: Floats, selected: npt.NDArray[np.bool_] | None, count: int, k: int
    ) -> list[tuple[Key, float]] | None:
        """Graph candidates plus the rows changed since the last refresh, re-scored
        exactly; None when the exact path should answer instead."""
        graph = self._graph
        assert graph is not None and graph.index is not None
        n = len(self._keys)
        fresh = np.flatnonzero(self._labels[:n] >= graph.upto)
        in_graph = max(1, n - len(fresh))
        # Oversample for the share the selection keeps and the graph's dead labels.
        want = k * (n / count) * (len(graph.index) / in_graph) * 1.5 + 8
        if want > self.max_candidates:
            return None
        want = min(math.ceil(want), len(graph.index))
        graph.index.expansion_search = max(self.ef_search, want)
        labels = graph.index.search(q, want, threads=1).keys.tolist()
        label_pos = self._label_pos
        found = [p for p in (label_pos.get(label) for label in labels) if p is not None]
        candidates = np.unique(np.concatenate([np.asarray(found, dtype=np.intp), fresh]))
        if selected is not None:
            candidates = candidates[selected[candidates]]
        if len(candidates) < k:
            return None
        scores = _dot(np.take(self._matrix, candidates, axis=0), q)
        top = _top(scores, k)
        keys = self._keys
        return [
            (keys[p], float(scores[t]))
            for p, t in zip(candidates[top].tolist(), top.tolist(), strict=True)
        ]

    # The HNSW graph -----------------------------------------------------------------------

    def refresh_graph(self) -> None:
        """Start a graph build in a worker thread when enough rows changed since the
        last one (a first build when there is none). What the build needs is copied
        here, so the rows may change while it runs."""
        graph = self._graph
        if graph is None or graph.task is not None:
            return
        n = len(self._keys)
        if n == 0 or (graph.index is None and n <= self.exact_below):
            return
        labels = self._labels[:n]
        fresh = labels >= graph.upto
        pending = int(np.count_nonzero(fresh)) + len(graph.dead)
        if graph.index is not None and pending < max(self.refresh_after, n // 50):
            return
        full = graph.index is None or len(graph.dead) > len(graph.index) // 4
        if full:
            add_labels, add_rows, dead = labels.copy(), self._matrix[:n].copy(), []
        else:
            add_labels, add_rows = labels[fresh], self._matrix[:n][fresh]
            dead = [label for label in graph.dead if label < graph.upto]
        graph.start(full, add_labels, add_rows, dead, self._next_label)

    async def wait_built(self) -> None:
        """Wait for a graph build in progress, if any (tests; ``kind="hnsw"`` only)."""
        if self._graph is not None and self._graph.task is not None:
            await asyncio.shield(self._graph.task)

    async def close(self) -> None:
        """Stop a graph build in progress (at its next chunk) and wait for it."""
        if self._graph is not None:
            await self._graph.stop()


def _dot(rows: Floats, q: Floats) -> Floats:
    """The dot product of each row with ``q``.

    Not ``rows @ q``: BLAS splits that matrix-vector product over threads that spin
    while they wait, which on a busy machine (or one shared with the embedding model's
    threads) can cost ten times more. numpy's own SIMD loop is as fast as BLAS on one
    core and never spins; from :data:`PARALLEL_ROWS` rows on, the second half runs on a
    helper thread meanwhile (numpy releases the GIL in the loop; the helper sleeps on a
    queue when idle), which on two cores matches BLAS's two threads.
    """
    n = rows.shape[0]
    if n < PARALLEL_ROWS or _CORES < 2:
        return _ROW_DOT(rows, q)  # type: ignore[no-any-return]
    global _helper
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="hivemem-dot")
    half = n // 2
    later = _helper.submit(_ROW_DOT, rows[half:], q)
    first = _ROW_DOT(rows[:half], q)
    return np.concatenate([first, later.result()])


#: Rows from which :func:`_dot` splits the product over two threads.
PARALLEL_ROWS = 32_768
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_helper: ThreadPoolExecutor | None = None


_ROW_DOT: Any = getattr(np, "vecdot", None) or (lambda rows, q: np.einsum("ij,j->i", rows, q))


def _top(scores: Floats, k: int) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` highest scores, best first."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
    return part[np.argsort(-scores[part], kind="stable")]


def _usearch() -> Any:
    # onnxruntime must be loaded before usearch's compiled module: the other way round,
    # the first MiniLM model run segfaults (usearch 2.26.6, onnxruntime 1.32.0).
    with contextlib.suppress(ImportError):
        importlib.import_module("onnxruntime")
    try:
        return importlib.import_module("usearch.index")
    except ImportError:
        raise InvalidInput(
            "vector_index='hnsw' needs the usearch package: pip install 'hivemem[hnsw]' "
            "(or pip install usearch)",
            field="vector_index",
        ) from None


class _Graph:
    """The usearch HNSW index of a :class:`VectorIndex` and its builds.

    Labels are never reused: a row's vector gets a fresh label each time it changes.
    The graph holds every label below :attr:`upto` that was live when it was built;
    :attr:`dead` lists labels retired since (still in the graph, skipped at search).
    The live index is only read on the event loop's thread; a build works on its own
    copy in a worker thread and is swapped in when done.
    """

    #: Vectors added per call during a build (the stop flag is checked between calls).
    chunk = 4096
    #: HNSW parameters: M (connectivity) and ef at construction (usearch's defaults).
    connectivity = 16
    expansion_add = 128

    def __init__(self, dim: int) -> None:
        self.usearch = _usearch()
        self.dim = dim
        self.index: Any = None
        self.upto = 0
        self.dead: list[int] = []
        self.task: asyncio.Task[None] | None = None
        self._stop: threading.Event | None = None  # of the build in flight
        self._epoch = 0
        self._threads = max(1, (os.cpu_count() or 2) // 2)

    def memory_bytes(self) -> int:
        """The graph's memory as usearch reports it (0 before the first build)."""
        index = self.index
        return 0 if index is None else int(index.memory_usage)

    def reset(self) -> None:
        """Forget the graph (a full reload follows); a build in flight is discarded."""
        self._epoch += 1
        self.index = None
        self.upto = 0
        self.dead = []

    def retire(self, label: int) -> None:
        if label < self.upto or self.task is not None:
            self.dead.append(label)

    def start(self, full: bool, labels: Ints, rows: Floats, dead: list[int], upto: int) -> None:
        taken = len(self.dead)
        base = None if full else self.index
        epoch = self._epoch
        stop = self._stop = threading.Event()

        async def run() -> None:
            try:
                built = await asyncio.to_thread(self._build, base, labels, rows, dead, stop)
            except asyncio.CancelledError:
                stop.set()  # the worker thread ends at its next chunk
                raise
            except Exception:  # keep serving from the old graph and the exact path
                log.exception("building the HNSW vector index failed")
                return
            finally:
                self.task = None
            if built is None or epoch != self._epoch:
                return
            self.index = built
            self.upto = upto
            del self.dead[:taken]

        self.task = asyncio.get_running_loop().create_task(run(), name="hivemem-hnsw-build")

    def _build(
        self, base: Any, labels: Ints, rows: Floats, dead: list[int], stop: threading.Event
    ) -> Any:
        """Build the new graph (in a worker thread): a fresh one, or a copy of ``base``
        without the ``dead`` labels; then add ``labels``/``rows``. None if stopped."""
        if base is None:
            index = self.usearch.Index(
                ndim=self.dim,
                metric="ip",
                dtype="f16",
                connectivity=self.connectivity,
                expansion_add=self.expansion_add,
            )
        else:
            index = base.copy()
            if dead:
                index.remove(np.asarray(dead, dtype=np.uint64))
        keys = labels.astype(np.uint64)
        for start in range(0, len(keys), self.chunk):
            if stop.is_set():
                return None
            end = start + self.chunk
            index.add(keys[start:end], rows[start:end], threads=self._threads)
        return index

    async def stop(self) -> None:
        """Stop the build in flight, if any, and wait for its worker to end."""
        task = self.task
        if task is not None and self._stop is not None:
            self._stop.set()
            await asyncio.gather(task, return_exceptions=True)
