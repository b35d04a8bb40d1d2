"""Embedders: text to unit-norm float32 vectors, for semantic search.

Providers, chosen by ``Settings.embedder`` (``HIVEMEM_EMBEDDER``):

- ``minilm`` (default): :class:`MiniLMEmbedder`, all-MiniLM-L6-v2 int8 ONNX, offline;
- ``openai``: :class:`OpenAIEmbedder`, any OpenAI-compatible ``/embeddings`` endpoint;
- ``none``: no vectors; search is lexical only.

Both providers put a :class:`MicroBatcher` in front of their model, so concurrent
callers share model calls.
"""

from __future__ import annotations

from hivemem.config import Settings
from hivemem.embedders.base import Embedder, Vectors
from hivemem.embedders.batching import MicroBatcher
from hivemem.embedders.minilm import MiniLMEmbedder
from hivemem.embedders.openai import OpenAIEmbedder

__all__ = [
    "Embedder",
    "MicroBatcher",
    "MiniLMEmbedder",
    "OpenAIEmbedder",
    "Vectors",
    "make_embedder",
]


def make_embedder(settings: Settings) -> Embedder | None:
    """The embedder ``settings.embedder`` names, or ``None`` for ``"none"``.

    Nothing is loaded or connected here: the MiniLM model is loaded at its first use
    (or by ``await embedder.load()``), the HTTP session is opened at the first request.

    Raises:
        ValueError: an unknown ``settings.embedder`` (Settings validation prevents it).
    """
    if settings.embedder == "none":
        return None
    if settings.embedder == "minilm":
        return MiniLMEmbedder(settings)
    if settings.embedder == "openai":
        return OpenAIEmbedder(settings)
    raise ValueError(f"unknown embedder {settings.embedder!r}")
