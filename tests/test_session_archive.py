"""Session archives: ``hivemem session export`` and ``import`` (cli/sessions.py) write and
read JSON Lines (a session line, then a line per message) to a file, stdin/stdout or S3
(moto's server), and refuse what would lose or mix data."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner, Result

import hivemem
from hivemem.cli import app
from hivemem.cli.sessions import ARCHIVE_FORMAT
from hivemem.errors import NotFound
from tests.servers.moto import REGION


def run(url: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, ["--url", url, *args], input=input, env={"COLUMNS": "200"})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def store(tmp_path: Path, name: str = "hive") -> str:
    return f"sqlite:///{tmp_path / f'{name}.db'}"


def make_session(url: str, messages: int = 3) -> str:
    """A session with metadata, a saved state, a ttl and ``messages`` messages by two
    authors with tokens, costs, JSON content and metadata."""
    with hivemem.connect_sync(url, agent="orchestrator") as hive:
        s = hive.create_session(
            app="support",
            user="u42",
            agent="helper",
            metadata={"channel": "web"},
            state={"step": 1},
            ttl=3600,
        )
        hive.save_state(s.id, {"step": 2, "notes": ["ok"]}, if_version=1)
        for start in range(0, messages, 50):
            batch = []
            for i in range(start, min(messages, start + 50)):
                batch.append(
                    {
                        "role": "user" if i % 2 == 0 else "assistant",
                        "content": f"turn {i}" if i % 3 else [{"type": "text", "text": f"{i}"}],
                        "tokens_in": i,
                        "tokens_out": 2 * i,
                        "cost": 0.001 * i,
                        "metadata": {"i": i},
                    }
                )
            author = "customer" if start % 100 == 0 else "helper"
            hive.as_agent(author).append_messages(s.id, batch)
    return s.id


def snapshot(url: str, session_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The session's record and messages, without what an import cannot keep (times,
    the state's version)."""
    with hivemem.connect_sync(url, agent="reader") as hive:
        s = hive.get_session(session_id)
        messages = []
        while True:
            page = hive.get_messages(session_id, after=len(messages), limit=100)
            messages += page
            if len(page) < 100:
                break
    record = s.model_dump(exclude={"started_at", "last_activity_at", "expires_at", "state_version"})
    return record, [m.model_dump(exclude={"created_at"}) for m in messages]


def test_a_session_round_trips_through_a_file(tmp_path: Path) -> None:
    source, target = store(tmp_path, "source"), store(tmp_path, "target")
    session_id = make_session(source, messages=130)  # more than one page of messages
    archive = tmp_path / "archive.jsonl"
    ok(run(source, "session", "export", session_id, "--to", str(archive)))

    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert lines[0]["type"] == "session" and lines[0]["format"] == ARCHIVE_FORMAT
    assert lines[0]["id"] == session_id and lines[0]["state"] == {"step": 2, "notes": ["ok"]}
    assert lines[0]["messages"] == 130 and lines[0]["turns"] == 65
    assert [line["seq"] for line in lines[1:]] == list(range(1, 131))
    assert {line["type"] for line in lines[1:]} == {"message"}

    ok(run(target, "session", "import", "--from", str(archive)))
    assert snapshot(target, session_id) == snapshot(source, session_id)
    with hivemem.connect_sync(target) as hive:
        assert hive.get_session(session_id).state_version == 1


def test_a_session_round_trips_through_s3(tmp_path: Path, moto_endpoint: str) -> None:
    bucket = f"archives-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    url = store(tmp_path)
    session_id = make_session(url)
    before = snapshot(url, session_id)
    target = f"s3://{bucket}/sessions/{session_id}.jsonl?endpoint={moto_endpoint}&region={REGION}"
    ok(run(url, "session", "export", session_id, "--to", target))
    ok(run(url, "session", "rm", session_id))
    ok(run(url, "session", "import", "--from", target))
    assert snapshot(url, session_id) == before


def test_export_to_stdout_and_import_from_stdin(tmp_path: Path) -> None:
    source, target = store(tmp_path, "source"), store(tmp_path, "target")
    session_id = make_session(source)
    exported = ok(run(source, "session", "export", session_id, "--to", "-"))
    assert exported.stdout.count("\n") == 4  # the session and its 3 messages
    assert "exported 1 sessions" in exported.stderr
    ok(run(target, "session", "import", "--from", "-", input=exported.stdout))
    assert snapshot(target, session_id) == snapshot(source, session_id)


def test_import_refuses_an_existing_session_and_imports_nothing_unless_replace(
    tmp_path: Path,
) -> None:
    url = store(tmp_path)
    first, second = make_session(url), make_session(url, messages=2)
    archive = tmp_path / "two.jsonl"
    ok(run(url, "session", "export", first, second, "--to", str(archive)))
    ok(run(url, "session", "rm", first))

    refused = run(url, "session", "import", "--from", str(archive))
    assert refused.exit_code == 2
    assert f"session {second!r} exists" in refused.stderr and "--replace" in refused.stderr
    with hivemem.connect_sync(url) as hive, pytest.raises(NotFound):
        hive.get_session(first)  # nothing was imported

    before = snapshot(url, second)
    ok(run(url, "session", "import", "--from", str(archive), "--replace"))
    assert snapshot(url, second) == before  # replaced, its messages not doubled
    assert snapshot(url, first)[0]["messages"] == 3


def test_a_cut_archive_is_refused_naming_the_option_and_writes_nothing(tmp_path: Path) -> None:
    source, target = store(tmp_path, "source"), store(tmp_path, "target")
    session_id = make_session(source)
    archive = tmp_path / "cut.jsonl"
    ok(run(source, "session", "export", session_id, "--to", str(archive)))
    archive.write_text("".join(archive.read_text().splitlines(keepends=True)[:-1]))

    refused = run(target, "session", "import", "--from", str(archive))
    assert refused.exit_code == 2
    assert "messages = 3" in refused.stderr and "field: from" in refused.stderr
    with hivemem.connect_sync(target) as hive, pytest.raises(NotFound):
        hive.get_session(session_id)


def test_an_archive_that_is_not_one_is_refused_naming_the_line(tmp_path: Path) -> None:
    url = store(tmp_path)
    archive = tmp_path / "bad.jsonl"
    archive.write_text('{"type": "message", "seq": 1}\n')
    refused = run(url, "session", "import", "--from", str(archive))
    assert refused.exit_code == 2 and "line 1" in refused.stderr
    missing = run(url, "session", "import", "--from", str(tmp_path / "absent.jsonl"))
    assert missing.exit_code == 1 and "no archive" in missing.stderr
