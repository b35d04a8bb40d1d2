"""``hivemem eval locomo``: evidence normalisation, recall@k, and the command end to end on a
tiny hand-made LoCoMo-format file; and the two search features tuned with it (context
expansion over neighbouring turns, score fusion)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import hivemem
from hivemem.cli import app
from hivemem.config import Settings
from hivemem.evaluation import load_locomo, normalise_evidence, parse_locomo, recall_at_k

# --- evidence ids and recall ---------------------------------------------------------

KNOWN = {"D1:3", "D8:6", "D9:17", "D11:26", "D30:5", "D2:1"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (["D1:3"], ["D1:3"]),
        (["D8:6; D9:17"], ["D8:6", "D9:17"]),
        (["D:11:26"], ["D11:26"]),
        (["D30:05"], ["D30:5"]),
        (["D02:01"], ["D2:1"]),
        (["D"], []),
        (["D4:4"], []),  # not a turn of the conversation
        (["D1:3", "D1:3", "D:1:3"], ["D1:3"]),
        ([None, 7, "D1:3"], ["D1:3"]),
        (["D8:6,D9:17 D1:3"], ["D8:6", "D9:17", "D1:3"]),
    ],
)
def test_evidence_ids_are_split_normalised_and_checked(raw: list[Any], expected: list[str]) -> None:
    assert normalise_evidence(raw, KNOWN) == expected


def test_recall_at_k_is_the_share_of_distinct_evidence_in_the_first_k() -> None:
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, ["b", "x"], 1) == 0.0
    assert recall_at_k(ranked, ["b", "x"], 2) == 0.5
    assert recall_at_k(ranked, ["b", "b", "d"], 4) == 1.0
    assert recall_at_k([], ["a"], 10) == 0.0


def test_recall_needs_evidence_and_a_positive_k() -> None:
    with pytest.raises(ValueError):
        recall_at_k(["a"], [], 1)
    with pytest.raises(ValueError):
        recall_at_k(["a"], ["a"], 0)


# --- the hand-made file ----------------------------------------------------------------

SAMPLE: list[dict[str, Any]] = [
    {
        "sample_id": "conv-t1",
        "conversation": {
            "speaker_a": "Alice",
            "speaker_b": "Bob",
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1": [
                {"speaker": "Alice", "dia_id": "D1:1", "text": "I adopted a puppy named Biscuit."},
                {"speaker": "Bob", "dia_id": "D1:2", "text": "That's wonderful! What breed?"},
                {"speaker": "Alice", "dia_id": "D1:3", "text": "A golden retriever."},
            ],
            "session_2_date_time": "2:00 pm on 3 June, 2023",
            "session_2": [
                {
                    "speaker": "Bob",
                    "dia_id": "D2:1",
                    "text": "I started learning a new instrument.",
                    "img_url": ["https://example.invalid/v.jpg"],
                    "blip_caption": "a photo of a violin on a chair",
                },
                {"speaker": "Alice", "dia_id": "D2:2", "text": "Cool! I went hiking in the Alps."},
            ],
        },
        "qa": [
            # single-hop: only D1:1 mentions the puppy -> recall@1 = recall@2 = 1
            {
                "question": "What is the name of Alice's puppy?",
                "answer": "Biscuit",
                "evidence": ["D1:1"],
                "category": 4,
            },
            # multi-hop, malformed evidence: D2:1 and D2:2 are the only turns matching more
            # than a speaker's name -> recall@1 = 0.5, recall@2 = 1
            {
                "question": "Where did Alice go hiking and which instrument is Bob learning?",
                "answer": "the Alps; violin",
                "evidence": ["D2:1; D2:2"],
                "category": 1,
            },
            # adversarial, zero-padded evidence; "violin" is only in D2:1's image caption
            {
                "question": "What colour is the violin of Bob?",
                "adversarial_answer": "red",
                "evidence": ["D2:01"],
                "category": 5,
            },
            # temporal, no evidence left after normalisation -> not asked
            {
                "question": "When did Bob move?",
                "answer": "2022",
                "evidence": ["D9:9", "D"],
                "category": 2,
            },
        ],
    }
]


@pytest.fixture
def locomo_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-locomo.json"
    path.write_text(json.dumps(SAMPLE), "utf-8")
    return path


def test_loading_makes_one_turn_per_dialog_turn_with_date_speaker_and_caption(
    locomo_file: Path,
) -> None:
    (conv,) = load_locomo(locomo_file)
    assert [t.dia_id for t in conv.turns] == ["D1:1", "D1:2", "D1:3", "D2:1", "D2:2"]
    assert conv.turns[0].memory_text == (
        "[1:00 pm on 1 May, 2023] Alice: I adopted a puppy named Biscuit."
    )
    assert conv.turns[3].memory_text == (
        "[2:00 pm on 3 June, 2023] Bob: I started learning a new instrument. "
        "[shares a photo of a violin on a chair]"
    )
    assert conv.turns[3].metadata == {"dia_id": "D2:1", "session": 2, "turn": 1}
    assert [q.evidence for q in conv.questions] == [("D1:1",), ("D2:1", "D2:2"), ("D2:1",)]
    assert conv.skipped == 1


def test_a_file_not_in_locomo_shape_is_invalid_input() -> None:
    with pytest.raises(hivemem.InvalidInput) as err:
        parse_locomo({"not": "a list"})
    assert err.value.field == "file"
    with pytest.raises(hivemem.InvalidInput):
        parse_locomo([{"sample_id": "x"}])


def run_eval(*args: str) -> Result:
    return CliRunner().invoke(
        app,
        ["eval", "locomo", *args],
        env={"COLUMNS": "200"},
    )


def test_eval_locomo_reports_recall_per_category_and_overall_as_json(
    locomo_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    result = run_eval(
        str(locomo_file),
        "--k",
        "1,2",
        "--mode",
        "lexical",
        "--embedder",
        "none",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text("utf-8"))
    assert report["items"] == 5
    assert report["questions"] == 3
    assert report["skipped_questions"] == 1
    assert report["questions_by_category"] == {"multi-hop": 1, "single-hop": 1, "adversarial": 1}
    lexical = report["modes"]["lexical"]
    assert lexical["questions"] == 3
    assert lexical["recall"]["1"] == pytest.approx(
        {"overall": 2.5 / 3, "multi-hop": 0.5, "single-hop": 1.0, "adversarial": 1.0}
    )
    assert lexical["recall"]["2"] == pytest.approx(
        {"overall": 1.0, "multi-hop": 1.0, "single-hop": 1.0, "adversarial": 1.0}
    )
    assert lexical["query_ms"]["p50"] > 0
    assert report["load_seconds"] > 0 and report["items_per_second"] > 0


def test_eval_locomo_prints_a_table_per_mode_with_timings(locomo_file: Path) -> None:
    result = run_eval(str(locomo_file), "--k", "1,2", "--mode", "all", "--embedder", "none")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # embedder none: no vector mode; hybrid is BM25 alone, so both give the same figures
    assert "hybrid search" in out and "lexical search" in out and "vector search" not in out
    assert "3 questions (1 without evidence skipped)" in out
    overall = [line for line in out.splitlines() if "overall" in line]
    assert len(overall) == 2
    assert all("0.833" in line and "1.000" in line for line in overall)
    assert "1 multi-hop" in out and "0.500" in out
    assert "query p50" in out and "items/s" in out


def test_eval_locomo_with_minilm_runs_every_mode(locomo_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run_eval(
        str(locomo_file), "--k", "5", "--mode", "all", "--embedder", "minilm", "--json", str(out)
    )
    assert result.exit_code == 0, result.output
    modes = json.loads(out.read_text("utf-8"))["modes"]
    assert set(modes) == {"hybrid", "vector", "lexical"}
    # five turns: the first five hits are all of them
    assert all(m["recall"]["5"]["overall"] == 1.0 for m in modes.values())


def test_eval_locomo_limit_conversations_and_bad_k(locomo_file: Path) -> None:
    result = run_eval(str(locomo_file), "--k", "0", "--embedder", "none")
    assert result.exit_code == 2
    assert "field: k" in result.output
    result = run_eval(str(locomo_file), "--mode", "vector", "--embedder", "none")
    assert result.exit_code == 2
    assert "field: mode" in result.output
    result = run_eval(str(locomo_file), "--limit-conversations", "1", "--embedder", "none")
    assert result.exit_code == 0, result.output
    assert "1 conversations, 5 turns" in result.stdout


def test_eval_locomo_unreadable_file_names_the_file(tmp_path: Path) -> None:
    result = run_eval(str(tmp_path / "missing.json"), "--embedder", "none")
    assert result.exit_code == 2
    assert "field: file" in result.output


# --- search features tuned with the evaluation ------------------------------------------

TURNS = [
    (1, 1, "Alice: my grandmother taught me to bake bread"),
    (1, 2, "Bob: which recipe did you like most?"),
    (1, 3, "Alice: the sourdough with rosemary"),
    (1, 4, "Bob: sounds lovely"),
    (2, 1, "Alice: the weather was awful today"),
]


async def _conversation(hive: hivemem.Hive, ns: str) -> None:
    for session, turn, text in TURNS:
        await hive.put(
            ns, f"D{session}:{turn}", text, metadata={"session": session, "turn": turn, "n": turn}
        )


async def _keys(settings: Settings, query: str, **kw: Any) -> list[tuple[str, int | None]]:
    async with hivemem.connect("sqlite://:memory:", settings=settings) as hive:
        await _conversation(hive, "chat/a")
        await hive.put("chat/a", "plain", "a recipe note without metadata")
        hits = await hive.search("chat", query, mode="lexical", **kw)
        return [(h.item.key, h.lexical_rank) for h in hits]


async def test_context_expansion_lifts_the_turns_next_to_a_hit() -> None:
    got = await _keys(Settings(embedder="none"), "recipe like")
    # D1:2 matches best, "plain" next; D1:2's neighbours D1:1 and D1:3 follow with half of
    # its score and no lexical rank of their own; D1:4 and D2:1 are nobody's neighbours
    assert got[:2] == [("D1:2", 1), ("plain", 2)]
    assert sorted(got[2:]) == [("D1:1", None), ("D1:3", None)]


async def test_context_expansion_obeys_the_filter_and_can_be_turned_off() -> None:
    got = await _keys(Settings(embedder="none"), "recipe like", filter={"n": {"$lte": 2}})
    assert [key for key, _ in got] == ["D1:2", "D1:1"]
    off = await _keys(Settings(embedder="none", search_context_window=0), "recipe like")
    assert [key for key, _ in off] == ["D1:2", "plain"]


async def test_score_fusion_gives_scores_between_0_and_1_best_first() -> None:
    settings = Settings(embedder="none", search_fusion="score", search_context_window=0)
    async with hivemem.connect("sqlite://:memory:", settings=settings) as hive:
        await _conversation(hive, "chat/a")
        hits = await hive.search("chat", "sourdough rosemary recipe", mode="hybrid")
    assert hits[0].item.key == "D1:3"
    assert hits[0].score == pytest.approx(1.0)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
