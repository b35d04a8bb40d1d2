"""Client failover: the circuit breaker's states, and a RemoteHive over two replicas that
keeps working while one is killed and uses it again once it is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import hivemem
from hivemem.client.endpoints import Endpoints
from hivemem.client.remote import RemoteHive
from hivemem.config import Settings
from tests.conftest import ServiceProcess, free_port


def test_round_robin_over_healthy_replicas() -> None:
    eps = Endpoints(["a", "b", "c"], failures_to_open=3, open_seconds=0.2)
    picked = [eps.pick().url for _ in range(6)]
    assert sorted(picked[:3]) == ["a", "b", "c"] and picked[:3] == picked[3:]


def test_refused_connection_opens_at_once_then_a_probe_closes_it() -> None:
    eps = Endpoints(["a", "b"], failures_to_open=3, open_seconds=0.2)
    a = next(ep for ep in eps.all if ep.url == "a")
    eps.failed(a, refused=True)
    assert eps.healthy() == ["b"]
    assert {eps.pick().url for _ in range(5)} == {"b"}
    time.sleep(0.25)
    probes = [eps.pick().url for _ in range(4)]
    assert probes.count("a") == 1  # one probe while its outcome is unknown
    eps.succeeded(a)
    assert sorted(eps.healthy()) == ["a", "b"]


def test_failures_open_after_threshold_and_backoff_doubles() -> None:
    eps = Endpoints(["a", "b"], failures_to_open=3, open_seconds=0.2)
    a = eps.all[0]
    eps.failed(a)
    eps.failed(a)
    assert a.closed
    eps.failed(a)
    assert not a.closed and a.open_seconds == pytest.approx(0.2)
    time.sleep(0.25)
    while eps.pick() is not a:
        pass
    eps.failed(a)  # the probe failed: out for twice as long
    assert not a.closed and a.open_seconds == pytest.approx(0.4)


def test_all_replicas_out_still_tries_the_soonest() -> None:
    eps = Endpoints(["a", "b"], failures_to_open=1, open_seconds=5.0)
    eps.failed(eps.all[0], refused=True)
    time.sleep(0.01)
    eps.failed(eps.all[1], refused=True)
    assert eps.pick().url == "a"


async def test_writes_survive_the_kill_of_a_replica(tmp_path: Path) -> None:
    store = tmp_path / "shared.db"
    replicas = [
        ServiceProcess(store, free_port(), log_path=tmp_path / f"r{i}.log") for i in range(2)
    ]
    for svc in replicas:
        svc.start()
    settings = Settings(client_circuit_open_seconds=0.3, request_timeout_seconds=5)
    hive = hivemem.connect(",".join(s.url for s in replicas), agent="w", settings=settings)
    assert isinstance(hive, RemoteHive)
    try:
        async with hive:
            ns = "failover"
            done = 0
            started = asyncio.Event()

            async def writer(n: int) -> None:
                nonlocal done
                for i in range(40):
                    await hive.put(ns, f"w{n}-{i}", i)
                    done += 1
                    if done >= 30:
                        started.set()
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(writer(n)) for n in range(4)]
            await started.wait()
            replicas[0].kill9()  # mid-run: some requests are in flight on it
            await asyncio.gather(*tasks)
            page = await hive.list(ns, limit=1000)
            assert len(page.items) == 160
            assert all(item.version == 1 for item in page.items)  # none applied twice
            endpoints = hive._shared.endpoints
            assert replicas[0].url not in endpoints.healthy()
            replicas[0].start()
            await asyncio.sleep(0.4)
            deadline = time.monotonic() + 10
            while replicas[0].url not in endpoints.healthy():
                assert time.monotonic() < deadline, "the restarted replica was never probed"
                await hive.get(ns, "w0-0")
                await asyncio.sleep(0.05)
    finally:
        for svc in replicas:
            svc.terminate()
