"""An in-process BM25 index, kept coherent with the store through the feed.

Used for stores whose engine cannot rank text itself (Redis), and for SQLite when
``Settings.lexical_index`` is ``"memory"`` (the engine's FTS5 must rank every
document matching any query word; this index scores postings with numpy).

Tokens are those of SQLite FTS5's ``porter unicode61 remove_diacritics 2``
tokenizer, so both indexes agree on what a word is: runs of letters and digits
(``_`` and punctuation separate), case-folded, diacritics removed, then reduced
by the Porter stemmer (M. F. Porter, "An algorithm for suffix stripping", 1980;
the PyStemmer implementation) when 3 to 64 characters long, as FTS5 does.

Scores are Okapi BM25 exactly as FTS5 computes them (Robertson and Zaragoza, "The
Probabilistic Relevance Framework: BM25 and Beyond", 2009; constants from FTS5's
``bm25()``): for each query term t in document d,
``idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))`` with k1 = 1.2,
b = 0.75, ``idf(t) = ln((N - n_t + 0.5) / (n_t + 0.5))`` (1e-6 when not positive),
N the live documents and n_t those containing t; higher is better.

Layout: a vocabulary (term → id); per document its term ids and frequencies;
postings as one compressed-sparse-row block (documents grouped by term) built at
load, plus per-term lists for documents added since. A changed item gets a new
document id and its old one is marked dead; when dead and recent documents (or
their postings) outgrow a quarter of the block, the block is rebuilt (numpy, about
a third of a second per 100k documents on two cores).

Bounds: the vocabulary holds at most ``max_terms`` terms (the setting
``max_vocabulary_terms``); a term first seen when it is full is not indexed (its
documents are still counted in BM25's lengths; a warning is logged once). A
rebuild drops the terms no live document uses any more (when they are at least an
eighth of the vocabulary, or the vocabulary is full) and renumbers the rest, and
copies the live documents' term arrays afresh, so the memory of deleted texts is
returned. Core refuses a text with more than ``max_text_terms`` distinct terms
(:func:`check_terms`) before it is written. (PyStemmer's own word cache, shared by the
process, is bounded apart: 100,000 words, about 20 MB of random words at most.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import Stemmer  # type: ignore[import-not-found]

from hivemem.backends.base import Backend
from hivemem.config import Settings
from hivemem.core.mirror import FeedMirror, Key, Namespaces
from hivemem.errors import TooLarge

__all__ = ["LexicalIndex", "check_terms", "distinct_terms", "tokens"]

log = logging.getLogger("hivemem.lexical")

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STEMMER = Stemmer.Stemmer("porter")
_STEMMER.maxCacheSize = 100_000
_MIN_DOCS = 1024
#: Rebuild once dead and recent postings pass this many, even when documents are few
#: (a few very long texts).
_MIN_POSTINGS = 1 << 18
#: Words stemmed per step while counting distinct terms.
_COUNT_STEP = 4096
#: The attributes that make up an index's contents (taken over from a fresh build).
_STATE = (
    "_vocab",
    "_doc_of",
    "_keys",
    "_doc_terms",
    "_ns",
    "_ns_ids",
    "_lengths",
    "_alive",
    "_live",
    "_total_length",
    "_dead",
    "_offsets",
    "_docs",
    "_tf",
    "_recent_docs",
    "_recent_tf",
    "_recent",
    "_dead_postings",
    "_recent_postings",
)

Ints = npt.NDArray[np.int32]
Floats = npt.NDArray[np.float32]


def _fold(text: str) -> str:
    text = text.lower()
    if text.isascii():
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def tokens(text: str) -> list[str]:
    """The index terms of ``text``, in order, repeats kept (see the module notes)."""
    words: list[str] = _WORD.findall(_fold(text))
    stemmed: list[str] = _STEMMER.stemWords(words)
    # FTS5's porter tokenizer leaves words shorter than 3 or longer than 64 as they are.
    return [s if 3 <= len(w) <= 64 else w for w, s in zip(words, stemmed, strict=True)]


def distinct_terms(text: str, limit: int) -> int:
    """How many distinct index terms ``text`` has (see :func:`tokens`), counting no
    further than ``limit + 1``.

    Args:
        text: the text to be indexed.
        limit: the count that matters; anything above it is reported as ``limit + 1``.

    Returns:
        The number of distinct terms, or ``limit + 1`` when there are more than ``limit``.
    """
    words: set[str] = set()
    for piece in _pieces(text):  # short C calls, so a worker thread lets others run between
        words.update(_WORD.findall(_fold(piece)))
    if len(words) <= limit:  # a word has one term: no need to stop early
        return len(set(_terms(list(words))))
    seen: set[str] = set()
    unique = list(words)
    for start in range(0, len(unique), _COUNT_STEP):
        seen.update(_terms(unique[start : start + _COUNT_STEP]))
        if len(seen) > limit:
            return limit + 1
    return len(seen)


def _pieces(text: str, size: int = 16_384) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, at whitespace when there is
    some (a word is never split; without whitespace, a cut may split one word in two)."""
    pieces = []
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        end = cut if cut > start else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def check_terms(text: str, limit: int, field: str) -> str:
    """Refuse a text to be indexed that has more than ``limit`` distinct index terms.

    Args:
        text: the text search would index.
        limit: the most distinct terms accepted (the setting ``max_text_terms``).
        field: the input's name, for the error (``text``, or ``value`` when the text is
            taken from the value).

    Returns:
        ``text``.

    Raises:
        TooLarge: the text has more than ``limit`` distinct terms (field ``field``).
    """
    # An ASCII text of c characters has at most (c + 1) // 2 words: no need to count.
    if text.isascii() and (len(text) + 1) // 2 <= limit:
        return text
    if distinct_terms(text, limit) > limit:
        raise TooLarge(
            f"{field} has more than {limit} distinct search terms (the setting max_text_terms)",
            field=field,
        )
    return text


def _terms(words: list[str]) -> list[str]:
    stemmed: list[str] = _STEMMER.stemWords(words)
    return [s if 3 <= len(w) <= 64 else w for w, s in zip(words, stemmed, strict=True)]


class LexicalIndex(FeedMirror):
    """BM25 over the index texts of every searchable item of a store.

    Args:
        backend: the store's backend (its :meth:`~hivemem.backends.base.Backend.load_texts`
            and :meth:`~hivemem.backends.base.Backend.texts_of` feed this index).
        poll_seconds: catch up at least this often even without a change signal.
        max_terms: the most distinct terms the vocabulary holds (default: the setting
            ``max_vocabulary_terms``); terms first seen beyond it are not indexed.

    Raises:
        ValueError: ``max_terms`` is not positive.
    """

    k1 = 1.2
    b = 0.75
    #: Rebuild the postings block when dead plus recent documents exceed this share of it.
    rebuild_share = 0.25
    #: A rebuild drops dead terms when they are at least this share of the vocabulary.
    compact_share = 0.125

    def __init__(self, backend: Backend, poll_seconds: float, max_terms: int | None = None) -> None:
        super().__init__(backend, poll_seconds)
        if max_terms is None:
            max_terms = Settings.model_fields["max_vocabulary_terms"].default
        if max_terms <= 0:
            raise ValueError("max_terms must be positive")
        self.max_terms: int = max_terms
        self._stopping = threading.Event()
        self._full_warned = False
        self._clear()

    def _clear(self) -> None:
        self._vocab: dict[str, int] = {}
        self._doc_of: dict[Key, int] = {}
        self._keys: list[Key | None] = []
        self._doc_terms: list[tuple[Ints, Floats] | None] = []
        self._ns = Namespaces()
        self._ns_ids: Ints = np.zeros(_MIN_DOCS, dtype=np.int32)
        self._lengths: Floats = np.zeros(_MIN_DOCS, dtype=np.float32)
        self._alive: npt.NDArray[np.bool_] = np.zeros(_MIN_DOCS, dtype=bool)
        self._live = 0
        self._total_length = 0.0
        self._dead = 0
        # Postings block: documents of term t are _docs[_offsets[t]:_offsets[t + 1]].
        self._offsets: npt.NDArray[np.int64] = np.zeros(1, dtype=np.int64)
        self._docs: Ints = np.zeros(0, dtype=np.int32)
        self._tf: Floats = np.zeros(0, dtype=np.float32)
        # Documents added since the block was built, per term.
        self._recent_docs: dict[int, list[int]] = {}
        self._recent_tf: dict[int, list[float]] = {}
        self._recent = 0
        # Postings of dead documents and of recent ones, since the block was built.
        self._dead_postings = 0
        self._recent_postings = 0

    def __len__(self) -> int:
        return self._live

    # Coherence with the store ------------------------------------------------------------

    async def _load_all(self) -> None:
        rows = await self.backend.load_texts()
        # Tokenizing a large store takes seconds: build a fresh index in a worker thread
        # (nothing else touches it) and take its state over on the event loop, so a search
        # running meanwhile sees the old state or the new one, never half of each.
        fresh = await asyncio.to_thread(self._built, rows)
        for name in _STATE:
            setattr(self, name, getattr(fresh, name))

    @property
    def loaded(self) -> bool:
        """Whether the index has been loaded from the store (it may lag by one catch-up)."""
        return self._cursor is not None

    def stop(self) -> None:
        """Make a load running in a worker thread give up (the hive is closing)."""
        self._stopping.set()

    def _built(self, rows: Sequence[tuple[str, str, str]]) -> LexicalIndex:
        fresh = LexicalIndex(self.backend, self.poll_seconds, self.max_terms)
        fresh._stopping = self._stopping
        fresh._bulk(rows)
        return fresh

    def _bulk(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Index every (namespace, key, text) of an empty index at once."""
        vocab = self._vocab
        flat_terms: list[int] = []
        flat_tf: list[int] = []
        bounds = [0]
        lengths: list[int] = []
        ns_ids: list[int] = []
        for i, (ns, _, text) in enumerate(rows):
            if i % 1000 == 0 and self._stopping.is_set():
                raise asyncio.CancelledError("the hive closed while its BM25 index loaded")
            words = tokens(text)
            counts = Counter(words)
            if len(vocab) + len(counts) <= self.max_terms:  # every new term fits
                flat_terms.extend([vocab.setdefault(t, len(vocab)) for t in counts])
                flat_tf.extend(counts.values())
            else:
                ids, freqs = self._term_ids(counts)
                flat_terms.extend(ids)
                flat_tf.extend(freqs)
            bounds.append(len(flat_terms))
            lengths.append(len(words))
            ns_ids.append(self._ns.id_of(ns))
        terms = np.asarray(flat_terms, dtype=np.int32)
        tf = np.asarray(flat_tf, dtype=np.float32)
        n = len(rows)
        self._keys = [(ns, key) for ns, key, _ in rows]
        self._doc_of = {key: i for i, key in enumerate(self._keys) if key is not None}
        if len(self._doc_of) != n:  # a key twice: keep its last text
            self._clear()
            for ns, key, text in rows:
                self.set((ns, key), text)
            self._rebuild()
            return
        self._doc_terms = [
            (terms[bounds[i] : bounds[i + 1]], tf[bounds[i] : bounds[i + 1]]) for i in range(n)
        ]
        self._grow(max(_MIN_DOCS, n))
        self._ns_ids[:n] = ns_ids
        self._lengths[:n] = lengths
        self._alive[:n] = True
        self._live = n
        self._total_length = float(sum(lengths))
        self._rebuild()

    async def _apply(self, changed: list[Key]) -> None:
        found = await self.backend.texts_of(changed)
        for key in changed:
            text = found.get(key)
            if text is None:
                self.remove(key)
            else:
                self.set(key, text)

    def _synced(self) -> None:
        if self._dead + self._recent > max(
            _MIN_DOCS, self.rebuild_share * len(self._docs)
        ) or self._dead_postings + self._recent_postings > max(
            _MIN_POSTINGS, self.rebuild_share * len(self._docs)
        ):
            self._rebuild()

    def _term_ids(self, counts: Counter[str]) -> tuple[list[int], list[int]]:
        """The ids and frequencies of the terms of ``counts``, giving new terms ids while
        the vocabulary has room; terms that find it full are left out."""
        vocab = self._vocab
        ids: list[int] = []
        freqs: list[int] = []
        for term, f in counts.items():
            tid = vocab.get(term)
            if tid is None:
                if len(vocab) >= self.max_terms:
                    if not self._full_warned:
                        self._full_warned = True
                        log.warning(
                            "the in-process BM25 vocabulary is full (%d terms, the setting "
                            "max_vocabulary_terms): new terms are not indexed until deleted "
                            "texts free room",
                            self.max_terms,
                        )
                    continue
                tid = vocab[term] = len(vocab)
            ids.append(tid)
            freqs.append(f)
        return ids, freqs

    def set(self, key: Key, text: str) -> None:
        """Index ``text`` as the document of ``key`` (replacing its previous text).

        Terms first seen while the vocabulary holds ``max_terms`` terms are not indexed
        (the document's length still counts them)."""
        self.remove(key)
        counts = Counter(tokens(text))
        vocab = self._vocab
        if len(vocab) + len(counts) <= self.max_terms:  # every new term fits
            term_ids = np.fromiter(
                (vocab.setdefault(t, len(vocab)) for t in counts),
                dtype=np.int32,
                count=len(counts),
            )
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        else:
            ids, freqs = self._term_ids(counts)
            term_ids = np.asarray(ids, dtype=np.int32)
            tf = np.asarray(freqs, dtype=np.float32)
        doc = len(self._keys)
        if doc == len(self._alive):
            self._grow(2 * doc)
        self._keys.append(key)
        self._doc_terms.append((term_ids, tf))
        self._doc_of[key] = doc
        self._ns_ids[doc] = self._ns.id_of(key[0])
        length = float(sum(counts.values()))
        self._lengths[doc] = length
        self._alive[doc] = True
        self._live += 1
        self._total_length += length
        for t, f in zip(term_ids.tolist(), tf.tolist(), strict=True):
            self._recent_docs.setdefault(t, []).append(doc)
            self._recent_tf.setdefault(t, []).append(f)
        self._recent += 1
        self._recent_postings += len(term_ids)

    def remove(self, key: Key) -> None:
        """Forget the document of ``key`` (nothing if absent)."""
        doc = self._doc_of.pop(key, None)
        if doc is None:
            return
        self._alive[doc] = False
        self._keys[doc] = None
        terms = self._doc_terms[doc]
        if terms is not None:
            self._dead_postings += len(terms[0])
        self._doc_terms[doc] = None
        self._live -= 1
        self._total_length -= float(self._lengths[doc])
        self._dead += 1

    def _grow(self, size: int) -> None:
        n = min(len(self._keys), len(self._alive))
        self._ns_ids = np.concatenate([self._ns_ids[:n], np.zeros(size - n, dtype=np.int32)])
        self._lengths = np.concatenate([self._lengths[:n], np.zeros(size - n, dtype=np.float32)])
        self._alive = np.concatenate([self._alive[:n], np.zeros(size - n, dtype=bool)])

    def _rebuild(self) -> None:
        """Renumber the live documents 0..n-1, rebuild the postings block, copy the live
        documents' term arrays into one fresh block (so deleted texts' memory is freed),
        and drop the terms no live document uses when they are many (see the module
        notes)."""
        live = [d for d, terms in enumerate(self._doc_terms) if terms is not None]
        keys = [self._keys[d] for d in live]
        doc_terms = [t for t in self._doc_terms if t is not None]
        n = len(live)
        index = np.asarray(live, dtype=np.int64)
        size = max(_MIN_DOCS, n)
        ns_ids = np.zeros(size, dtype=np.int32)
        lengths = np.zeros(size, dtype=np.float32)
        alive = np.zeros(size, dtype=bool)
        if n:
            ns_ids[:n] = self._ns_ids[index]
            lengths[:n] = self._lengths[index]
            alive[:n] = True
        counts = np.fromiter((len(t) for t, _ in doc_terms), dtype=np.int64, count=n)
        all_terms = np.concatenate([t for t, _ in doc_terms]) if n else np.zeros(0, dtype=np.int32)
        all_tf = np.concatenate([f for _, f in doc_terms]) if n else np.zeros(0, dtype=np.float32)
        del doc_terms
        vocab = self._vocab
        per_term = np.bincount(all_terms, minlength=len(vocab))
        used = per_term > 0
        n_used = int(np.count_nonzero(used))
        dead_terms = len(vocab) - n_used
        if dead_terms and (
            dead_terms >= self.compact_share * len(vocab) or len(vocab) >= self.max_terms
        ):
            # Renumber the used terms 0..n_used-1 in their old order.
            remap = (np.cumsum(used, dtype=np.int64) - 1).astype(np.int32)
            all_terms = remap[all_terms]
            per_term = per_term[used]
            keep = used.tolist()
            new_ids = remap.tolist()
            vocab = {t: new_ids[i] for t, i in vocab.items() if keep[i]}
            if len(vocab) < self.max_terms:
                self._full_warned = False
        all_docs = np.repeat(np.arange(n, dtype=np.int32), counts)
        order = np.argsort(all_terms, kind="stable")
        offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(per_term, out=offsets[1:])
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        cuts = bounds.tolist()
        self._vocab = vocab
        self._docs = all_docs[order]
        self._tf = all_tf[order]
        self._offsets = offsets
        self._keys = list(keys)
        self._doc_terms = list[tuple[Ints, Floats] | None](
            (all_terms[cuts[i] : cuts[i + 1]], all_tf[cuts[i] : cuts[i + 1]]) for i in range(n)
        )
        self._doc_of = {key: i for i, key in enumerate(keys) if key is not None}
        self._ns_ids, self._lengths, self._alive = ns_ids, lengths, alive
        self._recent_docs, self._recent_tf = {}, {}
        self._recent = self._dead = 0
        self._recent_postings = self._dead_postings = 0

    # Search -------------------------------------------------------------------------------

    def search(
        self,
        words: Sequence[str],
        prefix: str,
        allowed: Iterable[Key] | None,
        k: int,
    ) -> list[tuple[Key, float]]:
        """The ``k`` best BM25 matches of ``words`` at or under ``prefix`` (and in
        ``allowed`` when given): ((namespace, key), score), best first.

        ``words`` are query words; each is tokenized like the documents and each
        resulting term counts once.
        """
        if self._live == 0 or k <= 0:
            return []
        terms: dict[int, None] = {}
        for word in words:
            for term in tokens(word):
                tid = self._vocab.get(term)
                if tid is not None:
                    terms[tid] = None
        if not terms:
            return []
        n_docs = len(self._keys)
        scores = np.zeros(n_docs, dtype=np.float32)
        hit = np.zeros(n_docs, dtype=bool)
        live, avgdl = self._live, self._total_length / self._live
        k1, b = self.k1, self.b
        for tid in terms:
            docs, tf = self._postings(tid)
            if len(docs) == 0:
                continue
            keep = self._alive[docs]
            docs, tf = docs[keep], tf[keep]
            df = len(docs)
            if df == 0:
                continue
            idf = math.log((live - df + 0.5) / (df + 0.5))
            if idf <= 0.0:
                idf = 1e-6
            norm = k1 * (1.0 - b + b * self._lengths[docs] / avgdl)
            scores[docs] += idf * tf * (k1 + 1.0) / (tf + norm)
            hit[docs] = True
        mask = self._scope(prefix, allowed, n_docs)
        if mask is not None:
            hit &= mask
        found = np.flatnonzero(hit)
        if len(found) == 0:
            return []
        found_scores = scores[found]
        if len(found) > k:
            part = np.argpartition(-found_scores, k - 1)[:k]
            found, found_scores = found[part], found_scores[part]
        order = np.lexsort((found, -found_scores))
        hits: list[tuple[Key, float]] = []
        for i in order.tolist():
            key = self._keys[int(found[i])]
            if key is not None:
                hits.append((key, float(found_scores[i])))
        return hits

    def _postings(self, tid: int) -> tuple[Ints, Floats]:
        if tid + 1 < len(self._offsets):
            lo, hi = int(self._offsets[tid]), int(self._offsets[tid + 1])
            docs, tf = self._docs[lo:hi], self._tf[lo:hi]
        else:
            docs, tf = self._docs[:0], self._tf[:0]
        recent = self._recent_docs.get(tid)
        if recent:
            docs = np.concatenate([docs, np.asarray(recent, dtype=np.int32)])
            tf = np.concatenate([tf, np.asarray(self._recent_tf[tid], dtype=np.float32)])
        return docs, tf

    def _scope(
        self, prefix: str, allowed: Iterable[Key] | None, n: int
    ) -> npt.NDArray[np.bool_] | None:
        mask = self._ns.mask(prefix, self._ns_ids[:n])
        if allowed is not None:
            keep = np.zeros(n, dtype=bool)
            docs = [d for d in map(self._doc_of.get, allowed) if d is not None]
            keep[np.asarray(docs, dtype=np.int64)] = True
            mask = keep if mask is None else mask & keep
        return mask

    def memory_bytes(self) -> int:
        """Estimated memory (bytes): the numpy arrays exactly, plus about 100 bytes per
        vocabulary term, 150 per key and 8 per posting of each document's term list and
        of the recent postings (Python objects, estimated)."""
        arrays = (
            self._ns_ids.nbytes
            + self._lengths.nbytes
            + self._alive.nbytes
            + self._offsets.nbytes
            + self._docs.nbytes
            + self._tf.nbytes
        )
        terms = sum(t[0].nbytes + t[1].nbytes for t in self._doc_terms if t is not None)
        objects = 100 * len(self._vocab) + 150 * len(self._keys) + 16 * self._recent_postings
        return arrays + terms + objects

    def stats(self) -> dict[str, Any]:
        """Sizes, for diagnostics: live and dead documents, terms, postings."""
        return {
            "documents": self._live,
            "dead": self._dead,
            "recent": self._recent,
            "terms": len(self._vocab),
            "max_terms": self.max_terms,
            "postings": len(self._docs),
            "dead_postings": self._dead_postings,
        }
