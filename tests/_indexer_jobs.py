"""An indexer that tests/test_indexer.py runs in a separate process and kills mid-batch:
``python tests/_indexer_jobs.py STORE_FILE MARKER``.

Its embedder writes the number of texts of its first batch to ``MARKER`` and then never
returns, so the batch is in hand (embedded, not stored) when the process is killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hivemem.backends.sqlite import SqliteBackend
from hivemem.config import Settings
from hivemem.core import LocalHive
from tests.test_vectors import FakeEmbedder


class StuckEmbedder(FakeEmbedder):
    """:class:`FakeEmbedder` that announces its first batch and then hangs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        Path(self.marker).write_text(str(len(texts)))  # noqa: ASYNC240 (a test's marker)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def settings() -> Settings:
    """The settings both sides of the test use (short leases: a dead holder's parts are
    free again within a second)."""
    return Settings(embedder="none", feed_poll_seconds=0.05, index_lease_seconds=1.0)


async def main(path: str, marker: str) -> None:
    s = settings()
    hive = LocalHive(
        SqliteBackend(path, s), agent="stuck", settings=s, embedder=StuckEmbedder(marker)
    )
    await hive.wait_indexed(timeout=3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
