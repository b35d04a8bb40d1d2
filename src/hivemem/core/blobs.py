"""Large values in a blob store (S3 or a directory), once for every backend.

With ``blob_store`` set, a put's value (as JSON) or text (UTF-8) longer than
``blob_threshold_bytes`` is written as an object of the blob store *before* the write
commits, and the store's row holds a small reference in its place; every read of items
(get, list, history, batch and put results, search hits, the indexer) puts the value
back. Backends never know: they store the reference as they store any value. The feed's
item events carry no values, so they need nothing. docs/blobs.md is the user's guide.

**References.** A value: the JSON object ``{"__hivemem_blob__": {"v": 1, "object":
<name>, "bytes": <size>, "sha256": <hex>}}`` (a value of exactly that shape is refused
from callers: :func:`check_not_reference`). A text: the string ``"\\ufdd0hivemem-blob:"``
followed by the same inner object as JSON (U+FDD0 is a Unicode noncharacter).

**Objects.** ``<item>/<token>``: ``<item>`` is the first 32 hex digits of the SHA-256 of
``[namespace, key]`` as JSON, so an item's objects share a prefix; ``<token>`` is 32
random hex digits, so every write has objects of its own. An object is ``MAGIC``, a
4-byte big-endian header length, a JSON header ``{"namespace", "key"}`` (what the
sweeper needs to find the item) and the payload, whose size and SHA-256 the reference
holds and every read checks.

Why not content addressing: an object named by its content's hash is shared by every
version (or item) with that content, so freeing it means knowing that no other live
version refers to it, and a writer that re-uploads the same content while a deleter
decides it is unused loses its object (a check-then-delete race no object store lets
us close without a lock). With a name per write, a version's objects are its own: once
that version is gone nothing can refer to them again, and they are deleted at once.

**When objects are removed.**

- A delete or a put first reads the item's stored versions (one history read of at
  most ``history_limit`` rows; none for ``if_version=0``). When some of them refer to
  objects, the versions are read again after the commit, and the objects of those no
  longer stored (deleted, or trimmed beyond ``history_limit``) are deleted at once. The
  second read decides, not version arithmetic: it holds for any backend, for a request-id
  replay and for writes of others in between.
- A write that fails for certain (Conflict, InvalidInput, NotFound, TooLarge,
  PermissionDenied) deletes the objects it uploaded; a request-id replay (the stored
  result of an earlier attempt) deletes this attempt's unused objects.
- Everything else (a crash or a lost connection between the upload and the commit, an
  item that expired, a version a concurrent write removed before it was read) is left
  to the **sweeper** (:meth:`Blobs.sweep`, every ``blob_sweep_interval_seconds``): it
  scans the store in name order, at most ``SWEEP_OBJECTS`` per round, and deletes each
  object older than ``blob_grace_seconds`` that no live version of its item refers to.
  The grace period covers uploads whose commit is still to come: a write whose upload
  took more than half of it raises :class:`~hivemem.errors.Unavailable` (and deletes its
  objects) instead of committing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from hivemem.backends.base import Backend
from hivemem.backends.rows import CheckWrite, DeleteWrite, ItemRow, PutWrite
from hivemem.config import Settings
from hivemem.core.objects import TEMP_SUFFIX, ObjectStore, open_object_store
from hivemem.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unavailable,
)

__all__ = [
    "MAGIC",
    "BlobRef",
    "Blobs",
    "check_not_reference",
    "object_names",
    "resolve",
    "text_reference",
    "value_reference",
]

log = logging.getLogger("hivemem.blobs")

#: The first bytes of every object.
MAGIC = b"HMBLOB1\n"
#: The key of a value reference.
MARKER = "__hivemem_blob__"
_VALUE_PREFIX = b'{"' + MARKER.encode() + b'":'
#: The start of a text reference.
TEXT_PREFIX = "\ufdd0hivemem-blob:"
#: Bytes read for an object's header by the sweeper (a longer header is read whole).
_HEAD_BYTES = 16 * 1024
#: Objects the sweeper looks at per round.
SWEEP_OBJECTS = 10_000
#: Versions read to decide whether a version refers to an object (more than any
#: ``history_limit`` keeps).
_ALL_VERSIONS = 1_000_000
#: Most objects read or written at once by one call.
_PARALLEL = 8
#: Payloads at least this long are hashed in a worker thread.
_HASH_IN_THREAD = 1024 * 1024
#: Errors after which a write certainly committed nothing.
_NOT_WRITTEN = (Conflict, InvalidInput, NotFound, TooLarge, PermissionDenied)

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A reference to a blob: the object's name, the payload's size (bytes) and SHA-256
    (64 hex digits)."""

    object: str
    bytes: int
    sha256: str

    def body(self) -> dict[str, Any]:
        return {"v": 1, "object": self.object, "bytes": self.bytes, "sha256": self.sha256}


def _parse(doc: Any) -> BlobRef | None:
    if not isinstance(doc, dict) or doc.get("v") != 1 or len(doc) != 4:
        return None
    name, size, digest = doc.get("object"), doc.get("bytes"), doc.get("sha256")
    if isinstance(name, str) and isinstance(size, int) and isinstance(digest, str):
        return BlobRef(name, size, digest)
    return None


def value_reference(value: bytes) -> BlobRef | None:
    """The reference a stored value (JSON bytes) holds, or None for an ordinary value."""
    if not value.startswith(_VALUE_PREFIX):
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    return _parse(doc.get(MARKER))


def text_reference(text: str | None) -> BlobRef | None:
    """The reference a stored text holds, or None for an ordinary text (or None)."""
    if text is None or not text.startswith(TEXT_PREFIX):
        return None
    try:
        return _parse(orjson.loads(text[len(TEXT_PREFIX) :]))
    except orjson.JSONDecodeError:
        return None


def object_names(row: ItemRow) -> list[str]:
    """The objects a stored row refers to (none, one or two)."""
    refs = (value_reference(row.value), text_reference(row.text))
    return [r.object for r in refs if r is not None]


def check_not_reference(value: bytes, text: str | None, field: str = "") -> None:
    """Refuse a value or text that a read would take for a blob reference.

    Raises:
        InvalidInput: naming ``<field>value`` or ``<field>text``.
    """
    if value_reference(value) is not None:
        raise InvalidInput(
            f"a JSON object whose one key is {MARKER!r} holding a blob reference is "
            "reserved by hivemem; wrap it in another object",
            field=f"{field}value",
        )
    if text_reference(text) is not None:
        raise InvalidInput(
            "a text starting with U+FDD0 'hivemem-blob:' is reserved by hivemem",
            field=f"{field}text",
        )


def item_prefix(namespace: str, key: str) -> str:
    """The name prefix of an item's objects: 32 hex digits of SHA-256([namespace, key])."""
    return hashlib.sha256(orjson.dumps([namespace, key])).hexdigest()[:32]


async def _sha256(data: bytes) -> str:
    if len(data) >= _HASH_IN_THREAD:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def _header(namespace: str, key: str) -> bytes:
    head = orjson.dumps({"namespace": namespace, "key": key})
    return MAGIC + struct.pack(">I", len(head)) + head


def _split(data: bytes) -> tuple[dict[str, Any], memoryview] | None:
    """(header, payload) of an object's bytes, or None when they are not an object."""
    start = len(MAGIC) + 4
    if len(data) < start or not data.startswith(MAGIC):
        return None
    (size,) = struct.unpack(">I", data[len(MAGIC) : start])
    try:
        header = orjson.loads(data[start : start + size])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(header, dict):
        return None
    return header, memoryview(data)[start + size :]


@dataclass
class Upload:
    """The objects one write uploaded: the writes to commit (references in place of the
    large values and texts), the originals they replace, the object names, and when the
    upload began (``time.monotonic()``)."""

    writes: list[PutWrite | DeleteWrite | CheckWrite]
    originals: dict[int, PutWrite]
    names: list[str]
    started: float


class Blobs:
    """The blob store of one hive (see the module notes).

    Args:
        store: where the objects go.
        settings: ``blob_threshold_bytes``, ``blob_grace_seconds`` and
            ``blob_sweep_interval_seconds`` apply.
    """

    def __init__(self, store: ObjectStore, settings: Settings) -> None:
        self.store = store
        self.threshold = settings.blob_threshold_bytes
        self.grace = settings.blob_grace_seconds
        self.interval = settings.blob_sweep_interval_seconds
        #: Where the next sweep round starts (an object name; "" = the beginning).
        self._after = ""
        #: Item prefix -> (namespace, key), read from object headers.
        self._items: dict[str, Key] = {}
        self._next_sweep = time.monotonic() + self.interval
        self._limit = asyncio.Semaphore(_PARALLEL)

    @classmethod
    def from_settings(cls, settings: Settings) -> Blobs | None:
        """The blob store ``settings.blob_store`` names, or None when it is unset.

        Raises:
            InvalidInput: a malformed ``blob_store`` (field ``blob_store``).
        """
        if not settings.blob_store:
            return None
        return cls(open_object_store(settings.blob_store, field="blob_store"), settings)

    async def close(self) -> None:
        await self.store.close()

    # Writing ------------------------------------------------------------------------------

    async def write(
        self,
        backend: Backend,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        history_limit: int,
        now: float,
        commit: Callable[[list[PutWrite | DeleteWrite | CheckWrite]], Awaitable[list[Any]]],
    ) -> list[Any]:
        """Commit ``writes`` with ``commit`` (the backend's ``write_items``) with large
        values and texts uploaded first, and free the objects of the versions the commit
        removed. Returns ``commit``'s results, rows carrying the values and texts given.

        Raises:
            Unavailable: the blob store failed (nothing was committed), or the upload
                took more than half of ``blob_grace_seconds``.
            Whatever ``commit`` raises.
        """
        reading = asyncio.ensure_future(self._versions(backend, writes, history_limit, now))
        try:
            upload = await self._upload(writes)
        except BaseException:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            raise
        try:
            before = await reading
        except BaseException:
            await asyncio.shield(self._discard(upload.names))
            raise
        elapsed = time.monotonic() - upload.started
        if upload.names and elapsed > self.grace / 2:
            await self._discard(upload.names)
            raise Unavailable(
                f"uploading to the blob store took {elapsed:.1f} s, more than half of "
                f"blob_grace_seconds ({self.grace:g}); nothing was written",
                field="blob_store",
            )
        try:
            results = await commit(upload.writes)
        except _NOT_WRITTEN:
            await self._discard(upload.names)
            raise
        unused = set(upload.names)
        for i, original in upload.originals.items():
            row = results[i]
            if isinstance(row, ItemRow):
                unused.difference_update(object_names(row))
                results[i] = dataclasses.replace(row, value=original.value, text=original.text)
        if unused:  # a request-id replay: the stored result is an earlier attempt's
            await self._discard(sorted(unused))
        await self._free(backend, before, now)
        return results

    async def _upload(self, writes: Sequence[PutWrite | DeleteWrite | CheckWrite]) -> Upload:
        started = time.monotonic()
        out = list(writes)
        originals: dict[int, PutWrite] = {}
        jobs: list[tuple[int, str, bytes, str, str]] = []  # (index, kind, payload, ns, key)
        for i, w in enumerate(writes):
            if not isinstance(w, PutWrite):
                continue
            if len(w.value) > self.threshold:
                jobs.append((i, "value", w.value, w.namespace, w.key))
            if w.text is not None and 4 * len(w.text) > self.threshold:  # may be over
                payload = w.text.encode("utf-8", "surrogatepass")
                if len(payload) > self.threshold:
                    jobs.append((i, "text", payload, w.namespace, w.key))
        if not jobs:
            return Upload(out, originals, [], started)
        names = [f"{item_prefix(ns, key)}/{secrets.token_hex(16)}" for _, _, _, ns, key in jobs]

        async def one(name: str, payload: bytes, ns: str, key: str) -> BlobRef:
            digest = await _sha256(payload)
            async with self._limit:
                await self.store.put(name, _header(ns, key) + payload)
            return BlobRef(name, len(payload), digest)

        tasks = [
            asyncio.create_task(one(name, payload, ns, key))
            for name, (_, _, payload, ns, key) in zip(names, jobs, strict=True)
        ]
        try:
            refs = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.shield(self._discard(names))
            raise
        for (i, kind, _, _, _), ref in zip(jobs, refs, strict=True):
            w = out[i]
            assert isinstance(w, PutWrite)
            originals.setdefault(i, w)
            if kind == "value":
                out[i] = dataclasses.replace(
                    w, value=orjson.dumps({MARKER: ref.body()}, option=orjson.OPT_SORT_KEYS)
                )
            else:
                text = TEXT_PREFIX + orjson.dumps(ref.body(), option=orjson.OPT_SORT_KEYS).decode()
                out[i] = dataclasses.replace(w, text=text)
        return Upload(out, originals, names, started)

    async def _discard(self, names: Sequence[str]) -> None:
        """Delete objects this process uploaded and no version refers to; a failure is
        logged (the sweeper removes them later)."""
        if not names:
            return
        try:
            await self.store.delete(names)
        except Exception:
            log.warning("could not delete %d unused objects; the sweeper will", len(names))

    async def _versions(
        self,
        backend: Backend,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        history_limit: int,
        now: float,
    ) -> dict[Key, list[ItemRow]]:
        """The stored versions that refer to objects, of each item the writes may
        remove versions of (a create-only put removes none)."""
        keys = list(
            dict.fromkeys(
                (w.namespace, w.key)
                for w in writes
                if isinstance(w, DeleteWrite) or (isinstance(w, PutWrite) and w.if_version != 0)
            )
        )
        if not keys:
            return {}
        limit = max(history_limit, 1)
        found = await asyncio.gather(
            *(backend.item_history(ns, key, limit, now) for ns, key in keys)
        )
        out: dict[Key, list[ItemRow]] = {}
        for k, rows in zip(keys, found, strict=True):
            rows = [r for r in rows if object_names(r)]
            if rows:
                out[k] = rows
        return out

    async def _free(self, backend: Backend, before: dict[Key, list[ItemRow]], now: float) -> None:
        """Delete the objects of the versions in ``before`` that are no longer stored (a
        version's objects are its own, so once it is gone nothing refers to them). Never
        raises: what it cannot do is left to the sweeper."""
        if not before:
            return
        keys = list(before)
        try:
            after = await asyncio.gather(
                *(backend.item_history(ns, key, _ALL_VERSIONS, now) for ns, key in keys)
            )
        except Exception:  # the write committed: never fail it for this
            log.warning("could not read %d items back; the sweeper frees their objects", len(keys))
            return
        gone: list[str] = []
        for k, rows in zip(keys, after, strict=True):
            live = {n for r in rows for n in object_names(r)}
            gone += [n for r in before[k] for n in object_names(r) if n not in live]
        await self._discard(gone)

    # Reading ------------------------------------------------------------------------------

    async def fetch(self, namespace: str, key: str, ref: BlobRef) -> bytes:
        """The payload of a reference, checked against its size and SHA-256.

        Raises:
            Unavailable: the object is missing or does not match (field ``blob_store``),
                or the blob store failed.
        """
        async with self._limit:
            data = await self.store.get(ref.object)
        where = f"object {ref.object} of {namespace}/{key} in {self.store.url}"
        if data is None:
            raise Unavailable(f"{where} is missing", field="blob_store")
        parts = _split(data)
        if parts is None or len(parts[1]) != ref.bytes:
            raise Unavailable(f"{where} is not the object stored", field="blob_store")
        payload = bytes(parts[1])
        if await _sha256(payload) != ref.sha256:
            raise Unavailable(f"{where} does not match its SHA-256", field="blob_store")
        return payload

    async def _resolved(self, row: ItemRow) -> ItemRow:
        value_ref, text_ref = value_reference(row.value), text_reference(row.text)
        value, text = row.value, row.text
        if value_ref is not None:
            value = await self.fetch(row.namespace, row.key, value_ref)
        if text_ref is not None:
            text = (await self.fetch(row.namespace, row.key, text_ref)).decode(
                "utf-8", "surrogatepass"
            )
        return dataclasses.replace(row, value=value, text=text)

    # Sweeping -----------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether ``blob_sweep_interval_seconds`` passed since the last round (and
        starts the next interval when it did)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self.interval
        return True

    async def sweep(self, backend: Backend, now: float, *, grace: float | None = None) -> int:
        """One round of the sweeper: delete objects older than ``grace`` (default
        ``blob_grace_seconds``) that no live version of their item refers to, and stale
        temporary files. Looks at up to ``SWEEP_OBJECTS`` objects, continuing where the
        last round stopped. Returns how many objects it deleted.

        Raises:
            Unavailable: the blob store or the backend failed.
        """
        scanned = await self.store.scan(self._after, SWEEP_OBJECTS)
        self._after = scanned[-1].name if len(scanned) == SWEEP_OBJECTS else ""
        cutoff = now - (self.grace if grace is None else grace)
        groups: dict[str, list[str]] = {}
        dead: list[str] = []
        for info in scanned:
            if info.modified > cutoff:
                continue
            if info.name.endswith(TEMP_SUFFIX) or "/" not in info.name:
                if info.name.endswith(TEMP_SUFFIX):
                    dead.append(info.name)  # an upload a crash cut short
                continue
            groups.setdefault(info.name.rsplit("/", 1)[0], []).append(info.name)
        for prefix, names in groups.items():
            item = await self._item_of(prefix, names)
            if item is None:
                continue
            rows = await backend.item_history(item[0], item[1], _ALL_VERSIONS, now)
            live = {n for r in rows for n in object_names(r)}
            dead += [n for n in names if n not in live]
        if dead:
            await self.store.delete(dead)
        return len(dead)

    async def _item_of(self, prefix: str, names: Iterable[str]) -> Key | None:
        """(namespace, key) of the objects under ``prefix``, from an object's header."""
        known = self._items.get(prefix)
        if known is not None:
            return known
        for name in names:
            data = await self.store.head(name, _HEAD_BYTES)
            if data is None:
                continue
            start = len(MAGIC) + 4
            if len(data) >= start and data.startswith(MAGIC):
                (size,) = struct.unpack(">I", data[len(MAGIC) : start])
                if start + size > len(data):
                    data = await self.store.head(name, start + size) or b""
            parts = _split(data)
            if parts is None:
                log.warning("%s in %s is not a hivemem object; left alone", name, self.store.url)
                continue
            ns, key = parts[0].get("namespace"), parts[0].get("key")
            if isinstance(ns, str) and isinstance(key, str) and item_prefix(ns, key) == prefix:
                if len(self._items) >= 100_000:
                    self._items.clear()
                self._items[prefix] = (ns, key)
                return ns, key
        return None


async def resolve(blobs: Blobs | None, rows: Sequence[ItemRow]) -> list[ItemRow]:
    """``rows`` with every blob reference replaced by its value or text (the same list
    when none holds one).

    Raises:
        Unavailable: an object is missing or corrupt, the blob store failed, or a row
            holds a reference while ``blob_store`` is unset (field ``blob_store``).
    """
    todo = [i for i, r in enumerate(rows) if object_names(r)]
    if not todo:
        return list(rows)
    if blobs is None:
        row = rows[todo[0]]
        raise Unavailable(
            f"{row.namespace}/{row.key} is kept in a blob store, and blob_store is not set",
            field="blob_store",
        )
    out = list(rows)
    done = await asyncio.gather(*(blobs._resolved(rows[i]) for i in todo))
    for i, row in zip(todo, done, strict=True):
        out[i] = row
    return out
