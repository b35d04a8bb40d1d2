"""``HivememStore``: LangGraph's long-term memory store (``BaseStore``) on a hive.

A graph's ``runtime.store`` (or ``store=`` of ``create_react_agent`` / ``compile``) kept in
hivemem, so graphs in several processes or pods share one memory, with hivemem's
versions, feed and permissions underneath.

Mapping (interface: ``langgraph.store.base.BaseStore``, langgraph 1.2):

- A namespace tuple ``("users", "u1")`` is the hivemem namespace ``<prefix>/users/u1``
  (``prefix`` defaults to ``langgraph``); labels and keys are escaped as
  :mod:`hivemem.integrations.labels` says, so any LangGraph label or key round-trips.
  hivemem allows ``max_namespace_depth`` (8) segments, so a tuple holds at most 7 labels.
- ``put`` writes the value (a dict) with the text of its ``index`` fields as the item's
  ``text`` (LangGraph's default field is ``"$"``, the whole value as JSON; ``index=False``
  leaves it unsearchable by query) and ``ttl`` (minutes) as the item's expiry; a value
  of ``None`` deletes. The puts of one ``batch`` are applied after its reads, the last
  put of a (namespace, key) winning, as LangGraph's stores do, in hivemem batches of at
  most ``max_batch_ops`` (100): atomic within each chunk of 100.
- ``search`` without ``query`` lists the items at or under the prefix in (namespace, key)
  order and keeps those whose value matches ``filter`` (``$eq $ne $gt $gte $lt $lte``,
  nested objects, as LangGraph's in-memory store compares them): its cost grows with
  the items under the prefix. With ``query`` it is hivemem's hybrid search (BM25 and the
  hive's own embedder; at most ``max_search_limit`` (100) hits before ``offset``), best
  first, ``score`` the fused score, then the filter.
- ``list_namespaces`` lists namespaces holding at least one item (an emptied namespace
  is gone), sorted as tuples, after the match conditions (``*`` a wildcard label) and
  ``max_depth``.
- TTL: ``supports_ttl``; a read with ``refresh_ttl`` (by default ``ttl_config``'s
  ``refresh_on_read``, else True) writes the item again with a fresh expiry (a new
  hivemem version, compare-and-set on the version read: a concurrent write wins).
  Expired items are never returned; hivemem's sweeper deletes them.

The embedding settings of LangGraph's ``IndexConfig`` (``embed``, ``dims``) do not apply:
the hive embeds with its own embedder; only ``fields`` is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)

from hivemem import models
from hivemem.errors import Conflict
from hivemem.integrations._common import Bridge, every_item, every_namespace
from hivemem.integrations.labels import decode, encode_key, encode_label

if TYPE_CHECKING:
    from hivemem.hive import Hive
    from hivemem.sync import SyncHive

#: Metadata field holding an item's LangGraph TTL in minutes (to refresh it on read).
TTL_FIELD = "langgraph_ttl"
#: Largest text taken from an item's index fields, in UTF-8 bytes (hivemem's default
#: ``max_text_bytes`` is 256 KiB; longer texts are cut at a character boundary).
MAX_TEXT_BYTES = 64 * 1024
#: hivemem's batch size and search limits (their defaults).
_BATCH = 100
_SEARCH = 100


class HivememStore(BaseStore):
    """LangGraph ``BaseStore`` on a hive (embedded or service).

    Args:
        hive: an async :class:`~hivemem.Hive` (``hivemem.connect``) or a
            :class:`~hivemem.SyncHive` (``hivemem.connect_sync``). The async methods
            (``aget``, ``aput``, ``asearch``..., used by ``graph.ainvoke``) work with
            either; the blocking ones (``graph.invoke``) need a SyncHive, or an async
            hive whose event loop runs in another thread than the caller's.
        prefix: the hivemem namespace everything is kept under (default ``langgraph``).
        index: LangGraph's ``IndexConfig``; only ``fields`` (JSON paths whose text is
            indexed; default ``["$"]``, the whole value) is used.
        ttl: LangGraph's ``TTLConfig``: ``default_ttl`` (minutes) for puts that give
            none, ``refresh_on_read``. ``sweep_interval_minutes`` is the hive's
            ``sweep_interval_seconds``; expired items are never returned.
        consistency: of query searches: ``"eventual"`` (default; a new item's words are
            searchable at once, its vector moments later) or ``"indexed"`` (wait for
            every vector written before the search).

    Raises (from every operation):
        InvalidNamespaceError: an empty, non-string or dotted label, or a put into an
            empty namespace.
        hivemem.errors.InvalidInput: a namespace deeper than the hive allows, a key
            longer than ``max_key_bytes``, a value that is not a JSON object.
        hivemem.errors.Unavailable: the store or service cannot be reached.
    """

    supports_ttl = True

    def __init__(
        self,
        hive: Hive | SyncHive,
        *,
        prefix: str = "langgraph",
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
        consistency: Literal["eventual", "indexed"] = "eventual",
    ) -> None:
        self._bridge = Bridge(hive, "HivememStore")
        self._hive = self._bridge.hive
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must be a hivemem namespace")
        self.prefix = prefix
        self.index_config = index
        fields = (index or {}).get("fields") or ["$"]
        self._fields = [(f, tokenize_path(f) if f != "$" else f) for f in fields]
        self.ttl_config = ttl
        self.consistency = consistency

    # Names -----------------------------------------------------------------------

    def namespace_of(self, labels: Sequence[str]) -> str:
        """The hivemem namespace of a LangGraph namespace tuple."""
        return "/".join([self.prefix, *(encode_label(label) for label in labels)])

    def _labels(self, namespace: str) -> tuple[str, ...]:
        rest = namespace[len(self.prefix) + 1 :]
        return tuple(decode(s) for s in rest.split("/")) if rest else ()

    def _item(self, item: models.Item) -> Item:
        return Item(
            value=item.value if isinstance(item.value, dict) else {"value": item.value},
            key=decode(item.key),
            namespace=self._labels(item.namespace),
            created_at=item.created_at,
            updated_at=item.updated_at,
        )

    # Batches ---------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` and return one result per op (blocking); see the module notes."""
        return self._bridge.blocking(self.abatch, list(ops))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` and return one result per op; see the module notes."""
        ops = list(ops)
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, PutOp) and not op.namespace:
                raise InvalidNamespaceError("Namespace cannot be empty.")
        results: list[Result] = [None] * len(ops)
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        reads = []
        for i, op in enumerate(ops):
            if isinstance(op, GetOp):
                reads.append(self._get(i, op, results))
            elif isinstance(op, SearchOp):
                reads.append(self._search(i, op, results))
            elif isinstance(op, ListNamespacesOp):
                reads.append(self._list_namespaces(i, op, results))
            elif isinstance(op, PutOp):
                puts.pop((op.namespace, op.key), None)  # the last one wins, in its place
                puts[(op.namespace, op.key)] = op
            else:
                raise ValueError(f"Unknown operation type: {type(op)}")
        if reads:
            await asyncio.gather(*reads)
        if puts:
            await self._apply(list(puts.values()))
        return results

    # Reads -----------------------------------------------------------------------

    async def _get(self, i: int, op: GetOp, results: list[Result]) -> None:
        found = await self._hive.get(self.namespace_of(op.namespace), encode_key(op.key))
        if found is None:
            return
        results[i] = self._item(found)
        if op.refresh_ttl:
            await self._refresh([found])

    async def _search(self, i: int, op: SearchOp, results: list[Result]) -> None:
        prefix = self.namespace_of(op.namespace_prefix)
        offset, limit = max(op.offset, 0), max(op.limit, 0)
        kept: list[tuple[models.Item, float | None]] = []
        if op.query and op.query.strip():
            want = _SEARCH if op.filter else min(_SEARCH, offset + limit)
            if want > 0:
                hits = await self._hive.search(
                    prefix, op.query, limit=want, consistency=self.consistency
                )
                kept = [
                    (h.item, h.score)
                    for h in hits
                    if not op.filter or matches(h.item.value, op.filter)
                ]
            kept = kept[offset : offset + limit]
        else:
            async for item in every_item(self._hive, prefix):
                if op.filter and not matches(item.value, op.filter):
                    continue
                kept.append((item, None))
                if len(kept) >= offset + limit:
                    break
            kept = kept[offset:]
        results[i] = [
            SearchItem(
                namespace=self._labels(item.namespace),
                key=decode(item.key),
                value=item.value if isinstance(item.value, dict) else {"value": item.value},
                created_at=item.created_at,
                updated_at=item.updated_at,
                score=score,
            )
            for item, score in kept
        ]
        if op.refresh_ttl:
            await self._refresh([item for item, _ in kept])

    async def _list_namespaces(self, i: int, op: ListNamespacesOp, results: list[Result]) -> None:
        # The leading labels of a prefix condition without wildcards narrow the listing.
        fixed: list[str] = []
        for cond in op.match_conditions or ():
            if cond.match_type == "prefix":
                for label in cond.path:
                    if label == "*":
                        break
                    fixed.append(label)
                break
        base = self.namespace_of(fixed)
        found: list[tuple[str, ...]] = []
        async for ns in every_namespace(self._hive, base):
            if ns == base or ns.startswith(base + "/"):
                labels = self._labels(ns)
                if labels and all(_does_match(c, labels) for c in op.match_conditions or ()):
                    found.append(labels)
        if op.max_depth is not None:
            found = list({ns[: op.max_depth] for ns in found})
        found.sort()
        results[i] = found[op.offset : op.offset + op.limit]

    async def _refresh(self, items: Sequence[models.Item]) -> None:
        """Write each item again with its TTL from now (version-checked, best effort)."""
        for item in items:
            minutes = item.metadata.get(TTL_FIELD)
            if not isinstance(minutes, int | float) or item.expires_at is None:
                continue
            try:
                await self._hive.put(
                    item.namespace,
                    item.key,
                    item.value,
                    if_version=item.version,
                    ttl=float(minutes) * 60,
                    text=item.text,
                    metadata=item.metadata,
                )
            except Conflict:
                pass  # written or deleted meanwhile: that write decides

    # Writes ----------------------------------------------------------------------

    def _text(self, op: PutOp) -> str:
        """The item's text: its index fields' texts, or "" (not searchable)."""
        assert op.value is not None
        if op.index is False:
            return ""
        fields = self._fields if op.index is None else [(f, tokenize_path(f)) for f in op.index]
        texts: list[str] = []
        for path, tokens in fields:
            texts += get_text_at_path(op.value, tokens if path != "$" else "$")
        text = "\n".join(t for t in texts if t)
        raw = text.encode("utf-8")
        if len(raw) > MAX_TEXT_BYTES:
            text = raw[:MAX_TEXT_BYTES].decode("utf-8", "ignore")
        return text

    async def _apply(self, puts: list[PutOp]) -> None:
        ops: list[models.PutOp | models.DeleteOp] = []
        for op in puts:
            ns, key = self.namespace_of(op.namespace), encode_key(op.key)
            if op.value is None:
                ops.append(models.DeleteOp(namespace=ns, key=key))
                continue
            minutes = op.ttl
            ops.append(
                models.PutOp(
                    namespace=ns,
                    key=key,
                    value=dict(op.value),
                    ttl=float(minutes) * 60 if minutes is not None else None,
                    text=self._text(op),
                    metadata={TTL_FIELD: minutes} if minutes is not None else None,
                )
            )
        for start in range(0, len(ops), _BATCH):
            await self._hive.batch(ops[start : start + _BATCH])


def matches(value: Any, filter: Mapping[str, Any]) -> bool:
    """Whether a stored value passes a LangGraph search filter: each field equal, or each
    ``$eq $ne $gt $gte $lt $lte`` condition true, nested objects compared field by field
    (the semantics of LangGraph's in-memory store, ``langgraph.store.memory``)."""
    if not isinstance(value, dict):
        return False
    return all(_compare(value.get(k), v) for k, v in filter.items())


def _compare(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        if any(k.startswith("$") for k in want):
            return all(_operator(have, op, arg) for op, arg in want.items())
        if not isinstance(have, dict):
            return False
        return all(_compare(have.get(k), v) for k, v in want.items())
    if isinstance(want, list | tuple):
        return (
            isinstance(have, list | tuple)
            and len(have) == len(want)
            and all(_compare(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)


def _operator(have: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return bool(have == arg)
    if op == "$ne":
        return bool(have != arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        try:
            a, b = float(have), float(arg)
        except (TypeError, ValueError):
            return False
        return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]
    raise ValueError(f"Unsupported operator: {op}")


def _does_match(cond: MatchCondition, labels: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(labels) < len(path):
        return False
    pairs = (
        zip(labels, path, strict=False)
        if cond.match_type == "prefix"
        else zip(reversed(labels), reversed(path), strict=False)
    )
    if cond.match_type not in ("prefix", "suffix"):
        raise ValueError(f"Unsupported match type: {cond.match_type}")
    return all(p == "*" or have == p for have, p in pairs)


__all__ = ["TTL_FIELD", "HivememStore", "matches"]
