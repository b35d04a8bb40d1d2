"""Service replicas over one shared store: three `hivemem serve` processes over one
PostgreSQL and over one Redis Cluster, 32 concurrent clients doing compare-and-set
increments and plain writes while one replica is killed with SIGKILL (and, on the
cluster, one master is stopped so that its replica is promoted).

Afterwards: every write that got a success is there, none was applied twice, the
counters are exact, and a watcher on a surviving replica saw every event exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import hivemem
from hivemem import Conflict, Event
from hivemem.config import Settings
from tests.conftest import ServiceProcess
from tests.servers.redis import RedisClusterServers

pytestmark = pytest.mark.slow

CLIENTS = 32
ROUNDS = 5
COUNTERS = 4
CLIENT_SETTINGS = Settings(
    client_attempts=20,
    client_backoff_seconds=0.05,
    client_circuit_open_seconds=0.5,
    request_timeout_seconds=15,
    watch_reconnect_seconds=60,
)


def replicas_over(store_url: str, tmp_path: Path, n: int = 3) -> list[ServiceProcess]:
    """``n`` started services over ``store_url`` (the caller stops them)."""
    made = []
    for i in range(n):
        svc = ServiceProcess(
            tmp_path / f"unused-{i}.db", log_path=tmp_path / f"replica{i}.log", store_url=store_url
        )
        made.append(svc)
        svc.start()
    return made


@pytest.fixture
def stop_all() -> Iterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    yield procs
    for svc in procs:
        svc.terminate()


async def run_with_disruption(
    replicas: list[ServiceProcess], ns: str, disrupt: Callable[[], Awaitable[None]]
) -> None:
    """The scenario of the module notes; ``disrupt`` runs once a third of the work is done.
    Replica 0 may be killed; replica 2 hosts the watcher and must survive."""
    urls = ",".join(svc.url for svc in replicas)
    setup = hivemem.connect(urls, agent="setup", settings=CLIENT_SETTINGS)
    watcher_hive = hivemem.connect(replicas[2].url, agent="watcher", settings=CLIENT_SETTINGS)
    async with setup, watcher_hive:
        start = await setup.head()
        for c in range(COUNTERS):
            await setup.put(ns, f"counter{c}", 0, if_version=0)
        seen: list[Event] = []
        done_channel = f"{ns}/done"

        async def watch() -> None:
            async for event in watcher_hive.watch(ns, after=start):
                if event.type == "publish" and event.namespace == done_channel:
                    return
                seen.append(event)

        watcher = asyncio.create_task(watch())
        increments: list[tuple[str, int]] = []
        uniques: list[str] = []
        progress = 0
        third = asyncio.Event()

        async def client(i: int) -> None:
            nonlocal progress
            hive = hivemem.connect(urls, agent=f"client{i}", settings=CLIENT_SETTINGS)
            async with hive:
                for r in range(ROUNDS):
                    key = f"counter{(i + r) % COUNTERS}"
                    while True:
                        item = await hive.get(ns, key)
                        assert item is not None
                        try:
                            new = await hive.put(ns, key, item.value + 1, if_version=item.version)
                        except Conflict:
                            continue
                        increments.append((key, new.version))
                        break
                    unique = f"u{i}-{r}"
                    assert (await hive.put(ns, unique, {"i": i, "r": r})).version == 1
                    uniques.append(unique)
                    progress += 1
                    if progress >= CLIENTS * ROUNDS // 3:
                        third.set()

        clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        await third.wait()
        await disrupt()
        await asyncio.gather(*clients)
        await setup.publish(done_channel, {"done": True})
        await asyncio.wait_for(watcher, 120)

        # Counters are exact; every acknowledged increment is a distinct version.
        assert len(increments) == CLIENTS * ROUNDS
        per_counter = Counter(key for key, _ in increments)
        for c in range(COUNTERS):
            key = f"counter{c}"
            item = await setup.get(ns, key)
            assert item is not None
            assert item.value == per_counter[key], key
            assert item.version == per_counter[key] + 1, key
            versions = sorted(v for k, v in increments if k == key)
            assert versions == list(range(2, item.version + 1)), key
        # Every acknowledged plain write is there, applied once.
        listed = {i.key: i for i in (await setup.list(ns, limit=1000)).items}
        for unique in uniques:
            assert listed[unique].version == 1, unique
        # The watcher saw each change exactly once, and nothing else.
        puts = [(e.key, e.version) for e in seen if e.type == "item.put"]
        assert len(puts) == len(set(puts)), "an event was delivered twice"
        expected = {(f"counter{c}", 1) for c in range(COUNTERS)}
        expected |= {(k, v) for k, v in increments} | {(u, 1) for u in uniques}
        assert set(puts) == expected


async def test_replicas_over_postgres_survive_a_killed_replica(
    postgres_url: str, tmp_path: Path, stop_all: list[ServiceProcess]
) -> None:
    replicas = replicas_over(postgres_url, tmp_path)
    stop_all.extend(replicas)

    async def disrupt() -> None:
        replicas[0].kill9()

    await run_with_disruption(replicas, f"chaos{int(time.time() * 1000)}", disrupt)


@pytest.mark.matrix
async def test_replicas_over_redis_cluster_survive_a_killed_replica_and_master(
    tmp_path: Path, stop_all: list[ServiceProcess]
) -> None:
    with RedisClusterServers() as cluster:
        replicas = replicas_over(cluster.url, tmp_path)
        stop_all.extend(replicas)

        async def disrupt() -> None:
            replicas[0].kill9()
            dead = await asyncio.to_thread(cluster.stop_master)
            await asyncio.to_thread(cluster.wait_for_failover, dead)

        await run_with_disruption(replicas, "chaos", disrupt)


async def test_a_watcher_on_one_replica_sees_writes_through_another(
    postgres_url: str, tmp_path: Path, stop_all: list[ServiceProcess]
) -> None:
    a, b = replicas_over(postgres_url, tmp_path, 2)
    stop_all.extend([a, b])
    ns = f"ab{int(time.time() * 1000)}"
    hive_a = hivemem.connect(a.url, agent="wa")
    hive_b = hivemem.connect(b.url, agent="wb")
    async with hive_a, hive_b:
        start = await hive_a.head()
        got: list[Event] = []

        async def watch() -> None:
            async for event in hive_a.watch(ns, after=start):
                got.append(event)
                if len(got) == 3:
                    return

        task = asyncio.create_task(watch())
        for i in range(3):
            await hive_b.put(ns, f"k{i}", i)
        await asyncio.wait_for(task, 30)
        assert [(e.key, e.author) for e in got] == [("k0", "wb"), ("k1", "wb"), ("k2", "wb")]
