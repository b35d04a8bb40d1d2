"""The DynamoDB backend: items, sessions and the feed over one table (see the package
notes for the ordering of the feed and what it costs, :mod:`.layout` for the rows and
:mod:`.engine` for the transaction every write is)."""

from __future__ import annotations

import heapq
import math
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

from hivemem.backends.base import Backend
from hivemem.backends.dynamodb.engine import (
    FEED_SPAN,
    HEAD,
    DynamoEngine,
    Tx,
    feed_pk,
    feed_sk,
    run_tx,
)
from hivemem.backends.dynamodb.layout import (
    ITEM_FIELDS,
    SORT_KEY_BYTES,
    due_sk,
    events_from,
    item_from,
    item_key,
    live,
    message_from,
    message_key,
    new_id,
    root_of,
    session_from,
    session_live,
    session_to,
    version_key,
)
from hivemem.backends.dynamodb.tasks import DynamoTasks
from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.results import decode_stored_result, encode_stored_result, split_request_id
from hivemem.backends.rows import (
    INDEXED,
    SYSTEM,
    CheckWrite,
    DeleteWrite,
    EventRow,
    IndexEntry,
    ItemRow,
    MessageRow,
    NewMessage,
    PutWrite,
    SessionRow,
    at_or_under,
    key_range,
    state_conflict,
    version_conflict,
)
from hivemem.backends.signals import ChangeSignal
from hivemem.config import Settings
from hivemem.errors import Conflict, CursorExpired, InvalidInput, NotFound

__all__ = ["DynamoBackend"]

T = TypeVar("T")

#: Most expired items, sessions and request ids one sweep removes of each, and most
#: feed rows it trims.
SWEEP_BATCH = 500
#: Rows one sweep transaction deletes (DynamoDB takes 100 actions per transaction).
SWEEP_TX = 40
#: DynamoDB's own TTL removes a row this long after hivemem's sweeper should have (a
#: backstop for a store no hivemem process sweeps; the sweeper writes the events).
TTL_GRACE_SECONDS = 86_400


async def _merge(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """The rows of several sorted streams, by sort key."""
    heap: list[tuple[str, int, dict[str, Any]]] = []
    for i, stream in enumerate(streams):
        row = await anext(stream, None)
        if row is not None:
            heapq.heappush(heap, (row["sk"], i, row))
    while heap:
        _, i, row = heapq.heappop(heap)
        yield row
        nxt = await anext(streams[i], None)
        if nxt is not None:
            heapq.heappush(heap, (nxt["sk"], i, nxt))


def _span(low: str, high: str) -> tuple[str, str]:
    """Sort-key bounds ``[low, high)`` of a range of items, widened to every key that
    starts with the part :func:`~.layout.fit` keeps when a bound is too long for a key
    (the caller filters the rows by namespace and key)."""
    cut = SORT_KEY_BYTES - 40
    if len(low.encode("utf-8")) <= cut and len(high.encode("utf-8")) <= cut:
        return low, high
    head = low.encode("utf-8")[:cut].decode("utf-8", "ignore")
    upper = key_range(head)[1]
    return head, upper if upper is not None else head + "\U0010ffff"


def _ttl(at: float | None) -> int | None:
    return None if at is None else math.ceil(at) + TTL_GRACE_SECONDS


class DynamoBackend(DynamoTasks, Backend):
    """Items, sessions, task queues and the feed in one DynamoDB table.

    Args:
        table: the table's name (``hivemem_<prefix>``).
        region: the AWS region.
        endpoint: the endpoint URL of a local server (moto, DynamoDB Local), or None.
        settings: ``request_retention_seconds`` and ``request_timeout_seconds`` apply.
    """

    #: No full-text ranking in DynamoDB: the core ranks in process.
    native_lexical: ClassVar[bool] = False

    def __init__(self, table: str, region: str, endpoint: str | None, settings: Settings) -> None:
        self.settings = settings
        self.changes = ChangeSignal()
        self.db = DynamoEngine(table, region, endpoint, settings)

    def __repr__(self) -> str:
        return f"DynamoBackend({self.db.table!r})"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> DynamoBackend:
        """Build from ``dynamodb://PREFIX?region=REGION&endpoint=URL`` (the table is
        ``hivemem_PREFIX``; ``region`` defaults to ``AWS_REGION`` /
        ``AWS_DEFAULT_REGION``, then ``us-east-1``; ``endpoint`` is for local servers).

        Raises:
            InvalidInput: the URL is malformed (field ``url``).
        """
        import os
        import re

        parsed = urllib.parse.urlsplit(url)
        prefix = parsed.netloc
        if parsed.path not in ("", "/") or not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", prefix):
            raise InvalidInput(
                f"bad DynamoDB URL {url!r}: use dynamodb://TABLE_PREFIX?region=...&endpoint=... "
                "(the prefix: letters, digits, '_', '-', '.')",
                field="url",
            )
        params = urllib.parse.parse_qs(parsed.query)
        region = (
            params.get("region", [None])[-1]
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        endpoint = params.get("endpoint", [None])[-1]
        return cls(f"hivemem_{prefix}", region, endpoint, settings)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.db.get(*HEAD)

    # Writes -------------------------------------------------------------------------

    async def _write(
        self,
        request_id: str | None,
        now: float,
        job: Callable[[Tx], Awaitable[T]],
        what: str,
        reads: Sequence[tuple[str, str]] = (),
    ) -> T:
        """Run ``job`` as one transaction, at most once per request id (a repeat returns
        the stored result and writes nothing)."""
        rid, fingerprint = split_request_id(request_id)
        retention = self.settings.request_retention_seconds

        async def wrapped(tx: Tx) -> T:
            if rid is not None:
                found = await tx.get(f"RQ#{rid}", "-")
                if found is not None:
                    full = await self.db.expand(found)
                    if full is None:
                        raise InvalidInput("request id result unreadable", field="request_id")
                    raw = full["r"] if "r" in full else zlib.decompress(full["rz"])
                    stored: T = decode_stored_result(raw, fingerprint)
                    return stored
            result = await job(tx)
            if rid is not None:
                encoded = encode_stored_result(result, fingerprint)
                big = len(encoded) > 4096  # a put's result holds its value: compress it
                tx.put(
                    {
                        "pk": f"RQ#{rid}",
                        "sk": "-",
                        "r": None if big else encoded,
                        "rz": zlib.compress(encoded, 1) if big else None,
                        "at": now,
                        "ttl": _ttl(now + retention),
                    }
                )
                tx.put({"pk": "D#r", "sk": due_sk(now, rid), "rid": rid})
            return result

        if rid is not None:
            reads = [*reads, (f"RQ#{rid}", "-")]
        result: T = await run_tx(self.db, wrapped, what=what, reads=reads)
        self.changes.notify()
        return result

    # Items --------------------------------------------------------------------------

    async def _item(
        self, row: dict[str, Any] | None, namespace: str, key: str
    ) -> dict[str, Any] | None:
        """``row`` with its chunks put back, read again while a writer replaces it."""
        for _ in range(5):
            if row is None:
                return None
            full = await self.db.expand(row)
            if full is not None:
                return full
            row = await self.db.get(*item_key(namespace, key))
        return None

    async def get_item(self, namespace: str, key: str, now: float) -> ItemRow | None:
        row = await self.db.get(*item_key(namespace, key))
        if not live(row, now):
            return None
        full = await self._item(row, namespace, key)
        return item_from(full) if full is not None and live(full, now) else None

    def _remove_item(self, tx: Tx, cur: dict[str, Any], versions: list[dict[str, Any]]) -> None:
        """Delete an item row (``cur``, as read) with its index rows; its past versions
        (``versions``, read by the caller) go after the commit."""
        tx.delete(cur["pk"], cur["sk"], old=cur)
        if cur.get("ex") is not None:
            tx.delete("D#i", due_sk(float(cur["ex"]), cur["sk"]))
        if cur.get("pend"):
            tx.delete(f"P#{cur['mo']}", cur["sk"])
        for v in versions:
            tx.after_commit.append((v["pk"], v["sk"]))
            tx.drop_chunks(v)

    async def _versions_of(self, cur: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.db.rows(f"V#{cur['inc']}", fields=["pk", "sk", "_ck", "_cn"])

    async def _expire_in(self, tx: Tx, cur: dict[str, Any], now: float) -> None:
        self._remove_item(tx, cur, await self._versions_of(cur))
        tx.event("item.expired", cur["ns"], cur["key"], int(cur["ver"]), SYSTEM, now)

    async def write_items(
        self,
        writes: Sequence[PutWrite | DeleteWrite | CheckWrite],
        *,
        author: str,
        now: float,
        history_limit: int,
        request_id: str | None = None,
    ) -> list[ItemRow | bool]:
        async def job(tx: Tx) -> list[ItemRow | bool]:
            results: list[ItemRow | bool] = []
            for i, w in enumerate(writes):
                pk, sk = item_key(w.namespace, w.key)
                cur = await tx.get(pk, sk)
                if cur is not None and not live(cur, now):
                    await self._expire_in(tx, cur, now)
                    cur = None
                current = 0 if cur is None else int(cur["ver"])
                mismatch = w.if_version is not None and (
                    w.if_version != current or (cur is None and isinstance(w, DeleteWrite))
                )
                if mismatch:
                    raise version_conflict(w, current, i, len(writes))
                if isinstance(w, CheckWrite):
                    results.append(True)
                    continue
                if isinstance(w, DeleteWrite):
                    if cur is not None:
                        self._remove_item(tx, cur, await self._versions_of(cur))
                        tx.event(
                            w.event or "item.deleted", w.namespace, w.key, current, author, now
                        )
                    results.append(cur is not None)
                    continue
                results.append(await self._put(tx, w, cur, author, now, history_limit))
            return results

        keys = [item_key(w.namespace, w.key) for w in writes]
        return await self._write(request_id, now, job, "write", keys)

    async def _put(
        self,
        tx: Tx,
        w: PutWrite,
        cur: dict[str, Any] | None,
        author: str,
        now: float,
        history_limit: int,
    ) -> ItemRow:
        pk, sk = item_key(w.namespace, w.key)
        version = 1 if cur is None else int(cur["ver"]) + 1
        inc = new_id() if cur is None else str(cur["inc"])
        created = now if cur is None else float(cur["ca"])
        row: dict[str, Any] = {
            "pk": pk,
            "sk": sk,
            "ns": w.namespace,
            "key": w.key,
            "v": w.value,
            "ver": version,
            "au": author,
            "ca": created,
            "ua": now,
            "ex": w.expires_at,
            "tx": w.text,
            "md": w.metadata,
            "inc": inc,
            "ttl": _ttl(w.expires_at),
        }
        if w.index_text is not None:
            row["it"] = w.index_text
            row["iv"] = version
            if w.model is not None:
                row["mo"] = w.model
            if w.vector is not None:
                row["vec"] = w.vector
            elif w.model is not None:
                row["pend"] = True
        kept = False
        if cur is not None:
            if cur.get("ex") is not None:
                tx.delete("D#i", due_sk(float(cur["ex"]), sk))
            if cur.get("pend") and not (row.get("pend") and row.get("mo") == cur.get("mo")):
                tx.delete(f"P#{cur['mo']}", sk)
            if history_limit > 1:
                past = {k: cur[k] for k in (*ITEM_FIELDS, "_ck", "_cn") if k in cur}
                past["pk"], past["sk"] = version_key(inc, int(cur["ver"]))
                tx.put(past)  # keeps cur's chunks, if any
                kept = True
                gone = version - history_limit
                if gone >= 1:
                    old = await tx.get(*version_key(inc, gone))
                    if old is not None:
                        tx.delete(old["pk"], old["sk"], old=old)
        else:
            root = root_of(w.namespace)
            if await tx.get("R", root) is None:
                tx.put({"pk": "R", "sk": root})
        if w.expires_at is not None:
            tx.put({"pk": "D#i", "sk": due_sk(w.expires_at, sk), "ipk": pk, "isk": sk})
        if row.get("pend"):
            tx.put({"pk": f"P#{row['mo']}", "sk": sk, "ipk": pk, "at": now, "ex": w.expires_at})
        tx.put(row, old=None if kept or cur is None else cur)
        tx.event(w.event or "item.put", w.namespace, w.key, version, author, now)
        return ItemRow(
            w.namespace,
            w.key,
            w.value,
            version,
            author,
            created,
            now,
            w.expires_at,
            w.text,
            w.metadata,
        )

    async def _roots(self, prefix: str) -> list[str]:
        if prefix:
            return [root_of(prefix)]
        return [r["sk"] for r in await self.db.rows("R", fields=["pk", "sk"])]

    async def _walk(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        now: float,
        *,
        key_prefix: str | None = None,
        fields: Sequence[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Live item rows at or under ``prefix`` after ``after``, in (namespace, key)
        order (chunks not put back). A tree's rows sort by ``namespace\0key``, which is
        that order; trees whose roots extend one another (``a``, ``a-x``) interleave,
        so their partitions are merged."""
        if key_prefix is not None:
            low, high = key_range(key_prefix)
            lo, hi = _span(f"{prefix}\0{low}", f"{prefix}\0{high}" if high else f"{prefix}\x01")
        elif prefix:
            lo, hi = _span(f"{prefix}\0", f"{prefix}0")
        else:
            lo, hi = None, None
        if after is not None:
            start = item_key(*after)[1] + "\0"  # the least sort key above ``after``
            if hi is not None and start >= hi:
                return
            if lo is None or start > lo:
                lo = start
        roots = await self._roots(prefix)
        families: list[list[str]] = []
        for root in roots:
            if families and root.startswith(families[-1][0]):
                families[-1].append(root)
            else:
                families.append([root])
        for family in families:
            streams = [self.db.query(f"I#{r}", low=lo, high=hi, fields=fields) for r in family]
            rows = streams[0] if len(streams) == 1 else _merge(streams)
            async for row in rows:
                if key_prefix is not None:
                    if row["ns"] != prefix or not row["key"].startswith(key_prefix):
                        continue
                elif prefix and not at_or_under(row["ns"], prefix):
                    continue
                if live(row, now):
                    yield row

    async def list_items(
        self,
        prefix: str,
        after: tuple[str, str] | None,
        limit: int,
        now: float,
        *,
        key_prefix: str | None = None,
    ) -> list[ItemRow]:
        out: list[ItemRow] = []
        if limit <= 0:
            return out
        async for row in self._walk(prefix, after, now, key_prefix=key_prefix):
            full = await self._item(row, row["ns"], row["key"])
            if full is not None:
                out.append(item_from(full))
            if len(out) >= limit:
                break
        return out

    async def namespace_counts(self, prefix: str, now: float) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        async for row in self._walk(prefix, None, now, fields=["pk", "sk", "ns", "ex"]):
            counts[row["ns"]] = counts.get(row["ns"], 0) + 1
        return sorted(counts.items())

    async def list_namespaces(self, prefix: str, now: float) -> list[str]:
        return [ns for ns, _ in await self.namespace_counts(prefix, now)]

    async def item_history(self, namespace: str, key: str, limit: int, now: float) -> list[ItemRow]:
        row = await self.db.get(*item_key(namespace, key))
        if not live(row, now) or limit < 1:
            return []
        full = await self._item(row, namespace, key)
        if full is None:
            return []
        out = [item_from(full)]
        version = int(full["ver"])
        async for past in self.db.query(
            f"V#{full['inc']}", high=f"{version:012d}", forward=False, limit=limit - 1
        ):
            expanded = await self.db.expand(past)
            if expanded is not None:
                out.append(item_from(expanded))
        return out

    # Sweep ----------------------------------------------------------------------------

    async def sweep(
        self, now: float, events_before: float, requests_before: float
    ) -> tuple[int, int]:
        expired = 0
        due = await self.db.rows("D#i", high=due_sk(now, "\U0010ffff"), limit=SWEEP_BATCH)
        for start in range(0, len(due), SWEEP_TX // 4):
            part = due[start : start + SWEEP_TX // 4]

            async def expire(tx: Tx, part: list[dict[str, Any]] = part) -> int:
                n = 0
                for d in part:
                    cur = await tx.get(d["ipk"], d["isk"])
                    if cur is None or live(cur, now):
                        tx.delete(d["pk"], d["sk"])  # a stale index row
                        continue
                    await self._expire_in(tx, cur, now)
                    n += 1
                return n

            expired += await run_tx(self.db, expire, what="sweep")
        sessions = await self.db.rows("D#s", high=due_sk(now, "\U0010ffff"), limit=SWEEP_BATCH)
        for d in sessions:

            async def drop(tx: Tx, d: dict[str, Any] = d) -> int:
                row = await tx.get("S", d["sid"])
                if row is None or session_live(row, now):
                    tx.delete(d["pk"], d["sk"])
                    return 0
                await self._drop_session(tx, row, "session.expired", SYSTEM, now)
                return 1

            expired += await run_tx(self.db, drop, what="sweep")
        trimmed = await self._trim(events_before)
        stale = await self.db.rows("D#r", high=due_sk(requests_before, "\0"), limit=SWEEP_BATCH)
        keys: list[tuple[str, str]] = []
        for d in stale:
            keys += [(f"RQ#{d['rid']}", "-"), (d["pk"], d["sk"])]
        found = await self.db.get_many([k for k in keys if k[0].startswith("RQ#")])
        for row in found.values():
            if "_ck" in row:
                keys += [(f"C#{row['_ck']}", f"{i:04d}") for i in range(int(row["_cn"]))]
        await self.db.delete_quietly(keys)
        if expired or trimmed:
            self.changes.notify()
        return expired, trimmed

    async def _trim(self, events_before: float) -> int:
        """Delete feed rows whose events are all older than ``events_before``."""
        head = await self.db.get(*HEAD)
        assert head is not None
        seq, trim = int(head["seq"]), int(head.get("trim", 0))
        doomed: list[dict[str, Any]] = []
        part = trim // FEED_SPAN
        while len(doomed) < SWEEP_BATCH and part <= seq // FEED_SPAN:
            stop = False
            async for row in self.db.query(
                f"F#{part}", low=feed_sk(trim + 1), fields=["pk", "sk", "n", "al"], first_page=8
            ):  # usually stops at the first row (younger than the retention)
                last_at = row.get("al")
                if last_at is None or float(last_at) >= events_before:
                    stop = True
                    break
                doomed.append(row)
                if len(doomed) >= SWEEP_BATCH:
                    break
            if stop:
                break
            part += 1
        trimmed = 0
        for start in range(0, len(doomed), SWEEP_TX * 2):
            rows = doomed[start : start + SWEEP_TX * 2]

            async def job(tx: Tx, rows: list[dict[str, Any]] = rows) -> int:
                for r in rows:
                    tx.delete(r["pk"], r["sk"])
                tx.trim = int(rows[-1]["sk"]) + int(rows[-1]["n"]) - 1
                return sum(int(r["n"]) for r in rows)

            trimmed += await run_tx(self.db, job, what="trim")
        return trimmed

    # Sessions ---------------------------------------------------------------------------

    @staticmethod
    def _no_session(session_id: str) -> NotFound:
        return NotFound(f"no session {session_id!r}", field="session_id")

    def _session_due(self, tx: Tx, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """Move a session's due-index row from ``old``'s expiry to ``new``'s."""
        for row, put in ((old, False), (new, True)):
            if row is None or row.get("ttl_s") is None:
                continue
            sk = due_sk(float(row["la"]) + float(row["ttl_s"]), row["sk"])
            if put:
                tx.put({"pk": "D#s", "sk": sk, "sid": row["sk"]})
            else:
                tx.delete("D#s", sk)

    async def create_session(self, row: SessionRow, *, request_id: str | None = None) -> SessionRow:
        async def job(tx: Tx) -> SessionRow:
            if await tx.get("S", row.id) is not None:
                raise Conflict(f"session {row.id!r} already exists", field="session_id")
            stored = session_to(row, new_id())
            stored["ttl"] = _ttl(row.last_activity_at + row.ttl) if row.ttl is not None else None
            tx.put(stored)
            self._session_due(tx, None, stored)
            tx.event(
                "session.created", f"_sessions/{row.id}", None, 0, row.created_by, row.started_at
            )
            return row

        return await self._write(request_id, row.started_at, job, "create_session")

    async def _session_row(self, session_id: str) -> dict[str, Any] | None:
        for _ in range(5):
            row = await self.db.get("S", session_id)
            if row is None:
                return None
            full = await self.db.expand(row)
            if full is not None:
                return full
        return None

    async def get_session(self, session_id: str) -> SessionRow | None:
        row = await self._session_row(session_id)
        return session_from(row) if row is not None else None

    async def list_sessions(
        self,
        app: str | None,
        user: str | None,
        agent: str | None,
        after: str | None,
        limit: int,
        now: float,
    ) -> list[SessionRow]:
        out: list[SessionRow] = []
        if limit <= 0:
            return out
        low = None if after is None else after + "\0"
        async for row in self.db.query("S", low=low):
            if not session_live(row, now):
                continue
            if (
                (app is not None and row.get("app") != app)
                or (user is not None and row.get("user") != user)
                or (agent is not None and row.get("agent") != agent)
            ):
                continue
            full = await self._session_row(row["sk"])
            if full is not None:
                out.append(session_from(full))
            if len(out) >= limit:
                break
        return out

    async def _drop_session(
        self, tx: Tx, row: dict[str, Any], type_: str, author: str, now: float
    ) -> None:
        tx.delete("S", row["sk"], old=row)
        self._session_due(tx, row, None)
        for m in await self.db.rows(f"M#{row['inc']}", fields=["pk", "sk", "_ck", "_cn"]):
            tx.after_commit.append((m["pk"], m["sk"]))
            tx.drop_chunks(m)
        tx.event(type_, f"_sessions/{row['sk']}", None, None, author, now)

    async def delete_session(
        self, session_id: str, *, author: str, now: float, request_id: str | None = None
    ) -> bool:
        async def job(tx: Tx) -> bool:
            row = await tx.get("S", session_id)
            if not session_live(row, now):
                return False
            assert row is not None
            await self._drop_session(tx, row, "session.deleted", author, now)
            return True

        return await self._write(request_id, now, job, "delete_session", [("S", session_id)])

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> list[MessageRow]:
        async def job(tx: Tx) -> list[MessageRow]:
            row = await tx.get("S", session_id)
            if not session_live(row, now):
                raise self._no_session(session_id)
            assert row is not None
            full = await self.db.expand(row)
            if full is None:
                raise self._no_session(session_id)
            first = int(full["nm"]) + 1
            new = dict(full)
            new["nm"] = int(full["nm"]) + len(messages)
            new["tu"] = int(full["tu"]) + sum(m.role == "user" for m in messages)
            new["ti"] = int(full["ti"]) + sum(m.tokens_in for m in messages)
            new["to"] = int(full["to"]) + sum(m.tokens_out for m in messages)
            new["co"] = float(full["co"]) + float(sum(m.cost for m in messages))
            new["la"] = now
            if new.get("ttl_s") is not None:
                new["ttl"] = _ttl(now + float(new["ttl_s"]))
            self._session_due(tx, full, new)
            tx.put(new, old=row)
            out = []
            for i, m in enumerate(messages):
                seq = first + i
                pk, sk = message_key(str(full["inc"]), seq)
                tx.put(
                    {
                        "pk": pk,
                        "sk": sk,
                        "seq": seq,
                        "role": m.role,
                        "c": m.content,
                        "au": author,
                        "at": now,
                        "ti": m.tokens_in,
                        "to": m.tokens_out,
                        "co": float(m.cost),
                        "md": m.metadata,
                    }
                )
                out.append(
                    MessageRow(
                        session_id,
                        seq,
                        m.role,
                        m.content,
                        author,
                        now,
                        m.tokens_in,
                        m.tokens_out,
                        m.cost,
                        m.metadata,
                    )
                )
            tx.event("session.messages", f"_sessions/{session_id}", None, new["nm"], author, now)
            return out

        return await self._write(request_id, now, job, "append_messages", [("S", session_id)])

    async def read_messages(
        self, session_id: str, after: int, limit: int, now: float
    ) -> list[MessageRow]:
        row = await self.db.get("S", session_id)
        if not session_live(row, now):
            raise self._no_session(session_id)
        assert row is not None
        out = []
        async for m in self.db.query(
            f"M#{row['inc']}", low=f"{max(after, 0) + 1:012d}", limit=limit
        ):
            full = await self.db.expand(m)
            if full is not None:
                out.append(message_from(session_id, full))
        return out

    async def save_state(
        self,
        session_id: str,
        state: bytes,
        if_version: int | None,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> SessionRow:
        async def job(tx: Tx) -> SessionRow:
            row = await tx.get("S", session_id)
            if not session_live(row, now):
                raise self._no_session(session_id)
            assert row is not None
            if if_version is not None and if_version != int(row["sv"]):
                raise state_conflict(session_id, int(row["sv"]), if_version)
            full = await self.db.expand(row)
            if full is None:
                raise self._no_session(session_id)
            new = dict(full)
            new["st"] = state
            new["sv"] = int(full["sv"]) + 1
            new["la"] = now
            if new.get("ttl_s") is not None:
                new["ttl"] = _ttl(now + float(new["ttl_s"]))
            self._session_due(tx, full, new)
            result = session_from(new)
            tx.put(new, old=row)
            tx.event("session.state", f"_sessions/{session_id}", None, new["sv"], author, now)
            return result

        return await self._write(request_id, now, job, "save_state", [("S", session_id)])

    # Feed -------------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: bytes,
        *,
        author: str,
        now: float,
        request_id: str | None = None,
    ) -> EventRow:
        async def job(tx: Tx) -> EventRow:
            cursor = tx.event("publish", channel, None, None, author, now, payload)
            return EventRow(cursor, "publish", channel, None, None, author, now, payload)

        return await self._write(request_id, now, job, "publish")

    @staticmethod
    def _parse_cursor(after: str | None) -> int:
        if after is None:
            return 0
        if not after.isascii() or not after.isdigit() or len(after) > 19:
            raise InvalidInput(f"{after!r} is not a feed cursor of this store", field="after")
        return int(after)

    async def read_events(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[EventRow], str]:
        start = self._parse_cursor(after)
        head = await self.db.get(*HEAD)
        assert head is not None
        top, trim = int(head["seq"]), int(head.get("trim", 0))
        if start > 0 and start < trim:
            raise CursorExpired(
                f"events after cursor {start} were trimmed (retention); "
                f"resume from {trim} or later",
                field="after",
            )
        out: list[EventRow] = []
        pos = max(start, trim)  # the newest sequence number considered
        if pos < top:
            first = pos + 1
            # The commit row holding ``first`` starts at or below it, in its span's
            # partition or at the end of the span before.
            rows = await self.db.rows(
                feed_pk(first), high=feed_sk(first + 1), forward=False, limit=1
            )
            if not rows and first // FEED_SPAN > 0:
                rows = await self.db.rows(f"F#{first // FEED_SPAN - 1}", forward=False, limit=1)
            part = first // FEED_SPAN
            while True:
                for row in rows:
                    for ev in events_from(row):
                        s = int(ev.cursor)
                        if s <= pos:
                            continue
                        if s > top:
                            return out, str(max(start, top))
                        pos = s
                        if at_or_under(ev.namespace, prefix):
                            out.append(ev)
                            if len(out) >= limit:
                                return out, ev.cursor
                if pos >= top:
                    break
                rows = await self.db.rows(f"F#{part}", low=feed_sk(pos + 1), limit=max(limit, 100))
                if not rows:
                    part += 1
                    if part > top // FEED_SPAN:
                        break
        return out, str(max(start, top))

    async def head(self) -> str:
        head = await self.db.get(*HEAD)
        assert head is not None
        return str(int(head["seq"]))

    # Search -----------------------------------------------------------------------------

    async def search_lexical(
        self,
        prefix: str,
        terms: Sequence[str],
        conditions: Sequence[Condition],
        limit: int,
        now: float,
    ) -> list[tuple[str, str, float]]:
        raise NotImplementedError("DynamoDB has no full-text ranking: the core ranks in process")

    async def _all_items(
        self, fields: Sequence[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        for root in await self._roots(""):
            async for row in self.db.query(f"I#{root}", fields=fields):
                yield row

    async def load_texts(self) -> list[tuple[str, str, str]]:
        out = []
        async for row in self._all_items():
            if "it" in row or "_ck" in row:
                full = await self._item(row, row["ns"], row["key"])
                if full is not None and full.get("it") is not None:
                    out.append((full["ns"], full["key"], full["it"]))
        return out

    async def _rows_of(self, keys: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        found = await self.db.get_many([item_key(ns, key) for ns, key in keys])
        out = []
        for row in found.values():
            full = await self._item(row, row["ns"], row["key"])
            if full is not None:
                out.append(full)
        return out

    async def texts_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return {
            (r["ns"], r["key"]): r["it"]
            for r in await self._rows_of(keys)
            if r.get("it") is not None
        }

    async def matching_keys(
        self, prefix: str, conditions: Sequence[Condition], now: float
    ) -> list[tuple[str, str]]:
        out = []
        async for row in self._walk(prefix, None, now):
            if "it" not in row and "_ck" not in row:
                continue
            full = await self._item(row, row["ns"], row["key"])
            if full is None or full.get("it") is None:
                continue
            if row_matches(item_from(full), conditions):
                out.append((full["ns"], full["key"]))
        return out

    async def load_vectors(self, model: str) -> list[tuple[str, str, bytes]]:
        out = []
        async for row in self._all_items(fields=["pk", "sk", "ns", "key", "mo", "vec"]):
            if row.get("mo") == model and row.get("vec") is not None:
                out.append((row["ns"], row["key"], row["vec"]))
        return out

    async def vectors_of(
        self, keys: Sequence[tuple[str, str]], model: str
    ) -> dict[tuple[str, str], bytes]:
        found = await self.db.get_many([item_key(ns, key) for ns, key in keys])
        return {
            (r["ns"], r["key"]): r["vec"]
            for r in found.values()
            if r.get("mo") == model and r.get("vec") is not None
        }

    async def get_items(self, keys: Sequence[tuple[str, str]], now: float) -> list[ItemRow]:
        return [item_from(r) for r in await self._rows_of(keys) if live(r, now)]

    async def unindexed_items(
        self, model: str | None, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[ItemRow]:
        out: list[ItemRow] = []
        async for row in self._walk("", after, now):
            indexed = row.get("it") is not None and int(row.get("iv", -1)) == int(row["ver"])
            if indexed and model is not None:
                indexed = row.get("mo") == model and row.get("vec") is not None
            if indexed:
                continue
            full = await self._item(row, row["ns"], row["key"])
            if full is not None:
                out.append(item_from(full))
            if len(out) >= limit:
                break
        return out

    async def count_items(self, now: float) -> int:
        n = 0
        async for _ in self._walk("", None, now, fields=["pk", "sk", "ns", "ex"]):
            n += 1
        return n

    async def set_index(self, entries: Sequence[IndexEntry], now: float) -> int:
        total = 0
        for start in range(0, len(entries), 20):
            part = entries[start : start + 20]

            async def job(tx: Tx, part: Sequence[IndexEntry] = part) -> int:
                stored = 0
                for e in part:
                    pk, sk = item_key(e.namespace, e.key)
                    cur = await tx.get(pk, sk)
                    if cur is None or int(cur["ver"]) != e.version:
                        continue
                    full = await self.db.expand(cur)
                    if full is None:
                        continue
                    new = {
                        k: v for k, v in full.items() if k not in ("it", "iv", "mo", "vec", "pend")
                    }
                    if cur.get("pend"):
                        tx.delete(f"P#{cur['mo']}", sk)
                    if e.text is not None:
                        new["it"] = e.text
                        new["iv"] = e.version
                        if e.model is not None:
                            new["mo"] = e.model
                        if e.vector is not None:
                            new["vec"] = e.vector
                        elif e.model is not None:
                            new["pend"] = True
                            tx.put(
                                {
                                    "pk": f"P#{e.model}",
                                    "sk": sk,
                                    "ipk": pk,
                                    "at": now,
                                    "ex": full.get("ex"),
                                }
                            )
                    tx.put(new, old=cur)
                    tx.event(INDEXED, e.namespace, e.key, e.version, SYSTEM, now)
                    stored += 1
                return stored

            total += await run_tx(self.db, job, what="set_index")
        if total:
            self.changes.notify()
        return total

    async def pending_vectors(
        self, model: str, part: int, parts: int, limit: int, now: float
    ) -> list[ItemRow]:
        wanted: list[dict[str, Any]] = []
        async for p in self.db.query(f"P#{model}"):
            if zlib.crc32(p["sk"].encode("utf-8")) % parts != part or not live(p, now):
                continue
            wanted.append(p)
            if len(wanted) >= limit:
                break
        found = await self.db.get_many([(p["ipk"], p["sk"]) for p in wanted])
        out: list[ItemRow] = []
        for p in wanted:
            cur = found.get((p["ipk"], p["sk"]))
            if cur is None or not cur.get("pend") or cur.get("mo") != model or not live(cur, now):
                continue
            full = await self._item(cur, cur["ns"], cur["key"])
            if full is not None:
                out.append(item_from(full))
        return out

    async def pending_count(self, model: str, now: float) -> tuple[int, float | None]:
        n = 0
        oldest: float | None = None
        async for p in self.db.query(f"P#{model}"):
            if not live(p, now):
                continue
            n += 1
            at = float(p["at"])
            oldest = at if oldest is None else min(oldest, at)
        return n, oldest
