"""The indexer: vectors for deferred writes, computed in large batches after the commit.

With ``index_mode=deferred`` (the default) a put commits its item, its lexical entry
and its event at store speed; the index entry names the embedder's model and has no
vector yet. Such entries are the indexer's work list, kept by the store itself
(:meth:`~hivemem.backends.base.Backend.pending_vectors`; a partial index on SQLite
and PostgreSQL, a sorted set per partition on Redis), written in the same atomic step
as the item. So there is no cursor to lose: an indexer that dies mid-batch leaves
those entries waiting, and whoever holds their part next embeds them.

The work is split into ``index_partitions`` parts (each engine's own stable split of
the items). Each part is held by one process at a time under a lease
(``_hivemem/indexer/p<k>``, the coordination area's leases); each process runs an
indexer that heartbeats a membership row (namespace ``_hivemem/indexers``, with a
TTL), counts the live members, and holds the parts whose number modulo the member
count is its rank: one process holds every part; two share them half and half; a
process that stops holding its lease (it died, or a newcomer took its share) leaves
the part to the next. A part's loop wakes on the store's change signal, reads up to
``index_batch_size`` waiting entries, embeds their texts in one model call and stores
the vectors with the version they were made from (``set_index``: an item written
meanwhile keeps its newer entry, so a stale vector never lands on a newer version).
The store writes an ``item.indexed`` event per vector, which every process's
in-memory vector index follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import tenacity

from hivemem.backends.base import Backend
from hivemem.backends.rows import DeleteWrite, IndexEntry, ItemRow, PutWrite
from hivemem.backoff import Backoff
from hivemem.embedders.base import Embedder
from hivemem.errors import Conflict, HivememError

if TYPE_CHECKING:
    from hivemem.core.hive import LocalHive
    from hivemem.models import Lease

log = logging.getLogger("hivemem")

#: Namespace of the indexers' membership rows (one per process, with a TTL).
MEMBERS = "_hivemem/indexers"
#: Lease name of part ``k``: ``PART_LEASE.format(k)``.
PART_LEASE = "_hivemem/indexer/p{}"

#: Longest a part's loop sleeps without a change signal (seconds).
IDLE_SECONDS = 1.0
#: After a wake-up, how long a caught-up part lets writes gather before it reads them
#: (one model call for many texts costs far less per text than one call each).
GATHER_SECONDS = 0.05
#: Shortest pause between two looks at the waiting entries of :func:`until`.
RECHECK_SECONDS = 0.02
#: Backoff after a failed batch (the embedder or the store failed): doubling, capped.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


def _entry(row: ItemRow, text: str | None) -> IndexEntry:
    return IndexEntry(row.namespace, row.key, row.version, text, None, None)


class Indexer:
    """The vectors of deferred writes, for one process (see the module notes).

    Args:
        hive: a view of the LocalHive that may use hivemem's own lease names.
        embedder: makes the vectors.
        text_of: the searchable text of a stored row (None: not searchable).
        batch: most texts per model call.
        parts: how many parts the work is split into.
        lease: how long a part's lease and the membership row last without renewal
            (seconds); both are renewed every third of it.
        chunk: most texts per embed call (the embedder's own batch size): a batch is
            embedded a call at a time, so searches' query embeddings interleave.
    """

    def __init__(
        self,
        hive: LocalHive,
        embedder: Embedder,
        text_of: Callable[[ItemRow], str | None],
        *,
        batch: int,
        parts: int,
        lease: float,
        chunk: int = 32,
    ) -> None:
        self.hive = hive
        self.backend: Backend = hive.backend
        self.embedder = embedder
        self.text_of = text_of
        self.batch = batch
        self.parts = parts
        self.lease = lease
        self.chunk = chunk
        #: This process's membership key.
        self.instance = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._loops: dict[int, asyncio.Task[None]] = {}
        self._leases: dict[int, Lease] = {}
        self._stopping = False
        #: Vectors stored by this process (for tests and status).
        self.indexed = 0
        #: Batches embedded by this process.
        self.batches = 0

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the membership round and the part loops (idempotent; never again once
        closed: a hive that opens again makes a new indexer)."""
        if not self._stopping and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="hivemem-indexer")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def held(self) -> list[int]:
        """The parts this process holds now."""
        return sorted(self._leases)

    async def close(self) -> None:
        """Stop: the batch in hand is abandoned (its entries stay waiting), leases and
        membership are given back so another process takes over at once."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._loops.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._task = None
        self._loops.clear()
        with contextlib.suppress(Exception):
            for part in list(self._leases):
                await self.hive.release(self._leases.pop(part))
            await self.backend.write_items(
                [_member_delete(self.instance)],
                author=self.hive.agent,
                now=self.hive._now(),
                history_limit=0,
            )

    # The membership round ------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is away; the next round retries
                log.exception("indexer round failed")
            await asyncio.sleep(self.lease / 3)

    async def _round(self) -> None:
        """Heartbeat membership, renew held leases, then hold exactly this process's
        share: give back parts beyond it, try to take the free parts of it."""
        now = self.hive._now()
        await self.backend.write_items(
            [_member_put(self.instance, now + self.lease)],
            author=self.hive.agent,
            now=now,
            history_limit=0,
        )
        members = sorted(
            r.key
            for r in await self.backend.list_items(MEMBERS, None, 1000, now)
            if r.namespace == MEMBERS
        )
        rank = members.index(self.instance) if self.instance in members else 0
        n = max(1, len(members))
        mine = {p for p in range(self.parts) if p % n == rank % n}
        for part, lease in list(self._leases.items()):
            if part not in mine:
                self._drop(part)
                with contextlib.suppress(HivememError):
                    await self.hive.release(lease)
                continue
            try:
                self._leases[part] = await self.hive.renew(lease, ttl=self.lease)
            except Conflict:  # ran out (a long pause): the next holder has it
                self._drop(part)
        for part in sorted(mine - set(self._leases)):
            try:
                lease = await self.hive.acquire(PART_LEASE.format(part), self.lease, wait=0)
            except Conflict:
                continue  # its holder has not given it back yet
            self._leases[part] = lease
            self._loops[part] = asyncio.create_task(
                self._part(part), name=f"hivemem-indexer-p{part}"
            )

    def _drop(self, part: int) -> None:
        self._leases.pop(part, None)
        loop = self._loops.pop(part, None)
        if loop is not None:
            loop.cancel()

    # A part's loop ----------------------------------------------------------------------

    async def _part(self, part: int) -> None:
        changes = self.backend.changes
        backoff = Backoff(
            tenacity.wait_exponential_jitter(
                initial=RETRY_FIRST_SECONDS, max=RETRY_MAX_SECONDS, jitter=RETRY_FIRST_SECONDS
            )
        )
        while not self._stopping and part in self._leases:
            generation = changes.generation
            try:
                done = await self.index_batch(part)
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = backoff.next()
                log.exception("indexing part %d failed; retrying in %.1f s", part, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if done < self.batch:
                # Caught up: sleep until something changes, then let a few more writes
                # arrive so that one model call embeds them together.
                if done == 0:
                    await changes.wait(generation, IDLE_SECONDS)
                await asyncio.sleep(GATHER_SECONDS)

    async def index_batch(self, part: int) -> int:
        """Embed and store one batch of part ``part``'s waiting entries. Returns how many
        rows it read (0: nothing waits).

        Raises:
            Unavailable: the store or the embedder failed (nothing was stored).
        """
        rows = await self.backend.pending_vectors(
            self.embedder.name, part, self.parts, self.batch, self.hive._now()
        )
        if not rows:
            return 0
        rows = await self.hive._resolve(rows)  # values and texts in the blob store
        texts = [self.text_of(r) for r in rows]
        todo = [i for i, t in enumerate(texts) if t is not None]
        entries = [_entry(r, t) for r, t in zip(rows, texts, strict=True)]
        if todo:
            # One model call's worth at a time: a search's query embedding queued
            # meanwhile waits for one call of ours, not for the whole batch.
            wanted = [t for t in texts if t is not None]
            metrics = self.hive.metrics
            now = time.time()
            for i in todo:
                metrics.embed_wait.observe(max(0.0, now - rows[i].updated_at))
            vectors: list[Any] = []
            # An embedder with a background path (MiniLM: a thread of lower priority)
            # computes the indexer's vectors there, bypassing its micro-batcher.
            background = getattr(self.embedder, "embed_background", None)
            embed = background or self.embedder.embed
            observe = background is not None or not self.hive._shared.embedder_observed
            for start in range(0, len(wanted), self.chunk):
                chunk = wanted[start : start + self.chunk]
                began = time.perf_counter()
                vectors.extend(await embed(chunk))
                if observe:  # else the embedder's batcher reports this call
                    metrics.observe_embedding(len(chunk), time.perf_counter() - began)
            for i, vector in zip(todo, vectors, strict=True):
                e = entries[i]
                entries[i] = IndexEntry(
                    e.namespace, e.key, e.version, e.text, vector.tobytes(), self.embedder.name
                )
        stored = await self.backend.set_index(entries, self.hive._now())
        self.indexed += stored  # after the await: the part loops run concurrently
        self.batches += 1
        return len(rows)


def _member_put(instance: str, expires_at: float) -> PutWrite:
    value = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    return PutWrite(MEMBERS, instance, value, None, None, expires_at, None)


def _member_delete(instance: str) -> DeleteWrite:
    return DeleteWrite(MEMBERS, instance, None)


async def until(
    check: Callable[[], Awaitable[bool]], backend: Backend, seconds: float, poll: float
) -> bool:
    """Wait until ``check()`` is true, looking again after each change of the store (at
    most every :data:`RECHECK_SECONDS`, so a busy store is not asked on every commit; and
    every ``poll`` seconds); False if ``seconds`` pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        generation = backend.changes.generation
        if await check():
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(RECHECK_SECONDS, left))
        await backend.changes.wait(generation, min(max(0.0, deadline - loop.time()), poll))
