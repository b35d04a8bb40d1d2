"""The ``hivemem`` command line, driven through typer's CliRunner against a SQLite file."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from hivemem.cli import app
from hivemem.cli.common import fail
from hivemem.errors import Conflict

from .conftest import ServiceProcess

Cli = Callable[..., Result]


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A fresh store file for the test."""
    return f"sqlite:///{tmp_path / 'hive.db'}"


@pytest.fixture
def cli(url: str) -> Cli:
    """Run ``hivemem --url <store> ARGS...``; ``input`` feeds stdin."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(app, ["--url", url, *args], input=input, env={"COLUMNS": "200"})

    return invoke


def ok(result: Result) -> Result:
    """Fail with the command's output unless it exited 0."""
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def as_json(result: Result) -> Any:
    """The JSON document a ``--json`` command printed on stdout."""
    return json.loads(ok(result).stdout)


def test_put_then_get_prints_the_value(cli: Cli) -> None:
    assert "version 1" in ok(cli("put", "team/research", "findings", "hello")).stdout
    assert ok(cli("get", "team/research", "findings")).stdout == "hello\n"


def test_put_parses_json_values_and_keeps_other_text_as_strings(cli: Cli) -> None:
    assert as_json(cli("put", "t", "obj", '{"papers": 3}', "--json"))["value"] == {"papers": 3}
    assert as_json(cli("put", "t", "num", "42", "--json"))["value"] == 42
    assert as_json(cli("put", "t", "word", "not json", "--json"))["value"] == "not json"


def test_put_json_output_is_the_stored_item_with_ttl_text_and_metadata(cli: Cli) -> None:
    args = ["put", "t", "k", "v", "--ttl", "60", "--text", "about v", "--meta", "tag=x"]
    item = as_json(cli(*args, "--meta", "n=3", "--json"))
    assert (item["namespace"], item["key"], item["version"]) == ("t", "k", 1)
    assert item["metadata"] == {"tag": "x", "n": 3}
    assert item["text"] == "about v"
    assert item["expires_at"] is not None


def test_put_reads_the_value_from_a_file_or_stdin(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "value.json"
    path.write_text('{"from": "file"}\n')
    ok(cli("put", "t", "f", "--value-file", str(path)))
    ok(cli("put", "t", "s", "--value-file", "-", input="plain text\n"))
    assert as_json(cli("get", "t", "f", "--json"))["value"] == {"from": "file"}
    assert as_json(cli("get", "t", "s", "--json"))["value"] == "plain text"


def test_put_without_a_value_exits_2_naming_the_field(cli: Cli) -> None:
    result = cli("put", "t", "k")
    assert result.exit_code == 2
    assert "field: value" in result.stderr


def test_global_agent_and_command_agent_are_stamped_as_author(cli: Cli) -> None:
    assert as_json(cli("put", "t", "a", "1", "--json"))["author"] == "cli"
    assert as_json(cli("--agent", "alice", "put", "t", "b", "1", "--json"))["author"] == "alice"
    assert as_json(cli("put", "t", "c", "1", "--agent", "bob", "--json"))["author"] == "bob"


def test_get_of_an_absent_item_exits_1_with_a_message_on_stderr(cli: Cli) -> None:
    result = cli("get", "t", "missing")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "error" in result.stderr and "missing" in result.stderr


def test_illegal_namespace_exits_2_with_one_line_naming_the_field(cli: Cli) -> None:
    result = cli("put", "bad namespace!", "k", "v")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "field: namespace" in result.stderr
    assert "Traceback" not in result.output


def test_stale_if_version_exits_2_and_reports_the_current_version(cli: Cli) -> None:
    ok(cli("put", "t", "k", "v1"))
    result = cli("put", "t", "k", "v2", "--if-version", "5")
    assert result.exit_code == 2
    assert "field: if_version" in result.stderr and "version 1" in result.stderr
    assert ok(cli("get", "t", "k")).stdout == "v1\n"


def test_ls_prints_a_table_of_items(cli: Cli) -> None:
    ok(cli("put", "team/a", "k1", '{"x": 1}'))
    ok(cli("put", "team/b", "k2", "hello", "--agent", "bob"))
    out = ok(cli("ls", "team")).stdout
    for cell in ("namespace", "value", "team/a", "k1", '{"x": 1}', "team/b", "bob", "hello"):
        assert cell in out


def test_ls_pages_with_cursor_and_all(cli: Cli) -> None:
    for key in ("a", "b", "c"):
        ok(cli("put", "t", key, "1"))
    first = as_json(cli("ls", "t", "--limit", "2", "--json"))
    assert [i["key"] for i in first["items"]] == ["a", "b"]
    rest = as_json(cli("ls", "t", "--limit", "2", "--cursor", first["next_cursor"], "--json"))
    assert [i["key"] for i in rest["items"]] == ["c"]
    every = as_json(cli("ls", "t", "--limit", "1", "--all", "--json"))
    assert [i["key"] for i in every["items"]] == ["a", "b", "c"]
    assert every["next_cursor"] is None


def test_ls_with_key_prefix_lists_the_matching_keys_of_that_namespace_only(cli: Cli) -> None:
    for namespace, key in [("t", "note-1"), ("t", "note-2"), ("t", "todo"), ("t/sub", "note-3")]:
        ok(cli("put", namespace, key, "1"))
    listed = as_json(cli("ls", "t", "--key-prefix", "note-", "--json"))
    assert [(i["namespace"], i["key"]) for i in listed["items"]] == [
        ("t", "note-1"),
        ("t", "note-2"),
    ]
    every = as_json(cli("ls", "t", "--key-prefix", "", "--json"))
    assert [i["key"] for i in every["items"]] == ["note-1", "note-2", "todo"]


def test_ls_with_key_prefix_pages_with_cursor(cli: Cli) -> None:
    for key in ("a1", "a2", "a3", "b1"):
        ok(cli("put", "t", key, "1"))
    first = as_json(cli("ls", "t", "--key-prefix", "a", "--limit", "2", "--json"))
    assert [i["key"] for i in first["items"]] == ["a1", "a2"]
    args = ["ls", "t", "--key-prefix", "a", "--limit", "2", "--cursor", first["next_cursor"]]
    rest = as_json(cli(*args, "--json"))
    assert [i["key"] for i in rest["items"]] == ["a3"]
    assert rest["next_cursor"] is None


def test_ls_with_key_prefix_but_no_namespace_exits_2_naming_the_field(cli: Cli) -> None:
    result = cli("ls", "--key-prefix", "note")
    assert result.exit_code == 2
    assert "field: prefix" in result.stderr
    assert "Traceback" not in result.output


def test_ns_lists_namespaces_cut_to_a_depth(cli: Cli) -> None:
    ok(cli("put", "team/a", "k", "1"))
    ok(cli("put", "team/b/c", "k", "1"))
    assert ok(cli("ns")).stdout.split() == ["team/a", "team/b/c"]
    assert as_json(cli("ns", "--depth", "1", "--json")) == ["team"]


def test_rm_deletes_the_item_then_reports_it_absent(cli: Cli) -> None:
    ok(cli("put", "t", "k", "v"))
    assert as_json(cli("rm", "t", "k", "--json")) == {"deleted": True}
    assert cli("get", "t", "k").exit_code == 1
    assert cli("rm", "t", "k").exit_code == 1


def test_rm_with_a_stale_version_exits_2_and_keeps_the_item(cli: Cli) -> None:
    ok(cli("put", "t", "k", "v"))
    assert cli("rm", "t", "k", "--if-version", "9").exit_code == 2
    assert ok(cli("get", "t", "k")).stdout == "v\n"


def test_history_lists_versions_newest_first(cli: Cli) -> None:
    for value in ("one", "two", "three"):
        ok(cli("put", "t", "k", value))
    versions = as_json(cli("history", "t", "k", "--json"))
    assert [(v["version"], v["value"]) for v in versions] == [(3, "three"), (2, "two"), (1, "one")]
    assert len(as_json(cli("history", "t", "k", "--limit", "2", "--json"))) == 2
    assert "three" in ok(cli("history", "t", "k")).stdout


def test_index_shows_the_lag_and_waits_for_the_vectors(cli: Cli) -> None:
    ok(cli("put", "kb", "a", "walruses rest on the arctic ice"))
    status = as_json(cli("--json", "index"))
    assert (status["mode"], status["pending"]) == ("deferred", 1)
    assert status["lag_seconds"] >= 0
    assert "waiting 1" in ok(cli("index")).stdout
    waited = as_json(cli("--json", "index", "--wait", "60"))
    assert waited["pending"] == 0 and waited["lag_seconds"] is None
    hits = as_json(cli("--json", "search", "kb", "sea mammals", "--mode", "vector"))
    assert [h["item"]["key"] for h in hits] == ["a"]
    out = ok(cli("put", "kb", "b", "penguins on the ice"))
    assert "version 1" in out.stdout
    hits = as_json(
        cli("--json", "search", "kb", "birds", "--mode", "vector", "--consistency", "indexed")
    )
    assert {h["item"]["key"] for h in hits} == {"a", "b"}


def test_watch_from_start_prints_count_events_as_json_lines(cli: Cli) -> None:
    ok(cli("put", "w", "a", "1"))
    ok(cli("put", "w", "a", "2"))
    ok(cli("publish", "w/chan", '{"hello": "world"}'))
    lines = ok(cli("watch", "w", "--from-start", "--count", "3", "--json")).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [(e["type"], e["version"]) for e in events[:2]] == [("item.put", 1), ("item.put", 2)]
    assert (events[2]["type"], events[2]["namespace"]) == ("publish", "w/chan")
    assert events[2]["data"] == {"hello": "world"}


def test_watch_after_a_cursor_resumes_after_it(cli: Cli) -> None:
    first = as_json(cli("publish", "w", "1", "--json"))
    ok(cli("publish", "w", "2"))
    out = ok(cli("watch", "--after", first["cursor"], "--count", "1")).stdout
    assert "publish" in out and " 2" in out


def test_session_create_append_and_messages(cli: Cli) -> None:
    created = as_json(
        cli("session", "create", "--app", "demo", "--user", "u1", "--id", "s1", "--json")
    )
    assert (created["id"], created["app"], created["user"]) == ("s1", "demo", "u1")
    ok(cli("session", "append", "s1", "user", "hi there", "--tokens-in", "3"))
    appended = cli("session", "append", "s1", "assistant", "hello", "--tokens-out", "5", "--json")
    assert as_json(appended)["seq"] == 2
    messages = as_json(cli("session", "messages", "s1", "--json"))
    assert [(m["seq"], m["role"], m["content"]) for m in messages] == [
        (1, "user", "hi there"),
        (2, "assistant", "hello"),
    ]
    assert [
        m["seq"] for m in as_json(cli("session", "messages", "s1", "--after", "1", "--json"))
    ] == [2]
    session = as_json(cli("session", "get", "s1", "--json"))
    assert (session["messages"], session["turns"], session["tokens_in"], session["tokens_out"]) == (
        2,
        1,
        3,
        5,
    )
    assert "hi there" in ok(cli("session", "messages", "s1")).stdout


def test_session_ls_filters_and_rm_deletes(cli: Cli) -> None:
    ok(cli("session", "create", "--app", "a1", "--id", "x"))
    ok(cli("session", "create", "--app", "a2", "--id", "y", "--agent-id", "bot"))
    assert [s["id"] for s in as_json(cli("session", "ls", "--app", "a2", "--json"))] == ["y"]
    assert [s["id"] for s in as_json(cli("session", "ls", "--agent-id", "bot", "--json"))] == ["y"]
    ok(cli("session", "rm", "x"))
    assert cli("session", "get", "x").exit_code == 1
    assert cli("session", "rm", "x").exit_code == 1


def test_session_state_shows_saves_and_checks_the_version(cli: Cli) -> None:
    ok(cli("session", "create", "--app", "demo", "--id", "s"))
    assert as_json(cli("session", "state", "s", "--json")) == {"state": {}, "state_version": 0}
    ok(cli("session", "state", "s", '{"step": 1}'))
    assert as_json(cli("session", "state", "s", "--json")) == {
        "state": {"step": 1},
        "state_version": 1,
    }
    stale = cli("session", "state", "s", '{"step": 2}', "--if-version", "0")
    assert stale.exit_code == 2 and "if_version" in stale.stderr
    not_object = cli("session", "state", "s", "[1, 2]")
    assert not_object.exit_code == 2 and "field: state" in not_object.stderr


def test_session_create_with_ttl_shows_the_ttl_and_when_it_expires(cli: Cli) -> None:
    created = as_json(cli("session", "create", "--app", "a", "--id", "s", "--ttl", "90", "--json"))
    assert created["ttl"] == 90
    assert created["expires_at"] is not None
    shown = ok(cli("session", "get", "s")).stdout
    assert "90 s" in shown and "expires_at" in shown
    assert "expires" in ok(cli("session", "ls")).stdout


def test_a_session_without_ttl_shows_no_ttl_or_expiry(cli: Cli) -> None:
    created = as_json(cli("session", "create", "--app", "a", "--id", "s", "--json"))
    assert (created["ttl"], created["expires_at"]) == (None, None)
    assert "expires" not in ok(cli("session", "get", "s")).stdout
    assert "expires" not in ok(cli("session", "ls")).stdout


@pytest.mark.parametrize("ttl", ["0", "-5", "nan"])
def test_session_create_with_a_bad_ttl_exits_2_naming_the_field(cli: Cli, ttl: str) -> None:
    result = cli("session", "create", "--app", "a", "--id", "s", "--ttl", ttl)
    assert result.exit_code == 2
    assert "field: ttl" in result.stderr
    assert cli("session", "get", "s").exit_code == 1


def test_session_commands_on_a_missing_session_exit_1(cli: Cli) -> None:
    assert cli("session", "messages", "nope").exit_code == 1
    assert cli("session", "append", "nope", "user", "hi").exit_code == 1


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the click group, with the words that invoke it."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield (*path, name), command
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_help_explains_every_option_of_every_command() -> None:
    runner = CliRunner()
    root = typer.main.get_command(app)
    commands = [((), root), *_commands(root)]
    assert {" ".join(p) for p, _ in commands} >= {
        *("serve", "put", "get", "ls", "ns", "rm", "history", "watch", "publish"),
        *("session create", "session get", "session ls", "session rm", "session append"),
        *("session messages", "session state"),
    }
    for path, command in commands:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert command.help, f"{path} has no description"
        for param in command.params:
            assert getattr(param, "help", None), f"{path} {param.name} has no help"
            for opt in param.opts:
                if opt.startswith("-"):
                    assert opt in result.stdout, (path, opt)


def test_app_help_shows_examples() -> None:
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert "Examples" in out and "hivemem put" in out and "hivemem watch" in out


def test_serve_runs_the_service_that_client_commands_use(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory("cli")
    assert f"serving http://127.0.0.1:{svc.port}" in svc.output()
    runner = CliRunner()
    put = runner.invoke(app, ["--url", svc.url, "put", "remote/ns", "k", '{"a": 1}', "--json"])
    assert json.loads(ok(put).stdout)["version"] == 1
    got = runner.invoke(app, ["--url", svc.url, "--agent", "other", "get", "remote/ns", "k"])
    assert json.loads(ok(got).stdout) == {"a": 1}
    missing = runner.invoke(app, ["--url", svc.url, "get", "remote/ns", "missing"])
    assert missing.exit_code == 1
    bad = runner.invoke(app, ["--url", svc.url, "put", "bad ns!", "k", "v"])
    assert bad.exit_code == 2 and "field: namespace" in bad.stderr


def test_settings_order_file_then_env_then_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hivemem.config import Settings

    conf = tmp_path / "hivemem.toml"
    conf.write_text('[hivemem]\nhistory_limit = 3\nsearch_rrf_k = 7.0\nlexical_index = "engine"\n')
    monkeypatch.delenv("HIVEMEM_CONFIG", raising=False)
    monkeypatch.setenv("HIVEMEM_SEARCH_RRF_K", "9")
    s = Settings.load(conf, {"lexical_index": "memory"})
    assert (s.history_limit, s.search_rrf_k, s.lexical_index) == (3, 9.0, "memory")
    monkeypatch.setenv("HIVEMEM_CONFIG", str(conf))
    assert Settings.load().history_limit == 3


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--config", "{tmp}/missing.toml"], "config"),
        (["--config", "{tmp}/bad.toml"], "config.no_such_setting"),
        (["--set", "history_limit"], "set"),
        (["--set", "nope=1"], "set.nope"),
        (["--set", "history_limit=-1"], "history_limit"),
    ],
)
def test_serve_rejects_bad_settings_naming_the_field(
    tmp_path: Path, args: list[str], field: str
) -> None:
    (tmp_path / "bad.toml").write_text("no_such_setting = 1\n")
    argv = ["serve", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    result = CliRunner().invoke(app, argv, env={"HIVEMEM_CONFIG": ""})
    assert result.exit_code == 2, result.output
    assert f"field: {field}" in result.stderr


# --- watch says what it waits for; Conflict states its version once; serve names /docs ---


def as_from_a_terminal() -> None:
    """In the child before it runs: SIGINT handled by default, as for a command typed at
    a terminal. A suite started as a background job (``pytest &`` in a script) runs
    with SIGINT ignored, and its children rightly inherit that (POSIX), so Ctrl-C could
    not be tested there otherwise."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_on_a_quiet_feed_says_on_stderr_that_it_waits_and_how_to_stop(url: str) -> None:
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "hivemem",
        "--url",
        url,
        "watch",
        "team/research",
    ]
    env = {**os.environ, "HIVEMEM_EMBEDDER": "none", "COLUMNS": "200"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, "watch printed nothing on stderr within 30 s"
        line = proc.stderr.readline()
        assert "waiting for events under 'team/research'" in line
        assert "new events only" in line and "Ctrl-C to stop" in line
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack
            _, stacks = proc.communicate(timeout=10)
            raise AssertionError(f"Ctrl-C did not stop watch within 30 s:\n{stacks}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert stdout == ""
    assert "Traceback" not in stderr


def test_watch_json_keeps_the_waiting_line_off_stdout(cli: Cli) -> None:
    ok(cli("put", "w", "a", "1"))
    result = ok(cli("watch", "w", "--from-start", "--count", "1", "--json"))
    assert [json.loads(line)["key"] for line in result.stdout.splitlines()] == ["a"]
    assert "waiting for events under 'w' (from the oldest kept event)" in result.stderr
    every = ok(cli("watch", "--after", "0", "--count", "1"))
    assert "waiting for events in every namespace (after cursor 0)" in every.stderr


@pytest.mark.parametrize(
    ("setup", "args", "version"),
    [
        ([["put", "t", "k", "v1"]], ["put", "t", "k", "v2", "--if-version", "5"], 1),
        ([], ["put", "t", "absent", "v", "--if-version", "3"], 0),
        ([], ["rm", "t", "absent", "--if-version", "0"], 0),
        (
            [["session", "create", "--app", "a", "--id", "s"]],
            ["session", "state", "s", "{}", "--if-version", "4"],
            0,
        ),
    ],
)
def test_a_conflict_states_the_current_version_once(
    cli: Cli, setup: list[list[str]], args: list[str], version: int
) -> None:
    for command in setup:
        ok(cli(*command))
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert len(re.findall(r"\bversion\b", result.stderr)) == 1, result.stderr
    assert f"version {version}" in result.stderr
    assert "current version" not in result.stderr


def test_a_conflict_message_without_its_version_gets_it_appended(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(typer.Exit) as exited:
        fail(Conflict("someone else wrote first", field="if_version", current_version=7))
    assert exited.value.exit_code == 2
    err = capsys.readouterr().err
    assert "someone else wrote first (field: if_version) (current version: 7)" in err
    with pytest.raises(typer.Exit):
        fail(Conflict("agent 'x' already exists", field="name"))
    assert "version" not in capsys.readouterr().err


def test_serve_prints_its_url_the_docs_url_and_the_store_without_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    import uvicorn

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))
    store = "postgresql://hive:s3cret@127.0.0.1:1/hive"
    argv = ["serve", "--store", store, "--port", "9876"]
    result = CliRunner().invoke(app, argv, env={"HIVEMEM_CONFIG": "", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert line.startswith("hivemem serving http://127.0.0.1:9876 ")
    assert "API docs: http://127.0.0.1:9876/docs" in line
    assert "console: http://127.0.0.1:9876/ui" in line
    assert "store: postgresql://hive:***@127.0.0.1:1/hive" in line
    assert "s3cret" not in result.output
    assert served and served[0]["port"] == 9876
    argv = ["serve", "--host", "::1", "--store", url]
    ipv6 = CliRunner().invoke(app, argv, env={"HIVEMEM_CONFIG": ""})
    assert "http://[::1]:8765/docs" in ok(ipv6).stdout


def test_serve_docs_url_answers_and_a_remote_conflict_states_its_version_once(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory("docs")
    assert f"API docs: {svc.url}/docs" in svc.output()
    with urllib.request.urlopen(f"{svc.url}/docs", timeout=10) as response:
        assert response.status == 200
    runner = CliRunner()
    ok(runner.invoke(app, ["--url", svc.url, "put", "remote/ns", "k", "v"]))
    stale = runner.invoke(
        app, ["--url", svc.url, "put", "remote/ns", "k", "w", "--if-version", "3"]
    )
    assert stale.exit_code == 2
    assert len(re.findall(r"\bversion\b", stale.stderr)) == 1, stale.stderr
    assert "version 1" in stale.stderr


def test_eval_locomo_without_a_file_reads_hivemem_locomo_or_says_how_to_name_one(
    tmp_path: Path,
) -> None:
    sample = tmp_path / "tiny.json"
    conversation = {
        "speaker_a": "Ann",
        "speaker_b": "Ben",
        "session_1_date_time": "1 May 2024",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I bake bread on Sundays"},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "I play the violin"},
        ],
    }
    qa = [
        {"question": "What does Ann bake?", "answer": "bread", "evidence": ["D1:1"], "category": 4}
    ]
    data = [{"sample_id": "s1", "conversation": conversation, "qa": qa}]
    sample.write_text(json.dumps(data), "utf-8")
    argv = ["eval", "locomo", "--embedder", "none", "--k", "1"]
    runner = CliRunner()
    result = ok(runner.invoke(app, argv, env={"HIVEMEM_LOCOMO": str(sample), "COLUMNS": "200"}))
    assert "1 conversations, 2 turns, 1 questions" in result.stdout
    missing = tmp_path / "missing.json"
    result = runner.invoke(app, argv, env={"HIVEMEM_LOCOMO": str(missing), "COLUMNS": "200"})
    assert result.exit_code == 2
    assert f"no LoCoMo file at {missing}" in result.stderr
    assert "HIVEMEM_LOCOMO" in result.stderr and "field: file" in result.stderr


def test_tasks_ls_show_stats_cancel_and_requeue(cli: Cli, url: str) -> None:
    import hivemem

    with hivemem.connect_sync(url, agent="boss") as hive:
        first = hive.submit("jobs/mail", {"to": "bob"})
        second = hive.submit("jobs/mail", {"to": "eve"}, max_attempts=1)
        claimed = hive.claim("jobs/mail")
        assert claimed is not None and claimed.id == first.id
        hive.complete(claimed, "sent")
        claimed = hive.claim("jobs/mail")
        assert claimed is not None
        hive.fail(claimed, "mailbox full")
    listing = ok(cli("tasks", "ls", "jobs/mail")).stdout
    assert first.id in listing and second.id in listing and "dead" in listing
    assert [
        t["id"]
        for t in as_json(cli("tasks", "ls", "jobs/mail", "--state", "dead", "--json"))["items"]
    ] == [second.id]
    shown = ok(cli("tasks", "show", second.id)).stdout
    assert "mailbox full" in shown and "dead" in shown
    stats = as_json(cli("tasks", "stats", "jobs/mail", "--json"))
    assert (stats["completed"], stats["dead"], stats["ready"]) == (1, 1, 0)
    assert "ready" in ok(cli("tasks", "requeue", second.id)).stderr
    assert "cancelled" in ok(cli("tasks", "cancel", second.id)).stderr
    refused = cli("tasks", "cancel", second.id)
    assert refused.exit_code == 2 and "task_id" in refused.stderr
    missing = cli("tasks", "show", "0123456789abcdef")
    assert missing.exit_code == 1 and "task_id" in missing.stderr


def test_agents_status_lists_registered_agents(cli: Cli, url: str) -> None:
    import hivemem

    with hivemem.connect_sync(url, agent="summariser") as hive:
        hive.register("summariser", capabilities=["summarise"], ttl=30, heartbeat=False)
    table = ok(cli("agents", "status")).stdout
    assert "summariser" in table and "up" in table
    (record,) = as_json(cli("agents", "status", "--capability", "summarise", "--json"))
    assert (record["name"], record["healthy"]) == ("summariser", True)
    assert as_json(cli("agents", "status", "--capability", "nothing", "--json")) == []


def test_worker_runs_a_module_function_until_sigterm(url: str, tmp_path: Path) -> None:
    import hivemem

    (tmp_path / "jobs_mod.py").write_text("def double(task):\n    return task.payload * 2\n")
    with hivemem.connect_sync(url, agent="boss") as hive:
        tasks = [hive.submit("math", n) for n in range(3)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hivemem",
            "worker",
            "jobs_mod:double",
            "--queue",
            "math",
            "--url",
            url,
            "--agent",
            "w1",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with hivemem.connect_sync(url, agent="boss") as hive:
            done = [hive.result(t.id, wait=30) for t in tasks]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert [t.result for t in done] == [0, 2, 4] and {t.claimed_by for t in done} == {"w1"}
    assert proc.returncode == 0
    assert err.count(" completed in ") == 3 and "stopped: 3 completed" in err
    bad = subprocess.run(
        [sys.executable, "-m", "hivemem", "worker", "nowhere:fn", "--queue", "math", "--url", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "target" in bad.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://h/db?user=u&password=secret&x=1",
            "postgresql://h/db?user=u&password=***&x=1",
        ),
        ("redis://h:6379?password=secret", "redis://h:6379?password=***"),
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("redis+cluster://u:secret@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
        ("sqlite:///a.db", "sqlite:///a.db"),
    ],
)
def test_store_passwords_are_redacted_wherever_the_url_holds_them(url: str, shown: str) -> None:
    from hivemem.backends.redis.engine import redact
    from hivemem.config import redact_url
    from hivemem.policy.limits import _redact

    assert redact_url(url) == shown
    assert redact(url) == shown and _redact(url) == shown


def test_hivemem_url_names_the_store_of_connect_and_of_every_cli_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hivemem

    store = tmp_path / "named.db"
    monkeypatch.setenv("HIVEMEM_URL", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    with hivemem.connect_sync(agent="env") as hive:  # no URL: HIVEMEM_URL
        hive.put("team", "from-connect", 1)
    runner = CliRunner()
    env = {"COLUMNS": "200", "HIVEMEM_URL": f"sqlite:///{store}"}
    ok(runner.invoke(app, ["put", "team", "from-cli", "2"], env=env))
    listed = ok(runner.invoke(app, ["ls", "team", "--json"], env=env)).stdout
    assert {i["key"] for i in json.loads(listed)["items"]} == {"from-connect", "from-cli"}
    made = json.loads(
        ok(runner.invoke(app, ["session", "create", "--app", "env-test", "--json"], env=env)).stdout
    )
    with hivemem.connect_sync(f"sqlite:///{store}", agent="check") as hive:
        assert hive.get_session(made["id"]) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["named.db"]


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[str, str]:
    """Run ``hivemem ARGS`` with stderr on a pseudo-terminal; (stderr, stdout)."""

    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hivemem", *args],
        stderr=slave,
        stdout=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "100", **env},
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    out = proc.communicate(timeout=60)[0]
    os.close(master)
    return b"".join(chunks).decode(errors="replace"), out.decode()


@pytest.mark.parametrize(("mode", "shown"), [("deferred", False), ("sync", True)])
def test_the_model_spinner_shows_only_when_a_put_loads_the_model(
    tmp_path: Path, mode: str, shown: bool
) -> None:
    err_text, out = _stderr_on_a_terminal(
        ["--url", f"sqlite:///{tmp_path}/s.db", "put", "ns", "k", '{"text": "hello world"}'],
        {"HIVEMEM_INDEX_MODE": mode},
    )
    assert out == "ns k: version 1\n"
    assert ("loading the search model" in err_text) is shown, err_text
