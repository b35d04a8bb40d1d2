"""Retrieval evaluation on LoCoMo-format conversations (``hivemem eval locomo``).

LoCoMo (Maharana et al., "Evaluating Very Long-Term Conversational Memory of LLM
Agents", ACL 2024) holds long multi-session conversations between two speakers and
questions whose ``evidence`` names the dialog turns (``D<session>:<turn>``) that hold
the answer. Retrieval is measured without any language model:

- every dialog turn becomes one item in the namespace ``locomo/<sample_id>``, key =
  its dialog id, text ``"[<session date>] <speaker>: <text>"`` (plus
  ``" [shares <image caption>]"`` when the turn shared an image), metadata
  ``{"dia_id", "session", "turn"}``;
- every question with evidence inside its conversation is asked as a search query in
  that conversation's namespace;
- recall@k of a question is the share of its evidence ids found among the first k
  hits; recall@k of a category, or overall, is the mean over its questions.

Evidence ids are normalised first (the file has a few malformed ones): a field holding
several ids (``"D8:6; D9:17"``) is split, ``"D:11:26"`` becomes ``"D11:26"``, leading
zeros go (``"D30:05"`` -> ``"D30:5"``), and ids naming no turn of the conversation are
dropped; a question left with no evidence is not asked.

The data is not part of hivemem: LoCoMo's ``data/locomo10.json`` comes from
https://github.com/snap-research/locomo under CC BY-NC 4.0 (non-commercial). Without a
FILE argument, ``hivemem eval locomo`` reads the file that :func:`default_locomo_path`
names: the environment variable ``HIVEMEM_LOCOMO``, else ``../shared/data/locomo-dev.json``
relative to the root of the hivemem source checkout.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hivemem.errors import InvalidInput, Unavailable
from hivemem.hive import Hive
from hivemem.models import PutOp

__all__ = [
    "CATEGORIES",
    "LOCOMO_ENV",
    "LOCOMO_FALLBACK",
    "Conversation",
    "ModeResult",
    "Question",
    "Report",
    "Turn",
    "ask",
    "default_locomo_path",
    "evaluate",
    "load_locomo",
    "load_turns",
    "namespace_of",
    "normalise_evidence",
    "parse_locomo",
    "recall_at_k",
]

Mode = Literal["hybrid", "vector", "lexical"]

#: LoCoMo's question categories as they are usually read (the file only numbers them).
CATEGORIES: dict[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}

_DIA_ID = re.compile(r"D:?(\d+):(\d+)")
_SESSION_KEY = re.compile(r"session_(\d+)")
_SEGMENT_BAD = re.compile(r"[^A-Za-z0-9_.:@+\-]")


#: Longest :func:`store` waits for the turns' vectors (seconds).
_INDEX_WAIT_SECONDS = 3600


@dataclass(frozen=True)
class Turn:
    """One dialog turn: ``dia_id`` (e.g. ``D3:7``), its session number and date, the
    speaker, the text and the caption of an image it shared (or None)."""

    dia_id: str
    session: int
    turn: int
    date: str
    speaker: str
    text: str
    caption: str | None = None

    @property
    def memory_text(self) -> str:
        """What is indexed: ``"[<date>] <speaker>: <text>"`` and ``" [shares <caption>]"``."""
        shared = f" [shares {self.caption}]" if self.caption else ""
        return f"[{self.date}] {self.speaker}: {self.text}{shared}"

    @property
    def metadata(self) -> dict[str, Any]:
        """``{"dia_id": str, "session": int, "turn": int}``."""
        return {"dia_id": self.dia_id, "session": self.session, "turn": self.turn}


@dataclass(frozen=True)
class Question:
    """A question, its category (1-5) and its normalised evidence ids (never empty)."""

    question: str
    category: int
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Conversation:
    """One LoCoMo sample: its turns in order, the questions that can be asked, and how
    many questions were skipped because no evidence id named one of its turns."""

    sample_id: str
    turns: tuple[Turn, ...]
    questions: tuple[Question, ...]
    skipped: int = 0


def normalise_evidence(raw: Iterable[Any], known: Container[str]) -> list[str]:
    """The evidence ids of a question, normalised, without duplicates, in order.

    Each entry may hold several ids separated by ``;``, ``,`` or spaces; ``D:11:26``
    reads as ``D11:26`` and numbers lose leading zeros (``D30:05`` -> ``D30:5``). Ids
    that do not parse (``"D"``) or that are not in ``known`` are dropped.
    """
    found: list[str] = []
    for entry in raw:
        if not isinstance(entry, str):
            continue
        for part in re.split(r"[;,\s]+", entry):
            match = _DIA_ID.fullmatch(part.strip())
            if match is None:
                continue
            dia_id = f"D{int(match[1])}:{int(match[2])}"
            if dia_id in known and dia_id not in found:
                found.append(dia_id)
    return found


def _canonical_id(raw: str) -> str:
    match = _DIA_ID.fullmatch(raw.strip())
    return f"D{int(match[1])}:{int(match[2])}" if match else raw.strip()


def parse_locomo(data: Any) -> list[Conversation]:
    """Read LoCoMo-format data (the parsed JSON list) into conversations.

    Raises:
        InvalidInput: the data does not have LoCoMo's shape (field ``file``).
    """
    if not isinstance(data, list):
        raise InvalidInput("a LoCoMo file holds a JSON list of samples", field="file")
    conversations = []
    for n, sample in enumerate(data):
        try:
            conversations.append(_sample(sample))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(
                f"sample {n} is not in LoCoMo format: {exc!r}", field="file"
            ) from exc
    return conversations


def _sample(sample: Mapping[str, Any]) -> Conversation:
    conv = sample["conversation"]
    sessions = sorted(
        (int(m[1]), name)
        for name in conv
        if (m := _SESSION_KEY.fullmatch(name)) and isinstance(conv[name], list)
    )
    turns: list[Turn] = []
    seen: set[str] = set()
    for number, name in sessions:
        date = str(conv.get(f"{name}_date_time", ""))
        for raw in conv[name]:
            dia_id = _canonical_id(str(raw["dia_id"]))
            match = _DIA_ID.fullmatch(dia_id)
            if match is None or dia_id in seen:
                continue
            seen.add(dia_id)
            caption = raw.get("blip_caption")
            turns.append(
                Turn(
                    dia_id=dia_id,
                    session=number,
                    turn=int(match[2]),
                    date=date,
                    speaker=str(raw["speaker"]),
                    text=str(raw.get("text", "")),
                    caption=caption if isinstance(caption, str) and caption else None,
                )
            )
    questions = []
    skipped = 0
    for qa in sample.get("qa", []):
        evidence = normalise_evidence(qa.get("evidence") or [], seen)
        if not evidence:
            skipped += 1
            continue
        questions.append(Question(str(qa["question"]), int(qa["category"]), tuple(evidence)))
    return Conversation(str(sample["sample_id"]), tuple(turns), tuple(questions), skipped)


#: Environment variable naming the LoCoMo-format file read when no file is given.
LOCOMO_ENV = "HIVEMEM_LOCOMO"
#: Where that file is looked for last, relative to the root of the source checkout
#: (the directory holding ``pyproject.toml``): a shared data directory beside it.
LOCOMO_FALLBACK = Path("..", "shared", "data", "locomo-dev.json")


def default_locomo_path() -> Path:
    """The LoCoMo-format file to read when none is given (it may not exist).

    ``$HIVEMEM_LOCOMO`` if set, else :data:`LOCOMO_FALLBACK` relative to the root of the
    hivemem source checkout this module runs from.

    Raises:
        InvalidInput: neither applies (hivemem installed from a wheel and the variable
            unset), field ``file``.
    """
    named = os.environ.get(LOCOMO_ENV, "").strip()
    if named:
        return Path(named).expanduser()
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return Path(os.path.normpath(root / LOCOMO_FALLBACK))
    raise InvalidInput(
        f"no LoCoMo file given: pass FILE or set {LOCOMO_ENV} to the path of a LoCoMo-format "
        "file (data/locomo10.json of github.com/snap-research/locomo)",
        field="file",
    )


def load_locomo(path: str | Path) -> list[Conversation]:
    """Read a LoCoMo-format JSON file (see :func:`parse_locomo`).

    Raises:
        InvalidInput: unreadable file, not JSON, or not LoCoMo's shape (field ``file``).
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}", field="file") from exc
    return parse_locomo(data)


def namespace_of(sample_id: str) -> str:
    """The namespace of a conversation: ``locomo/<sample_id>`` (odd characters -> ``_``)."""
    return "locomo/" + (_SEGMENT_BAD.sub("_", sample_id)[:128] or "_")


def recall_at_k(ranked: Sequence[str], evidence: Sequence[str], k: int) -> float:
    """The share of ``evidence`` (distinct ids) among the first ``k`` of ``ranked``.

    Raises:
        ValueError: ``evidence`` is empty or ``k`` < 1.
    """
    wanted = set(evidence)
    if not wanted or k < 1:
        raise ValueError("recall needs evidence and k >= 1")
    return len(wanted & set(ranked[:k])) / len(wanted)


async def load_turns(
    hive: Hive,
    conversations: Sequence[Conversation],
    *,
    chunk: int = 64,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Store every turn as an item (see the module notes), ``chunk`` turns per batch,
    then wait until every turn's vector is stored (the indexer embeds them in batches
    after the writes), so that the questions rank every turn by meaning too.

    Args:
        progress: called with the number of turns just stored, after each batch.

    Returns:
        The number of items written.

    Raises:
        Unavailable: the vectors were not all stored within an hour.
    """
    written = 0
    for conv in conversations:
        ns = namespace_of(conv.sample_id)
        for start in range(0, len(conv.turns), chunk):
            part = conv.turns[start : start + chunk]
            await hive.batch(
                [
                    PutOp(
                        namespace=ns,
                        key=t.dia_id,
                        value=t.memory_text,
                        metadata=t.metadata,
                    )
                    for t in part
                ]
            )
            written += len(part)
            if progress is not None:
                progress(len(part))
    if not await hive.wait_indexed(timeout=_INDEX_WAIT_SECONDS):
        raise Unavailable(f"the turns' vectors were not stored within {_INDEX_WAIT_SECONDS} s")
    return written


@dataclass
class ModeResult:
    """The answers of one search mode: per question its category and recall@k for each
    k, and the latency of each search call in seconds (query embedding included)."""

    mode: str
    ks: tuple[int, ...]
    categories: list[int] = field(default_factory=list)
    recalls: dict[int, list[float]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def recall(self, k: int, category: int | None = None) -> float | None:
        """Mean recall@k over the questions (of ``category`` when given); None if none."""
        values = [
            r
            for c, r in zip(self.categories, self.recalls[k], strict=True)
            if category is None or c == category
        ]
        return sum(values) / len(values) if values else None

    def latency_ms(self, percentile: float) -> float:
        """A percentile (0-100) of the search latency in milliseconds (0 if no query)."""
        if not self.latencies:
            return 0.0
        return float(np.percentile(np.asarray(self.latencies), percentile) * 1000.0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: questions, recall per k (overall and per category name), p50/p99 ms."""
        present = sorted(set(self.categories))
        recall: dict[str, dict[str, float | None]] = {}
        for k in self.ks:
            row: dict[str, float | None] = {"overall": self.recall(k)}
            for c in present:
                row[CATEGORIES.get(c, str(c))] = self.recall(k, c)
            recall[str(k)] = row
        return {
            "questions": len(self.categories),
            "recall": recall,
            "query_ms": {"p50": self.latency_ms(50), "p99": self.latency_ms(99)},
        }


@dataclass
class Report:
    """Everything ``hivemem eval locomo`` prints."""

    conversations: int
    items: int
    questions_by_category: dict[int, int]
    skipped_questions: int
    load_seconds: float
    modes: dict[str, ModeResult]

    @property
    def items_per_second(self) -> float:
        return self.items / self.load_seconds if self.load_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document of the report."""
        return {
            "conversations": self.conversations,
            "items": self.items,
            "questions": sum(self.questions_by_category.values()),
            "questions_by_category": {
                CATEGORIES.get(c, str(c)): n for c, n in sorted(self.questions_by_category.items())
            },
            "skipped_questions": self.skipped_questions,
            "load_seconds": self.load_seconds,
            "items_per_second": self.items_per_second,
            "modes": {name: result.summary() for name, result in self.modes.items()},
        }


async def ask(
    hive: Hive,
    conversations: Sequence[Conversation],
    mode: Mode,
    ks: Sequence[int],
    *,
    progress: Callable[[int], None] | None = None,
) -> ModeResult:
    """Ask every question in its conversation's namespace with ``mode``, one search at a
    time (limit = the largest k), and score the hits.

    Args:
        progress: called with 1 after each question.
    """
    result = ModeResult(mode, tuple(ks), recalls={k: [] for k in ks})
    limit = max(ks)
    for conv in conversations:
        ns = namespace_of(conv.sample_id)
        for q in conv.questions:
            started = time.perf_counter()
            hits = await hive.search(ns, q.question, mode=mode, limit=limit)
            result.latencies.append(time.perf_counter() - started)
            ranked = [h.item.key for h in hits]
            result.categories.append(q.category)
            for k in ks:
                result.recalls[k].append(recall_at_k(ranked, q.evidence, k))
            if progress is not None:
                progress(1)
    return result


async def evaluate(
    hive: Hive,
    conversations: Sequence[Conversation],
    modes: Sequence[Mode],
    ks: Sequence[int],
    *,
    on_load: Callable[[int], None] | None = None,
    on_question: Callable[[int], None] | None = None,
) -> Report:
    """Load ``conversations`` into ``hive`` (which should be empty) and ask their
    questions with each of ``modes``; see the module notes for the measure."""
    started = time.perf_counter()
    items = await load_turns(hive, conversations, progress=on_load)
    load_seconds = time.perf_counter() - started
    results: dict[str, ModeResult] = {}
    for mode in modes:
        results[mode] = await ask(hive, conversations, mode, ks, progress=on_question)
    counts: dict[int, int] = {}
    for conv in conversations:
        for q in conv.questions:
            counts[q.category] = counts.get(q.category, 0) + 1
    return Report(
        conversations=len(conversations),
        items=items,
        questions_by_category=counts,
        skipped_questions=sum(c.skipped for c in conversations),
        load_seconds=load_seconds,
        modes=results,
    )
