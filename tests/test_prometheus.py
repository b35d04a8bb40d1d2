"""deploy/prometheus: the rules pass ``promtool check`` and their unit tests (each alert
fires on its synthetic series and none on a healthy replica); and a real Prometheus
scraping three replicas under load sees them all, aggregates their request rate within
10 % of the load sent and their counters exactly, and fires the replica-down alert when
one is killed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ServiceProcess
from tests.servers.prometheus import PrometheusServer

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
GRAFANA = DEPLOY.parent / "grafana"
RULES = [DEPLOY / "rules" / "recording.yml", DEPLOY / "rules" / "alerts.yml"]
ITEMS = "/v1/items/{path:anypath}"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is not on PATH (Debian: apt-get install prometheus)"
    return subprocess.run([binary, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)


def test_the_config_and_rules_check() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rule files found" in done.stdout + done.stderr
    done = promtool("check", "rules", *(str(p) for p in RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_on_its_series_and_none_on_a_healthy_replica() -> None:
    done = promtool("test", "rules", "tests/alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert of the rules file has a test of its own in which it fires.
    alerts = re.findall(r"- alert: (\w+)", RULES[1].read_text())
    tests = (DEPLOY / "tests" / "alerts_test.yml").read_text()
    assert len(alerts) == 11
    for name in alerts:
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests), name


def test_a_broken_alert_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the error-rate threshold raised to 50 % misses the 10 %
    series."""
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES[1].read_text().replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.5"))
    shutil.copy(RULES[0], tmp_path / "recording.yml")
    test = tmp_path / "t.yml"
    test.write_text(
        (DEPLOY / "tests" / "alerts_test.yml")
        .read_text()
        .replace("../rules/recording.yml", str(tmp_path / "recording.yml"))
        .replace("../rules/alerts.yml", str(broken))
    )
    done = promtool("test", "rules", str(test))
    assert done.returncode != 0 and "HivememHighErrorRate" in done.stdout + done.stderr


@pytest.mark.matrix
@pytest.mark.slow  # three replicas and Prometheus: in the "processes" group, one at a time
def test_prometheus_aggregates_three_replicas_and_sees_one_die(
    tmp_path: Path, redis_url: str
) -> None:
    env = {"HIVEMEM_EMBEDDER": "none"}
    replicas = [
        ServiceProcess(tmp_path / f"r{i}.db", store_url=redis_url, env=env) for i in range(3)
    ]
    # The alert rules as shipped, with the replica-down hold cut from 1 m to 2 s.
    alerts = tmp_path / "alerts.yml"
    text = RULES[1].read_text()
    down = 'expr: up{job="hivemem"} == 0\n        for: '
    text = text.replace(down + "1m", down + "2s")
    assert "for: 2s" in text
    alerts.write_text(text)
    try:
        for r in replicas:
            r.start()
        targets = [f"127.0.0.1:{r.port}" for r in replicas]
        with PrometheusServer(targets, [RULES[0], alerts], interval=1.0) as prom:
            deadline = time.monotonic() + 30
            while prom.value('count(up{job="hivemem"} == 1)') != 3:
                assert time.monotonic() < deadline, prom.output()
                time.sleep(0.5)
            sent, rate_seen, rate_sent = asyncio.run(_load(prom, [r.url for r in replicas]))
            time.sleep(3)  # two more scrapes
            total = prom.value(f'sum(hivemem_http_requests_total{{route="{ITEMS}"}})')
            assert total == sent
            assert rate_seen == pytest.approx(rate_sent, rel=0.10)
            replicas[1].kill9()
            deadline = time.monotonic() + 30
            firing: list[dict[str, object]] = []
            while not firing:
                assert time.monotonic() < deadline, prom.output()
                time.sleep(0.5)
                firing = prom.query('ALERTS{alertname="HivememReplicaDown",alertstate="firing"}')
            assert [a["metric"]["instance"] for a in firing] == [targets[1]]  # type: ignore[index]
            assert prom.value('count(up{job="hivemem"} == 1)') == 2
            # Every query of the Grafana dashboard parses and runs on these series.
            dashboard = json.loads((GRAFANA / "hivemem.json").read_text())
            exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
            assert len(exprs) >= 20
            for expr in exprs:
                prom.query(expr.replace("${datasource}", ""))
            assert prom.value("hivemem:http_requests:rate1m") is not None
    finally:
        for r in replicas:
            r.terminate()


#: The load: requests per second over all replicas, and for how long (seconds).
RATE, SECONDS = 60, 14


async def _load(prom: PrometheusServer, urls: list[str]) -> tuple[int, float, float]:
    """GETs and PUTs at :data:`RATE` per second round-robin over the replicas for
    :data:`SECONDS`; returns the requests sent, the aggregate rate Prometheus saw over
    the last 10 s of the load (asked near its end) and the rate actually sent then."""
    sent: list[float] = []
    seen: list[float] = []
    start = time.monotonic()
    async with aiohttp.ClientSession(headers={"X-Hivemem-Agent": "load"}) as http:

        async def one(i: int) -> None:
            url = f"{urls[i % len(urls)]}/v1/items/load/k{i % 50}"
            if i % 4 == 0:
                async with http.put(url, json={"value": i}) as resp:
                    assert resp.status in (200, 201)
            else:
                async with http.get(url) as resp:
                    assert resp.status in (200, 404)
            sent.append(time.monotonic())

        pending = set()
        i = 0
        while time.monotonic() - start < SECONDS:
            due = start + i / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pending.add(asyncio.create_task(one(i)))
            i += 1
            if not seen and time.monotonic() - start > SECONDS - 1.5:
                asked = time.monotonic()
                query = f'sum(rate(hivemem_http_requests_total{{route="{ITEMS}"}}[10s]))'
                got = await asyncio.to_thread(prom.value, query)
                assert got is not None
                seen.append(got)
                seen.append(sum(1 for t in sent if asked - 10 <= t <= asked) / 10)
        await asyncio.gather(*pending)
    return len(sent), seen[0], seen[1]
