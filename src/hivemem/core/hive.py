"""LocalHive: the embedded Hive, every rule applied in this process over a backend."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import os
import re
import time

import orjson

from hivemem import validation as check
from hivemem.backends.base import Backend
from hivemem.backends.rows import SYSTEM
from hivemem.config import Settings
from hivemem.core.blobs import Blobs
from hivemem.core.coordination import CoordinationMixin, mark_down
from hivemem.core.events import EventsMixin
from hivemem.core.feedtail import FeedTail
from hivemem.core.indexer import Indexer
from hivemem.core.items import ItemsMixin, searchable_text
from hivemem.core.lexical import LexicalIndex
from hivemem.core.rowcache import RowCache
from hivemem.core.search import SearchMixin
from hivemem.core.sessions import SessionsMixin
from hivemem.core.tasks import EXPIRE_PER_ROUND, TasksMixin
from hivemem.core.taskwaits import TaskWaits
from hivemem.core.vectors import VectorIndex
from hivemem.embedders.base import Embedder
from hivemem.errors import InvalidInput
from hivemem.hive import Heartbeats, Hive
from hivemem.metrics import Metrics
from hivemem.policy.principal import Principal
from hivemem.policy.rules import Access, PolicyHolder

__all__ = ["LocalHive"]

log = logging.getLogger("hivemem")

#: Longest wait for a background task to end when a hive closes (seconds).
CLOSE_WAIT_SECONDS = 5.0

_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


#: The backend calls timed by the store metrics (every async method of
#: :class:`~hivemem.backends.base.Backend`).
STORE_OPERATIONS = tuple(
    name
    for name, fn in vars(Backend).items()
    if not name.startswith("_") and asyncio.iscoroutinefunction(fn)
)


def _file_sizes(path: str) -> list[tuple[str, int]]:
    """Sizes of a SQLite database and its WAL (absent files are left out), and the free
    and total bytes of their file system."""
    out = []
    for role, name in (("db", path), ("wal", path + "-wal")):
        with contextlib.suppress(OSError):
            out.append((role, os.stat(name).st_size))
    with contextlib.suppress(OSError):
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
        out += [("disk_free", fs.f_bavail * fs.f_frsize), ("disk_size", fs.f_blocks * fs.f_frsize)]
    return out


def backend_kind(backend: Backend) -> str:
    """``sqlite``, ``postgres``, ``redis`` or ``redis-cluster`` (the ``backend`` label)."""
    name = type(backend).__name__.removesuffix("Backend").lower()
    if name == "redis" and getattr(backend, "is_cluster", False):
        return "redis-cluster"
    return name


class _Shared:
    """What the views of one LocalHive share: the backend, the embedder, the in-memory
    vector index and the background sweeper."""

    def __init__(self, backend: Backend, settings: Settings, embedder: Embedder | None) -> None:
        self.backend = backend
        self.settings = settings
        self.embedder = embedder
        self.vectors: VectorIndex | None = None
        self.lexical: LexicalIndex | None = None
        self.lexical_loading: asyncio.Task[None] | None = None
        self.rows: RowCache | None = None
        self.tail: FeedTail | None = None
        self.lock = asyncio.Lock()
        self.opened = False
        self.sweeper: asyncio.Task[None] | None = None
        self.coordinator: asyncio.Task[None] | None = None
        self.heartbeats = Heartbeats()
        self.task_waits: TaskWaits | None = None
        self.indexer: Indexer | None = None
        #: The blob store of large values, or None (core/blobs.py).
        self.blobs = Blobs.from_settings(settings)
        #: Set when closing: background loops stop at their next turn even if a
        #: cancellation was swallowed (redis-py can swallow one landing in a read).
        self.closing = False
        #: The permission rules in force, or None: no policy, every view may do anything.
        self.policy: PolicyHolder | None = (
            PolicyHolder(settings.policy_file) if settings.policy_file else None
        )
        #: The built-in roles alone, for principals when no policy file is in force.
        self.builtin_policy = PolicyHolder()
        #: This hive's Prometheus metrics (every backend call is timed).
        self.metrics = Metrics(backend_kind(backend))
        tracer = None
        if settings.tracing:
            from hivemem import tracing

            if not tracing.available():
                raise InvalidInput(
                    "tracing needs OpenTelemetry: pip install 'hivemem[otel]'", field="tracing"
                )
            tracer = tracing.tracer()
        if settings.metrics or tracer is not None:
            self.metrics.instrument_backend(
                backend, STORE_OPERATIONS, tracer=tracer, timed=settings.metrics
            )
        #: hivemem's OpenTelemetry tracer when tracing is on, else None.
        self.tracer = tracer
        self.metrics.add_index_source(self._index_sizes)
        #: Whether the embedder reports its own model calls (its micro-batcher does);
        #: otherwise the indexer times the calls it makes.
        self.embedder_observed = False
        # (a MicroBatcher's observers; looked up by name, so numpy is not imported here)
        observers = getattr(getattr(embedder, "batcher", None), "observers", None)
        if isinstance(observers, list):
            observers.append(self.metrics.observe_embedding)
            self.embedder_observed = True
        path = getattr(backend, "path", None)
        if isinstance(path, str) and path != ":memory:" and backend_kind(backend) == "sqlite":
            self.metrics.add_file_source(functools.partial(_file_sizes, path))

    def _index_sizes(self) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        if self.lexical is not None:
            out.append(("bm25", len(self.lexical), self.lexical.memory_bytes()))
        if self.vectors is not None:
            out.append(("vectors", len(self.vectors), self.vectors.memory_bytes()))
        if self.rows is not None:
            out.append(("rows", len(self.rows), 200 * len(self.rows)))
        return out

    def vector_index(self, dim: int) -> VectorIndex:
        if self.vectors is None:
            assert self.embedder is not None
            self.vectors = VectorIndex(
                self.backend,
                self.embedder.name,
                dim,
                self.settings.feed_poll_seconds,
                kind=self.settings.vector_index
                if self.settings.vector_index in ("exact", "hnsw")
                else "exact",
            )
        return self.vectors

    def lexical_index(self) -> LexicalIndex | None:
        """The in-process BM25 index to search with, or None to let the engine rank.

        ``lexical_index``: ``engine`` → None; ``memory`` → the index (loaded by the
        caller's sync); ``auto`` → the index once it is loaded, and until then None
        while it loads in the background (stores without engine ranking always get it).
        """
        mode = self.settings.lexical_index
        native = self.backend.native_lexical
        if native and mode == "engine":
            return None
        if self.lexical is None:
            self.lexical = LexicalIndex(
                self.backend,
                self.settings.feed_poll_seconds,
                max_terms=self.settings.max_vocabulary_terms,
            )
        if native and mode == "auto" and not self.lexical.loaded:
            if self.lexical_loading is None or self.lexical_loading.done():
                self.lexical_loading = asyncio.create_task(
                    self._load_lexical(self.lexical), name="hivemem-bm25-load"
                )
            return None
        return self.lexical

    @staticmethod
    async def _load_lexical(index: LexicalIndex) -> None:
        try:
            await index.sync()
        except asyncio.CancelledError:
            raise
        except Exception:  # the next search starts another load
            log.exception("loading the in-process BM25 index failed")

    def feed_tail(self) -> FeedTail:
        if self.tail is None:
            self.tail = FeedTail(
                self.backend,
                self.settings.feed_poll_seconds,
                self.metrics.feed_head.set,
                self.metrics.feed_read.set_to_current_time,
            )
        return self.tail

    def row_cache(self) -> RowCache:
        if self.rows is None:
            self.rows = RowCache(self.backend, self.settings.feed_poll_seconds)
        return self.rows

    async def open(self) -> None:
        if self.opened:
            return
        async with self.lock:
            if self.opened:
                return
            await self.backend.open()
            self.closing = False
            self.sweeper = asyncio.create_task(self._sweep_forever(), name="hivemem-sweeper")
            self.coordinator = asyncio.create_task(
                self._coordinate_forever(), name="hivemem-coordinator"
            )
            self.opened = True

    async def close(self) -> None:
        async with self.lock:
            # First: nothing starts an indexer or a loop while the others stop.
            self.closing = True
            if self.indexer is not None:
                await self.indexer.close()
                self.indexer = None
            await self.heartbeats.close()
            if self.task_waits is not None:
                await self.task_waits.close()
                self.task_waits = None
            for task in (self.sweeper, self.coordinator):
                if task is not None:
                    task.cancel()
                    # Bounded: a loop whose cancellation was swallowed ends at its next
                    # turn (it checks ``closing``); never wait on it forever.
                    await asyncio.wait({task}, timeout=CLOSE_WAIT_SECONDS)
            self.sweeper = self.coordinator = None
            if self.tail is not None:
                await self.tail.close()
                self.tail = None
            if self.opened:
                await self.backend.close()
                self.opened = False
            if self.embedder is not None:
                await self.embedder.close()
            if self.blobs is not None:
                await self.blobs.close()
            if self.vectors is not None:
                await self.vectors.close()  # stops a background HNSW build
            self.vectors = None
            if self.lexical is not None:
                self.lexical.stop()
            if self.lexical_loading is not None:
                self.lexical_loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.lexical_loading
                self.lexical_loading = None
            self.lexical = None
            self.rows = None

    async def sweep(self) -> tuple[int, int]:
        now = time.time()
        swept = await self.backend.sweep(
            now,
            now - self.settings.event_retention_seconds,
            now - self.settings.request_retention_seconds,
        )
        await self.backend.sweep_tasks(now - self.settings.task_retention_seconds, 1000)
        return swept

    async def coordinate(self) -> tuple[int, int]:
        """One coordination round: settle expired task leases of every queue and mark
        silent agents down. Returns (leases settled, agents marked down)."""
        now = time.time()
        settled = await self.backend.expire_leases(now, EXPIRE_PER_ROUND)
        return settled, await mark_down(self.backend, now)

    async def _coordinate_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.settings.coordination_interval_seconds)
            try:
                await self.coordinate()
            except Exception:  # keep going; the next round retries
                log.exception("coordination round failed")

    async def _sweep_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            try:
                expired, trimmed = await self.sweep()
                if expired or trimmed:
                    log.debug("swept %d expired items, trimmed %d events", expired, trimmed)
            except Exception:  # keep sweeping; the next round retries
                log.exception("sweep failed")
            if self.blobs is not None and self.blobs.due():
                try:
                    removed = await self.blobs.sweep(self.backend, time.time())
                    if removed:
                        log.debug("removed %d unreferenced objects from the blob store", removed)
                except Exception:
                    log.exception("blob sweep failed")


class LocalHive(
    ItemsMixin, SessionsMixin, EventsMixin, SearchMixin, TasksMixin, CoordinationMixin, Hive
):
    """The embedded Hive over a storage backend (SQLite today).

    Validation, identities, TTL arithmetic and record building happen here; the
    backend applies each write with its version check and feed event atomically.
    A background task removes expired items and trims the feed every
    ``sweep_interval_seconds`` (expired items are filtered out of every read
    before that).

    Args:
        backend: an unopened backend; opened on first use or by :meth:`open`.
        agent: the identity stamped as author of writes.
        settings: limits and tuning.
        embedder: makes vectors for search; None for lexical search only.
        principal: who this hive acts for, when a policy is in force (default: the
            agent, with no roles).

    With ``settings.policy_file`` set, every view of this hive enforces that policy for
    its agent (see :mod:`hivemem.policy.rules`); :meth:`as_principal` gives a view
    for an authenticated principal with its roles.

    Raises:
        InvalidInput: ``agent`` is not a valid identity (field ``agent``), or the
            policy file is unreadable or malformed (field ``policy_file`` / ``rules.<i>...``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        agent: str = "anonymous",
        settings: Settings | None = None,
        embedder: Embedder | None = None,
        principal: Principal | None = None,
        _shared: _Shared | None = None,
    ) -> None:
        self._settings = settings or Settings()
        self.agent = check.segment(agent, "agent", self._settings)
        self._backend = backend
        self._shared = _shared or _Shared(backend, self._settings, embedder)
        self._embedder = self._shared.embedder
        self._heartbeats = self._shared.heartbeats
        self._blobs = self._shared.blobs
        holder = self._shared.policy
        if holder is not None:
            self._access = Access(principal or Principal(self.agent), holder)

    def __repr__(self) -> str:
        return f"LocalHive({self._backend!r}, agent={self.agent!r})"

    @property
    def backend(self) -> Backend:
        """The storage backend."""
        return self._backend

    @property
    def metrics(self) -> Metrics:
        """This hive's Prometheus metrics (shared by its views); see
        :mod:`hivemem.metrics`."""
        return self._shared.metrics

    @property
    def settings(self) -> Settings:
        """The limits and tuning in force."""
        return self._settings

    async def _ready(self) -> None:
        if not self._shared.opened:
            await self._shared.open()

    def _opened(self) -> bool:
        return self._shared.opened and not self._shared.closing

    async def open(self) -> None:
        await self._shared.open()

    async def close(self) -> None:
        await self._shared.close()

    def as_agent(self, agent: str) -> LocalHive:
        return LocalHive(self._backend, agent=agent, settings=self._settings, _shared=self._shared)

    def as_principal(self, principal: Principal) -> LocalHive:
        """A view acting for an authenticated ``principal``: its agent is the author of
        the view's writes, and the policy in force (or, without a policy file, the
        built-in roles alone) decides what it may read and write.

        Raises:
            InvalidInput: the principal's agent is not a valid identity (field ``agent``).
        """
        view = LocalHive(
            self._backend,
            agent=principal.agent,
            settings=self._settings,
            principal=principal,
            _shared=self._shared,
        )
        if view._access is None:  # no policy file: the built-in roles decide
            view._access = Access(principal, self._shared.builtin_policy)
        return view

    @property
    def policy(self) -> PolicyHolder | None:
        """The permission rules in force (shared by every view), or None."""
        return self._shared.policy

    @property
    def principal(self) -> Principal | None:
        """Who this view acts for when a policy is in force, else None."""
        return None if self._access is None else self._access.principal

    def with_request_id(self, request_id: str | None, *, field: str = "request_id") -> LocalHive:
        """A view of this hive whose writes carry ``request_id``: a write repeated with
        the same request id (by the same agent, within ``request_retention_seconds``) is
        applied once, and the repeat returns the first result.

        The id is bound to the request: the same id with a different operation or
        arguments raises :class:`~hivemem.errors.InvalidInput` naming ``field`` and
        writes nothing.

        Raises:
            InvalidInput: not 1-128 letters, digits or ``_ - . :`` (field ``field``).
        """
        if request_id is None:
            return self
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise InvalidInput(f"{field} must be 1-128 letters, digits or _ - . :", field=field)
        view = copy.copy(self)
        view._request_id = request_id
        view._request_field = field
        return view

    def _vector_index(self, dim: int) -> VectorIndex:
        return self._shared.vector_index(dim)

    def _vectors_in_engine(self) -> bool:
        return self._backend.native_vectors and self._settings.vector_index in ("auto", "engine")

    def _lexical_index(self) -> LexicalIndex | None:
        return self._shared.lexical_index()

    def _feed_tail(self) -> FeedTail:
        return self._shared.feed_tail()

    def _row_cache(self) -> RowCache:
        return self._shared.row_cache()

    def _start_indexer(self) -> None:
        shared = self._shared
        if self._embedder is None or shared.closing or not shared.opened:
            return
        if shared.indexer is None:
            system = LocalHive(self._backend, agent=SYSTEM, settings=self._settings, _shared=shared)
            system._access = None
            system._system = True
            shared.indexer = Indexer(
                system,
                self._embedder,
                lambda row: searchable_text(row.text, orjson.loads(row.value)),
                batch=self._settings.index_batch_size,
                parts=self._settings.index_partitions,
                lease=self._settings.index_lease_seconds,
                chunk=self._settings.embed_batch_size,
            )
        shared.indexer.start()

    def _indexer_state(self) -> tuple[bool, list[int]]:
        indexer = self._shared.indexer
        return (False, []) if indexer is None else (indexer.running, indexer.held)

    @property
    def indexer(self) -> Indexer | None:
        """This process's indexer of deferred vectors, once a search started it."""
        return self._shared.indexer

    def _task_waits(self) -> TaskWaits:
        shared = self._shared
        if shared.task_waits is None:
            shared.task_waits = TaskWaits(self._backend, self._settings.feed_poll_seconds)
        return shared.task_waits

    @property
    def embedder(self) -> Embedder | None:
        """The embedder that makes vectors for search (None: lexical search only)."""
        return self._embedder

    async def warm(self) -> None:
        """Load the in-process search indexes and start the indexer of deferred vectors
        now rather than on the first search (the service does this in the background at
        start). Failures are logged, not raised: the first search retries."""
        try:
            await self._ready()
            lexical = self._lexical_index()
            if lexical is not None:
                await lexical.sync()
            elif self._shared.lexical_loading is not None:
                await asyncio.shield(self._shared.lexical_loading)
            if self._embedder is not None and not self._vectors_in_engine():
                await self._vector_index(self._embedder.dim).sync()
            self._start_indexer()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loading the search indexes failed; the first search retries")

    async def ping(self) -> None:
        await self._ready()
        await self._backend.ping()

    async def sweep(self) -> tuple[int, int]:
        """Remove expired items and trim the feed now (the background task does it
        every ``sweep_interval_seconds``). Returns (items expired, events trimmed)."""
        await self._ready()
        return await self._shared.sweep()

    async def sweep_blobs(self, *, grace: float | None = None) -> int:
        """One round of the blob sweeper now (the background task runs one every
        ``blob_sweep_interval_seconds``): delete objects of the blob store that no stored
        version refers to and that are older than ``grace`` seconds (default
        ``blob_grace_seconds``). ``grace=0`` also removes uploads whose commit may still
        be on its way: use it only when no process is writing. Returns how many objects
        were deleted (0 without a blob store); see docs/blobs.md.

        Raises:
            InvalidInput: ``grace`` is negative or not a number (field ``grace``).
            Unavailable: the blob store or the store failed.
        """
        if grace is not None and (
            isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0
        ):
            raise InvalidInput("grace must be a number of seconds >= 0", field="grace")
        blobs = self._shared.blobs
        if blobs is None:
            return 0
        await self._ready()
        return await blobs.sweep(self._backend, time.time(), grace=grace)
