"""Search: hybrid (BM25 + vectors, fused), vector or lexical alone, with context expansion.

What is indexed: an item's ``text`` if given, otherwise its value when the value
is a string, otherwise the value's ``text`` or ``content`` field when that is a
string. Items with none of these, or with an empty ``text``, are stored but not
searchable.

A search runs in three steps (every number below is a setting, see
:class:`~hivemem.config.Settings`):

1. Candidates: up to ``search_candidates`` (100) items from BM25 over the query's
   words (lower-cased, English stopwords dropped) and as many by cosine similarity
   to the query's embedding.
2. Fusion (``search_fusion``): ``rrf``, reciprocal rank fusion, score = sum over
   modes of w_m / (k + rank_m) (Cormack, Clarke and Buettcher, SIGIR 2009, where
   k = 60; k = 5 by default here, which favours each mode's first hits); or
   ``score``, a convex combination of each mode's scores min-max normalised over
   its own candidates (Bruch, Gai and Ingber, "An Analysis of Fusion Functions for
   Hybrid Retrieval", TOIS 2023). Weights: BM25 1.0, vectors 0.5.
3. Context expansion: items that carry a sequence (metadata ``session``) and a
   position in it (metadata ``turn``, an integer) have neighbours: the items of the
   same namespace and sequence within ``search_context_window`` (1) positions. Each
   neighbour of one of the ``search_context_hits`` (5) best hits gains
   ``search_context_weight`` (0.5) times that hit's score (the largest such gain),
   so the turn next to the one that matched the words, often the answer to it,
   rises. Neighbours obey the prefix, the filter and expiry like any hit; they may
   have no lexical or vector rank. Items without those metadata fields are
   unaffected, and cost nothing extra. This applies in every mode.

On the LoCoMo dev conversations (``hivemem eval locomo``) hybrid recall@10 went from
0.622 (RRF, k=60, equal weights) to 0.690 with k=5 and the weights above, and to
0.758 with context expansion (score fusion instead of RRF: 0.761).
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Literal

import numpy as np
import orjson

from hivemem import validation as check
from hivemem.backends.filters import Condition, row_matches
from hivemem.backends.rows import IndexEntry, ItemRow
from hivemem.config import Settings
from hivemem.core.area import Area
from hivemem.core.indexer import until
from hivemem.core.items import searchable_text, to_item
from hivemem.core.lexical import LexicalIndex, tokens
from hivemem.core.rowcache import RowCache
from hivemem.core.vectors import VectorIndex
from hivemem.errors import InvalidInput, Unavailable
from hivemem.models import IndexStatus, SearchHit

Mode = Literal["hybrid", "vector", "lexical"]
MODES = ("hybrid", "vector", "lexical")
Consistency = Literal["eventual", "indexed"]
CONSISTENCIES = ("eventual", "indexed")
Fusion = Literal["rrf", "score"]
Key = tuple[str, str]

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_MAX_QUERY_CHARS = 4096
#: A filtered in-process ranking first checks this many times the wanted items ...
_FILTER_OVERSAMPLE = 4
#: ... and at least this many; widening stops at the most below, where asking the store
#: for every matching item becomes the cheaper way.
_FILTER_MIN_CANDIDATES = 2000
_FILTER_MAX_CANDIDATES = 20_000
#: Candidate lists longer than this are checked against the filter in a worker thread.
_CHECK_IN_THREAD = 4000
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
    """The BM25 words of a query: its words (split as the index splits text),
    lower-cased, without stopwords (unless the query has nothing else), one word per
    distinct index term (so "run" and "running" count once), in order."""
    words = [w.lower() for w in _WORD.findall(query)]
    kept = [w for w in words if w not in STOPWORDS] or words
    by_term: dict[str, str] = {}
    for word in kept:
        for term in tokens(word):
            by_term.setdefault(term, word)
    return list(by_term.values())


def _scalar(value: Any, field: str) -> Any:
    """A filter value: a string, a boolean, a finite float or an int64.

    Raises:
        InvalidInput: anything else, NaN, Infinity, or an integer outside -2**63..2**63-1.
    """
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int | float):
        return check.finite(value, field)
    raise InvalidInput("filter values must be strings, numbers or booleans", field=field)


def parse_filter(
    filter: Mapping[str, Any] | None,
    author: str | None,
    updated_after: datetime | float | None,
    updated_before: datetime | float | None,
    *,
    settings: Settings | None = None,
) -> builtins.list[Condition]:
    """Check the filter arguments of :meth:`search` and turn them into conditions.

    ``filter`` maps a metadata key to a value (equality) or to an object of
    operators: ``$eq``, ``$in`` (a non-empty list), ``$gt``, ``$gte``, ``$lt``, ``$lte``.
    Values are strings, booleans, finite floats or integers within -2**63..2**63-1;
    ``updated_after`` / ``updated_before`` are aware datetimes or UNIX seconds (finite).

    Args:
        settings: the limits ``max_filter_keys`` (most keys in ``filter``) and
            ``max_filter_values`` (longest ``$in`` list); default: their default values.

    Raises:
        InvalidInput: naming the field, e.g. ``filter.tags.$near`` for an unknown operator,
            ``filter`` for more than ``max_filter_keys`` keys, ``filter.<key>.$in`` for a
            list longer than ``max_filter_values``.
    """
    if settings is not None:
        max_keys, max_values = settings.max_filter_keys, settings.max_filter_values
    else:
        fields = Settings.model_fields
        max_keys = fields["max_filter_keys"].default
        max_values = fields["max_filter_values"].default
    conditions: builtins.list[Condition] = []
    if filter is not None:
        if not isinstance(filter, Mapping):
            raise InvalidInput("filter must be an object of metadata conditions", field="filter")
        if len(filter) > max_keys:
            raise InvalidInput(
                f"a filter holds at most {max_keys} conditions (the setting max_filter_keys)",
                field="filter",
            )
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
                    if len(operand) > max_values:
                        raise InvalidInput(
                            f"$in holds at most {max_values} values "
                            "(the setting max_filter_values)",
                            field=f"{field}.$in",
                        )
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
            seconds = float(check.finite(value, field))
        else:
            raise InvalidInput("must be a datetime or UNIX seconds", field=field)
        conditions.append(Condition("updated_at", None, op, seconds))
    return conditions


def fuse(
    rankings: Mapping[str, builtins.list[tuple[Key, float]]],
    weights: Mapping[str, float],
    k: float,
    method: Fusion = "rrf",
) -> builtins.list[tuple[Key, float, dict[str, tuple[int, float]]]]:
    """Fuse per-mode rankings (each best first) into one.

    ``method="rrf"``: reciprocal rank fusion, score = sum over modes of
    ``weight / (k + rank)``. ``method="score"``: each mode's scores are min-max
    normalised over its ranking (best 1, worst 0; all 1 when they are equal) and
    summed with the weights, divided by the sum of the weights, so scores are in
    [0, 1]; an item missing from a mode's ranking counts 0 there.

    Returns:
        ((namespace, key), fused score, {mode: (1-based rank, mode score)}), best
        first; ties keep the order of first appearance.
    """
    fused: dict[Key, float] = {}
    seen: dict[Key, dict[str, tuple[int, float]]] = {}
    total = sum(weights.get(mode, 1.0) for mode in rankings) or 1.0
    for mode, ranking in rankings.items():
        weight = weights.get(mode, 1.0)
        if ranking:
            high, low = ranking[0][1], ranking[-1][1]
        for rank, (key, score) in enumerate(ranking, start=1):
            if method == "rrf":
                gain = weight / (k + rank)
            else:
                gain = weight / total * ((score - low) / (high - low) if high > low else 1.0)
            fused[key] = fused.get(key, 0.0) + gain
            seen.setdefault(key, {})[mode] = (rank, score)
    order = sorted(fused, key=lambda key: -fused[key])
    return [(key, fused[key], seen[key]) for key in order]


def _position(row: ItemRow, group_field: str, position_field: str) -> tuple[Any, int] | None:
    """(group, position) of an item from its metadata, or None when it has no usable pair:
    the group must be a string or an integer, the position an integer."""
    if row.metadata is None:
        return None
    meta = orjson.loads(row.metadata)
    if not isinstance(meta, dict):
        return None
    group, position = meta.get(group_field), meta.get(position_field)
    if not isinstance(group, str | int) or isinstance(group, bool):
        return None
    if not isinstance(position, int) or isinstance(position, bool):
        return None
    return group, position


class SearchMixin(Area):
    """The search operations of :class:`~hivemem.core.LocalHive`."""

    def _vector_index(self, dim: int) -> VectorIndex:
        raise NotImplementedError

    def _lexical_index(self) -> LexicalIndex | None:
        raise NotImplementedError

    def _vectors_in_engine(self) -> bool:
        raise NotImplementedError

    def _row_cache(self) -> RowCache:
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
        consistency: Consistency = "eventual",
    ) -> builtins.list[SearchHit]:
        s = self._settings
        if consistency not in CONSISTENCIES:
            raise InvalidInput(
                f"consistency must be one of {', '.join(CONSISTENCIES)}", field="consistency"
            )
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
        conditions = parse_filter(filter, author, updated_after, updated_before, settings=s)
        if mode == "vector" and self._embedder is None:
            raise InvalidInput("vector search needs an embedder (embedder=none)", field="mode")
        await self._ready()
        roots = self._roots("search", prefix)
        if not roots:
            return []
        waited = False
        if self._embedder is not None and mode != "lexical":
            self._start_indexer()
            if consistency == "indexed":
                if not await self.wait_indexed(timeout=s.index_wait_seconds):
                    status = await self.index_status()
                    raise Unavailable(
                        f"{status.pending} writes still wait for their vectors after "
                        f"index_wait_seconds ({s.index_wait_seconds:g} s); search with "
                        "consistency='eventual' to rank them by their words meanwhile"
                    )
                waited = True
        budget = s.search_timeout_seconds
        where: builtins.list[str] = []
        started = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                hits = await self._search(
                    roots, query, conditions, mode, limit, s.search_candidates, waited, where
                )
            index = "+".join(sorted(set(where))) or "none"
            self.metrics.search_seconds.labels(mode, index).observe(time.perf_counter() - started)
            return hits
        except TimeoutError:
            raise Unavailable(
                f"the search took longer than search_timeout_seconds ({budget:g} s); "
                "narrow it with a prefix or a more selective filter"
            ) from None

    async def _search(
        self,
        roots: builtins.list[str],
        query: str,
        conditions: builtins.list[Condition],
        mode: Mode,
        limit: int,
        search_candidates: int,
        waited: bool = False,
        where: builtins.list[str] | None = None,
    ) -> builtins.list[SearchHit]:
        """The search proper, over the prefixes ``roots`` (the request's prefix, or the
        narrower prefixes the principal may search under it); hits the principal may
        not search are dropped before fusion. ``waited``: the vectors were waited for,
        so the in-process vector index reads the feed even without a change signal.
        ``where`` collects where each ranking ran (``engine``, ``memory``)."""
        s = self._settings
        where = [] if where is None else where
        now = self._now()
        candidates = max(search_candidates, limit)
        rankings: dict[str, builtins.list[tuple[Key, float]]] = {}
        rows: dict[Key, ItemRow] = {}

        async def ranked(
            one: Callable[[str], Awaitable[builtins.list[tuple[Key, float]]]],
        ) -> builtins.list[tuple[Key, float]]:
            # Scores of one mode are comparable across prefixes (same index, same idf),
            # so the roots' rankings merge by score.
            if len(roots) == 1:
                found = await one(roots[0])
            else:
                parts = [await one(root) for root in roots]
                found = heapq.nlargest(
                    candidates, (hit for part in parts for hit in part), key=lambda h: h[1]
                )
            return [hit for hit in found if self._may("search", hit[0][0])]

        if mode != "vector":
            lexical_index = self._lexical_index()
            terms = query_terms(query)
            if lexical_index is None:

                async def lexical_in_engine(root: str) -> builtins.list[tuple[Key, float]]:
                    found = await self._backend.search_lexical(
                        root, terms, conditions, candidates, now
                    )
                    return [((ns, key), score) for ns, key, score in found]

                where.append("engine")
                rankings["lexical"] = await ranked(lexical_in_engine)
            else:
                await lexical_index.sync()

                async def lexical_in_process(root: str) -> builtins.list[tuple[Key, float]]:
                    return await self._filtered(
                        lambda allowed, k: lexical_index.search(terms, root, allowed, k),
                        root,
                        conditions,
                        candidates,
                        now,
                        rows,
                    )

                where.append("memory")
                rankings["lexical"] = await ranked(lexical_in_process)
        if mode != "lexical" and self._embedder is not None:
            (vector,) = await self._embedder.embed([query])
            q = np.asarray(vector, dtype=np.float32)
            embedder = self._embedder
            if self._vectors_in_engine():

                async def vectors_in_engine(root: str) -> builtins.list[tuple[Key, float]]:
                    nearest = await self._backend.search_vectors(
                        root, q.tobytes(), embedder.name, conditions, candidates, now
                    )
                    return [((ns, key), score) for ns, key, score in nearest]

                where.append("engine")
                rankings["vector"] = await ranked(vectors_in_engine)
            else:
                index = self._vector_index(int(q.shape[0]))
                await index.sync(force=waited)

                async def vectors_in_process(root: str) -> builtins.list[tuple[Key, float]]:
                    return await self._filtered(
                        lambda allowed, k: index.search(q, root, allowed, k),
                        root,
                        conditions,
                        candidates,
                        now,
                        rows,
                    )

                where.append("memory")
                rankings["vector"] = await ranked(vectors_in_process)
        fused = fuse(
            rankings,
            {"lexical": s.search_weight_lexical, "vector": s.search_weight_vector},
            s.search_rrf_k,
            s.search_fusion,
        )
        scores = {key: score for key, score, _ in fused}
        modes = {key: ranks for key, _, ranks in fused}
        top = [key for key, _, _ in fused[: max(limit, s.search_context_hits)]]
        fetch = [key for key in top if key not in rows]
        if fetch:
            found = await self._backend.get_items(fetch, now)
            rows.update(((r.namespace, r.key), r) for r in found)
        if s.search_context_window > 0 and s.search_context_weight > 0:
            gains = await self._context_gains(
                [rows[key] for key in top[: s.search_context_hits] if key in rows],
                scores,
                conditions,
                now,
            )
            for key, gain in gains.items():
                if self._may("search", key[0]):
                    scores[key] = scores.get(key, 0.0) + gain
        best = sorted(scores, key=lambda key: -scores[key])[:limit]
        missing = [key for key in best if key not in rows]
        if missing:
            rows.update(
                ((r.namespace, r.key), r) for r in await self._backend.get_items(missing, now)
            )
        resolved = {
            (r.namespace, r.key): r
            for r in await self._resolve([rows[key] for key in best if key in rows])
        }
        hits = []
        for key in best:
            row = resolved.get(key)
            if row is None:  # deleted or expired since it was ranked
                continue
            lex, vec = modes.get(key, {}).get("lexical"), modes.get(key, {}).get("vector")
            hits.append(
                SearchHit.model_construct(
                    item=to_item(row),
                    score=scores[key],
                    lexical_rank=None if lex is None else lex[0],
                    vector_rank=None if vec is None else vec[0],
                    lexical_score=None if lex is None else lex[1],
                    vector_score=None if vec is None else vec[1],
                )
            )
        return hits

    async def _filtered(
        self,
        rank: Callable[[builtins.list[Key] | None, int], builtins.list[tuple[Key, float]]],
        prefix: str,
        conditions: builtins.list[Condition],
        want: int,
        now: float,
        rows: dict[Key, ItemRow],
    ) -> builtins.list[tuple[Key, float]]:
        """The ``want`` best of an in-process ranking that satisfy ``conditions``.

        ``rank(allowed, k)`` ranks the items at or under the prefix (only those in
        ``allowed`` when it is a list). With conditions, the best
        ``_FILTER_OVERSAMPLE`` x ``want`` (at least ``_FILTER_MIN_CANDIDATES``) are
        ranked and checked against the in-process :class:`RowCache` (expiry and
        :func:`~hivemem.backends.filters.row_matches`); if too few pass, the ranking is
        widened once to what the observed pass rate needs (up to
        ``_FILTER_MAX_CANDIDATES``). Only a filter more selective than that makes the
        store list every matching item for an exact ranking. Rows fetched from the
        store (for items the cache had not seen yet) are kept in ``rows``.
        """
        if not conditions:
            return rank(None, want)
        cache = self._row_cache()
        await cache.sync()
        wide = max(_FILTER_OVERSAMPLE * want, _FILTER_MIN_CANDIDATES)
        checked: dict[Key, bool] = {}
        while True:
            ranked = rank(None, wide)
            fresh = [key for key, _ in ranked if key not in checked]
            if len(fresh) > _CHECK_IN_THREAD:  # keep the event loop answering meanwhile
                passing, unknown = await asyncio.to_thread(cache.check, fresh, conditions, now)
            else:
                passing, unknown = cache.check(fresh, conditions, now)
            cache_requests = self.metrics.cache
            cache_requests.labels("rows", "hit").inc(len(fresh) - len(unknown))
            if unknown:
                cache_requests.labels("rows", "miss").inc(len(unknown))
            checked.update((key, key in passing) for key in fresh)
            if unknown:  # written since the cache caught up: ask the store
                for row in await self._backend.get_items(unknown, now):
                    key = (row.namespace, row.key)
                    checked[key] = row_matches(row, conditions)
                    rows[key] = row
                for key in unknown:
                    checked.setdefault(key, False)
            kept = [(key, score) for key, score in ranked if checked[key]]
            if len(kept) >= want or len(ranked) < wide:
                return kept[:want]
            needed = int(want * len(ranked) / max(len(kept), 1) * 1.5)
            if needed > _FILTER_MAX_CANDIDATES or wide >= _FILTER_MAX_CANDIDATES:
                break
            wide = max(needed, 2 * wide)
        allowed = await self._backend.matching_keys(prefix, conditions, now)
        return rank(allowed, want)

    async def _context_gains(
        self,
        hits: builtins.list[ItemRow],
        scores: Mapping[Key, float],
        conditions: builtins.list[Condition],
        now: float,
    ) -> dict[Key, float]:
        """What the context neighbours of ``hits`` gain (see the module notes): for each
        neighbour, ``search_context_weight`` times the largest score among the hits it
        neighbours.

        One store query per namespace among the hits finds the items under the search's
        conditions whose group is one of the hits' groups and whose position is within
        the window of one of the hits' positions; their rows tell which hit they are
        next to.
        """
        s = self._settings
        window, weight = s.search_context_window, s.search_context_weight
        group_field, position_field = s.search_context_group, s.search_context_position
        placed: dict[str, builtins.list[tuple[ItemRow, Any, int]]] = {}
        for row in hits:
            place = _position(row, group_field, position_field)
            if place is not None:
                placed.setdefault(row.namespace, []).append((row, *place))
        if not placed:
            return {}

        def near(rows: builtins.list[tuple[ItemRow, Any, int]]) -> builtins.list[Condition]:
            groups = tuple(dict.fromkeys(group for _, group, _ in rows))
            positions = sorted(
                {p + offset for _, _, p in rows for offset in range(-window, window + 1)}
            )
            return [
                *conditions,
                Condition("metadata", group_field, "in", groups),
                Condition("metadata", position_field, "in", tuple(positions)),
            ]

        found = await asyncio.gather(
            *(self._backend.matching_keys(ns, near(rows), now) for ns, rows in placed.items())
        )
        known = {(row.namespace, row.key): row for row in hits}
        keys = {key for batch in found for key in batch if key[0] in placed}
        fetch = [key for key in keys if key not in known]
        rows = [known[key] for key in keys if key in known]
        rows += await self._backend.get_items(fetch, now) if fetch else []
        at: dict[tuple[str, Any, int], builtins.list[Key]] = {}
        for row in rows:
            place = _position(row, group_field, position_field)
            if place is not None:
                at.setdefault((row.namespace, *place), []).append((row.namespace, row.key))
        gains: dict[Key, float] = {}
        for ns, ranked in placed.items():
            for row, group, position in ranked:
                gain = weight * scores[(ns, row.key)]
                for offset in range(-window, window + 1):
                    for key in at.get((ns, group, position + offset), ()):
                        if key[1] != row.key and gain > gains.get(key, 0.0):
                            gains[key] = gain
        return gains

    def _start_indexer(self) -> None:
        """Start this process's indexer of deferred vectors, if not running."""
        raise NotImplementedError

    def _indexer_state(self) -> tuple[bool, builtins.list[int]]:
        """Whether this process's indexer runs, and the parts it holds."""
        raise NotImplementedError

    async def wait_indexed(
        self,
        cursor: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bool:
        """Wait until every write made before this call (and so every event at or before
        ``cursor``, any cursor the caller has seen) has its vector stored, so that a
        vector search finds it. Starts this process's indexer if it is not running.

        Args:
            cursor: a feed cursor; accepted for symmetry with the feed (every cursor a
                caller holds was committed before this call, so it is covered).
            timeout: seconds to wait at most (default ``index_wait_seconds``).

        Returns:
            True when indexed; False when ``timeout`` passed first.

        Raises:
            InvalidInput: ``cursor`` not a string, ``timeout`` not a number >= 0.
        """
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidInput("cursor must be a cursor string", field="cursor")
        wait = self._settings.index_wait_seconds if timeout is None else timeout
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < 1e9:
            raise InvalidInput("timeout must be a number of seconds >= 0", field="timeout")
        await self._ready()
        embedder = self._embedder
        if embedder is None:
            return True
        self._start_indexer()
        since = self._now()

        async def indexed() -> bool:
            waiting, oldest = await self._backend.pending_count(embedder.name, self._now())
            return waiting == 0 or (oldest is not None and oldest > since)

        return await until(indexed, self._backend, float(wait), self._settings.feed_poll_seconds)

    async def index_status(self) -> IndexStatus:
        """How far the vectors lag behind the writes.

        Returns:
            An :class:`~hivemem.models.IndexStatus`: the mode, the model, how many
            entries wait for a vector, the age of the oldest (seconds), and whether this
            process indexes (and which parts it holds).
        """
        await self._ready()
        embedder = self._embedder
        running, parts = self._indexer_state()
        if embedder is None:
            return IndexStatus(
                mode=self._settings.index_mode, model=None, pending=0, lag_seconds=None
            )
        now = self._now()
        waiting, oldest = await self._backend.pending_count(embedder.name, now)
        return IndexStatus(
            mode=self._settings.index_mode,
            model=embedder.name,
            pending=waiting,
            lag_seconds=None if oldest is None or waiting == 0 else max(0.0, now - oldest),
            indexing=running,
            parts=parts,
        )

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
            entries = [e for e in (_entry(r) for r in await self._resolve(rows)) if e is not None]
            texts = [e.text for e in entries if e.text is not None]
            if self._embedder is not None and texts:
                vectors = await self._embedder.embed(texts)
                entries = [
                    IndexEntry(e.namespace, e.key, e.version, e.text, v.tobytes(), model)
                    for e, v in zip(entries, vectors, strict=True)
                ]
            done += await self._backend.set_index(entries, self._now())
            scanned += len(rows)
            if progress is not None:
                progress(scanned, done, total)


def _entry(row: ItemRow) -> IndexEntry | None:
    text = searchable_text(row.text, orjson.loads(row.value))
    if text is None:
        return None
    return IndexEntry(row.namespace, row.key, row.version, text, None, None)
