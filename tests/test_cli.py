"""The ``hivemem`` command line, driven through typer's CliRunner against a SQLite file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from hivemem.cli import app

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
    assert "field: if_version" in result.stderr and "current version: 1" in result.stderr
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
