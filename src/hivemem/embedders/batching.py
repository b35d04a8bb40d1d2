"""Micro-batching: concurrent ``embed`` calls share one model call.

A model embeds 32 texts in one call much faster than in 32 calls of one text, and a
hive sees many writers each embedding one short text. :class:`MicroBatcher` sits
between the callers and the model's batch function and coalesces their texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from hivemem.embedders.base import Vectors
from hivemem.errors import Unavailable

__all__ = ["BatchFunction", "MicroBatcher"]

#: The wrapped model call: ``texts -> (len(texts), dim)`` float32 rows, in order.
BatchFunction = Callable[[list[str]], Awaitable[Vectors]]


class _Request:
    """One ``embed`` call: its texts, the rows received so far and the caller's future."""

    __slots__ = ("future", "parts", "queued", "remaining")

    def __init__(self, future: asyncio.Future[Vectors], size: int) -> None:
        self.future = future
        #: Rows received, keyed by the offset of their first text in the request.
        self.parts: dict[int, Vectors] = {}
        #: Texts of this request still waiting in the queue (not yet in a batch).
        self.queued = size
        #: Texts of this request whose rows have not arrived yet.
        self.remaining = size


class _Piece:
    """A contiguous run of one request's texts waiting in the queue."""

    __slots__ = ("arrival", "offset", "request", "texts")

    def __init__(self, request: _Request, offset: int, texts: list[str], arrival: float) -> None:
        self.request = request
        self.offset = offset
        self.texts = texts
        self.arrival = arrival


#: A batch as dispatched: for each slice of the batch, its request, the request offset
#: of its first text and its number of texts.
_Slices = list[tuple[_Request, int, int]]


class MicroBatcher:
    """Coalesces concurrent ``embed(texts)`` calls into calls of one batch function.

    Algorithm (dynamic batching, as in inference servers):

    1. ``embed(texts)`` appends the texts to a FIFO queue, stamped with the time they
       arrived, and waits for its rows. A call with more than ``max_batch`` texts is
       split into pieces of at most ``max_batch`` texts.
    2. One dispatcher task (started on demand, ended when the queue is empty) waits
       until the queue holds ``max_batch`` texts or until ``max_wait_ms`` has passed
       since the oldest queued text arrived, whichever comes first.
    3. It then waits for a free model slot (at most ``concurrency`` calls of the batch
       function run at once; with 1, calls are serial), takes up to ``max_batch``
       texts from the head of the queue (a piece larger than what remains is split,
       its rest stays at the head with its original arrival time) and starts the
       batch function on them. Texts that arrive while the model is busy collect in
       the queue, so under load every call is full and no time is spent waiting.
    4. When the batch function returns, each caller's rows are cut out of the result
       and stored under their offset in the caller's request; when all of a caller's
       rows have arrived they are concatenated in order and returned to it.
    5. When the batch function raises, the exception is raised to every caller with
       texts in that batch; their texts still queued are dropped. The batcher goes on
       serving later calls.
    6. A caller cancelled while waiting loses its place: its texts still queued are
       dropped; rows of a batch already running are discarded when they arrive. The
       other callers of the batch are not affected.

    So the added latency of a lone request is at most ``max_wait_ms`` (plus the time
    for a free slot); under load, callers wait for at most one batch ahead of them.

    The batcher belongs to one event loop at a time: the loop of the dispatcher
    task; it may be used from another loop once the queue has drained.

    Args:
        batch_fn: the model call, ``list[str] -> (n, dim)`` float32 array in order.
        max_batch: most texts in one call of ``batch_fn`` (> 0).
        max_wait_ms: longest time (milliseconds, >= 0) the oldest queued text waits
            for others before a partial batch is dispatched.
        concurrency: most calls of ``batch_fn`` running at once (> 0).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        batch_fn: BatchFunction,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        concurrency: int = 1,
    ) -> None:
        if max_batch <= 0:
            raise ValueError("max_batch must be > 0")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if concurrency <= 0:
            raise ValueError("concurrency must be > 0")
        self._batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.concurrency = concurrency
        self._queue: deque[_Piece] = deque()
        self._queued_texts = 0
        self._wake = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called after each call of the batch function (returned or raised) with the
        #: number of texts and the call's seconds: how a hive's metrics see every model
        #: call, whoever asked (a put in ``index_mode=sync``, a search, the indexer).
        self.observers: list[Callable[[int, float], None]] = []
        #: Calls of the batch function so far (for tests and benchmarks).
        self.calls = 0
        #: Texts embedded by those calls.
        self.texts = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` in one or more shared calls of the batch function.

        Args:
            texts: the texts; an empty sequence returns a ``(0, 0)`` array at once.

        Returns:
            The ``(len(texts), dim)`` rows of exactly these texts, in order.

        Raises:
            Unavailable: the batcher was closed while these texts were queued.
            Exception: whatever the batch function raised for a batch holding some of
                these texts; a result of the wrong shape raises ``RuntimeError``.
        """
        items = list(texts)
        if not items:
            return np.empty((0, 0), dtype=np.float32)
        loop = asyncio.get_running_loop()
        self._bind(loop)
        request = _Request(loop.create_future(), len(items))
        request.future.add_done_callback(lambda _: self._forget(request))
        now = loop.time()
        for start in range(0, len(items), self.max_batch):
            piece = _Piece(request, start, items[start : start + self.max_batch], now)
            self._queue.append(piece)
        self._queued_texts += len(items)
        if self._queued_texts >= self.max_batch:
            self._wake.set()
        if self._dispatcher is None:
            self._dispatcher = loop.create_task(self._dispatch_loop())
        return await request.future

    async def close(self) -> None:
        """Stop the batcher: queued callers get ``Unavailable``; running calls finish.

        The batcher stays usable: a later ``embed`` starts a new dispatcher.
        """
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
        while self._queue:
            piece = self._queue.popleft()
            if not piece.request.future.done():
                piece.request.future.set_exception(Unavailable("the embedder was closed"))
        self._queued_texts = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # Internals -------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the batcher's asyncio primitives to ``loop`` when it is idle."""
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_closed():
            # Whatever was queued or running there can no longer be answered.
            self._queue.clear()
            self._queued_texts = 0
            self._dispatcher = None
            self._running.clear()
        if self._dispatcher is not None or self._running:
            raise RuntimeError("MicroBatcher is busy in another event loop")
        self._loop = loop
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)

    def _forget(self, request: _Request) -> None:
        """Done callback of a request: its texts still queued no longer count."""
        self._queued_texts -= request.queued
        request.queued = 0

    def _drop_dead_head(self) -> None:
        """Pop queued pieces whose caller already has an answer (cancelled or failed)."""
        while self._queue and self._queue[0].request.future.done():
            self._queue.popleft()

    async def _dispatch_loop(self) -> None:
        """Form batches and start the batch function while anything is queued."""
        assert self._slots is not None and self._loop is not None
        loop = self._loop
        me = asyncio.current_task()
        try:
            while True:
                self._drop_dead_head()
                if not self._queue:
                    return
                if self._queued_texts < self.max_batch:
                    delay = self._queue[0].arrival + self.max_wait_ms / 1000.0 - loop.time()
                    if delay > 0:
                        self._wake.clear()
                        # asyncio.timeout, not wait_for (on Python 3.11 wait_for
                        # loses a cancellation that lands as the event is set).
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await self._wake.wait()
                        continue
                await self._slots.acquire()
                texts, slices = self._take()
                if not texts:
                    self._slots.release()
                    continue
                task = loop.create_task(self._run_batch(texts, slices))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            if self._dispatcher is me:
                self._dispatcher = None

    def _take(self) -> tuple[list[str], _Slices]:
        """Remove up to ``max_batch`` live texts from the head of the queue."""
        texts: list[str] = []
        slices: _Slices = []
        while self._queue and len(texts) < self.max_batch:
            piece = self._queue[0]
            request = piece.request
            if request.future.done():
                self._queue.popleft()
                continue
            room = self.max_batch - len(texts)
            if len(piece.texts) <= room:
                self._queue.popleft()
                taken = piece.texts
            else:
                taken = piece.texts[:room]
                self._queue[0] = _Piece(
                    request, piece.offset + room, piece.texts[room:], piece.arrival
                )
            slices.append((request, piece.offset, len(taken)))
            texts.extend(taken)
            request.queued -= len(taken)
            self._queued_texts -= len(taken)
        return texts, slices

    async def _run_batch(self, texts: list[str], slices: _Slices) -> None:
        """Call the batch function once and hand every caller its rows or the error."""
        assert self._slots is not None
        try:
            self.calls += 1
            self.texts += len(texts)
            began = time.perf_counter()
            try:
                try:
                    rows = await self._batch_fn(texts)
                finally:
                    for observe in self.observers:
                        observe(len(texts), time.perf_counter() - began)
                if rows.ndim != 2 or rows.shape[0] != len(texts):
                    raise RuntimeError(
                        f"the batch function returned shape {rows.shape} for {len(texts)} texts"
                    )
            except asyncio.CancelledError:
                for request, _, _ in slices:
                    if not request.future.done():
                        request.future.set_exception(Unavailable("the embedding was cancelled"))
                raise
            except Exception as exc:
                for request, _, _ in slices:
                    if not request.future.done():
                        request.future.set_exception(exc)
                return
            start = 0
            for request, offset, count in slices:
                part = rows[start : start + count]
                start += count
                if request.future.done():
                    continue
                request.parts[offset] = part
                request.remaining -= count
                if request.remaining == 0:
                    ordered = [request.parts[k] for k in sorted(request.parts)]
                    result = ordered[0] if len(ordered) == 1 else np.concatenate(ordered)
                    request.future.set_result(result)
        finally:
            self._slots.release()
