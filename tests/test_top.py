"""``hivemem top``: rates between two scrapes are right, a real replica is read, an
unreachable one is shown as such, and none answering exits 1 with a message."""

from __future__ import annotations

import urllib.request

from typer.testing import CliRunner

from hivemem.cli import app
from hivemem.cli.top import Sample, parse, table
from tests.conftest import ServiceProcess, free_port


def test_rates_between_two_scrapes() -> None:
    old = Sample("http://a", at=10.0, requests=100, errors_5xx=1, cpu_seconds=5.0)
    new = Sample("http://a", at=12.0, requests=300, errors_5xx=5, cpu_seconds=6.0)
    new.request_seconds, new.request_count = 2.0, 200  # 10 ms each
    new.tasks = {"ready": 7, "running": 2, "dead": 1}
    rendered = table([old], [new])
    cells = [list(col.cells) for col in rendered.columns]
    row = [c[0] for c in cells]
    assert row[:6] == ["http://a", "100.0", "2.00", "10.00", "0.0", "0.00"]
    assert row[6] == "50" and row[-3:] == ["7", "2", "1"]


def test_parse_reads_the_exposition() -> None:
    text = (
        'hivemem_http_requests_total{route="/x",method="GET",status="200"} 7\n'
        'hivemem_http_requests_total{route="/x",method="GET",status="503"} 2\n'
        'hivemem_tasks{queue="q",state="ready"} 4\n'
        "process_resident_memory_bytes 1048576\n"
    )
    s = parse("u", text, 1.0)
    assert (s.requests, s.errors_5xx, s.tasks, s.rss_bytes) == (9, 2, {"ready": 4}, 1048576)


def test_top_reads_a_replica_and_marks_a_dead_one(service: ServiceProcess) -> None:
    with urllib.request.urlopen(service.url + "/healthz") as resp:
        assert resp.status == 200
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        app,
        ["top", "--url", f"{service.url},{dead}", "--once", "--interval", "0.3"],
        env={"COLUMNS": "240"},
    )
    assert result.exit_code == 0, result.output
    assert service.url in result.output and "URLError" in result.output
    assert "all" in result.output  # the total row of several replicas


def test_top_exits_1_when_no_replica_answers() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["top", "--url", dead, "--once", "--interval", "0.2"])
    assert result.exit_code == 1 and "no replica answered" in result.output
