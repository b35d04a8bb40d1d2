"""examples/integrations/ run end to end: each starts a service and two agent processes,
the second resuming what the first left in hivemem, and checks what it read back.

Each takes 10-20 s of process starts, so they run in ``.ci/run``'s ``-m matrix`` pass
after the default suite (the adapters themselves are tested in the default run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "integrations"

pytestmark = pytest.mark.matrix


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("langgraph_pods.py", "pod-b: published 'v42: faster writes, MCP tools', approved by ana"),
        ("strands_pods.py", "pod-b: read pod A's entry {'issue': 'refund for order 991'}"),
        ("a2a_pods.py", "turn 2: greeter-1: hello Ada"),
        ("adk_pods.py", "pod-b: a new session of ann starts with {'user:home': 'Lisbon'}"),
        ("agentscope_pods.py", "pod-b: a new session recalled the tea from long-term memory"),
        (
            "openai_agents_pods.py",
            "pod-b: the model was given pod A's conversation before the question",
        ),
    ],
)
def test_the_example_runs_and_the_second_pod_resumes(script: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout
    assert done.stdout.rstrip().endswith("ok")
    assert "Traceback" not in done.stderr
