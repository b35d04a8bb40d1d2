"""Items: the shared memory bank (put, get, delete, list, batch, history)."""

from __future__ import annotations

import asyncio
import builtins
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson
from pydantic import ValidationError

from hivemem import validation as check
from hivemem.backends.results import RequestIdReused
from hivemem.backends.rows import CheckWrite, DeleteWrite, ItemRow, PutWrite
from hivemem.core import cursors
from hivemem.core.area import Area, timestamp
from hivemem.core.blobs import check_not_reference, object_names
from hivemem.core.lexical import check_terms
from hivemem.errors import Conflict, InvalidInput
from hivemem.models import DeleteOp, Item, NamespaceCount, Page, PutOp

#: A listing scans at most this many pages of rows it may not show before it returns a
#: short page with a cursor.
_SCAN_PAGES = 10
#: Texts longer than this (characters) have their distinct terms counted in a thread.
_TERMS_IN_THREAD = 8192


def _row_key(row: ItemRow) -> tuple[str, str]:
    return (row.namespace, row.key)


def to_item(row: ItemRow) -> Item:
    """Build the public record from a stored row."""
    return Item.model_construct(
        namespace=row.namespace,
        key=row.key,
        value=orjson.loads(row.value),
        version=row.version,
        author=row.author,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        expires_at=None if row.expires_at is None else timestamp(row.expires_at),
        text=row.text,
        metadata={} if row.metadata is None else orjson.loads(row.metadata),
    )


def searchable_text(text: str | None, value: Any) -> str | None:
    """What search indexes for an item (see the module notes), or None: an empty
    ``text`` keeps the item out of search (no fallback to its value)."""
    if text is not None:
        return text or None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for field in ("text", "content"):
            candidate = value.get(field)
            if isinstance(candidate, str):
                return candidate
    return None


class ItemsMixin(Area):
    """The item operations of :class:`~hivemem.core.LocalHive`."""

    def _put_write(
        self,
        namespace: str,
        key: str,
        value: Any,
        if_version: int | None,
        ttl: float | None,
        text: str | None,
        metadata: dict[str, Any] | None,
        field: str = "",
    ) -> PutWrite:
        """Check a put. ``expires_at`` holds the TTL in seconds until :meth:`_index`
        turns it into a time, so that the TTL counts from the write, not from before
        the embedding."""
        s = self._settings
        write = PutWrite(
            namespace=check.namespace(namespace, s, field=f"{field}namespace"),
            key=check.key(key, s, field=f"{field}key"),
            value=check.to_json(value, f"{field}value", s.max_value_bytes),
            text=None if text is None else check.text(text, s, field=f"{field}text"),
            metadata=None
            if metadata is None
            else check.json_object(metadata, f"{field}metadata", s.max_metadata_bytes),
            expires_at=None if ttl is None else check.ttl(ttl, field=f"{field}ttl", settings=s),
            if_version=None
            if if_version is None
            else check.version(if_version, field=f"{field}if_version"),
        )
        check_not_reference(write.value, write.text, field)
        return write

    async def _commit_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        now: float,
        request_id: str | None,
    ) -> builtins.list[ItemRow | bool]:
        """Apply ``writes`` in one backend call; with a blob store, large values and
        texts are uploaded first and replaced objects freed after (core/blobs.py).

        Raises:
            Conflict, InvalidInput: as :meth:`Backend.write_items` (and a reused request
                id); Unavailable: the store or the blob store failed.
        """

        async def commit(
            batch: builtins.list[PutWrite | DeleteWrite | CheckWrite],
        ) -> builtins.list[ItemRow | bool]:
            return await self._once(
                self._backend.write_items(
                    batch,
                    author=self.agent,
                    now=now,
                    history_limit=self._settings.history_limit,
                    request_id=request_id,
                )
            )

        if self._blobs is None:
            return await commit(builtins.list(writes))
        return await self._blobs.write(
            self._backend, writes, self._settings.history_limit, now, commit
        )

    async def _check_terms(self, texts: Sequence[tuple[str | None, str]]) -> None:
        """Refuse texts with more than ``max_text_terms`` distinct terms; ``texts`` are
        (indexed text or None, field). Counting a long text's terms costs tens of
        milliseconds of CPU, so long texts are counted in a worker thread and the event
        loop keeps serving others meanwhile.

        Raises:
            TooLarge: naming the field of the first text over the bound.
        """
        limit = self._settings.max_text_terms
        for text, field in texts:
            if text is None:
                continue
            if len(text) > _TERMS_IN_THREAD:
                await asyncio.to_thread(check_terms, text, limit, field)
            else:
                check_terms(text, limit, field)

    async def _index(
        self, writes: Sequence[PutWrite], texts: Sequence[str | None], now: Callable[[], float]
    ) -> tuple[builtins.list[PutWrite], float]:
        """Attach what search indexes to each write, then stamp the expiry times from
        the clock read after it. With ``index_mode=sync`` the texts are embedded here,
        outside any transaction (one model call for all of them); with ``deferred`` each
        entry names the model and waits for the indexer (core/indexer.py). Returns the
        writes and that time.

        Raises:
            Unavailable: the embedder failed (sync); nothing is written.
        """
        if self._embedder is None or self._settings.index_mode == "deferred":
            return self._index_now(writes, texts, now)
        model = self._embedder.name
        embedded = [i for i, t in enumerate(texts) if t is not None]
        vectors: dict[int, bytes] = {}
        if embedded:
            rows = await self._embedder.embed([texts[i] for i in embedded])  # type: ignore[misc]
            vectors = {i: row.tobytes() for i, row in zip(embedded, rows, strict=True)}
        stamp = now()
        return [
            replace(
                w,
                index_text=t,
                vector=vectors.get(i),
                model=model if i in vectors else None,
                expires_at=None if w.expires_at is None else stamp + w.expires_at,
            )
            for i, (w, t) in enumerate(zip(writes, texts, strict=True))
        ], stamp

    def _index_now(
        self, writes: Sequence[PutWrite], texts: Sequence[str | None], now: Callable[[], float]
    ) -> tuple[builtins.list[PutWrite], float]:
        """:meth:`_index` where nothing is embedded before the write (no embedder, or
        ``index_mode=deferred``): each entry names the model, if any, and waits for the
        indexer."""
        model = None if self._embedder is None else self._embedder.name
        stamp = now()
        return [
            replace(
                w,
                index_text=t,
                model=None if t is None else model,
                expires_at=None if w.expires_at is None else stamp + w.expires_at,
            )
            for w, t in zip(writes, texts, strict=True)
        ], stamp

    def _put_checked(
        self,
        namespace: str,
        key: str,
        value: Any,
        if_version: int | None,
        ttl: float | None,
        text: str | None,
        metadata: dict[str, Any] | None,
        fence: tuple[str, int] | None,
    ) -> tuple[PutWrite, CheckWrite | None, str | None, str]:
        """The checks a put makes before counting its text's terms, in order (shared by
        :meth:`put` and :meth:`_put_here`): the write, its fence's check (None without
        one), the text search indexes (None: none) and the field that text came from.

        Raises:
            InvalidInput, TooLarge: a bad argument; PermissionDenied: the namespace.
        """
        write = self._put_write(namespace, key, value, if_version, ttl, text, metadata)
        guard = None if fence is None else self._fence(fence)
        self._must("write", write.namespace, "namespace")
        indexed = searchable_text(text, value)
        return write, guard, indexed, "text" if text is not None else "value"

    async def put(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        if_version: int | None = None,
        ttl: float | None = None,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        fence: tuple[str, int] | None = None,
    ) -> Item:
        write, guard, indexed, field = self._put_checked(
            namespace, key, value, if_version, ttl, text, metadata, fence
        )
        await self._check_terms([(indexed, field)])
        request_id = self._scoped_request_id("put", write, guard)
        await self._ready()
        (write,), now = await self._index([write], [indexed], self._now)
        writes: builtins.list[PutWrite | CheckWrite] = [write] if guard is None else [guard, write]
        try:
            *_, row = await self._commit_items(writes, now, request_id)
        except Conflict as exc:
            raise _put_conflict(exc, fence) from None
        assert isinstance(row, ItemRow)
        return to_item(row)

    def _put_here(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        if_version: int | None = None,
        ttl: float | None = None,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        fence: tuple[str, int] | None = None,
    ) -> tuple[bool, Item | None]:
        """:meth:`put` in the calling thread, for :class:`~hivemem.SyncHive`, where the
        backend can write there (:meth:`Backend.write_items_here`: an embedded SQLite
        file whose writer is idle) and the put needs nothing of the event loop (no blob
        store, no embedding before the write). The same checks in the same order, the
        same errors; a long text's terms are counted in this thread. Returns (False,
        None) having written nothing when it cannot; SyncHive then goes through the
        loop."""
        if not self._opened() or self._blobs is not None or not self._backend.can_write_here():
            return False, None
        if self._embedder is not None and self._settings.index_mode != "deferred":
            return False, None
        write, guard, indexed, field = self._put_checked(
            namespace, key, value, if_version, ttl, text, metadata, fence
        )
        if indexed is not None:
            check_terms(indexed, self._settings.max_text_terms, field)
        request_id = self._scoped_request_id("put", write, guard)
        (write,), now = self._index_now([write], [indexed], self._now)
        writes: builtins.list[PutWrite | CheckWrite] = [write] if guard is None else [guard, write]
        try:
            done, rows = self._backend.write_items_here(
                writes,
                author=self.agent,
                now=now,
                history_limit=self._settings.history_limit,
                request_id=request_id,
            )
        except Conflict as exc:
            raise _put_conflict(exc, fence) from None
        except RequestIdReused:
            raise self._request_id_reused() from None
        if not done:
            return False, None
        assert rows is not None
        row = rows[-1]
        assert isinstance(row, ItemRow)
        return True, to_item(row)

    async def get(self, namespace: str, key: str) -> Item | None:
        check.namespace(namespace, self._settings)
        check.key(key, self._settings)
        if not self._may("read", namespace):
            return None  # indistinguishable from an absent item
        await self._ready()
        row = await self._backend.get_item(namespace, key, self._now())
        if row is None:
            return None
        (row,) = await self._resolve([row])
        return to_item(row)

    def _get_here(self, namespace: str, key: str) -> tuple[bool, Item | None]:
        if not self._opened():
            return False, None
        check.namespace(namespace, self._settings)
        check.key(key, self._settings)
        if not self._may("read", namespace):
            return True, None
        done, row = self._backend.get_item_here(namespace, key, self._now())
        if row is not None and object_names(row):
            return False, None  # its value is in the blob store: read through the loop
        return done, None if row is None else to_item(row)

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        write = DeleteWrite(
            check.namespace(namespace, self._settings),
            check.key(key, self._settings),
            None if if_version is None else check.version(if_version),
        )
        self._must("write", write.namespace, "namespace")
        request_id = self._scoped_request_id("delete", write)
        await self._ready()
        (deleted,) = await self._commit_items([write], self._now(), request_id)
        return bool(deleted)

    async def list(
        self,
        prefix: str = "",
        *,
        key_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Item]:
        check.namespace(prefix, self._settings, field="prefix", allow_empty=True)
        if key_prefix is not None:
            check.key_prefix(key_prefix, self._settings)
            if prefix == "":
                raise InvalidInput(
                    "key_prefix lists one namespace: prefix must name it", field="prefix"
                )
        check.limit(limit, self._settings)
        after = cursors.decode(cursor)
        if after is not None and not (
            isinstance(after, list) and len(after) == 2 and all(isinstance(x, str) for x in after)
        ):
            raise InvalidInput("cursor was not made by list()", field="cursor")
        await self._ready()
        if key_prefix is None:
            roots = self._roots("read", prefix)
        else:  # one namespace: readable or empty
            roots = [prefix] if self._may("read", prefix) else []
        rows, last = await self._visible_items(
            roots, None if after is None else (after[0], after[1]), limit, key_prefix
        )
        next_cursor = None if last is None else cursors.encode(list(last))
        rows = await self._resolve(rows)
        return Page[Item](items=[to_item(r) for r in rows], next_cursor=next_cursor)

    async def _visible_items(
        self,
        roots: builtins.list[str],
        after: tuple[str, str] | None,
        limit: int,
        key_prefix: str | None = None,
    ) -> tuple[builtins.list[ItemRow], tuple[str, str] | None]:
        """Up to ``limit`` live items under ``roots`` after ``after`` that this view may
        read (never hivemem's own ``_`` namespaces), in (namespace, key) order, and the
        position to continue from (None at the end). With ``key_prefix``, ``roots`` is
        one namespace and only its keys starting with ``key_prefix`` are listed.

        Rows the view may not read are skipped; after scanning
        ``_SCAN_PAGES`` x ``limit`` rows without filling the page, the page is returned
        short with a cursor, so one request never scans a whole store.
        """
        now = self._now()
        out: builtins.list[ItemRow] = []
        position = after
        budget = _SCAN_PAGES * limit
        while roots and budget > 0:
            want = min(limit, budget)
            if len(roots) == 1:
                batch = await self._backend.list_items(
                    roots[0], position, want, now, key_prefix=key_prefix
                )
            else:  # merge the roots' orders; each answers up to ``want`` after position
                parts = await asyncio.gather(
                    *(self._backend.list_items(r, position, want, now) for r in roots)
                )
                batch = heapq.nsmallest(want, (row for part in parts for row in part), key=_row_key)
            budget -= len(batch)
            for row in batch:
                position = (row.namespace, row.key)
                if not row.namespace.startswith("_") and self._may("read", row.namespace):
                    out.append(row)
                    if len(out) == limit:
                        return out, position
            if len(batch) < want:
                return out, None
        return out, position

    async def list_namespaces(
        self,
        prefix: str = "",
        *,
        max_depth: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[str]:
        check.namespace(prefix, self._settings, field="prefix", allow_empty=True)
        check.limit(limit, self._settings)
        if max_depth is not None and (
            isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1
        ):
            raise InvalidInput("max_depth must be an integer >= 1", field="max_depth")
        after = cursors.decode(cursor)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("cursor was not made by list_namespaces()", field="cursor")
        await self._ready()
        roots = self._roots("read", prefix)
        now = self._now()
        if roots == [prefix]:
            found = await self._backend.list_namespaces(prefix, now)
        else:
            parts = await asyncio.gather(*(self._backend.list_namespaces(r, now) for r in roots))
            found = sorted({ns for part in parts for ns in part})
        found = [ns for ns in found if not ns.startswith("_") and self._may("read", ns)]
        if max_depth is not None:
            found = sorted({"/".join(ns.split("/")[:max_depth]) for ns in found})
        if after is not None:
            found = [ns for ns in found if ns > after]
        page = found[:limit]
        next_cursor = cursors.encode(page[-1]) if len(found) > limit else None
        return Page[str](items=page, next_cursor=next_cursor)

    async def namespace_counts(
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[NamespaceCount]:
        check.namespace(prefix, self._settings, field="prefix", allow_empty=True)
        check.limit(limit, self._settings)
        after = cursors.decode(cursor)
        if after is not None and not isinstance(after, str):
            raise InvalidInput("cursor was not made by namespace_counts()", field="cursor")
        await self._ready()
        roots = self._roots("read", prefix)
        now = self._now()
        parts = await asyncio.gather(*(self._backend.namespace_counts(r, now) for r in roots))
        counted = dict(pair for part in parts for pair in part)
        found = [
            (ns, n)
            for ns, n in sorted(counted.items())
            if not ns.startswith("_") and self._may("read", ns) and (after is None or ns > after)
        ]
        page = found[:limit]
        next_cursor = cursors.encode(page[-1][0]) if len(found) > limit else None
        return Page[NamespaceCount](
            items=[NamespaceCount(namespace=ns, items=n) for ns, n in page], next_cursor=next_cursor
        )

    async def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        if not isinstance(ops, Sequence) or isinstance(ops, str | bytes):
            raise InvalidInput("ops must be a list of operations", field="ops")
        if not 1 <= len(ops) <= self._settings.max_batch_ops:
            raise InvalidInput(
                f"a batch holds 1 to {self._settings.max_batch_ops} operations", field="ops"
            )
        writes: builtins.list[PutWrite | DeleteWrite] = []
        ops_ = [_coerce_op(op, i) for i, op in enumerate(ops)]
        for i, op in enumerate(ops_):
            if isinstance(op, PutOp):
                writes.append(
                    self._put_write(
                        op.namespace,
                        op.key,
                        op.value,
                        op.if_version,
                        op.ttl,
                        op.text,
                        op.metadata,
                        field=f"ops.{i}.",
                    )
                )
            else:
                writes.append(
                    DeleteWrite(
                        check.namespace(op.namespace, self._settings, field=f"ops.{i}.namespace"),
                        check.key(op.key, self._settings, field=f"ops.{i}.key"),
                        None
                        if op.if_version is None
                        else check.version(op.if_version, field=f"ops.{i}.if_version"),
                    )
                )
        for i, w in enumerate(writes):
            self._must("write", w.namespace, f"ops.{i}.namespace")
        request_id = self._scoped_request_id("batch", writes)
        await self._ready()
        puts = [(i, w) for i, w in enumerate(writes) if isinstance(w, PutWrite)]
        texts = [_text_of(ops_[i]) for i, _ in puts]
        await self._check_terms(
            [
                (text, f"ops.{i}.text" if ops_[i].text is not None else f"ops.{i}.value")  # type: ignore[union-attr]
                for (i, _), text in zip(puts, texts, strict=True)
            ]
        )
        indexed, now = await self._index([w for _, w in puts], texts, self._now)
        for (i, _), write in zip(puts, indexed, strict=True):
            writes[i] = write
        results = await self._commit_items(writes, now, request_id)
        return [to_item(r) if isinstance(r, ItemRow) else r for r in results]

    async def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        check.namespace(namespace, self._settings)
        check.key(key, self._settings)
        check.limit(limit, self._settings)
        if not self._may("read", namespace):
            return []  # as for an absent item
        await self._ready()
        rows = await self._backend.item_history(namespace, key, limit, self._now())
        return [to_item(r) for r in await self._resolve(rows)]


def _text_of(op: PutOp | DeleteOp) -> str | None:
    return searchable_text(op.text, op.value) if isinstance(op, PutOp) else None


def _coerce_op(op: Any, index: int) -> PutOp | DeleteOp:
    """Accept PutOp/DeleteOp records or plain dicts with an ``op`` field."""
    if isinstance(op, PutOp | DeleteOp):
        return op
    if isinstance(op, dict):
        kind = op.get("op")
        models: dict[str, type[PutOp] | type[DeleteOp]] = {"put": PutOp, "delete": DeleteOp}
        model = models.get(kind if isinstance(kind, str) else "")
        if model is None:
            raise InvalidInput("op must be 'put' or 'delete'", field=f"ops.{index}.op")
        try:
            return model.model_validate(op)
        except ValidationError as exc:
            raise check.invalid_input(exc, prefix=f"ops.{index}") from None
    raise InvalidInput("each operation must be a PutOp, DeleteOp or dict", field=f"ops.{index}")


def _put_conflict(exc: Conflict, fence: tuple[str, int] | None) -> Conflict:
    """The Conflict a fenced put raises for ``exc`` of its two writes (the fence's check,
    then the put): a stale fence (field ``fence``) or the put's own ``if_version``.
    Unfenced, ``exc`` itself."""
    if fence is None:
        return exc
    if exc.field == "ops.0.if_version":
        return Conflict(
            f"fence {fence!r} is stale: a newer token of that lease was issued "
            f"(the newest is {exc.current_version}); nothing was written",
            field="fence",
            current_version=exc.current_version,
        )
    return Conflict(exc.message, field="if_version", current_version=exc.current_version)
