"""Search: hybrid (BM25 + vectors, fused by reciprocal rank), vector or lexical alone.

What is indexed: an item's ``text`` if given, otherwise its value when the value
is a string, otherwise the value's ``text`` or ``content`` field when that is a
string. Items with none of these are stored but not searchable.

Fusion: reciprocal rank fusion, score = sum over modes of w_m / (k + rank_m)
(Cormack, Clarke and Buettcher, SIGIR 2009; k = 60 there and by default here).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import numpy as np
import orjson

from hivemem.backends.base import Condition, IndexEntry, ItemRow
from hivemem.core import validation as check
from hivemem.core.area import Area
from hivemem.core.items import searchable_text, to_item
from hivemem.core.vectors import VectorIndex
from hivemem.errors import InvalidInput
from hivemem.models import SearchHit

Mode = Literal["hybrid", "vector", "lexical"]
MODES = ("hybrid", "vector", "lexical")

_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_QUERY_CHARS = 4096
_FILTER_OPS = {"$eq": "=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<=", "$in": "in"}

#: Words too common to help a BM25 query (a short English list).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves""".split()
)


def query_terms(query: str) -> builtins.list[str]:
    """The BM25 terms of a query: its words, lower-cased, without stopwords (unless
    the query has nothing else), each once, in order."""
    words = [w.lower() for w in _WORD.findall(query)]
    kept = [w for w in words if w not in STOPWORDS] or words
    return list(dict.fromkeys(kept))


def _scalar(value: Any, field: str) -> Any:
    if isinstance(value, bool | int | float | str) and not (
        isinstance(value, float) and value != value
    ):
        return value
    raise InvalidInput("filter values must be strings, numbers or booleans", field=field)


def parse_filter(
    filter: Mapping[str, Any] | None,
    author: str | None,
    updated_after: datetime | float | None,
    updated_before: datetime | float | None,
) -> builtins.list[Condition]:
    """Check the filter arguments of :meth:`search` and turn them into conditions.

    ``filter`` maps a metadata key to a value (equality) or to an object of
    operators: ``$eq``, ``$in`` (a non-empty list), ``$gt``, ``$gte``, ``$lt``, ``$lte``.

    Raises:
        InvalidInput: naming the field, e.g. ``filter.tags.$near`` for an unknown operator.
    """
    conditions: builtins.list[Condition] = []
    if filter is not None:
        if not isinstance(filter, Mapping):
            raise InvalidInput("filter must be an object of metadata conditions", field="filter")
        for name, spec in filter.items():
            field = f"filter.{name}"
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:@+\-]{1,128}", name):
                raise InvalidInput("filter keys must be metadata field names", field=field)
            if not isinstance(spec, Mapping):
                conditions.append(Condition("metadata", name, "=", _scalar(spec, field)))
                continue
            if not spec:
                raise InvalidInput("an operator object needs at least one operator", field=field)
            for op, operand in spec.items():
                sql_op = _FILTER_OPS.get(op)
                if sql_op is None:
                    raise InvalidInput(
                        f"unknown operator {op!r}; use one of {', '.join(_FILTER_OPS)}",
                        field=f"{field}.{op}",
                    )
                if sql_op == "in":
                    if not isinstance(operand, list | tuple) or not operand:
                        raise InvalidInput("$in needs a non-empty list", field=f"{field}.$in")
                    values = tuple(_scalar(v, f"{field}.$in") for v in operand)
                    conditions.append(Condition("metadata", name, "in", values))
                else:
                    conditions.append(
                        Condition("metadata", name, sql_op, _scalar(operand, f"{field}.{op}"))
                    )
    if author is not None:
        if not isinstance(author, str) or not author:
            raise InvalidInput("author must be an agent identity", field="author")
        conditions.append(Condition("author", None, "=", author))
    bounds = ((updated_after, ">", "updated_after"), (updated_before, "<", "updated_before"))
    for value, op, field in bounds:
        if value is None:
            continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise InvalidInput("times must carry a timezone (UTC)", field=field)
            seconds = value.timestamp()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise InvalidInput("must be a datetime or UNIX seconds", field=field)
        conditions.append(Condition("updated_at", None, op, seconds))
    return conditions


def fuse(
    rankings: Mapping[str, builtins.list[tuple[tuple[str, str], float]]],
    weights: Mapping[str, float],
    k: float,
) -> builtins.list[tuple[tuple[str, str], float, dict[str, tuple[int, float]]]]:
    """Reciprocal rank fusion of per-mode rankings (best first).

    Returns:
        ((namespace, key), fused score, {mode: (1-based rank, mode score)}), best
        first; ties keep the order of first appearance.
    """
    fused: dict[tuple[str, str], float] = {}
    seen: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    for mode, ranking in rankings.items():
        weight = weights.get(mode, 1.0)
        for rank, (key, score) in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
            seen.setdefault(key, {})[mode] = (rank, score)
    order = sorted(fused, key=lambda key: -fused[key])
    return [(key, fused[key], seen[key]) for key in order]


class SearchMixin(Area):
    """The search operations of :class:`~hivemem.core.LocalHive`."""

    def _vector_index(self, dim: int) -> VectorIndex:
        raise NotImplementedError

    async def search(
        self,
        prefix: str,
        query: str,
        *,
        filter: Mapping[str, Any] | None = None,
        author: str | None = None,
        updated_after: datetime | float | None = None,
        updated_before: datetime | float | None = None,
        mode: Mode = "hybrid",
        limit: int = 10,
    ) -> builtins.list[SearchHit]:
        s = self._settings
        check.namespace(prefix, s, field="prefix", allow_empty=True)
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}", field="mode")
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("query must be a non-empty string", field="query")
        if len(query) > _MAX_QUERY_CHARS:
            raise InvalidInput(f"query is longer than {_MAX_QUERY_CHARS} characters", field="query")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 0 < limit <= s.max_search_limit
        ):
            raise InvalidInput(f"limit must be between 1 and {s.max_search_limit}", field="limit")
        conditions = parse_filter(filter, author, updated_after, updated_before)
        if mode == "vector" and self._embedder is None:
            raise InvalidInput("vector search needs an embedder (embedder=none)", field="mode")
        await self._ready()
        now = self._now()
        candidates = max(s.search_candidates, limit)
        rankings: dict[str, builtins.list[tuple[tuple[str, str], float]]] = {}
        if mode != "vector":
            lexical = await self._backend.search_lexical(
                prefix, query_terms(query), conditions, candidates, now
            )
            rankings["lexical"] = [((ns, key), score) for ns, key, score in lexical]
        if mode != "lexical" and self._embedder is not None:
            (vector,) = await self._embedder.embed([query])
            index = self._vector_index(int(vector.shape[0]))
            await index.sync()
            allowed = (
                await self._backend.matching_keys(prefix, conditions, now) if conditions else None
            )
            rankings["vector"] = index.search(np.asarray(vector), prefix, allowed, candidates)
        fused = fuse(
            rankings,
            {"lexical": s.search_weight_lexical, "vector": s.search_weight_vector},
            s.search_rrf_k,
        )[:limit]
        rows = {
            (r.namespace, r.key): r
            for r in await self._backend.get_items([key for key, _, _ in fused], now)
        }
        hits = []
        for key, score, modes in fused:
            row = rows.get(key)
            if row is None:  # deleted or expired since it was ranked
                continue
            lex, vec = modes.get("lexical"), modes.get("vector")
            hits.append(
                SearchHit.model_construct(
                    item=to_item(row),
                    score=score,
                    lexical_rank=None if lex is None else lex[0],
                    vector_rank=None if vec is None else vec[0],
                    lexical_score=None if lex is None else lex[1],
                    vector_score=None if vec is None else vec[1],
                )
            )
        return hits

    async def reindex(self, *, batch: int = 64, progress: Any = None) -> int:
        """Index every item whose entry is missing, stale or by another model.

        Run after changing the embedder (or after upgrading a store written before
        search existed). Embeds in batches of ``batch`` texts outside any transaction;
        an item written meanwhile keeps the newer entry its write made.

        Args:
            progress: called as ``progress(scanned, indexed, total)`` after each batch
                (items looked at, entries written, live items in the store), if given.

        Returns:
            How many items got a new index entry.
        """
        await self._ready()
        model = None if self._embedder is None else self._embedder.name
        done = scanned = 0
        total = await self._backend.count_items(self._now())
        after: tuple[str, str] | None = None
        while True:
            rows: builtins.list[ItemRow] = await self._backend.unindexed_items(
                model, after, batch, self._now()
            )
            if not rows:
                return done
            after = (rows[-1].namespace, rows[-1].key)
            entries = [e for e in (_entry(r) for r in rows) if e is not None]
            texts = [e.text for e in entries if e.text is not None]
            if self._embedder is not None and texts:
                vectors = await self._embedder.embed(texts)
                entries = [
                    IndexEntry(e.namespace, e.key, e.version, e.text, v.tobytes(), model)
                    for e, v in zip(entries, vectors, strict=True)
                ]
            done += await self._backend.set_index(entries)
            scanned += len(rows)
            if progress is not None:
                progress(scanned, done, total)


def _entry(row: ItemRow) -> IndexEntry | None:
    text = searchable_text(row.text, orjson.loads(row.value))
    if text is None:
        return None
    return IndexEntry(row.namespace, row.key, row.version, text, None, None)
