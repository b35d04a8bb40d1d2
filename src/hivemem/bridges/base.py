"""The follower loop of every bridge, the store of its cursor and its dead-letter file.

A :class:`Bridge` is one durable consumer of a hive's feed, known by its name:

1. **Claim.** It reads its record (cursor, owner) from the :class:`CursorStore` and
   rewrites it with compare-and-set (``if_version`` = the version read). The newest
   bridge of a name takes over: a bridge that finds its record rewritten by another (its
   next save is a :class:`~hivemem.errors.Conflict`, or a check every
   :data:`OWNER_CHECK_SECONDS` while it has nothing to save finds another version) stops
   with :class:`CursorTaken` and records nothing more. So a bridge restarted after
   ``kill -9`` resumes at once, and two bridges of one name never both advance the
   cursor: the older one stops. On its first run (no record, or ``reset``) it starts at
   the feed's head (new events only) or, with ``from_start``, at the oldest kept event.
2. **Follow.** ``hive.watch(prefix, after=cursor)`` on any hive, embedded or remote; a
   feed that becomes unavailable is followed again from the last event read, with
   backoff (a :class:`~hivemem.errors.CursorExpired` stops the bridge).
3. **Deliver.** Each event becomes a :class:`Message` (the event as JSON, with its
   :func:`event_id`) that the :class:`Sink` sends, ``concurrency`` at a time. A failure
   is retried with exponential backoff (:class:`Retry`, tenacity) until ``max_attempts``
   tries; :class:`Undeliverable` (a 4xx answer, say) is not retried. An event that failed
   for good is appended to the dead-letter file and the bridge moves on.
4. **Record.** The cursor of the last event of the delivered run (every event up to it
   delivered or dead-lettered) is written to the store every ``save_every`` events or
   ``save_seconds`` seconds, whichever comes first, and at :meth:`Bridge.stop`.

Delivery is at-least-once: events are delivered, then their cursor is recorded, so a
crash redelivers what was delivered since the last record (at most ``save_every`` events
or ``save_seconds`` seconds of them, plus the deliveries in flight). Each redelivery
carries the same event id, so a receiver that drops ids it has seen (idempotency) sees
each event exactly once.

Where the cursor is kept (:func:`cursor_store`): in an embedded hive, the item
``_hivemem/bridges/<name>``, hivemem's own bookkeeping namespace (written through the
backend, like the service's replica rows: the public API refuses ``_`` namespaces), whose
changes reach no watcher. A service refuses writes under ``_hivemem/``, so a bridge over
``http://`` keeps it in the ordinary item ``hivemem-bridges/<name>`` instead, and never
forwards events of that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from hivemem import validation as check
from hivemem.backends.base import Backend
from hivemem.backends.rows import ItemRow, PutWrite
from hivemem.config import Settings
from hivemem.errors import Conflict, HivememError, InvalidInput, Unavailable
from hivemem.models import Event

if TYPE_CHECKING:
    from hivemem.hive import Hive

__all__ = [
    "CURSORS",
    "OWNER_CHECK_SECONDS",
    "REMOTE_CURSORS",
    "Bridge",
    "BridgeStats",
    "CursorRecord",
    "CursorStore",
    "CursorTaken",
    "DeadLetters",
    "DeliveryFailed",
    "Message",
    "Retry",
    "Sink",
    "Undeliverable",
    "cursor_store",
    "event_body",
    "event_id",
]

log = logging.getLogger("hivemem.bridge")

#: Namespace of the bridges' cursors in an embedded hive (``_hivemem/``: no watcher sees
#: its changes).
CURSORS = "_hivemem/bridges"
#: Namespace of the cursors of bridges over HTTP (the service refuses ``_hivemem/``).
REMOTE_CURSORS = "hivemem-bridges"
#: Seconds between checks, while there is nothing to record, that no other bridge of the
#: same name has taken the cursor over.
OWNER_CHECK_SECONDS = 5.0
#: Tries of the claim at start while other bridges of the name rewrite the record.
_CLAIM_TRIES = 5
#: Longest error text kept in a dead-letter line (characters).
_ERROR_CHARS = 2000


# Errors ---------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """Raised by a sink when a delivery failed but may succeed later (a timeout, a refused
    connection, a 5xx, 408 or 429 answer): the bridge tries again after a backoff.

    Attributes:
        retry_after: seconds the receiver asked to wait (``Retry-After``), or None.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Undeliverable(Exception):
    """Raised by a sink when the receiver refused the event for good (a 4xx answer other
    than 408 and 429): it goes to the dead-letter file at once, without retry."""


class CursorTaken(Conflict):
    """Raised when another bridge of the same name rewrote the cursor record since this
    one claimed it (it took the name over): this bridge stops and records nothing more."""


# Messages ---------------------------------------------------------------------------


def event_id(event: Event) -> str:
    """The id of ``event`` in every message a bridge sends: ``<cursor>-<16 hex digits>``.

    The same on every redelivery of the event, by any bridge over the same feed (so a
    receiver dedupes by it). The cursor alone identifies an event within one feed; the
    digits (the first 64 bits of SHA-256 over the event's type, namespace, key, version,
    author and time in milliseconds) keep the id of an event in a recreated store, whose
    cursors start again, from matching an id a receiver has already seen.
    """
    at_ms = round(event.at.timestamp() * 1000)
    parts = (event.type, event.namespace, event.key or "", event.version or 0, event.author)
    digest = hashlib.sha256(orjson.dumps([*parts, at_ms])).hexdigest()[:16]
    return f"{event.cursor}-{digest}"


def event_body(event: Event, id_: str | None = None) -> bytes:
    """``event`` as the UTF-8 JSON object every sink sends: ``id`` (:func:`event_id`),
    then the event's fields (``cursor``, ``type``, ``namespace``, ``key``, ``version``,
    ``author``, ``at`` as ISO 8601 UTC, ``data``)."""
    return orjson.dumps({"id": id_ or event_id(event), **event.model_dump(mode="json")})


@dataclass(frozen=True, slots=True)
class Message:
    """One event as a sink sends it."""

    #: The event id (:func:`event_id`): the same on every redelivery.
    id: str
    event: Event
    #: The JSON body (:func:`event_body`).
    body: bytes

    @classmethod
    def of(cls, event: Event) -> Message:
        """The message of ``event``."""
        id_ = event_id(event)
        return cls(id_, event, event_body(event, id_))


class Sink(ABC):
    """Where a bridge delivers events: a webhook, an SNS topic, a Redis channel.

    The bridge calls :meth:`open` once, :meth:`send` for each event (up to its
    ``concurrency`` at once), and :meth:`close` at the end.
    """

    #: The sink's kind, as the command line names it (``webhook``, ``sns``, ...).
    kind: ClassVar[str]

    @property
    @abstractmethod
    def target(self) -> str:
        """Where it delivers, for log lines and the dead-letter file (no secret in it)."""

    async def open(self) -> None:  # noqa: B027 (optional)
        """Connect; called once before the first :meth:`send`."""

    async def close(self) -> None:  # noqa: B027 (optional)
        """Release connections."""

    @abstractmethod
    async def send(self, message: Message) -> None:
        """Deliver one message; return once the receiver accepted it.

        Raises:
            Undeliverable: the receiver will never accept it (dead-lettered, no retry).
            DeliveryFailed: it may be accepted later (retried). Any other exception is
                retried the same way.
        """


# Retries and the dead-letter file --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failed delivery is tried again: up to ``max_attempts`` tries in all, waiting
    ``backoff_seconds * 2**(n-1)`` after the n-th failure, at most ``max_backoff_seconds``,
    with "equal jitter" (a random half of each wait; M. Brooker, "Exponential Backoff And
    Jitter", AWS Architecture Blog, 2015). A receiver's ``Retry-After`` lengthens a wait,
    up to ``max_backoff_seconds``.

    Raises:
        InvalidInput: ``max_attempts`` below 1 or a negative or inverted backoff (field
            named).
    """

    max_attempts: int = 8
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InvalidInput("max_attempts must be an integer", field="max_attempts")
        if self.max_attempts < 1:
            raise InvalidInput("max_attempts must be at least 1", field="max_attempts")
        if not 0 <= self.backoff_seconds <= self.max_backoff_seconds:
            raise InvalidInput(
                "backoff_seconds must be between 0 and max_backoff_seconds",
                field="backoff_seconds",
            )

    def pause(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row (1 = the first)."""
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2.0 ** min(failures - 1, 60))
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff_seconds))
        return wait


def _retryable(exc: BaseException) -> bool:
    # Exception only: a cancellation (BaseException) ends the delivery at once.
    return isinstance(exc, Exception) and not isinstance(exc, Undeliverable)


class DeadLetters:
    """The dead-letter file: one JSON object per line (JSON Lines) for each event that
    failed for good, appended and flushed to disk (fsync) before the bridge moves past
    the event. Its fields: ``id``, ``bridge``, ``sink``, ``target``, ``attempts``,
    ``error``, ``permanent`` (true: refused without retry), ``failed_at`` (ISO 8601 UTC)
    and ``event`` (the message body as sent, a JSON object).

    Args:
        path: the file; created (with its directory) on the first line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()

    async def add(self, line: dict[str, Any]) -> None:
        """Append ``line``.

        Raises:
            OSError: the file could not be written (the bridge stops: moving on would
                lose the event).
        """
        data = orjson.dumps(line) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append, data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


# The cursor store -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CursorRecord:
    """A bridge's stored record: its cursor, the owner that wrote it and the item's
    version (what the next compare-and-set write must name)."""

    cursor: str
    owner: str
    version: int
    #: The whole record (also ``sink``, ``target``, ``prefix``, ``delivered``,
    #: ``dead_lettered``, ``recorded_at``).
    value: dict[str, Any]


def _record(value: bytes | Any, version: int) -> CursorRecord:
    data = orjson.loads(value) if isinstance(value, bytes) else value
    if not isinstance(data, dict):
        data = {}
    return CursorRecord(str(data.get("cursor", "0")), str(data.get("owner", "")), version, data)


class CursorStore(ABC):
    """Where a bridge keeps its cursor: one item per bridge name, written only with
    compare-and-set.

    Attributes:
        namespace: the item's namespace; its key is the bridge's name.
    """

    namespace: str

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    async def load(self) -> CursorRecord | None:
        """The stored record, or None when the bridge has none yet."""

    @abstractmethod
    async def save(self, value: dict[str, Any], *, if_version: int) -> int:
        """Write the record if it is still at ``if_version`` (0: only if absent).

        Returns:
            The record's new version.

        Raises:
            Conflict: it is at another version; nothing was written.
        """

    def own(self, event: Event) -> bool:
        """Whether ``event`` is a change of the cursor items themselves (never forwarded)."""
        return event.namespace == self.namespace


class _BackendCursors(CursorStore):
    """Cursors of an embedded hive: items of :data:`CURSORS`, written through its backend."""

    namespace = CURSORS

    def __init__(self, backend: Backend, name: str, author: str) -> None:
        super().__init__(name)
        self.backend = backend
        self.author = author

    async def load(self) -> CursorRecord | None:
        rows = await self.backend.get_items([(CURSORS, self.name)], time.time())
        return _record(rows[0].value, rows[0].version) if rows else None

    async def save(self, value: dict[str, Any], *, if_version: int) -> int:
        put = PutWrite(CURSORS, self.name, orjson.dumps(value), None, None, None, if_version)
        (row,) = await self.backend.write_items(
            [put], author=self.author, now=time.time(), history_limit=0
        )
        assert isinstance(row, ItemRow)
        return row.version


class _ItemCursors(CursorStore):
    """Cursors of a hive over HTTP: ordinary items of ``namespace`` (kept out of search)."""

    def __init__(self, hive: Hive, name: str, namespace: str) -> None:
        super().__init__(name)
        self.hive = hive
        self.namespace = namespace

    async def load(self) -> CursorRecord | None:
        item = await self.hive.get(self.namespace, self.name)
        return None if item is None else _record(item.value, item.version)

    async def save(self, value: dict[str, Any], *, if_version: int) -> int:
        item = await self.hive.put(self.namespace, self.name, value, if_version=if_version, text="")
        return item.version


def cursor_store(hive: Hive, name: str, *, namespace: str = REMOTE_CURSORS) -> CursorStore:
    """The store of bridge ``name``'s cursor in ``hive``: the item
    ``_hivemem/bridges/<name>`` in an embedded hive (open it first), the item
    ``<namespace>/<name>`` in any other (``namespace`` applies only there)."""
    backend = getattr(hive, "backend", None)
    if isinstance(backend, Backend):
        return _BackendCursors(backend, name, hive.agent)
    return _ItemCursors(hive, name, namespace)


# The bridge ---------------------------------------------------------------------------


@dataclass
class BridgeStats:
    """What a bridge did since it started."""

    #: Events the sink accepted.
    delivered: int = 0
    #: Events written to the dead-letter file.
    dead_lettered: int = 0
    #: The last cursor recorded in the store (None before the claim).
    cursor: str | None = None
    #: Cursor records written (the claim included).
    saves: int = 0


@dataclass(slots=True)
class _Flight:
    """An event taken from the feed: its delivery (None: not forwarded)."""

    event: Event
    task: asyncio.Task[bool] | None


class Bridge:
    """Follows ``hive``'s feed under ``prefix`` from the cursor stored under ``name`` and
    delivers each event to ``sink`` (see the module notes for the guarantees).

    Args:
        hive: any Hive (embedded or over HTTP); the cursor is written as its agent.
        sink: where events go.
        name: the consumer's name, the key of its cursor (one namespace segment: letters,
            digits and ``_ - . : @ +``).
        prefix: the namespace prefix followed (``""``: every namespace).
        from_start: on the first run (or with ``reset``) start at the oldest kept event;
            otherwise at the feed's head (only events written from now on).
        reset: discard the stored cursor and start as on a first run.
        dead_letter: the dead-letter file (see :class:`DeadLetters`).
        retry: how failed deliveries are retried.
        save_every: record the cursor once this many events wait to be recorded
            (1 .. 1,000,000) ...
        save_seconds: ... or once this many seconds passed since the last record while
            any wait (> 0).
        concurrency: deliveries in flight at once (1 .. 1000); 1 keeps the feed's order.
        cursor_namespace: the namespace of the cursor item over HTTP (see
            :func:`cursor_store`).

    Raises:
        InvalidInput: a bad name, prefix, count or number of seconds (field named).
    """

    def __init__(
        self,
        hive: Hive,
        sink: Sink,
        *,
        name: str,
        prefix: str = "",
        from_start: bool = False,
        reset: bool = False,
        dead_letter: str | os.PathLike[str],
        retry: Retry | None = None,
        save_every: int = 100,
        save_seconds: float = 1.0,
        concurrency: int = 1,
        cursor_namespace: str = REMOTE_CURSORS,
    ) -> None:
        limits = Settings.model_construct()  # the default limits, not read from anywhere
        check.segment(name, "name", limits)
        check.namespace(prefix, limits, field="prefix", allow_empty=True)
        if not 1 <= save_every <= 1_000_000:
            raise InvalidInput("save_every must be between 1 and 1000000", field="save_every")
        if not 0 < save_seconds <= 86400:
            raise InvalidInput("save_seconds must be in (0, 86400]", field="save_seconds")
        if not 1 <= concurrency <= 1000:
            raise InvalidInput("concurrency must be between 1 and 1000", field="concurrency")
        self.hive = hive
        self.sink = sink
        self.name = name
        self.prefix = prefix
        self.from_start = from_start
        self.reset = reset
        self.dead_letters = DeadLetters(dead_letter)
        self.retry = retry or Retry()
        self.save_every = save_every
        self.save_seconds = float(save_seconds)
        self.concurrency = concurrency
        self.cursor_namespace = cursor_namespace
        self.owner = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = BridgeStats()
        self._stop = asyncio.Event()
        self._store: CursorStore | None = None
        self._version = 0
        self._done = "0"  # every event up to this cursor is delivered or dead-lettered
        self._unsaved = 0
        self._since = (0, 0)  # stats.delivered, stats.dead_lettered at the last record
        self._totals = (0, 0)  # the counts of earlier runs, from the record
        self._saved_at = 0.0
        self._saved_ok = True  # the last record was written (else wait before the next)
        self._taken = False

    def stop(self) -> None:
        """Stop: deliveries in flight are cancelled (redelivered by the next run), the
        cursor of what was delivered is recorded, and :meth:`run` returns."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = False) -> BridgeStats:
        """Claim the cursor and deliver events until :meth:`stop` (or SIGTERM/SIGINT when
        ``handle_signals`` and on the main thread).

        Returns:
            What it did.

        Raises:
            CursorTaken: another bridge of this name took the cursor over.
            CursorExpired: the stored cursor is older than the feed's retention.
            HivememError: the store could not be read or written at start.
            OSError: the dead-letter file could not be written.
        """
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        try:
            await self.hive.open()
            self._store = cursor_store(self.hive, self.name, namespace=self.cursor_namespace)
            await self.sink.open()  # before the claim: a sink that cannot open takes nothing
            try:
                await self._follow(await self._claim())
            finally:
                await self.sink.close()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        log.info(
            "bridge %r stopped: %d delivered, %d dead-lettered; cursor %s recorded",
            self.name,
            self.stats.delivered,
            self.stats.dead_lettered,
            self.stats.cursor,
        )
        return self.stats

    # The record ---------------------------------------------------------------------

    def _value(self, cursor: str) -> dict[str, Any]:
        return {
            "cursor": cursor,
            "owner": self.owner,
            "sink": self.sink.kind,
            "target": self.sink.target,
            "prefix": self.prefix,
            "delivered": self._totals[0] + self.stats.delivered,
            "dead_lettered": self._totals[1] + self.stats.dead_lettered,
            "recorded_at": datetime.now(UTC).isoformat(),
        }

    async def _claim(self) -> str:
        """Take the record over with compare-and-set; the cursor to start after."""
        store = self._store
        assert store is not None
        for _ in range(_CLAIM_TRIES):
            record = await store.load()
            if record is None or self.reset:
                cursor = "0" if self.from_start else await self.hive.head()
                how = "from the oldest kept event" if self.from_start else "from the feed's head"
            else:
                cursor = record.cursor
                how = f"after its recorded cursor {cursor}"
                value = record.value
                self._totals = (int(value.get("delivered", 0)), int(value.get("dead_lettered", 0)))
            try:
                self._version = await store.save(
                    self._value(cursor), if_version=0 if record is None else record.version
                )
            except Conflict:
                continue  # another bridge of this name wrote in between: look again
            self._done = self.stats.cursor = cursor
            self.stats.saves += 1
            self._saved_at = time.monotonic()
            if record is not None and record.value.get("prefix", self.prefix) != self.prefix:
                log.warning(
                    "bridge %r: its cursor was recorded following prefix %r; now %r",
                    self.name,
                    record.value.get("prefix"),
                    self.prefix,
                )
            log.info(
                "bridge %r (%s → %s) starts %s, prefix %r%s",
                self.name,
                self.sink.kind,
                self.sink.target,
                how,
                self.prefix,
                f"; took the cursor over from {record.owner}"
                if record is not None and record.owner and not self.reset
                else "",
            )
            return cursor
        raise CursorTaken(
            f"bridge {self.name!r}: its cursor record kept changing while this bridge tried "
            f"to claim it ({_CLAIM_TRIES} tries): other bridges of the same name are starting",
            field="name",
        )

    async def _taken_error(self) -> CursorTaken:
        self._taken = True
        store = self._store
        assert store is not None
        holder = "another bridge"
        with contextlib.suppress(HivememError):
            record = await store.load()
            if record is not None:
                holder = f"bridge owner {record.owner} (record version {record.version})"
        return CursorTaken(
            f"bridge {self.name!r}: {holder} of the same name took the cursor over; this one "
            f"stops without recording (its events since cursor {self.stats.cursor} are "
            "delivered again by the new owner)",
            field="name",
        )

    async def _save(self) -> None:
        """Record the cursor of the delivered run (a failure to reach the store is logged
        and tried again at the next record).

        Raises:
            CursorTaken: another bridge rewrote the record.
        """
        store = self._store
        assert store is not None
        cursor = self._done
        self._saved_at = time.monotonic()
        try:
            self._version = await store.save(self._value(cursor), if_version=self._version)
        except Conflict:
            raise await self._taken_error() from None
        except HivememError as exc:
            self._saved_ok = False
            log.warning(
                "bridge %r: recording cursor %s failed (%s); delivering on, trying again in %g s",
                self.name,
                cursor,
                exc,
                self.save_seconds,
            )
            return
        self._saved_ok = True
        delivered = self.stats.delivered - self._since[0]
        dead = self.stats.dead_lettered - self._since[1]
        self._since = (self.stats.delivered, self.stats.dead_lettered)
        self._unsaved = 0
        self.stats.cursor = cursor
        self.stats.saves += 1
        log.info(
            "bridge %r: %d delivered, %d dead-lettered; cursor %s recorded "
            "(%d delivered, %d dead-lettered since start)",
            self.name,
            delivered,
            dead,
            cursor,
            self.stats.delivered,
            self.stats.dead_lettered,
        )

    async def _check_owner(self) -> None:
        """Raise :class:`CursorTaken` if the record is no longer at this bridge's version."""
        store = self._store
        assert store is not None
        try:
            record = await store.load()
        except HivememError:
            return  # the store is away; the next record or check will tell
        if record is None or record.version != self._version:
            raise await self._taken_error()

    # The loop -------------------------------------------------------------------------

    async def _follow(self, start: str) -> None:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max(64, 2 * self.concurrency))
        reader = asyncio.create_task(self._read(start, queue), name=f"bridge-{self.name}-feed")
        stopping = asyncio.create_task(self._stop.wait())
        inflight: deque[_Flight] = deque()
        getter: asyncio.Task[Event] | None = None
        checked = time.monotonic()
        try:
            while True:
                self._retire(inflight)
                now = time.monotonic()
                # _saved_at moves on a failed record too: the next try waits save_seconds.
                if self._unsaved and (
                    now - self._saved_at >= self.save_seconds
                    or (self._unsaved >= self.save_every and self._saved_ok)
                ):
                    await self._save()
                elif not self._unsaved and now - checked >= OWNER_CHECK_SECONDS:
                    await self._check_owner()
                    checked = now
                busy = [f.task for f in inflight if f.task is not None and not f.task.done()]
                waits: set[asyncio.Future[Any]] = {stopping, reader, *busy}
                if len(busy) < self.concurrency:
                    if getter is None:
                        getter = asyncio.create_task(queue.get())
                    waits.add(getter)
                if self._unsaved:
                    timeout = self.save_seconds - (time.monotonic() - self._saved_at)
                else:
                    timeout = OWNER_CHECK_SECONDS - (time.monotonic() - checked)
                done, _ = await asyncio.wait(
                    waits, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return
                if reader in done:
                    reader.result()  # raises what ended it (the feed never ends by itself)
                    raise RuntimeError("the feed ended")
                if getter is not None and getter in done:
                    event, getter = getter.result(), None
                    own = self._store is not None and self._store.own(event)
                    task = None if own else asyncio.create_task(self._deliver(event))
                    inflight.append(_Flight(event, task))
        finally:
            waited: list[asyncio.Task[Any]] = [t for t in (getter, reader, stopping) if t]
            pending = [f.task for f in inflight if f.task is not None and not f.task.done()]
            for running in (*waited, *pending):
                running.cancel()
            await asyncio.gather(*waited, *pending, return_exceptions=True)
            self._retire(inflight, final=True)
            if self._unsaved and not self._taken:
                with contextlib.suppress(CursorTaken):
                    await self._save()

    def _retire(self, inflight: deque[_Flight], *, final: bool = False) -> None:
        """Move the delivered run's cursor past the finished deliveries at the head of
        ``inflight``, in feed order (a delivery still running holds back those after it).

        Raises:
            Exception: what a delivery raised (a dead-letter file that cannot be written),
                unless ``final``.
        """
        while inflight:
            task = inflight[0].task
            if task is not None:
                if not task.done() or task.cancelled():
                    return
                if task.exception() is not None:
                    if final:
                        return
                    raise cast(BaseException, task.exception())
                self._unsaved += 1
            self._done = inflight.popleft().event.cursor

    async def _read(self, after: str, queue: asyncio.Queue[Event]) -> None:
        """Put the feed's events after ``after`` on ``queue``, following the feed again
        from the last event read when it is unavailable."""
        position, failures = after, 0
        # A hand-written loop rather than a tenacity policy: the count of failures in a
        # row restarts with each event read, which a policy around a call that never
        # returns cannot express.
        while True:
            feed = cast(AsyncGenerator[Event, None], self.hive.watch(self.prefix, after=position))
            try:
                async with contextlib.aclosing(feed):
                    async for event in feed:
                        failures = 0
                        position = event.cursor
                        await queue.put(event)
            except Unavailable as exc:
                failures += 1
                pause = self.retry.pause(failures)
                log.warning(
                    "bridge %r: the feed is unavailable (%s); following it again in %.1f s",
                    self.name,
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)

    async def _deliver(self, event: Event) -> bool:
        """Deliver ``event`` with retries; dead-letter it if it fails for good.

        Returns:
            True if delivered, False if dead-lettered.

        Raises:
            OSError: the dead-letter file could not be written.
        """
        message = Message.of(event)
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            await self.sink.send(message)

        try:
            # The first try runs outside tenacity (its bookkeeping costs more CPU than a
            # delivery on loopback); a failure is replayed to the policy as its first try.
            try:
                await attempt()
            except Exception as exc:
                if not _retryable(exc) or self.retry.max_attempts == 1:
                    raise
                replay: list[BaseException] = [exc]

                async def again() -> None:
                    if replay:
                        raise replay.pop()
                    await attempt()

                await self._retrying(message)(again)
        except Exception as exc:
            await self._dead_letter(message, exc, attempts)
            return False
        self.stats.delivered += 1
        return True

    def _retrying(self, message: Message) -> AsyncRetrying:
        retry = self.retry

        def wait(state: RetryCallState) -> float:
            assert state.outcome is not None  # tenacity asks only after a try ended
            exc = state.outcome.exception()
            return retry.pause(state.attempt_number, getattr(exc, "retry_after", None))

        def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None and state.next_action is not None
            log.warning(
                "bridge %r: event %s failed (try %d of %d): %s; trying again in %.2f s",
                self.name,
                message.id,
                state.attempt_number,
                retry.max_attempts,
                state.outcome.exception(),
                state.next_action.sleep,
            )

        return AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(retry.max_attempts),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def _dead_letter(self, message: Message, exc: Exception, attempts: int) -> None:
        error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        await self.dead_letters.add(
            {
                "id": message.id,
                "bridge": self.name,
                "sink": self.sink.kind,
                "target": self.sink.target,
                "attempts": attempts,
                "error": error,
                "permanent": isinstance(exc, Undeliverable),
                "failed_at": datetime.now(UTC).isoformat(),
                "event": orjson.loads(message.body),
            }
        )
        self.stats.dead_lettered += 1
        log.error(
            "bridge %r: event %s failed for good after %d %s (%s); written to %s",
            self.name,
            message.id,
            attempts,
            "try" if attempts == 1 else "tries",
            error,
            self.dead_letters.path,
        )
