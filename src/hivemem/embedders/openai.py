"""An embedder for any OpenAI-compatible embeddings endpoint.

Protocol (the OpenAI embeddings API, also spoken by vLLM, text-embeddings-inference,
llama.cpp, Ollama and LiteLLM): ``POST {base_url}/embeddings`` with the JSON body
``{"model": str, "input": [str, ...]}`` and, if a key is set, the header
``Authorization: Bearer <key>``; the answer is
``{"data": [{"index": int, "embedding": [float, ...]}, ...], ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np

from hivemem.config import Settings
from hivemem.embedders.base import Vectors
from hivemem.embedders.batching import MicroBatcher
from hivemem.errors import HivememError, Unavailable, UpstreamFailed

__all__ = ["OpenAIEmbedder"]

#: Model calls in flight at once: an HTTP service embeds several batches in parallel.
HTTP_CONCURRENCY = 4
#: Longest part of an error body quoted in an exception message (characters).
MAX_ERROR_CHARS = 500


def _server_message(body: Any, text: str) -> str:
    """The error message in an error response: OpenAI, FastAPI or RFC 9457 shape."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for field in ("message", "detail", "error", "title"):
            if body.get(field):
                return str(body[field])
    return text.strip()[:MAX_ERROR_CHARS] or "(empty body)"


log = logging.getLogger("hivemem.embedders")


class OpenAIEmbedder:
    """Embeds with ``POST {base_url}/embeddings``, micro-batched, over aiohttp.

    Args:
        settings: ``openai_base_url``, ``openai_model``, ``openai_api_key``,
            ``openai_timeout_seconds`` (whole request) and ``embed_batch_size`` /
            ``embed_batch_wait_ms`` (micro-batching) are used.
        dim: the expected vector dimension; ``None`` learns it from the first answer.

    Attributes:
        name: ``"openai:<model>"``.
        dim: the vector dimension: ``dim`` if given, else learnt from the first
            answer (0 until then).

    Rows are returned in input order (sorted by ``index``) and scaled to unit L2 norm.
    Up to :data:`HTTP_CONCURRENCY` requests run at once.
    """

    def __init__(self, settings: Settings | None = None, *, dim: int | None = None) -> None:
        settings = settings or Settings()
        self.base_url = settings.openai_base_url.rstrip("/")
        self.url = f"{self.base_url}/embeddings"
        self.model = settings.openai_model
        self.name = f"openai:{self.model}"
        self.dim = dim or 0
        self._fixed_dim = dim is not None
        self._headers = {"Content-Type": "application/json"}
        if settings.openai_api_key:
            self._headers["Authorization"] = f"Bearer {settings.openai_api_key.get_secret_value()}"
        self._timeout = aiohttp.ClientTimeout(total=settings.openai_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self.batcher = MicroBatcher(
            self.embed_batch,
            max_batch=settings.embed_batch_size,
            max_wait_ms=settings.embed_batch_wait_ms,
            concurrency=HTTP_CONCURRENCY,
        )

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``, sharing requests with concurrent callers.

        Returns:
            A ``(len(texts), dim)`` float32 array of unit-norm rows.

        Raises:
            Unavailable: the endpoint cannot be reached, timed out, answered 5xx or
                429, or the embedder was closed while these texts were queued.
            UpstreamFailed: the endpoint refused the request (another 4xx) or answered
                something that is not an embeddings response, or of the wrong dimension.
            Messages never carry the endpoint's answer; it is logged (logger
                ``hivemem.embedders``).
        """
        items = list(texts)
        if not items:
            return np.empty((0, self.dim), dtype=np.float32)
        return await self.batcher.embed(items)

    async def embed_batch(self, texts: list[str]) -> Vectors:
        """One request for ``texts``, without micro-batching. Raises as :meth:`embed`."""
        session = self._open()
        payload = {"model": self.model, "input": texts}
        try:
            async with session.post(self.url, json=payload, headers=self._headers) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _failed(
                Unavailable,
                "cannot be reached",
                f"{self.url} cannot be reached: {type(exc).__name__}: {exc}",
            ) from exc
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = None
        if status >= 500 or status in (408, 429):
            raise _failed(
                Unavailable,
                f"answered HTTP {status}",
                f"{self.url} answered {status}: {_server_message(body, text)}",
            )
        if status >= 400:
            raise _failed(
                UpstreamFailed,
                f"refused the request (HTTP {status})",
                f"{self.url} refused the request ({status}): {_server_message(body, text)}",
            )
        return self._parse(body, len(texts))

    async def close(self) -> None:
        """Finish running requests, then close the HTTP connections.

        Queued callers get ``Unavailable``. A later :meth:`embed` opens a new session.
        """
        await self.batcher.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        """The HTTP session of the running loop, opened on first use."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._session_loop is not loop:
            # A session of another (finished) loop cannot be reused or closed here.
            session = aiohttp.ClientSession(timeout=self._timeout)
            self._session, self._session_loop = session, loop
        return session

    def _parse(self, body: Any, count: int) -> Vectors:
        """Check an embeddings response and turn it into unit-norm float32 rows."""
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != count:
            got = len(data) if isinstance(data, list) else "no"
            raise _failed(
                UpstreamFailed,
                "returned a malformed response",
                f"{self.url} returned {got} embeddings for {count} texts",
            )
        try:
            ordered = sorted(data, key=lambda entry: int(entry["index"]))
            if [int(entry["index"]) for entry in ordered] != list(range(count)):
                raise ValueError("the indexes are not 0..n-1")
            rows = np.array([entry["embedding"] for entry in ordered], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise _failed(
                UpstreamFailed,
                "returned a malformed response",
                f"{self.url} returned a malformed response: {exc}",
            ) from exc
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise _failed(
                UpstreamFailed,
                "returned a malformed response",
                f"{self.url} returned embeddings of shape {rows.shape}",
            )
        if self.dim == 0:
            self.dim = int(rows.shape[1])
        elif rows.shape[1] != self.dim:
            source = "configured" if self._fixed_dim else "of its earlier answers"
            raise _failed(
                UpstreamFailed,
                "returned vectors of the wrong dimension",
                f"{self.url} returned {rows.shape[1]}-dimensional vectors, expected "
                f"{self.dim} ({source})",
            )
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        unit: Vectors = (rows / np.clip(norms, 1e-12, None)).astype(np.float32)
        return unit


def _failed(kind: type[HivememError], summary: str, detail: str) -> HivememError:
    """An error for callers that names what went wrong but not the provider's answer
    (which may carry its internals or echo a key); the detail goes to the log."""
    log.warning("embeddings endpoint: %s", detail)
    return kind(f"the embedding provider {summary}; the hive's log has the details")
