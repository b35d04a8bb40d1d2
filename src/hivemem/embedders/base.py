"""The Embedder protocol: text in, L2-normalised float32 vectors out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors for semantic search.

    Attributes:
        name: the model's name, stored beside every vector (a change of model is
            detected by comparing names; ``hivemem reindex`` re-embeds).
        dim: the vector dimension (384 for all-MiniLM-L6-v2).
    """

    name: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``.

        Returns:
            A ``(len(texts), dim)`` float32 array whose rows have unit L2 norm, so
            a dot product is the cosine similarity.

        Raises:
            Unavailable: the model or the embedding service cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release the model, threads or HTTP connections."""
        ...
