"""Embedders: the offline MiniLM model, micro-batching and the OpenAI-compatible provider.

The MiniLM tests run the real int8 model. The micro-batching tests drive the batcher with
a counting batch function (they test the batcher itself), plus one with the real model.
The OpenAI provider talks to a small embeddings server started here on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

import hivemem
from hivemem.config import Settings
from hivemem.embedders import (
    Embedder,
    MicroBatcher,
    MiniLMEmbedder,
    OpenAIEmbedder,
    Vectors,
    make_embedder,
)
from hivemem.embedders.minilm import (
    MAX_TOKENS,
    TOKENIZER_SHA256,
    default_tokenizer_path,
    load_model,
    load_tokenizer,
)
from hivemem.errors import HivememError, Unavailable, UpstreamFailed

from .conftest import free_port

# MiniLM: the real model ------------------------------------------------------------


@pytest.fixture(scope="module")
async def minilm() -> AsyncIterator[MiniLMEmbedder]:
    embedder = MiniLMEmbedder(Settings(embed_threads=2))
    await embedder.load()
    yield embedder
    await embedder.close()


def cosine(a: Vectors, b: Vectors) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_minilm_returns_unit_norm_float32_rows_of_dim_384(minilm: MiniLMEmbedder) -> None:
    vectors = await minilm.embed(["hello world", "the cat sat on the mat", "x"])
    assert minilm.name == "all-MiniLM-L6-v2-int8"
    assert minilm.dim == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_minilm_is_an_embedder(minilm: MiniLMEmbedder) -> None:
    assert isinstance(minilm, Embedder)


async def test_minilm_scores_a_paraphrase_above_an_unrelated_sentence(
    minilm: MiniLMEmbedder,
) -> None:
    eating, bread, baby = await minilm.embed(
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ]
    )
    related = cosine(eating, bread)
    unrelated = cosine(eating, baby)
    # The fp32 model gives 0.755 and -0.105 (sentence-transformers' own example).
    assert related > 0.65
    assert unrelated < 0.1
    assert related - unrelated > 0.5


async def test_minilm_gives_identical_text_identical_vectors(minilm: MiniLMEmbedder) -> None:
    text = "Melanie painted a sunrise over the lake last week."
    same_batch = await minilm.embed([text, text])
    again = await minilm.embed([text])
    np.testing.assert_array_equal(same_batch[0], same_batch[1])
    np.testing.assert_array_equal(same_batch[0], again[0])


async def test_minilm_vector_does_not_depend_on_the_other_texts_of_the_batch(
    minilm: MiniLMEmbedder,
) -> None:
    text = "Caroline went to an LGBTQ support group."
    alone = await minilm.embed([text])
    padded = await minilm.embed([text, "a much longer text " * 40])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


async def test_minilm_truncates_text_after_256_tokens(minilm: MiniLMEmbedder) -> None:
    head = "word " * (MAX_TOKENS + 10)
    one, other = await minilm.embed([head + "apples and pears", head + "rockets and planets"])
    np.testing.assert_allclose(one, other, atol=1e-6)


async def test_minilm_long_request_returns_rows_in_input_order(minilm: MiniLMEmbedder) -> None:
    texts = [f"sentence {i} " + "filler " * (i % 7) for i in range(70)]
    together = await minilm.embed(texts)
    alone = await minilm.embed([texts[5]])
    assert together.shape == (70, 384)
    np.testing.assert_allclose(together[5], alone[0], atol=1e-5)
    # Rows differ from each other: none was swapped in for another.
    assert len({row.tobytes() for row in together}) == 70


async def test_minilm_batch_of_mixed_lengths_matches_each_text_embedded_alone(
    minilm: MiniLMEmbedder,
) -> None:
    # Long and short texts interleaved: the model runs them in length groups.
    texts = [("long text " * (3 * i) if i % 2 else f"short {i}") for i in range(24)]
    together = await minilm.embed_batch(texts)
    for i in (0, 1, 10, 23):
        alone = await minilm.embed_batch([texts[i]])
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


async def test_minilm_empty_input_returns_an_empty_array(minilm: MiniLMEmbedder) -> None:
    vectors = await minilm.embed([])
    assert vectors.shape == (0, 384)


async def test_minilm_runs_the_model_off_the_event_loop(minilm: MiniLMEmbedder) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await minilm.embed_batch(["a sentence that takes some time to embed " * 12] * 8)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    # The loop kept running while the model ran for `elapsed` seconds.
    assert ticks >= min(10, elapsed / 0.01)


def test_the_shipped_tokenizer_matches_its_pinned_sha256() -> None:
    digest = hashlib.sha256(default_tokenizer_path().read_bytes()).hexdigest()
    assert digest == TOKENIZER_SHA256
    tokenizer = load_tokenizer()
    assert tokenizer.encode("Hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]


def test_tokenizer_checksum_rejects_a_tampered_copy(tmp_path: Path) -> None:
    tampered = tmp_path / "tokenizer.json"
    data = default_tokenizer_path().read_bytes().replace(b'"hello"', b'"hellp"', 1)
    tampered.write_bytes(data)
    with pytest.raises(HivememError, match="sha256"):
        load_tokenizer(tampered)


def test_tokenizer_loads_an_intact_copy(tmp_path: Path) -> None:
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(default_tokenizer_path().read_bytes())
    assert load_tokenizer(copy).encode("hi").ids == [101, 7632, 102]


def test_model_checksum_rejects_a_wrong_file(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    with pytest.raises(HivememError, match="sha256"):
        load_model(fake)


async def test_minilm_works_again_after_close() -> None:
    embedder = MiniLMEmbedder()
    first = await embedder.embed(["reopened"])
    await embedder.close()
    again = await embedder.embed(["reopened"])
    await embedder.close()
    np.testing.assert_array_equal(first, again)


def _thread_names() -> dict[int, str]:
    """This process's threads (Linux): id -> Python thread name, "" for threads Python
    did not start (onnxruntime's)."""
    import os
    import threading

    python = {t.native_id: t.name for t in threading.enumerate()}
    return {int(t): python.get(int(t), "") for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_the_indexers_embeddings_run_at_lower_priority_and_match_the_foreground_ones() -> (
    None
):
    """``embed_background`` (the indexer's path) gives the vectors ``embed`` gives, from
    threads at niceness ``index_nice``: its own and the onnxruntime threads its session
    started. The foreground thread keeps the process's niceness."""
    import os
    import threading

    texts = ["the deploy failed because the migration timed out", "a refund after the price change"]
    embedder = MiniLMEmbedder(Settings(embed_threads=2, index_nice=7))
    try:
        background = await embedder.embed_background(texts)
        foreground = await embedder.embed(texts)
        np.testing.assert_allclose(background, foreground, atol=1e-6)
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        names = _thread_names()
        # This embedder's two worker threads (other tests' embedders may run in this
        # process too, so they are found by their executors, not by name).
        index_threads = [t.native_id or 0 for t in embedder._background._threads]  # type: ignore[union-attr]
        model_threads = [t.native_id or 0 for t in embedder._executor._threads]  # type: ignore[union-attr]
        assert len(index_threads) == 1 and len(model_threads) == 1
        assert os.getpriority(os.PRIO_PROCESS, index_threads[0]) == base + 7
        assert os.getpriority(os.PRIO_PROCESS, model_threads[0]) == base
        # onnxruntime's intra-op threads (one per session beyond the caller's, for
        # embed_threads=2) inherit the niceness of the thread that made their session.
        niceness = sorted(os.getpriority(os.PRIO_PROCESS, t) for t, n in names.items() if not n)
        assert niceness.count(base + 7) >= 1
    finally:
        await embedder.close()


async def test_minilm_embed_with_a_tampered_tokenizer_raises_a_clear_error(
    tmp_path: Path,
) -> None:
    tampered = tmp_path / "tokenizer.json"
    tampered.write_bytes(default_tokenizer_path().read_bytes() + b" ")
    embedder = MiniLMEmbedder(tokenizer_path=tampered)
    try:
        with pytest.raises(HivememError, match="expected " + TOKENIZER_SHA256):
            await embedder.embed(["anything"])
    finally:
        await embedder.close()


def test_make_embedder_follows_the_setting() -> None:
    assert make_embedder(Settings(embedder="none")) is None
    assert isinstance(make_embedder(Settings(embedder="minilm")), MiniLMEmbedder)
    remote = make_embedder(Settings(embedder="openai", openai_model="m1"))
    assert isinstance(remote, OpenAIEmbedder)
    assert remote.name == "openai:m1"


# Micro-batching --------------------------------------------------------------------


class CountingModel:
    """A batch function recording every call; row i of text "t<n>" is [n, len(batch)]."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_next: Exception | None = None
        self.release: asyncio.Event | None = None
        #: Set when the first call starts.
        self.started = asyncio.Event()

    async def __call__(self, texts: list[str]) -> Vectors:
        self.batches.append(list(texts))
        self.started.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.release is not None:
                await self.release.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            return np.array([[float(t[1:]), len(texts)] for t in texts], dtype=np.float32)
        finally:
            self.in_flight -= 1


def ids(rows: Vectors) -> list[int]:
    return [int(v) for v in rows[:, 0]]


async def test_concurrent_calls_share_one_model_call() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(10)))
    assert len(model.batches) == 1
    assert sorted(model.batches[0]) == sorted(f"t{i}" for i in range(10))
    assert [ids(r) for r in results] == [[i] for i in range(10)]


async def test_a_full_batch_is_dispatched_without_waiting() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=60_000)
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(8))), 5)
    assert time.perf_counter() - started < 5
    assert [len(b) for b in model.batches] == [4, 4]


async def test_a_partial_batch_is_dispatched_after_the_wait() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=40)
    started = time.perf_counter()
    rows = await batcher.embed(["t1"])
    elapsed = time.perf_counter() - started
    assert ids(rows) == [1]
    assert 0.035 <= elapsed < 2.0


async def test_zero_wait_dispatches_at_once() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=0)
    assert ids(await batcher.embed(["t3", "t4"])) == [3, 4]
    assert model.batches == [["t3", "t4"]]


async def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=1)
    rows = await batcher.embed([f"t{i}" for i in range(70)])
    assert [len(b) for b in model.batches] == [32, 32, 6]
    assert ids(rows) == list(range(70))


async def test_each_caller_gets_exactly_its_own_rows_in_order() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=5, concurrency=2)
    sizes = [1, 3, 8, 13, 2, 1, 20, 5, 1, 7]
    requests: list[list[str]] = []
    counter = 0
    for size in sizes:
        requests.append([f"t{counter + j}" for j in range(size)])
        counter += size
    results = await asyncio.gather(*(batcher.embed(r) for r in requests))
    for request, rows in zip(requests, results, strict=True):
        assert ids(rows) == [int(t[1:]) for t in request]
    assert all(len(b) <= 8 for b in model.batches)
    assert sum(len(b) for b in model.batches) == counter


async def test_an_error_in_a_model_call_reaches_every_caller_of_that_batch() -> None:
    model = CountingModel()
    model.fail_next = RuntimeError("model exploded")
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=20)
    results = await asyncio.gather(
        *(batcher.embed([f"t{i}"]) for i in range(5)), return_exceptions=True
    )
    assert len(model.batches) == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "model exploded" for r in results)


async def test_the_batcher_keeps_working_after_a_failed_call() -> None:
    model = CountingModel()
    model.fail_next = Unavailable("down for a moment")
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=1)
    with pytest.raises(Unavailable):
        await batcher.embed(["t1"])
    assert ids(await batcher.embed(["t2", "t3"])) == [2, 3]


async def test_a_caller_cancelled_while_queued_is_left_out_of_the_batch() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=50)
    doomed = asyncio.create_task(batcher.embed(["t99"]))
    others = [asyncio.create_task(batcher.embed([f"t{i}"])) for i in range(3)]
    await asyncio.sleep(0)
    doomed.cancel()
    results = await asyncio.gather(*others)
    assert doomed.cancelled()
    assert [ids(r) for r in results] == [[0], [1], [2]]
    assert model.batches == [["t0", "t1", "t2"]]


async def test_a_caller_cancelled_during_the_model_call_does_not_break_the_batch() -> None:
    model = CountingModel()
    model.release = asyncio.Event()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=5)
    doomed = asyncio.create_task(batcher.embed(["t7", "t8"]))
    others = [asyncio.create_task(batcher.embed([f"t{i}"])) for i in range(3)]
    await model.started.wait()
    doomed.cancel()
    await asyncio.sleep(0)
    model.release.set()
    results = await asyncio.gather(*others)
    assert doomed.cancelled()
    assert [ids(r) for r in results] == [[0], [1], [2]]
    assert len(model.batches) == 1
    assert ids(await batcher.embed(["t5"])) == [5]


async def test_a_split_request_cancelled_midway_drops_its_queued_rest() -> None:
    model = CountingModel()
    model.release = asyncio.Event()
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=1)
    doomed = asyncio.create_task(batcher.embed([f"t{i}" for i in range(12)]))
    await model.started.wait()
    doomed.cancel()
    await asyncio.sleep(0)
    model.release.set()
    assert ids(await batcher.embed(["t50"])) == [50]
    assert model.batches == [["t0", "t1", "t2", "t3"], ["t50"]]


async def test_concurrency_bounds_the_model_calls_in_flight() -> None:
    serial = CountingModel(delay=0.01)
    batcher = MicroBatcher(serial, max_batch=2, max_wait_ms=0, concurrency=1)
    await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(10)))
    assert serial.most_in_flight == 1

    parallel = CountingModel(delay=0.01)
    batcher = MicroBatcher(parallel, max_batch=2, max_wait_ms=0, concurrency=3)
    await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(20)))
    assert parallel.most_in_flight == 3


async def test_a_result_of_the_wrong_shape_raises_to_the_callers() -> None:
    async def short(texts: list[str]) -> Vectors:
        return np.zeros((len(texts) - 1, 4), dtype=np.float32)

    batcher = MicroBatcher(short, max_batch=8, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="shape"):
        await batcher.embed(["a", "b"])


async def test_close_fails_queued_callers_and_a_later_call_starts_afresh() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=60_000)
    waiting = asyncio.create_task(batcher.embed(["t1"]))
    await asyncio.sleep(0.01)
    await batcher.close()
    with pytest.raises(Unavailable):
        await waiting
    assert model.batches == []
    batcher.max_wait_ms = 0
    assert ids(await batcher.embed(["t2"])) == [2]


@pytest.mark.parametrize("seed", range(10))
async def test_under_random_load_every_caller_gets_its_rows_or_its_batch_error(
    seed: int,
) -> None:
    rng = random.Random(seed)
    sizes: list[int] = []

    async def flaky(texts: list[str]) -> Vectors:
        sizes.append(len(texts))
        await asyncio.sleep(rng.random() * 0.002)
        if rng.random() < 0.1:
            raise ValueError("flaky model")
        return np.array([[float(t)] for t in texts], dtype=np.float32)

    batcher = MicroBatcher(
        flaky,
        max_batch=rng.randint(1, 20),
        max_wait_ms=rng.choice([0, 1, 3]),
        concurrency=rng.randint(1, 3),
    )
    requests: list[list[str]] = []
    tasks: list[asyncio.Task[Vectors]] = []
    counter = 0
    for _ in range(100):
        size = rng.randint(1, 40)
        requests.append([str(counter + j) for j in range(size)])
        counter += size
        tasks.append(asyncio.create_task(batcher.embed(requests[-1])))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.002)
        if rng.random() < 0.1:
            tasks[rng.randrange(len(tasks))].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for request, result in zip(requests, results, strict=True):
        if isinstance(result, np.ndarray):
            assert [int(v) for v in result[:, 0]] == [int(t) for t in request]
        else:
            assert isinstance(result, ValueError | asyncio.CancelledError)
    assert max(sizes) <= batcher.max_batch


async def test_32_concurrent_single_text_calls_make_few_real_model_calls() -> None:
    embedder = MiniLMEmbedder(Settings(embed_batch_size=32, embed_batch_wait_ms=5))
    try:
        await embedder.load()
        texts = [f"Writer {i} remembers that the meeting moved to room {i}." for i in range(32)]
        results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
        assert embedder.batcher.calls <= 2
        alone = await embedder.embed_batch(texts)
        for i, rows in enumerate(results):
            np.testing.assert_allclose(rows[0], alone[i], atol=1e-5)
    finally:
        await embedder.close()


# The OpenAI-compatible provider ----------------------------------------------------

EMBED_DIM = 16


def hashed_vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic, not normalised vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return [b - 127.5 for b in digest[:dim]]


class EmbeddingsServer:
    """An OpenAI-compatible ``POST /v1/embeddings`` on 127.0.0.1.

    The requested model selects the behaviour: ``ok`` answers (entries in reverse
    order, to check sorting by index); ``wide`` answers 32-dimensional vectors;
    ``broken`` 500; ``picky`` 400 with an OpenAI error body; ``slow`` waits 5 s or until the
    server stops.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        model, inputs = body["model"], body["input"]
        if model == "broken":
            return web.json_response({"error": {"message": "GPU on fire"}}, status=500)
        if model == "picky":
            error = {"message": "This model's maximum context length is 8 tokens", "code": None}
            return web.json_response({"error": error}, status=400)
        if model == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 5)
        dim = 32 if model == "wide" else EMBED_DIM
        data = [
            {"object": "embedding", "index": i, "embedding": hashed_vector(text, dim)}
            for i, text in enumerate(inputs)
        ]
        return web.json_response(
            {"object": "list", "data": data[::-1], "model": model, "usage": {"total_tokens": 1}}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[EmbeddingsServer]:
    srv = EmbeddingsServer()
    await srv.start()
    yield srv
    await srv.stop()


def openai_embedder(
    url: str, model: str = "ok", *, key: str | None = None, timeout: float = 10.0, **kw: Any
) -> OpenAIEmbedder:
    settings = Settings(
        embedder="openai",
        openai_base_url=url,
        openai_model=model,
        openai_api_key=key,
        openai_timeout_seconds=timeout,
        embed_batch_wait_ms=5,
    )
    return OpenAIEmbedder(settings, **kw)


def expected_rows(texts: Sequence[str], dim: int = EMBED_DIM) -> Vectors:
    rows = np.array([hashed_vector(t, dim) for t in texts], dtype=np.float32)
    unit: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


async def test_openai_returns_unit_norm_rows_in_input_order(server: EmbeddingsServer) -> None:
    embedder = openai_embedder(server.base_url)
    try:
        texts = ["first", "second", "third"]
        vectors = await embedder.embed(texts)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, expected_rows(texts), atol=1e-6)
        assert server.requests == [{"model": "ok", "input": texts}]
    finally:
        await embedder.close()


async def test_openai_learns_its_dimension_from_the_first_answer(
    server: EmbeddingsServer,
) -> None:
    embedder = openai_embedder(server.base_url, "wide")
    try:
        assert embedder.dim == 0
        assert embedder.name == "openai:wide"
        assert (await embedder.embed(["x"])).shape == (1, 32)
        assert embedder.dim == 32
        assert (await embedder.embed([])).shape == (0, 32)
    finally:
        await embedder.close()


async def test_openai_rejects_vectors_of_another_dimension_than_configured(
    server: EmbeddingsServer, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = openai_embedder(server.base_url, "wide", dim=EMBED_DIM)
    try:
        with pytest.raises(UpstreamFailed, match="wrong dimension"):
            await embedder.embed(["x"])
        assert "32-dimensional vectors, expected 16" in caplog.text
    finally:
        await embedder.close()


async def test_openai_sends_the_bearer_key_only_when_set(server: EmbeddingsServer) -> None:
    with_key = openai_embedder(server.base_url, key="sk-test-123")
    without = openai_embedder(server.base_url)
    try:
        await with_key.embed(["a"])
        await without.embed(["b"])
        assert server.auth == ["Bearer sk-test-123", None]
    finally:
        await with_key.close()
        await without.close()


async def test_openai_coalesces_concurrent_calls_into_few_requests(
    server: EmbeddingsServer,
) -> None:
    embedder = openai_embedder(server.base_url)
    try:
        texts = [f"text {i}" for i in range(40)]
        results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
        assert len(server.requests) <= 3
        for text, rows in zip(texts, results, strict=True):
            np.testing.assert_allclose(rows, expected_rows([text]), atol=1e-6)
    finally:
        await embedder.close()


async def test_openai_works_again_after_close(server: EmbeddingsServer) -> None:
    embedder = openai_embedder(server.base_url)
    first = await embedder.embed(["x"])
    await embedder.close()
    again = await embedder.embed(["x"])
    await embedder.close()
    np.testing.assert_array_equal(first, again)


async def test_openai_server_error_raises_unavailable_without_the_upstream_body(
    server: EmbeddingsServer, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = openai_embedder(server.base_url, "broken")
    try:
        with pytest.raises(Unavailable, match="HTTP 500") as info:
            await embedder.embed(["x"])
        assert "GPU on fire" not in info.value.message and server.base_url not in info.value.message
        assert "500: GPU on fire" in caplog.text  # the operator sees it in the log
    finally:
        await embedder.close()


async def test_openai_client_error_raises_upstream_failed_and_logs_the_server_message(
    server: EmbeddingsServer, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = openai_embedder(server.base_url, "picky")
    try:
        with pytest.raises(UpstreamFailed, match="HTTP 400") as info:
            await embedder.embed(["x"])
        assert info.value.status == 502
        assert "maximum context length" not in info.value.message
        assert "maximum context length is 8 tokens" in caplog.text
    finally:
        await embedder.close()


async def test_openai_refused_connection_raises_unavailable() -> None:
    embedder = openai_embedder(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(Unavailable, match="cannot be reached"):
            await embedder.embed(["x"])
    finally:
        await embedder.close()


async def test_openai_timeout_raises_unavailable(server: EmbeddingsServer) -> None:
    embedder = openai_embedder(server.base_url, "slow", timeout=0.2)
    try:
        started = time.perf_counter()
        with pytest.raises(Unavailable):
            await embedder.embed(["x"])
        assert time.perf_counter() - started < 3
    finally:
        await embedder.close()


async def test_openai_unknown_path_raises_hivemem_error(server: EmbeddingsServer) -> None:
    embedder = openai_embedder(f"http://127.0.0.1:{server.port}/nope")
    try:
        with pytest.raises(UpstreamFailed, match="404") as info:
            await embedder.embed(["x"])
        assert not isinstance(info.value, Unavailable)
    finally:
        await embedder.close()


async def test_observers_see_every_model_call_with_its_size_and_time() -> None:
    model = CountingModel(delay=0.02)
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=1)
    seen: list[tuple[int, float]] = []
    batcher.observers.append(lambda n, seconds: seen.append((n, seconds)))
    await batcher.embed([f"t{i}" for i in range(6)])  # two calls: 4 and 2 texts
    model.fail_next = RuntimeError("model exploded")
    with pytest.raises(RuntimeError):
        await batcher.embed(["t9"])  # a failed call is a call too
    assert [n for n, _ in seen] == [len(b) for b in model.batches] == [4, 2, 1]
    assert all(seconds >= 0.015 for _, seconds in seen)


async def test_a_hive_counts_the_model_calls_of_synchronous_indexing(tmp_path: Path) -> None:
    # index_mode=sync embeds in the put itself, outside the indexer: its model calls and
    # the search's query embedding are in hivemem_embedding_batch_size all the same.
    settings = Settings(embedder="minilm", index_mode="sync", embed_threads=1)
    async with hivemem.connect(f"sqlite:///{tmp_path}/s.db", agent="a", settings=settings) as hive:
        for i in range(3):
            await hive.put("docs", f"k{i}", {"text": f"note number {i} about tea"})
        assert await hive.search("docs", "tea", mode="vector")
        registry = hive.metrics.registry
        calls = registry.get_sample_value("hivemem_embedding_batch_size_count")
        texts = registry.get_sample_value("hivemem_embedding_batch_size_sum")
        timed = registry.get_sample_value("hivemem_embedding_duration_seconds_count")
    assert texts == 4  # three puts and one query, each text once
    assert calls is not None and 1 <= calls <= 4 and timed == calls
