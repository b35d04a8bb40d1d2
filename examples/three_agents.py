#!/usr/bin/env python3
"""Three agents in three processes share memory through one hivemem service.

The script starts ``hivemem serve`` on a free loopback port with a SQLite store
in a temporary directory, then three agent processes that know nothing of each
other except the service URL:

* the **orchestrator** writes the plan (create-only, ``if_version=0``), listens
  on the channel ``handoff/orchestrator``, reads each finding it is pointed to,
  keeps its own conversation log as a session, and prints the report;
* the **data specialist** waits for the plan, then replays each LoCoMo
  conversation: one hivemem session per LoCoMo session, one item per dialog
  turn in ``locomo/<sample_id>/turns`` (written with ``batch``), and one summary
  item per session in ``locomo/<sample_id>/sessions``;
* the **researcher** follows the change feed under ``locomo``; for each session
  summary it reads the session's messages, derives a finding by plain counting
  (the most frequent capitalised words per speaker), stores it in
  ``findings/<sample_id>`` and publishes a pointer to it on
  ``handoff/orchestrator``.

All three bump one shared progress counter with compare-and-set retries, so
concurrent writers collide and retry on ``Conflict``; the orchestrator checks
at the end that no increment was lost.

Usage::

    python examples/three_agents.py                      # the bundled sample
    python examples/three_agents.py /path/to/locomo.json --max-conversations 2

The exit status is 0 when every agent finished and every check passed, 1 when
an agent failed or the run timed out, 2 for a bad input file or arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import hivemem
from hivemem import Conflict, Event, Item, MessageIn, PutOp, Session, SyncHive

SAMPLE = Path(__file__).resolve().parent / "sample_conversation.json"

ORCHESTRATOR = "orchestrator"
DATA_SPECIALIST = "data-specialist"
RESEARCHER = "researcher"
AGENTS = (ORCHESTRATOR, DATA_SPECIALIST, RESEARCHER)

PLAN_NS, PLAN_KEY = "plans", "locomo"
PROGRESS_NS, PROGRESS_KEY = "progress", "locomo"
HANDOFF = "handoff/orchestrator"
LOG_APP = "orchestration"
LOG_SESSION = "orchestrator-log"

#: Items per batch() call; the service accepts at most 100 operations per batch.
BATCH_OPS = 50
#: Messages per append_messages() call.
MESSAGE_CHUNK = 50
#: Terms shown per speaker in the report.
TOP_TERMS = 5

_SEGMENT = re.compile(r"^[A-Za-z0-9.:@+-][A-Za-z0-9_.:@+-]{0,127}$")
_SESSION_LIST = re.compile(r"^session_(\d+)$")


class InputError(Exception):
    """Raised when the input file is not a LoCoMo-format list of conversations."""


class CheckFailed(Exception):
    """Raised by an agent when what it reads back is not what the plan promised."""


# Input -------------------------------------------------------------------------


def load_conversations(path: Path) -> list[dict[str, Any]]:
    """Read and check a LoCoMo-format file.

    Args:
        path: a JSON file holding a list of ``{sample_id, conversation, qa}``.

    Returns:
        The list as decoded from JSON.

    Raises:
        InputError: the file is missing, not JSON, or not of that shape.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of conversations")
    seen: set[str] = set()
    for i, sample in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversation"), dict):
            raise InputError(f"{where}: expected an object with a 'conversation' object")
        sample_id = sample.get("sample_id")
        if not isinstance(sample_id, str) or not _SEGMENT.match(sample_id):
            raise InputError(f"{where}: sample_id {sample_id!r} is not a usable identifier")
        if sample_id in seen:
            raise InputError(f"{where}: duplicate sample_id {sample_id!r}")
        seen.add(sample_id)
        conversation = sample["conversation"]
        for side in ("speaker_a", "speaker_b"):
            if not isinstance(conversation.get(side), str):
                raise InputError(f"{where}: conversation.{side} must be a string")
        for number in session_numbers(conversation):
            for j, turn in enumerate(conversation[f"session_{number}"]):
                ok = isinstance(turn, dict) and all(
                    isinstance(turn.get(f), str) for f in ("speaker", "dia_id", "text")
                )
                if not ok or "/" in turn["dia_id"] or not turn["dia_id"]:
                    raise InputError(f"{where}: session_{number}[{j}] is not a valid turn")
    return data


def session_numbers(conversation: dict[str, Any]) -> list[int]:
    """Numbers N of the non-empty ``session_N`` turn lists, ascending."""
    numbers = []
    for name, turns in conversation.items():
        match = _SESSION_LIST.match(name)
        if match and isinstance(turns, list) and turns:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def build_plan(
    samples: list[dict[str, Any]],
    source: Path,
    *,
    max_conversations: int | None,
    max_sessions: int | None,
) -> dict[str, Any]:
    """The work the orchestrator hands out: which sessions of which conversations.

    Returns:
        ``{"input", "conversations": [{"sample_id", "speakers", "sessions", "turns"}],
        "totals": {"conversations", "sessions", "turns"}}``.
    """
    conversations = []
    for sample in samples[:max_conversations]:
        conversation = sample["conversation"]
        numbers = session_numbers(conversation)[:max_sessions]
        turns = sum(len(conversation[f"session_{n}"]) for n in numbers)
        conversations.append(
            {
                "sample_id": sample["sample_id"],
                "speakers": [conversation["speaker_a"], conversation["speaker_b"]],
                "sessions": numbers,
                "turns": turns,
            }
        )
    return {
        "input": str(source),
        "conversations": conversations,
        "totals": {
            "conversations": len(conversations),
            "sessions": sum(len(c["sessions"]) for c in conversations),
            "turns": sum(c["turns"] for c in conversations),
        },
    }


# Findings ----------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
# Sentence-like boundaries: end punctuation, line breaks, dashes and emoji, after
# which a capital says nothing about a name.
_SENTENCE_END = re.compile(
    r"(?<=[.!?:;)\u2026])\s+|\n+|\s[-\u2013\u2014]\s|[\U0001F000-\U0001FFFF\u2600-\u27BF]+"
)
_FUNCTION_WORDS = set(
    "i i'm i've i'll i'd it it'll that this these those the a an and but or so my your our "
    "their his her its we you he she they me us them what when where who why how is was "
    "just even also always really very oh well yes no hey hi wow thanks please not".split()
)


def capitalised_terms(texts: dict[str, list[str]], exclude: set[str]) -> dict[str, Counter[str]]:
    """Count, per speaker, the capitalised words that look like names.

    A word counts when it starts with a capital, is not in a short list of
    function words (``I``, ``It``, ``The`` ...) nor in ``exclude``, and appears
    capitalised somewhere in the session other than the start of a sentence
    (so "Hey" or "Thanks" opening a sentence do not count, while "Lisbon" does
    wherever it stands).

    Args:
        texts: speaker -> the speaker's turns in one session.
        exclude: words to leave out (the speakers' own names).

    Returns:
        speaker -> (word -> occurrences).
    """
    occurrences: dict[str, list[str]] = {speaker: [] for speaker in texts}
    mid_sentence: set[str] = set()
    for speaker, said in texts.items():
        for text in said:
            for sentence in _SENTENCE_END.split(text):
                for position, raw in enumerate(_WORD.findall(sentence)):
                    word = raw.replace("\u2019", "'").rstrip("'-")
                    if word.endswith("'s"):
                        word = word[:-2]
                    if len(word) < 2 or not word[0].isupper():
                        continue
                    if word.lower() in _FUNCTION_WORDS or word in exclude:
                        continue
                    occurrences[speaker].append(word)
                    if position > 0:
                        mid_sentence.add(word)
    return {
        speaker: Counter(w for w in words if w in mid_sentence)
        for speaker, words in occurrences.items()
    }


def top_terms(counts: dict[str, int], n: int = TOP_TERMS) -> list[tuple[str, int]]:
    """The ``n`` most frequent terms, ties broken alphabetically."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def format_terms(terms: list[tuple[str, int]] | list[list[Any]]) -> str:
    """``Lisbon x3, Rui x2`` (or ``-`` when empty)."""
    return ", ".join(f"{t} x{c}" for t, c in terms) or "-"


# Shared helpers (used by the agents) ---------------------------------------------


def log(agent: str, message: str) -> None:
    """Print one line prefixed by the agent's name."""
    print(f"[{agent}] {message}", flush=True)


def bump_progress(hive: SyncHive, deltas: dict[str, int]) -> int:
    """Add ``deltas`` to the shared progress counter with compare-and-set.

    Read the item, compute the new value, write it with ``if_version`` = the
    version read (0 when absent); on ``Conflict`` another agent wrote in
    between, so read again and retry.

    Returns:
        How many conflicts were retried.

    Raises:
        CheckFailed: still conflicting after 200 attempts.
    """
    conflicts = 0
    for _ in range(200):
        item = hive.get(PROGRESS_NS, PROGRESS_KEY)
        value: dict[str, int] = dict(item.value) if item else {}
        for field, delta in deltas.items():
            value[field] = value.get(field, 0) + delta
        try:
            hive.put(PROGRESS_NS, PROGRESS_KEY, value, if_version=item.version if item else 0)
            return conflicts
        except Conflict:
            conflicts += 1
            time.sleep(random.uniform(0.0, 0.005 * min(conflicts, 10)))
    raise CheckFailed("progress counter: still conflicting after 200 attempts")


@contextlib.contextmanager
def watching(hive: SyncHive, prefix: str, *, after: str | None) -> Iterator[Iterator[Event]]:
    """``hive.watch(prefix, after=after)``, closed (ending the subscription) on exit."""
    events = hive.watch(prefix, after=after)
    try:
        yield events
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def wait_for_item(hive: SyncHive, namespace: str, key: str) -> Item:
    """Return the item at (namespace, key), waiting on the feed until it is written.

    The feed head is taken before the first read, so a write that lands between
    the read and the watch is replayed rather than missed.
    """
    cursor = hive.head()
    item = hive.get(namespace, key)
    if item is not None:
        return item
    with watching(hive, namespace, after=cursor) as events:
        for event in events:
            if event.type == "item.put" and event.namespace == namespace and event.key == key:
                break
    item = hive.get(namespace, key)
    if item is None:
        raise CheckFailed(f"{namespace}/{key} was announced on the feed but cannot be read")
    return item


def all_items(hive: SyncHive, prefix: str) -> Iterator[Item]:
    """Every live item at or under ``prefix``, following ``next_cursor``."""
    cursor: str | None = None
    while True:
        page = hive.list(prefix, limit=1000, cursor=cursor)
        yield from page.items
        cursor = page.next_cursor
        if cursor is None:
            return


def all_sessions(hive: SyncHive, **filters: str) -> Iterator[Session]:
    """Every session matching ``filters`` (app, user, agent), following ``next_cursor``."""
    cursor: str | None = None
    while True:
        page = hive.list_sessions(limit=1000, cursor=cursor, **filters)
        yield from page.items
        cursor = page.next_cursor
        if cursor is None:
            return


def all_namespaces(hive: SyncHive, prefix: str, max_depth: int | None = None) -> list[str]:
    """Every namespace holding items at or under ``prefix`` (truncated to ``max_depth``)."""
    names: list[str] = []
    cursor: str | None = None
    while True:
        page = hive.list_namespaces(prefix, max_depth=max_depth, limit=1000, cursor=cursor)
        names.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return names


def count_events(hive: SyncHive) -> Counter[str]:
    """Events now in the feed, by type (the feed has no last page: stop at an empty one)."""
    counts: Counter[str] = Counter()
    cursor = "0"
    while True:
        page = hive.read_events("", after=cursor, limit=1000)
        if not page.items:
            return counts
        counts.update(event.type for event in page.items)
        cursor = page.next_cursor or page.items[-1].cursor


# The data specialist -------------------------------------------------------------


def data_specialist(url: str, source: str) -> None:
    """Replay the planned sessions of each conversation into the hive.

    For each LoCoMo session: create a hivemem session (app ``locomo``, user =
    sample_id), append its turns as messages (speaker_a -> ``user``, speaker_b
    -> ``assistant``, speaker in metadata), write one item per turn with
    ``batch`` and, last, the session summary the researcher waits for.
    """
    with hivemem.connect_sync(url, agent=DATA_SPECIALIST) as hive:
        hive.publish(HANDOFF, {"kind": "ready", "agent": DATA_SPECIALIST})
        plan = wait_for_item(hive, PLAN_NS, PLAN_KEY).value
        samples = {s["sample_id"]: s for s in load_conversations(Path(source))}
        log(DATA_SPECIALIST, f"plan received: {plan['totals']}")
        started = time.perf_counter()
        batches = messages = turn_items = summaries = conflicts = 0
        for planned in plan["conversations"]:
            sample_id = planned["sample_id"]
            conversation = samples[sample_id]["conversation"]
            speaker_a = conversation["speaker_a"]
            for number in planned["sessions"]:
                turns = conversation[f"session_{number}"]
                date = str(conversation.get(f"session_{number}_date_time", ""))
                session = hive.create_session(
                    app="locomo",
                    user=sample_id,
                    agent=DATA_SPECIALIST,
                    session_id=f"locomo-{sample_id}-session-{number}",
                    metadata={"sample_id": sample_id, "session": number, "date": date},
                )
                for i in range(0, len(turns), MESSAGE_CHUNK):
                    chunk = turns[i : i + MESSAGE_CHUNK]
                    stored = hive.append_messages(
                        session.id,
                        [
                            MessageIn(
                                role="user" if t["speaker"] == speaker_a else "assistant",
                                content=t["text"],
                                metadata={"speaker": t["speaker"], "dia_id": t["dia_id"]},
                            )
                            for t in chunk
                        ],
                    )
                    messages += len(stored)
                ops = [
                    PutOp(
                        namespace=f"locomo/{sample_id}/turns",
                        key=t["dia_id"],
                        value={"speaker": t["speaker"], "text": t["text"], "date": date},
                        text=f"[{date}] {t['speaker']}: {t['text']}",
                        metadata={"session": number, "dia_id": t["dia_id"]},
                    )
                    for t in turns
                ]
                for i in range(0, len(ops), BATCH_OPS):
                    turn_items += len(hive.batch(ops[i : i + BATCH_OPS]))
                    batches += 1
                speakers = Counter(t["speaker"] for t in turns)
                hive.put(
                    f"locomo/{sample_id}/sessions",
                    f"session_{number}",
                    {
                        "sample_id": sample_id,
                        "session": number,
                        "session_id": session.id,
                        "date": date,
                        "turns": len(turns),
                        "speakers": dict(speakers),
                        "first_dia_id": turns[0]["dia_id"],
                        "last_dia_id": turns[-1]["dia_id"],
                        "written_at": time.time(),
                    },
                    text=f"Session {number} of {sample_id} on {date}: {len(turns)} turns "
                    f"between {' and '.join(speakers)}",
                    metadata={"session": number},
                )
                summaries += 1
                conflicts += bump_progress(hive, {"sessions_loaded": 1})
        elapsed = time.perf_counter() - started
        stats = {
            "sessions": summaries,
            "messages": messages,
            "turn_items": turn_items,
            "summary_items": summaries,
            "batches": batches,
            "conflicts_retried": conflicts,
            "elapsed_s": elapsed,
        }
        log(
            DATA_SPECIALIST,
            f"replayed {summaries} sessions: {turn_items} turn items in {batches} batches, "
            f"{messages} messages, {elapsed:.2f} s",
        )
        hive.put(f"agents/{DATA_SPECIALIST}", "stats", stats)
        hive.publish(HANDOFF, {"kind": "done", "agent": DATA_SPECIALIST, "stats": "agents"})


# The researcher ------------------------------------------------------------------


def researcher(url: str) -> None:
    """Turn each finished session summary into a finding and hand it to the orchestrator."""
    with hivemem.connect_sync(url, agent=RESEARCHER) as hive:
        hive.publish(HANDOFF, {"kind": "ready", "agent": RESEARCHER})
        plan = wait_for_item(hive, PLAN_NS, PLAN_KEY).value
        planned = {c["sample_id"]: c for c in plan["conversations"]}
        expected = plan["totals"]["sessions"]
        log(RESEARCHER, f"watching 'locomo' for {expected} session summaries")
        done: set[tuple[str, str]] = set()
        messages_read = conflicts = 0
        started: float | None = None
        # after="0" replays the feed from its start, so summaries written before
        # this agent got here are seen too.
        with watching(hive, "locomo", after="0") as events:
            for event in events:
                parts = event.namespace.split("/")
                if event.type != "item.put" or len(parts) != 3 or parts[2] != "sessions":
                    continue
                sample_id, key = parts[1], event.key or ""
                if sample_id not in planned or (sample_id, key) in done:
                    continue
                started = started or time.perf_counter()
                summary = hive.get(event.namespace, key)
                if summary is None:
                    raise CheckFailed(f"summary {event.namespace}/{key} vanished")
                finding, read = derive_finding(hive, summary, planned[sample_id]["speakers"])
                messages_read += read
                stored = hive.put(
                    f"findings/{sample_id}",
                    key,
                    finding,
                    text=finding["summary"],
                    metadata={"session": finding["session"]},
                )
                conflicts += bump_progress(hive, {"findings": 1})
                hive.publish(
                    HANDOFF,
                    {
                        "kind": "finding",
                        "sample_id": sample_id,
                        "namespace": stored.namespace,
                        "key": stored.key,
                        "version": stored.version,
                        "summary_written_at": summary.value["written_at"],
                    },
                )
                done.add((sample_id, key))
                if len(done) == expected:
                    break
        elapsed = time.perf_counter() - (started or time.perf_counter())
        log(RESEARCHER, f"handed off {len(done)} findings from {messages_read} messages")
        hive.put(
            f"agents/{RESEARCHER}",
            "stats",
            {
                "findings": len(done),
                "messages_read": messages_read,
                "conflicts_retried": conflicts,
                "elapsed_s": elapsed,
            },
        )
        hive.publish(HANDOFF, {"kind": "done", "agent": RESEARCHER, "stats": "agents"})


def derive_finding(
    hive: SyncHive, summary: Item, speakers: list[str]
) -> tuple[dict[str, Any], int]:
    """Read a session's messages and count, per speaker, turns, words, questions and names.

    Returns:
        (the finding to store, the number of messages read).

    Raises:
        CheckFailed: the session holds another number of messages than the summary says.
    """
    info = summary.value
    texts: dict[str, list[str]] = {s: [] for s in speakers}
    after = 0
    while True:
        page = hive.get_messages(info["session_id"], after=after, limit=100)
        if not page:
            break
        for message in page:
            texts.setdefault(message.metadata.get("speaker", message.role), []).append(
                str(message.content)
            )
        after = page[-1].seq
    read = sum(len(t) for t in texts.values())
    if read != info["turns"]:
        raise CheckFailed(f"{info['session_id']}: {read} messages, summary says {info['turns']}")
    exclude = {part for name in speakers for part in name.split()}
    counted = capitalised_terms(texts, exclude)
    per_speaker: dict[str, dict[str, Any]] = {}
    for speaker, said in texts.items():
        terms = counted[speaker]
        per_speaker[speaker] = {
            "turns": len(said),
            "words": sum(len(t.split()) for t in said),
            "questions": sum(t.rstrip().endswith("?") for t in said),
            "top_terms": top_terms(terms),
            "terms": dict(terms),
        }
    line = "; ".join(f"{s}: {format_terms(v['top_terms'][:3])}" for s, v in per_speaker.items())
    finding = {
        "sample_id": info["sample_id"],
        "session": info["session"],
        "session_id": info["session_id"],
        "date": info["date"],
        "source": {"namespace": summary.namespace, "key": summary.key, "version": summary.version},
        "turns": read,
        "speakers": per_speaker,
        "summary": f"session {info['session']} ({info['date']}): {line}",
    }
    return finding, read


# The orchestrator ----------------------------------------------------------------


def write_plan(hive: SyncHive, plan: dict[str, Any]) -> str:
    """Create the plan item (create-only) and show that a second create is refused.

    Returns:
        A line for the report.

    Raises:
        Conflict: a plan already exists.
        CheckFailed: the second create-only put was not refused.
    """
    item = hive.put(PLAN_NS, PLAN_KEY, plan, if_version=0)
    try:
        hive.put(PLAN_NS, PLAN_KEY, plan, if_version=0)
    except Conflict as exc:
        log(ORCHESTRATOR, f"plan written: {plan['totals']}")
        return (
            f"created v{item.version}; a second create was refused "
            f"(Conflict, current_version={exc.current_version})"
        )
    raise CheckFailed("a second create-only put of the plan succeeded")


def orchestrator(url: str, plan: dict[str, Any], all_findings: bool) -> None:
    """Publish the plan, collect the findings, check the shared state and print the report.

    The plan is written once both other agents have said on ``handoff/orchestrator``
    that they are ready, so the timings measure the work, not process start-up.

    Raises:
        CheckFailed: a count read back from the hive differs from the plan.
    """
    with hivemem.connect_sync(url, agent=ORCHESTRATOR) as hive:
        totals = plan["totals"]
        own = hive.create_session(
            app=LOG_APP,
            user="locomo",
            agent=ORCHESTRATOR,
            session_id=LOG_SESSION,
            metadata={"input": plan["input"]},
        )
        planned = {c["sample_id"]: c for c in plan["conversations"]}
        findings: dict[str, dict[str, dict[str, Any]]] = {sid: {} for sid in planned}
        handled: list[str] = []
        latencies: list[float] = []
        ready: set[str] = set()
        finished: set[str] = set()
        team = {DATA_SPECIALIST, RESEARCHER}
        conflicts = 0
        state_version = own.state_version
        started = time.perf_counter()
        plan_cas = ""
        with watching(hive, HANDOFF, after="0") as events:
            for event in events:
                payload = event.data if isinstance(event.data, dict) else {}
                kind = payload.get("kind")
                if kind == "ready":
                    ready.add(str(payload.get("agent")))
                    if ready >= team and not plan_cas:
                        started = time.perf_counter()
                        plan_cas = write_plan(hive, plan)
                        hive.append_message(
                            own.id,
                            "system",
                            f"Plan: {totals['conversations']} conversations, "
                            f"{totals['sessions']} sessions, {totals['turns']} turns "
                            f"from {plan['input']}.",
                        )
                elif kind == "done":
                    finished.add(str(payload.get("agent")))
                elif kind == "finding":
                    latencies.append(time.time() - float(payload["summary_written_at"]))
                    item = hive.get(payload["namespace"], payload["key"])
                    if item is None or item.version < int(payload["version"]):
                        raise CheckFailed(f"finding {payload} cannot be read back")
                    sample_id = payload["sample_id"]
                    findings[sample_id][item.key] = item.value
                    conflicts += bump_progress(hive, {"sessions_acknowledged": 1})
                    if len(findings[sample_id]) == len(planned[sample_id]["sessions"]):
                        state_version = conclude_conversation(
                            hive, own.id, state_version, planned[sample_id], handled
                        )
                        conflicts += bump_progress(hive, {"conversations_done": 1})
                        handled.append(sample_id)
                if len(handled) == len(planned) and finished >= team:
                    break
        elapsed = time.perf_counter() - started
        hive.append_message(
            own.id, "assistant", f"All {len(handled)} conversations handled in {elapsed:.2f} s."
        )
        report = build_report(
            hive,
            plan,
            findings,
            latencies=latencies,
            elapsed=elapsed,
            own_conflicts=conflicts,
            plan_cas=plan_cas,
            all_findings=all_findings,
        )
        print(report, flush=True)


def conclude_conversation(
    hive: SyncHive,
    log_session: str,
    state_version: int,
    planned: dict[str, Any],
    handled: list[str],
) -> int:
    """Check one finished conversation by listing, store its report and log it.

    Returns:
        The orchestrator log session's new state version.
    """
    sample_id = planned["sample_id"]
    stored = list(all_items(hive, f"findings/{sample_id}"))
    if len(stored) != len(planned["sessions"]):
        raise CheckFailed(f"{sample_id}: {len(stored)} findings listed, planned {planned}")
    sessions = list(all_sessions(hive, app="locomo", user=sample_id))
    messages = sum(s.messages for s in sessions)
    if len(sessions) != len(planned["sessions"]) or messages != planned["turns"]:
        raise CheckFailed(
            f"{sample_id}: {len(sessions)} sessions / {messages} messages, "
            f"planned {len(planned['sessions'])} / {planned['turns']}"
        )
    namespaces = all_namespaces(hive, f"locomo/{sample_id}")
    terms: dict[str, Counter[str]] = {s: Counter() for s in planned["speakers"]}
    for item in stored:
        for speaker, info in item.value["speakers"].items():
            terms.setdefault(speaker, Counter()).update(info["terms"])
    ordered = sorted(stored, key=lambda i: i.value["session"])
    report = {
        "sample_id": sample_id,
        "sessions": len(sessions),
        "turns": messages,
        "namespaces": namespaces,
        "first_date": ordered[0].value["date"],
        "last_date": ordered[-1].value["date"],
        "top_terms": {s: top_terms(c) for s, c in terms.items()},
    }
    hive.put(f"reports/{sample_id}", "summary", report)
    line = " | ".join(f"{s}: {format_terms(t[:3])}" for s, t in report["top_terms"].items())
    hive.append_message(
        log_session, "assistant", f"{sample_id}: {len(sessions)} sessions checked. {line}"
    )
    saved = hive.save_state(
        log_session,
        {"handled": [*handled, sample_id]},
        if_version=state_version,
    )
    log(ORCHESTRATOR, f"{sample_id} handled: {len(sessions)} sessions, {messages} turns")
    return saved.state_version


def build_report(
    hive: SyncHive,
    plan: dict[str, Any],
    findings: dict[str, dict[str, dict[str, Any]]],
    *,
    latencies: list[float],
    elapsed: float,
    own_conflicts: int,
    plan_cas: str,
    all_findings: bool,
) -> str:
    """Count what the hive now holds, check it against the plan and format the report.

    Raises:
        CheckFailed: a count differs from what the plan implies.
    """
    totals = plan["totals"]
    by_kind: Counter[str] = Counter()
    for item in all_items(hive, ""):
        parts = item.namespace.split("/")
        kind = parts[0]
        if kind == "locomo":
            kind = {"turns": "turns", "sessions": "session summaries"}.get(parts[-1], kind)
        by_kind[kind] += 1
    sessions = list(all_sessions(hive))
    locomo_sessions = [s for s in sessions if s.app == "locomo"]
    log_sessions = [s for s in sessions if s.app == LOG_APP]
    locomo_messages = sum(s.messages for s in locomo_sessions)
    log_messages = sum(s.messages for s in log_sessions)
    events = count_events(hive)
    progress = hive.get(PROGRESS_NS, PROGRESS_KEY)
    ds_item = hive.get(f"agents/{DATA_SPECIALIST}", "stats")
    rs_item = hive.get(f"agents/{RESEARCHER}", "stats")
    ds: dict[str, Any] = ds_item.value if ds_item else {}
    rs: dict[str, Any] = rs_item.value if rs_item else {}
    top_namespaces = all_namespaces(hive, "", max_depth=1)

    expected_progress = {
        "sessions_loaded": totals["sessions"],
        "findings": totals["sessions"],
        "sessions_acknowledged": totals["sessions"],
        "conversations_done": totals["conversations"],
    }
    problems = []
    if by_kind["turns"] != totals["turns"]:
        problems.append(f"turn items {by_kind['turns']} != {totals['turns']}")
    if (
        by_kind["session summaries"] != totals["sessions"]
        or by_kind["findings"] != totals["sessions"]
    ):
        problems.append("session summaries or findings differ from the planned sessions")
    if len(locomo_sessions) != totals["sessions"] or locomo_messages != totals["turns"]:
        problems.append("locomo sessions or messages differ from the plan")
    if progress is None or progress.value != expected_progress:
        problems.append(
            f"progress counter {progress.value if progress else None} != {expected_progress}"
        )

    item_total = sum(by_kind.values())
    puts = events["item.put"]
    conflicts = own_conflicts + ds.get("conflicts_retried", 0) + rs.get("conflicts_retried", 0)
    kinds = ["turns", "session summaries", "findings", "reports", "plans", "progress", "agents"]
    kinds += sorted(k for k in by_kind if k not in kinds)
    ds_items = ds.get("turn_items", 0) + ds.get("summary_items", 0)
    ds_elapsed = max(ds.get("elapsed_s", 0.0), 1e-9)
    lines = [
        "",
        "=== hivemem three-agent report ===",
        f"input                  : {plan['input']}",
        f"conversations handled  : {len(findings)} of {totals['conversations']}",
        f"items                  : {item_total} live ("
        + ", ".join(f"{k} {by_kind[k]}" for k in kinds)
        + ")",
        f"sessions               : {len(sessions)} (locomo {len(locomo_sessions)}, "
        f"orchestrator log {len(log_sessions)})",
        f"messages               : {locomo_messages + log_messages} (locomo {locomo_messages}, "
        f"orchestrator log {log_messages})",
        f"events                 : {sum(events.values())} ("
        + ", ".join(f"{t} {n}" for t, n in sorted(events.items()))
        + ")",
        f"namespaces             : {', '.join(top_namespaces)}",
        f"plan (if_version=0)    : {plan_cas}",
        "progress counter       : "
        + (
            " ".join(f"{k}={v}" for k, v in sorted(progress.value.items()))
            + f" (version {progress.version}, {conflicts} conflicts retried)"
            if progress
            else "missing"
        ),
        f"elapsed                : {elapsed:.2f} s from plan to last handoff",
        f"throughput             : {puts / max(elapsed, 1e-9):.0f} item writes/s overall; "
        f"data specialist {ds_items} items in {ds_elapsed:.2f} s "
        f"({ds_items / ds_elapsed:.0f} items/s, {ds.get('batches', 0)} batches)",
        "handoff latency        : summary written -> finding received: "
        + (
            f"mean {1000 * sum(latencies) / len(latencies):.0f} ms, "
            f"max {1000 * max(latencies):.0f} ms"
            if latencies
            else "-"
        ),
        "",
        "findings (most frequent capitalised words per speaker; speaker names left out)",
    ]
    for planned in plan["conversations"]:
        sample_id = planned["sample_id"]
        report = hive.get(f"reports/{sample_id}", "summary")
        if report is None:
            problems.append(f"no report for {sample_id}")
            continue
        value = report.value
        lines.append(
            f"  {sample_id}: {value['sessions']} sessions, {value['turns']} turns, "
            f"{value['first_date']} .. {value['last_date']}"
        )
        for speaker, terms in value["top_terms"].items():
            lines.append(f"    {speaker}: {format_terms(terms)}")
        per_session = sorted(findings[sample_id].values(), key=lambda f: f["session"])
        if all_findings or totals["sessions"] <= 10:
            lines.extend(f"    - {f['summary']}" for f in per_session)
    if not all_findings and totals["sessions"] > 10:
        lines.append(
            "  (per-session findings are in findings/<sample_id>; --all-findings prints them)"
        )
    if problems:
        lines.append("")
        lines.extend(f"CHECK FAILED: {p}" for p in problems)
        print("\n".join(lines), flush=True)
        raise CheckFailed("; ".join(problems))
    lines.append("checks                 : all passed")
    return "\n".join(lines)


# Processes -----------------------------------------------------------------------


def run_agent(role: str, url: str, args: tuple[Any, ...]) -> None:
    """Entry point of an agent process: run the agent, exit 1 with a traceback on error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when agents stop
    targets: dict[str, Callable[..., None]] = {
        ORCHESTRATOR: orchestrator,
        DATA_SPECIALIST: data_specialist,
        RESEARCHER: researcher,
    }
    try:
        targets[role](url, *args)
    except BaseException:
        log(role, "failed:\n" + traceback.format_exc().rstrip())
        sys.stdout.flush()
        os._exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(url: str, service: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll ``GET /healthz`` until it answers 200.

    Raises:
        RuntimeError: the service exited or did not answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"the service exited with status {service.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service did not answer {url}/healthz within {timeout:.0f} s")


def stop_service(service: subprocess.Popen[bytes]) -> int | None:
    """Stop the service with SIGTERM (SIGKILL after 10 s); return its exit status."""
    if service.poll() is None:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    return service.returncode


def stop_agents(processes: dict[str, multiprocessing.process.BaseProcess]) -> None:
    """Terminate agents still running (SIGTERM, then SIGKILL after 5 s)."""
    for process in processes.values():
        if process.is_alive():
            process.terminate()
    for process in processes.values():
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run(args: argparse.Namespace) -> int:
    """Start the service and the agents, wait for them, stop everything; the exit status."""
    began = time.perf_counter()
    source = Path(args.input)
    samples = load_conversations(source)
    plan = build_plan(
        samples,
        source.resolve(),
        max_conversations=args.max_conversations,
        max_sessions=args.max_sessions,
    )
    if plan["totals"]["sessions"] == 0:
        raise InputError(f"{source}: no conversation has a non-empty session")
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="hivemem-example-") as workdir:
        db = Path(workdir) / "hive.db"
        service_log = Path(workdir) / "service.log"
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "hivemem", "serve", "--store", f"sqlite:///{db}"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        processes: dict[str, multiprocessing.process.BaseProcess] = {}
        failed: list[str] = []
        with service_log.open("wb") as log_file:
            service = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, service, timeout=min(30.0, args.timeout))
            print(f"service: {url} ready in {time.perf_counter() - began:.2f} s (store {db})")
            context = multiprocessing.get_context("spawn")
            agent_args: dict[str, tuple[Any, ...]] = {
                ORCHESTRATOR: (plan, args.all_findings),
                DATA_SPECIALIST: (str(source.resolve()),),
                RESEARCHER: (),
            }
            for role in AGENTS:
                processes[role] = context.Process(
                    target=run_agent, args=(role, url, agent_args[role]), name=role
                )
                processes[role].start()
            while any(p.is_alive() for p in processes.values()):
                failed = [r for r, p in processes.items() if p.exitcode not in (None, 0)]
                if failed:
                    print(f"error: agent(s) failed: {', '.join(failed)}", file=sys.stderr)
                    break
                if service.poll() is not None:
                    failed = ["service"]
                    print(f"error: the service exited ({service.returncode})", file=sys.stderr)
                    break
                if time.monotonic() > deadline:
                    failed = ["timeout"]
                    print(f"error: timed out after {args.timeout:.0f} s", file=sys.stderr)
                    break
                time.sleep(0.1)
            stop_agents(processes)
            failed = failed or [r for r, p in processes.items() if p.exitcode != 0]
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
            stop_agents(processes)
            status = stop_service(service)
            if failed or not processes:
                print(f"--- service log (last lines) ---\n{tail(service_log)}", file=sys.stderr)
        codes = ", ".join(f"{r}={p.exitcode}" for r, p in processes.items())
        # uvicorn shuts down gracefully on SIGTERM, then exits by that signal.
        how = "SIGTERM" if status == -signal.SIGTERM else f"status {status}"
        print(f"agents: {codes}; service stopped ({how})")
        total = time.perf_counter() - began
        if failed:
            print(f"FAILED ({', '.join(failed)}) after {total:.2f} s", file=sys.stderr)
            return 1
        print(f"OK in {total:.2f} s")
        return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        description="Run an orchestrator, a data specialist and a researcher as three "
        "processes that share memory through one hivemem service, over a LoCoMo-format "
        "conversation file.",
    )
    parser.add_argument(
        "input",
        nargs="?",
        default=str(SAMPLE),
        help="LoCoMo-format JSON file (default: the bundled sample_conversation.json)",
    )
    parser.add_argument(
        "--max-conversations", type=positive_int, help="use only the first N conversations"
    )
    parser.add_argument(
        "--max-sessions", type=positive_int, help="use only the first N sessions of each"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before the run is abandoned and fails (default: 300)",
    )
    parser.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    parser.add_argument(
        "--all-findings",
        action="store_true",
        help="print every per-session finding (by default only when there are at most 10)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the example; the process exit status."""
    args = parse_args(argv)
    # Agents write to the same stdout; line buffering keeps the lines in order.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through run(), which stops agents and service

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
