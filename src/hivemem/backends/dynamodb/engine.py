"""The DynamoDB engine: the client, the table, attribute values, and one transaction.

Every write of the DynamoDB backend is a :class:`Tx`: it reads the rows it needs with
strongly consistent reads, computes the new rows in Python, then commits them in one
``TransactWriteItems`` whose first action moves the head row (``pk = "H"``) from the
generation it read to the next one. Any other write in between moved the generation,
so the commit is cancelled and the write runs again from its reads: writes are
serializable, and a feed event's sequence number (allocated from the head in the same
transaction) is visible exactly when every event before it is. See the package notes
for what this costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity

from hivemem.backends.dynamodb.layout import chunk_keys, spill, unspill
from hivemem.backoff import Backoff
from hivemem.config import Settings
from hivemem.errors import HivememError, InvalidInput, Unavailable

log = logging.getLogger("hivemem.dynamodb")

__all__ = ["Cancelled", "DynamoEngine", "Tx", "decode", "encode"]

#: Most actions DynamoDB takes in one TransactWriteItems.
MAX_ACTIONS = 100
#: Attempts of a write whose commit another write's commit cancelled.
TX_ATTEMPTS = 200
#: The head row: feed sequence, write generation, trimmed-through sequence.
HEAD = ("H", "-")


def encode(row: dict[str, Any]) -> dict[str, Any]:
    """A row (str, int, float, bytes, bool, list and dict values; None left out) as
    DynamoDB attribute values."""
    return {k: _enc(v) for k, v in row.items() if v is not None}


def _enc(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"BOOL": v}
    if isinstance(v, str):
        return {"S": v}
    if isinstance(v, int | float):
        return {"N": repr(v) if isinstance(v, float) else str(v)}
    if isinstance(v, bytes | bytearray | memoryview):
        return {"B": bytes(v)}
    if isinstance(v, list | tuple):
        return {"L": [_enc(x) if x is not None else {"NULL": True} for x in v]}
    if isinstance(v, dict):
        return {"M": encode(v)}
    raise TypeError(f"cannot store a {type(v).__name__} in DynamoDB")


def decode(item: dict[str, Any]) -> dict[str, Any]:
    """The row :func:`encode` encoded (numbers with a point or exponent as float)."""
    return {k: _dec(v) for k, v in item.items()}


def _dec(v: dict[str, Any]) -> Any:
    ((t, x),) = v.items()
    if t == "S":
        return x
    if t == "N":
        return float(x) if any(c in x for c in ".eEn") else int(x)
    if t == "B":
        return bytes(x)
    if t == "BOOL":
        return bool(x)
    if t == "NULL":
        return None
    if t == "L":
        return [_dec(i) for i in x]
    if t == "M":
        return decode(x)
    raise TypeError(f"unexpected DynamoDB type {t}")


class Cancelled(Exception):
    """A transaction's condition failed: another write committed first."""


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class DynamoEngine:
    """The aiobotocore client and the table of one store (``<prefix>`` on DynamoDB).

    Args:
        table: the table name.
        region: the AWS region.
        endpoint: an endpoint URL (a local server), or None for AWS's own.
        settings: ``request_timeout_seconds`` bounds each call.
    """

    def __init__(self, table: str, region: str, endpoint: str | None, settings: Settings) -> None:
        self.table = table
        self.region = region
        self.endpoint = endpoint
        self.settings = settings
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._where = f"dynamodb table {table} ({endpoint or region})"
        #: Group commit of this process's writes (see :class:`Committer`).
        self.committer = Committer(self)

    # Lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create the table (on-demand billing, TTL on ``ttl``) and its
        head row when missing.

        Raises:
            Unavailable: DynamoDB did not answer, or refused the credentials.
        """
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError:  # pragma: no cover - the aws extra is missing
            raise InvalidInput(
                "the DynamoDB store needs the aws extra: pip install 'hivemem[aws]'", field="url"
            ) from None
        stack = contextlib.AsyncExitStack()
        timeout = getattr(self.settings, "request_timeout_seconds", 30.0)
        config = AioConfig(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=timeout,
            max_pool_connections=64,
        )
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "dynamodb", region_name=self.region, endpoint_url=self.endpoint, config=config
                )
            )
        except Exception as exc:
            await stack.aclose()
            raise Unavailable(f"cannot reach {self._where}: {exc}") from exc
        self._stack = stack
        try:
            await self._ensure_table()
            await self.call(
                "put_item",
                TableName=self.table,
                Item=encode({"pk": HEAD[0], "sk": HEAD[1], "seq": 0, "gen": 0, "trim": 0}),
                ConditionExpression="attribute_not_exists(pk)",
                ok_codes=("ConditionalCheckFailedException",),
            )
        except BaseException:
            await self.close()
            raise

    async def _ensure_table(self) -> None:
        try:
            await self.call("describe_table", TableName=self.table)
            return
        except Unavailable as exc:
            if "ResourceNotFoundException" not in str(exc):
                raise
        log.info("creating %s (on-demand billing)", self._where)
        await self.call(
            "create_table",
            TableName=self.table,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
            ok_codes=("ResourceInUseException",),
        )
        for _ in range(600):
            described = await self.call("describe_table", TableName=self.table)
            if described["Table"].get("TableStatus") == "ACTIVE":
                break
            await asyncio.sleep(0.1)
        await self.call(
            "update_time_to_live",
            TableName=self.table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            ok_codes=("ValidationException",),  # already on
        )

    async def close(self) -> None:
        """Close the client's connections."""
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    # Calls --------------------------------------------------------------------------

    async def call(self, op: str, *, ok_codes: Sequence[str] = (), **kwargs: Any) -> Any:
        """Call client method ``op`` (botocore retries throttling and 5xx itself).

        Returns the response, or ``{}`` when the error's code is in ``ok_codes``.

        Raises:
            Cancelled: a transaction was cancelled by a condition or a conflict.
            Unavailable: anything else went wrong (its code and message in the text).
        """
        client = self._client
        if client is None:
            raise Unavailable(f"the {self._where} is not open")
        try:
            return await getattr(client, op)(**kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = _code(exc)
            if code in ok_codes:
                return {}
            if code in ("TransactionCanceledException", "TransactionConflictException"):
                raise Cancelled(str(exc)) from None
            if isinstance(exc, HivememError):
                raise
            raise Unavailable(
                f"{self._where}: {op} failed: {code or type(exc).__name__}: {exc}"
            ) from exc

    async def get(self, pk: str, sk: str) -> dict[str, Any] | None:
        """The row at (pk, sk), read strongly consistent, or None."""
        reply = await self.call(
            "get_item",
            TableName=self.table,
            Key={"pk": {"S": pk}, "sk": {"S": sk}},
            ConsistentRead=True,
        )
        item = reply.get("Item")
        return decode(item) if item else None

    async def get_many(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The rows at ``keys`` that exist (strongly consistent; 100 per call)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 100):
            pending: dict[str, Any] = {
                self.table: {
                    "Keys": [
                        {"pk": {"S": pk}, "sk": {"S": sk}} for pk, sk in unique[start : start + 100]
                    ],
                    "ConsistentRead": True,
                }
            }
            backoff = Backoff(tenacity.wait_random_exponential(multiplier=0.005, max=1.0))
            for _ in range(20):
                reply = await self.call("batch_get_item", RequestItems=pending)
                for item in reply.get("Responses", {}).get(self.table, []):
                    row = decode(item)
                    found[(row["pk"], row["sk"])] = row
                pending = reply.get("UnprocessedKeys") or {}
                if not pending:
                    break
                await asyncio.sleep(backoff.next())
            else:
                raise Unavailable(f"{self._where}: batch_get_item left keys unprocessed")
        return found

    async def query(
        self,
        pk: str,
        *,
        low: str | None = None,
        high: str | None = None,
        forward: bool = True,
        limit: int | None = None,
        fields: Sequence[str] | None = None,
        first_page: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Rows of partition ``pk`` with ``low <= sk < high`` (each bound optional), in
        sk order (``forward``) or reversed, read strongly consistent, page by page; at
        most ``limit`` rows (``fields``: only these attributes).

        ``first_page``: the first request asks for this many rows and each next one for
        twice as many (up to 1,000), for a caller that usually stops after the first
        few rows: a request is billed, and answered, by the rows it reads."""
        cond = "pk = :pk"
        values: dict[str, Any] = {":pk": {"S": pk}}
        if low is not None and high is not None:
            if low >= high:
                return
            cond += " AND sk BETWEEN :lo AND :hi"  # inclusive: rows at ``high`` are dropped
            values[":lo"] = {"S": low}
            values[":hi"] = {"S": high}
        elif low is not None:
            cond += " AND sk >= :lo"
            values[":lo"] = {"S": low}
        elif high is not None:
            cond += " AND sk < :hi"
            values[":hi"] = {"S": high}
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": cond,
            "ExpressionAttributeValues": values,
            "ConsistentRead": True,
            "ScanIndexForward": forward,
        }
        if fields:
            names = {f"#p{i}": f for i, f in enumerate(fields)}
            kwargs["ProjectionExpression"] = ", ".join(names)
            kwargs["ExpressionAttributeNames"] = names
        given = 0
        page = first_page
        while True:
            if limit is not None or page is not None:
                want = min(1000, limit - given + 1 if limit is not None else 1000)
                if page is not None:
                    want, page = min(want, page), min(1000, page * 2)
                kwargs["Limit"] = max(1, want)
            reply = await self.call("query", **kwargs)
            for item in reply.get("Items", []):
                row = decode(item)
                if high is not None and row["sk"] >= high:
                    continue
                yield row
                given += 1
                if limit is not None and given >= limit:
                    return
            last = reply.get("LastEvaluatedKey")
            if not last:
                return
            kwargs["ExclusiveStartKey"] = last

    async def expand(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """``row`` with its spilled attributes put back from its chunks; None when a
        chunk is gone (the row was replaced meanwhile: read it again)."""
        keys = chunk_keys(row)
        if not keys:
            return row
        found = await self.get_many(keys)
        if len(found) < len(keys):
            return None
        return unspill(row, [found[k]["d"] for k in keys])

    async def rows(self, pk: str, **kwargs: Any) -> list[dict[str, Any]]:
        """:meth:`query` as a list."""
        return [row async for row in self.query(pk, **kwargs)]

    async def delete_quietly(self, keys: Sequence[tuple[str, str]]) -> None:
        """Delete rows outside any transaction (leftovers nothing reads: chunks of a
        removed version). Failures are logged, not raised: the rows only cost space."""
        for start in range(0, len(keys), 25):
            batch = {
                self.table: [
                    {"DeleteRequest": {"Key": {"pk": {"S": pk}, "sk": {"S": sk}}}}
                    for pk, sk in keys[start : start + 25]
                ]
            }
            try:
                for _ in range(10):
                    reply = await self.call("batch_write_item", RequestItems=batch)
                    batch = reply.get("UnprocessedItems") or {}
                    if not batch:
                        break
            except Unavailable as exc:
                log.warning("leaving %d rows to a later sweep: %s", len(keys), exc)
                return


class Tx:
    """One serializable write: consistent reads, then rows to put and delete and feed
    events, committed together with the head's generation check (see the module notes).

    ``head`` is the head row as read when the transaction began.
    """

    def __init__(self, engine: DynamoEngine, head: dict[str, Any]) -> None:
        self.engine = engine
        self.head = head
        self._read: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._writes: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._conditions: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.after_commit: list[tuple[str, str]] = []  # rows to delete once committed
        self._dropped_groups: dict[str, list[tuple[str, str]]] = {}
        #: Set the head's ``trim`` (the newest trimmed sequence number) at commit.
        self.trim: int | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next event of this transaction gets."""
        return int(self.head["seq"]) + len(self.events) + 1

    def mark(self) -> tuple[Any, ...]:
        """The transaction's state now, for :meth:`rollback` (a write of a group that
        raised, or did not fit, leaves no trace)."""
        return (
            dict(self._writes),
            len(self.events),
            len(self._conditions),
            len(self.after_commit),
            dict(self._dropped_groups),
            self.trim,
        )

    def rollback(self, mark: tuple[Any, ...]) -> None:
        """Forget what was written since :meth:`mark` gave ``mark``."""
        writes, events, conditions, after, dropped, trim = mark
        self._writes = writes
        del self.events[events:]
        del self._conditions[conditions:]
        del self.after_commit[after:]
        self._dropped_groups = dropped
        self.trim = trim

    def size(self) -> int:
        """Bytes of str and bytes data in the rows and events to write (an estimate of
        the transaction's size)."""
        total = 0
        for row in self._writes.values():
            if row is not None:
                total += sum(len(v) if isinstance(v, bytes) else len(str(v)) for v in row.values())
        for e in self.events:
            total += 100 + len(e.get("d") or b"") + len(e["n"]) + len(e.get("k") or "")
        return total

    def seen(self, rows: dict[tuple[str, str], dict[str, Any] | None]) -> None:
        """Rows read with the head (None: absent), as if read by :meth:`get`."""
        self._read.update(rows)

    def leftovers(self) -> list[tuple[str, str]]:
        """Rows to delete once committed: :attr:`after_commit` and dropped chunks no
        written row keeps."""
        kept = {str(r["_ck"]) for r in self._writes.values() if r is not None and "_ck" in r}
        out = list(self.after_commit)
        for group, keys in self._dropped_groups.items():
            if group not in kept:
                out.extend(keys)
        return out

    async def get(self, pk: str, sk: str) -> dict[str, Any] | None:
        """The row at (pk, sk) as this transaction sees it (its own writes included;
        chunks not put back: see :meth:`DynamoEngine.expand`)."""
        key = (pk, sk)
        if key in self._writes:
            return self._writes[key]
        if key not in self._read:
            self._read[key] = await self.engine.get(pk, sk)
        return self._read[key]

    def put(self, row: dict[str, Any], *, old: dict[str, Any] | None = None) -> None:
        """Write ``row`` (it has ``pk`` and ``sk``) at commit; a large one spills into
        chunk rows (see :mod:`.layout`). ``old``: the row it replaces, whose chunks
        are removed after the commit unless another written row keeps them."""
        for chunk in spill(row):
            self._writes[(chunk["pk"], chunk["sk"])] = chunk
        self._writes[(row["pk"], row["sk"])] = row
        if old is not None:
            self.drop_chunks(old)

    def delete(self, pk: str, sk: str, *, old: dict[str, Any] | None = None) -> None:
        """Delete the row at (pk, sk) at commit (``old``: that row, whose chunks go too)."""
        self._writes[(pk, sk)] = None
        if old is not None:
            self.drop_chunks(old)

    def drop_chunks(self, row: dict[str, Any]) -> None:
        """Remove the chunks of ``row`` after the commit (unless a row written by this
        transaction keeps them)."""
        if "_ck" in row:
            self._dropped_groups[str(row["_ck"])] = chunk_keys(row)

    def require_absent(self, pk: str, sk: str) -> None:
        """Commit only if no row is at (pk, sk) (for rows no generation guards, such as
        a request id's result written by a write that bypasses the head)."""
        self._conditions.append(
            {
                "ConditionCheck": {
                    "TableName": self.engine.table,
                    "Key": {"pk": {"S": pk}, "sk": {"S": sk}},
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        )

    def event(
        self,
        type_: str,
        namespace: str,
        key: str | None,
        version: int | None,
        author: str,
        at: float,
        data: bytes | None = None,
    ) -> str:
        """Append a feed event; returns its cursor."""
        seq = self.next_seq
        self.events.append(
            {"t": type_, "n": namespace, "k": key, "v": version, "a": author, "at": at, "d": data}
        )
        return str(seq)

    def actions(self) -> list[dict[str, Any]]:
        """The TransactWriteItems actions of the commit."""
        table = self.engine.table
        gen = int(self.head["gen"])
        seq = int(self.head["seq"])
        out: list[dict[str, Any]] = [
            {
                "Update": {
                    "TableName": table,
                    "Key": {"pk": {"S": HEAD[0]}, "sk": {"S": HEAD[1]}},
                    "UpdateExpression": "SET #g = :g1, #s = :s1, #t = :t",
                    "ConditionExpression": "#g = :g0",
                    "ExpressionAttributeNames": {"#g": "gen", "#s": "seq", "#t": "trim"},
                    "ExpressionAttributeValues": {
                        ":g0": {"N": str(gen)},
                        ":g1": {"N": str(gen + 1)},
                        ":s1": {"N": str(seq + len(self.events))},
                        ":t": {
                            "N": str(
                                self.trim if self.trim is not None else self.head.get("trim", 0)
                            )
                        },
                    },
                }
            }
        ]
        if self.events:
            first = seq + 1
            out.append(
                {
                    "Put": {
                        "TableName": table,
                        "Item": encode(
                            {
                                "pk": feed_pk(first),
                                "sk": feed_sk(first),
                                "n": len(self.events),
                                "al": self.events[-1]["at"],
                                "ev": [
                                    {k: v for k, v in e.items() if v is not None}
                                    for e in self.events
                                ],
                            }
                        ),
                    }
                }
            )
        for (pk, sk), row in self._writes.items():
            if row is None:
                if self._read.get((pk, sk), True) is None:
                    continue  # never existed: nothing to delete
                out.append(
                    {"Delete": {"TableName": table, "Key": {"pk": {"S": pk}, "sk": {"S": sk}}}}
                )
            else:
                out.append({"Put": {"TableName": table, "Item": encode(row)}})
        out.extend(self._conditions)
        return out

    @property
    def empty(self) -> bool:
        """Whether the transaction writes nothing."""
        return not self._writes and not self.events and self.trim is None


#: Events per feed partition key: the feed's rows spread over partitions of this many
#: sequence numbers, so no partition holds the whole feed.
FEED_SPAN = 10_000


def feed_pk(seq: int) -> str:
    """The partition key of the feed row whose first event is ``seq``."""
    return f"F#{seq // FEED_SPAN}"


def feed_sk(seq: int) -> str:
    """The sort key of the feed row whose first event is ``seq``."""
    return f"{seq:020d}"


#: Bytes of row data one group commit carries at most (DynamoDB takes 4 MB per
#: transaction; the rest is headroom for names and encoding).
GROUP_BYTES = 3_800_000


@dataclass(slots=True)
class _Job:
    """One write waiting for the committer."""

    run: Any
    reads: Sequence[tuple[str, str]]
    what: str
    done: asyncio.Future[Any]


class Committer:
    """Group commit: the writes of one process that arrive while a commit is on its way
    go together in the next transaction (as many as fit in 100 actions and
    :data:`GROUP_BYTES`), so they do not race each other for the head row — only other
    processes' commits can cancel one. A write that raises (Conflict, NotFound) leaves
    the others of its group untouched; a cancelled group runs every write again from
    fresh reads."""

    def __init__(self, engine: DynamoEngine) -> None:
        self.engine = engine
        self._queue: list[_Job] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, run: Any, reads: Sequence[tuple[str, str]], what: str) -> Any:
        """Run ``run(tx)`` in the next group and return what it returned."""
        job = _Job(run, reads, what, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="hivemem-dynamodb-commit")
        return await job.done

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            try:
                deferred = await self._commit(group)
            except BaseException as exc:
                for job in group:
                    if not job.done.done():
                        job.done.set_exception(
                            exc if isinstance(exc, Exception) else Unavailable(str(exc))
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            self._queue[:0] = deferred

    async def _commit(self, group: list[_Job]) -> list[_Job]:
        """Run and commit ``group``; returns the jobs that did not fit (for the next)."""
        engine = self.engine
        backoff = Backoff(tenacity.wait_random_exponential(multiplier=0.001, max=0.2))
        for _ in range(TX_ATTEMPTS):
            group = [job for job in group if not job.done.done()]
            if not group:
                return []
            reads = list(dict.fromkeys(k for job in group for k in job.reads))
            if reads:
                found = await engine.get_many([HEAD, *reads])
                head = found.get(HEAD)
            else:
                found = {}
                head = await engine.get(*HEAD)
            if head is None:
                raise Unavailable(f"{engine._where} has no head row (was the table emptied?)")
            tx = Tx(engine, head)
            tx.seen({k: found.get(k) for k in reads})
            outcomes: list[tuple[_Job, bool, Any]] = []
            deferred: list[_Job] = []
            for job in group:
                if deferred:
                    deferred.append(job)
                    continue
                mark = tx.mark()
                try:
                    result = await job.run(tx)
                except Exception as exc:
                    tx.rollback(mark)
                    outcomes.append((job, False, exc))
                    continue
                if len(tx.actions()) > MAX_ACTIONS or tx.size() > GROUP_BYTES:
                    tx.rollback(mark)
                    if any(ok for _, ok, _ in outcomes):
                        deferred.append(job)  # the next group takes it
                        continue
                    outcomes.append(
                        (
                            job,
                            False,
                            InvalidInput(
                                "this write needs more than one DynamoDB transaction takes "
                                f"({MAX_ACTIONS} actions, 4 MB): split the batch",
                                field="ops",
                            ),
                        )
                    )
                    continue
                outcomes.append((job, True, result))
            if not tx.empty:
                try:
                    await engine.call(
                        "transact_write_items",
                        TransactItems=tx.actions(),
                        ClientRequestToken=uuid.uuid4().hex,
                    )
                except Cancelled:
                    await asyncio.sleep(backoff.next())
                    continue
                leftovers = tx.leftovers()
                if leftovers:
                    await engine.delete_quietly(leftovers)
            for job, ok, value in outcomes:
                if job.done.done():
                    continue
                if ok:
                    job.done.set_result(value)
                else:
                    job.done.set_exception(value)
            return deferred
        raise Unavailable(
            f"{engine._where}: {group[0].what} lost to other writes {TX_ATTEMPTS} times"
        )


async def run_tx(
    engine: DynamoEngine, job: Any, *, what: str, reads: Sequence[tuple[str, str]] = ()
) -> Any:
    """Run ``job(tx)`` (an async function building the transaction and returning the
    result) and commit it, with the other writes of this process that are waiting
    (:class:`Committer`), again from fresh reads while another process's commit cancels
    it; ``job`` may raise (Conflict, NotFound...) to write nothing. ``reads``: rows the
    job will read, fetched with the head in one round trip.

    Raises:
        InvalidInput: the write alone needs more than one transaction takes (100
            actions, 4 MB; field ``ops``).
        Unavailable: DynamoDB failed, or the write kept losing to others.
    """
    return await engine.committer.submit(job, reads, what)
