"""examples/three_agents.py runs end to end on the bundled sample and reports what it stored.

The example starts its own hivemem service on a free loopback port and three
agent processes; the expected counts are computed here from the sample file.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "three_agents.py"
SAMPLE = ROOT / "examples" / "sample_conversation.json"
TIMEOUT_SECONDS = 180
#: Messages per append_messages() call in the example.
MESSAGE_CHUNK = 50

pytestmark = pytest.mark.slow


def run_example(*args: str, timeout: float = TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    """Run the example in its own process group; on timeout kill the whole group."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the example did not finish in {timeout} s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def sample_counts() -> dict[str, Any]:
    """Conversations, sessions, turns and per-session turn counts of the sample file."""
    data = json.loads(SAMPLE.read_text(encoding="utf-8"))
    session_turns = [
        len(turns)
        for sample in data
        for name, turns in sample["conversation"].items()
        if re.fullmatch(r"session_\d+", name) and turns
    ]
    return {
        "conversations": len(data),
        "sessions": len(session_turns),
        "turns": sum(session_turns),
        "session_turns": session_turns,
    }


def report_line(output: str, label: str) -> str:
    """The text after ``label :`` on the report line that starts with ``label``."""
    match = re.search(rf"^{re.escape(label)}\s*: (.*)$", output, re.MULTILINE)
    assert match, f"no '{label}' line in the report:\n{output}"
    return match.group(1)


def numbers(text: str) -> dict[str, int]:
    """``"turns 31, session summaries 3"`` -> ``{"turns": 31, "session summaries": 3}``."""
    return {name: int(n) for name, n in re.findall(r"([a-z][a-z. ]*?) (\d+)", text)}


@pytest.fixture(scope="module")
def sample_run() -> Iterator[subprocess.CompletedProcess[str]]:
    yield run_example()


def test_example_on_sample_exits_zero_and_passes_its_checks(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    assert sample_run.returncode == 0, sample_run.stdout + sample_run.stderr
    assert "checks                 : all passed" in sample_run.stdout
    assert re.search(r"^OK in \d+\.\d+ s$", sample_run.stdout, re.MULTILINE)


def test_every_agent_exits_cleanly_and_the_service_is_stopped(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    assert re.search(
        r"^agents: orchestrator=0, data-specialist=0, researcher=0; service stopped",
        sample_run.stdout,
        re.MULTILINE,
    ), sample_run.stdout + sample_run.stderr


def test_report_counts_items_by_kind_as_the_sample_implies(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    c = sample_counts()
    line = report_line(sample_run.stdout, "items")
    total = int(line.split()[0])
    kinds = numbers(line.split("(", 1)[1])
    assert kinds == {
        "turns": c["turns"],
        "session summaries": c["sessions"],
        "findings": c["sessions"],
        "reports": c["conversations"],
        "plans": 1,
        "progress": 1,
        "agents": 2,
    }
    assert total == sum(kinds.values())


def test_report_counts_sessions_and_messages_as_the_sample_implies(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    c = sample_counts()
    sessions = report_line(sample_run.stdout, "sessions")
    assert sessions == f"{c['sessions'] + 1} (locomo {c['sessions']}, orchestrator log 1)"
    # The orchestrator logs the plan, one message per conversation and a closing message.
    log_messages = c["conversations"] + 2
    messages = report_line(sample_run.stdout, "messages")
    assert messages == (
        f"{c['turns'] + log_messages} (locomo {c['turns']}, orchestrator log {log_messages})"
    )


def test_report_counts_events_as_the_sample_implies(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    c = sample_counts()
    line = report_line(sample_run.stdout, "events")
    total = int(line.split()[0])
    by_type = numbers(line.split("(", 1)[1])
    # Item writes: turns, summaries, findings, plan, per-conversation reports, two
    # agent stats, and the progress counter: one write per session by each of the
    # three agents plus one per conversation by the orchestrator.
    puts = (
        c["turns"]
        + 2 * c["sessions"]
        + 1
        + c["conversations"]
        + 2
        + 3 * c["sessions"]
        + c["conversations"]
    )
    appends = sum(math.ceil(n / MESSAGE_CHUNK) for n in c["session_turns"])
    assert by_type == {
        "item.put": puts,
        "publish": c["sessions"] + 4,  # a finding per session; ready and done from two agents
        "session.created": c["sessions"] + 1,
        "session.messages": appends + c["conversations"] + 2,
        "session.state": c["conversations"],
    }
    assert total == sum(by_type.values())


def test_progress_counter_lost_no_increment(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    c = sample_counts()
    line = report_line(sample_run.stdout, "progress counter")
    assert line.startswith(
        f"conversations_done={c['conversations']} findings={c['sessions']} "
        f"sessions_acknowledged={c['sessions']} sessions_loaded={c['sessions']} "
    ), line


def test_report_lists_a_finding_for_each_session(
    sample_run: subprocess.CompletedProcess[str],
) -> None:
    c = sample_counts()
    findings = re.findall(r"^    - session \d+ \(", sample_run.stdout, re.MULTILINE)
    assert len(findings) == c["sessions"]
    assert "Helena" in sample_run.stdout  # a name the sample's first speaker mentions


def test_missing_input_file_exits_2_without_starting_anything() -> None:
    result = run_example(str(ROOT / "examples" / "no-such-file.json"), timeout=60)
    assert result.returncode == 2
    assert "cannot read" in result.stderr
