"""The service with credentials: JWT bearer tokens, the client's API key, rate limits per
agent (shared by replicas through Redis), watch-stream limits, policy reload."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

import hivemem
from hivemem.errors import PermissionDenied, RateLimited, Unauthenticated
from tests.conftest import HEALTH_TIMEOUT_SECONDS, ServiceProcess, free_port
from tests.test_permissions import POLICY, add_agent

SECRET = "s" * 40
ISSUER = "https://issuer.test"
AUDIENCE = "hivemem-test"


def token(sub: str = "jay", *, secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, "HS256")


@pytest.fixture(scope="module")
def jwt_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("jwt")
    (base / "policy.toml").write_text(POLICY)
    svc = ServiceProcess(
        base / "hive.db",
        env={
            "HIVEMEM_AUTH": "true",
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_POLICY_FILE": str(base / "policy.toml"),
            "HIVEMEM_JWT_SECRET": SECRET,
            "HIVEMEM_JWT_ISSUER": ISSUER,
            "HIVEMEM_JWT_AUDIENCE": AUDIENCE,
            "HIVEMEM_JWT_LEEWAY_SECONDS": "0",
            "HIVEMEM_RATE_LIMIT_WRITE": "5/minute",
            "HIVEMEM_MAX_WATCH_STREAMS_PER_AGENT": "2",
        },
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.terminate()


async def status_of(
    url: str, bearer: str | None, method: str = "GET", **kw: Any
) -> tuple[int, Any]:
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers, **kw) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body


@pytest.mark.parametrize(
    "credential",
    [
        pytest.param(None, id="missing"),
        pytest.param(token(exp=int(time.time()) - 60), id="expired"),
        pytest.param(token(secret="x" * 40), id="wrongly-signed"),
        pytest.param(token(aud="someone-else"), id="wrong-audience"),
        pytest.param(token(iss="https://other.test"), id="wrong-issuer"),
        pytest.param(token(sub=None), id="no-subject"),
        pytest.param("not-a-token", id="garbage"),
    ],
)
async def test_bad_credentials_get_401(jwt_service: ServiceProcess, credential: str | None) -> None:
    status, body = await status_of(jwt_service.url + "/v1/events/head", credential)
    assert status == 401 and body["type"] == "/problems/unauthenticated", body


async def test_jwt_subject_is_the_author_and_the_policy_applies(
    jwt_service: ServiceProcess,
) -> None:
    hive = hivemem.connect(jwt_service.url, agent="ignored", api_key=token("jay"))
    async with hive:
        item = await hive.put("team/jay/notes", f"k{uuid.uuid4().hex[:6]}", 1)
        assert item.author == "jay"
        with pytest.raises(PermissionDenied):
            await hive.put("team/kay/notes", "k", 1)
        assert await hive.get("team/kay/notes", "k") is None


async def test_jwt_roles_claim_grants_builtin_roles(jwt_service: ServiceProcess) -> None:
    hive = hivemem.connect(jwt_service.url, api_key=token("ops", roles=["reader"]))
    writer = hivemem.connect(jwt_service.url, api_key=token("kay"))
    async with hive, writer:
        key = f"k{uuid.uuid4().hex[:6]}"
        await writer.put("team/kay/x", key, 1)
        item = await hive.get("team/kay/x", key)
        assert item is not None and item.author == "kay"
        with pytest.raises(PermissionDenied):
            await hive.put("elsewhere/x", "k", 1)


async def test_client_without_key_is_refused(jwt_service: ServiceProcess) -> None:
    async with hivemem.connect(jwt_service.url) as hive:
        with pytest.raises(Unauthenticated):
            await hive.head()


async def clear_of_a_window_boundary(period: float = 60.0, margin: float = 15.0) -> None:
    """Sleep past the next boundary of the limits' windows (aligned to multiples of
    ``period`` seconds of the clock) when it is less than ``margin`` seconds away. The
    sliding window counter weighs the previous window by the part of it still inside
    the sliding window, so just past a boundary a full window's 5 hits count as fewer
    than 5 and one more is allowed: a test that straddles a boundary would see it."""
    left = period - time.time() % period
    if left < margin:
        await asyncio.sleep(left + 0.5)


async def test_over_its_write_limit_an_agent_gets_429_while_another_is_served(
    jwt_service: ServiceProcess,
) -> None:
    await clear_of_a_window_boundary()
    url = jwt_service.url
    busy = f"busy{uuid.uuid4().hex[:6]}"
    statuses = []
    for i in range(7):
        status, body = await status_of(
            f"{url}/v1/items/team/{busy}/k{i}", token(busy), "PUT", json={"value": i}
        )
        statuses.append(status)
        if status == 429:
            assert body["type"] == "/problems/rate-limited" and body["retry_after"] > 0
    assert statuses[:5] == [201] * 5 and statuses[5:] == [429, 429], statuses
    other = f"calm{uuid.uuid4().hex[:6]}"
    status, _ = await status_of(
        f"{url}/v1/items/team/{other}/k", token(other), "PUT", json={"value": 1}
    )
    assert status == 201
    # Reads are another action class: still served for the limited agent.
    status, _ = await status_of(f"{url}/v1/items/team/{busy}/k0", token(busy))
    assert status == 200
    # The client raises RateLimited for a write (never retried).
    async with hivemem.connect(url, api_key=token(busy)) as hive:
        with pytest.raises(RateLimited) as info:
            await hive.put(f"team/{busy}", "again", 1)
        assert info.value.retry_after > 0


async def test_watch_streams_per_agent_are_bounded(jwt_service: ServiceProcess) -> None:
    agent = f"w{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {token(agent)}"}
    async with aiohttp.ClientSession() as http:
        first = await http.get(jwt_service.url + "/v1/watch", headers=headers)
        second = await http.get(jwt_service.url + "/v1/watch", headers=headers)
        assert first.status == second.status == 200
        third = await http.get(jwt_service.url + "/v1/watch", headers=headers)
        assert third.status == 429 and third.headers["Retry-After"]
        third.release()
        other = await http.get(
            jwt_service.url + "/v1/watch", headers={"Authorization": f"Bearer {token('z' + agent)}"}
        )
        assert other.status == 200
        other.close()
        first.close()
        # The slot comes back when a stream ends.
        deadline = time.monotonic() + 5
        while True:
            again = await http.get(jwt_service.url + "/v1/watch", headers=headers)
            if again.status == 200 or time.monotonic() > deadline:
                break
            again.release()
            await asyncio.sleep(0.2)
        assert again.status == 200
        again.close()
        second.close()


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[list[ServiceProcess]]:
    """Two services on one SQLite file, sharing rate-limit counters in Redis."""
    store = tmp_path / "hive.db"
    env = {
        "HIVEMEM_EMBEDDER": "none",
        "HIVEMEM_RATE_LIMIT_WRITE": "6/minute",
        "HIVEMEM_RATE_LIMIT_STORE": redis_url.replace("/0", "/3")
        if redis_url.endswith("/0")
        else redis_url,
    }
    made = [ServiceProcess(store, env=env), ServiceProcess(store, env=env)]
    for svc in made:
        svc.start()
    try:
        yield made
    finally:
        for svc in made:
            svc.terminate()


async def test_two_replicas_sharing_redis_share_the_limit(replicas: list[ServiceProcess]) -> None:
    await clear_of_a_window_boundary()
    agent = f"r{uuid.uuid4().hex[:6]}"
    statuses = []
    async with aiohttp.ClientSession() as http:
        for i in range(8):
            svc = replicas[i % 2]
            async with http.put(
                f"{svc.url}/v1/items/shared/k{i}",
                json={"value": i},
                headers={"X-Hivemem-Agent": agent},
            ) as resp:
                statuses.append(resp.status)
    assert statuses[:6] == [201] * 6 and statuses[6:] == [429, 429], statuses


async def test_sighup_reloads_the_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    store = tmp_path / "hive.db"
    key = add_agent(f"sqlite:///{store}", "a")
    svc = ServiceProcess(
        store,
        env={
            "HIVEMEM_AUTH": "true",
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_POLICY_FILE": str(policy),
        },
    )
    svc.start()
    try:
        async with hivemem.connect(svc.url, api_key=key) as hive:
            with pytest.raises(PermissionDenied):
                await hive.put("shared/x", "k", 1)
            policy.write_text(
                POLICY
                + '\n[[rules]]\nactions = ["write", "read"]\n'
                + 'namespaces = ["shared/**"]\nagents = ["a"]\n'
            )
            assert svc.proc is not None
            os.kill(svc.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                try:
                    await hive.put("shared/x", "k", 1)
                    break
                except PermissionDenied:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            policy.write_text("[[rules]]\nbroken = true\n")  # a bad file keeps the rules
            os.kill(svc.proc.pid, signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert (await hive.put("shared/x", "k", 2)).version == 2
            assert svc.running
    finally:
        svc.terminate()


def test_the_store_password_is_never_printed(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql://hive:hunter2@127.0.0.1:{free_port()}/hive?password=hunter2"
    proc = subprocess.run(
        [sys.executable, "-m", "hivemem", "serve", "--store", url, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HIVEMEM_EMBEDDER": "none"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "127.0.0.1" in output, output
    assert "hunter2" not in output, output


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hivemem", "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HIVEMEM_EMBEDDER": "none", **env},
        start_new_session=True,
    )


async def _wait_healthy(url: str, ssl_context: Any = None) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/healthz", ssl=ssl_context) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


async def test_serve_over_tls_with_a_private_ca(tmp_path: Path) -> None:
    import ssl

    from tests.test_client_trust import make_certificates

    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    proc = _serve(
        [
            "--store",
            f"sqlite:///{tmp_path / 'hive.db'}",
            "--port",
            str(port),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ],
        {},
    )
    try:
        url = f"https://127.0.0.1:{port}"
        await _wait_healthy(url, ssl.create_default_context(cafile=str(ca)))
        settings = hivemem.Settings(client_ca_file=str(ca), embedder="none")
        async with hivemem.connect(url, agent="tls", settings=settings) as hive:
            assert (await hive.put("secure/notes", "k", 1)).author == "tls"
        async with aiohttp.ClientSession() as http:  # plain HTTP is not served
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    await resp.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


async def test_allowed_hosts_refuses_other_host_headers(tmp_path: Path) -> None:
    port = free_port()
    proc = _serve(
        [
            "--store",
            f"sqlite:///{tmp_path / 'hive.db'}",
            "--port",
            str(port),
            "--allowed-hosts",
            "hive.test,127.0.0.1",
        ],
        {},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_healthy(url)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/events/head", headers={"Host": "evil.test"}) as resp:
                assert resp.status == 400
            async with http.get(url + "/v1/events/head", headers={"Host": "hive.test"}) as resp:
                assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
