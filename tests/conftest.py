"""Shared fixtures: free loopback ports, `hivemem serve` subprocesses and the `hive` fixture.

The ``hive`` fixture runs each test that uses it once per store kind of
:data:`DEFAULT_STORES` (``HIVEMEM_TEST_STORES`` picks others, e.g. the rest of :data:`STORES`):
embedded hives (a SQLite file, in-memory SQLite, PostgreSQL, Redis, Redis Cluster) and
RemoteHives talking to a real service process over each of them (``remote``,
``remote-postgres``, ...). ``HIVEMEM_TEST_STORES=sqlite-file,postgres`` narrows the run.
The database servers are real, started by the fixtures of ``tests/servers/`` on free
loopback ports, once per test session. Tests isolate themselves with the ``ns`` fixture
(a unique namespace per test).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import hivemem
from hivemem.core.area import Area

#: How long a test service may take to answer /healthz. A CI rehearsal on a busy
#: 2-core machine took over 20 s to import and start one under a full xdist run.
HEALTH_TIMEOUT_SECONDS = 60.0

pytest_plugins = ["tests.servers.postgres", "tests.servers.redis", "tests.servers.moto"]

#: Every store kind the conformance suite knows: the embedded ones, then
#: ``remote-<kind>`` for a service over an embedded kind (``remote`` = over a SQLite file).
STORES = [
    "sqlite-file",
    "sqlite-memory",
    "remote",
    "postgres",
    "remote-postgres",
    "redis",
    "remote-redis",
    "redis-cluster",
    "remote-redis-cluster",
    "dynamodb",
    "remote-dynamodb",
]
#: Store kinds run when HIVEMEM_TEST_STORES is not set: SQLite (file and memory),
#: PostgreSQL, Redis and the service over SQLite. Redis Cluster (the Redis backend's code
#: with keys spread over slots; its own cases stay in test_redis*.py and
#: test_task_store.py) and the service over the network stores (``remote-postgres``,
#: ``remote-redis``, ``remote-redis-cluster``: the same service code over backends the
#: embedded kinds already cover) run in ``.ci/run`` after the default suite, and so do
#: ``dynamodb`` and ``remote-dynamodb`` (moto's server serves one request at a time: the
#: DynamoDB store's own cases stay in test_dynamodb.py).
DEFAULT_STORES = [
    k for k in STORES if not k.startswith("remote-") and k not in ("redis-cluster", "dynamodb")
]
#: What ``.ci/run`` adds to the default run.
MATRIX_STORES = [k for k in STORES if k not in DEFAULT_STORES]
#: The fixture giving the URL of each embedded server-backed kind.
_SERVER_FIXTURES = {
    "postgres": "postgres_url",
    "redis": "redis_url",
    "redis-cluster": "redis_cluster_url",
    "dynamodb": "dynamodb_url",
}

#: The indexer computes vectors at niceness 0 in tests. The suite runs four workers on two
#: cores, so every process is busy; at the default niceness (10) an indexer thread got
#: about a twentieth of a core beside them, and searches with consistency="indexed" timed
#: out waiting for it (CI: 30 s for one vector over PostgreSQL). Yielding to busy
#: neighbours is the point of that setting in a service, not something these tests check
#: (tests/test_embedders.py checks the niceness itself, with its own setting).
os.environ.setdefault("HIVEMEM_INDEX_NICE", "0")
#: And a search with consistency="indexed" waits up to 120 s (30 s by default): on the
#: session's shared stores the indexer also embeds the other tests' writes first, and
#: beside three other busy workers that backlog took over 30 s in CI (Redis, 2 writes).
os.environ.setdefault("HIVEMEM_INDEX_WAIT_SECONDS", "120")
#: And a search may take 60 s (10 s by default): on the session's shared DynamoDB (moto,
#: one request at a time) a hybrid search's first load of the in-process indexes reads
#: every other test's items too, and took over 10 s in a CI rehearsal on a slow day.
#: tests/test_bounds.py checks the timeout itself, with its own setting.
os.environ.setdefault("HIVEMEM_SEARCH_TIMEOUT_SECONDS", "60")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests for pytest-xdist (``--dist loadgroup``) and leave some out.

    The tests marked ``slow`` (processes killed, replicas, crashes) run one after another
    on one worker rather than compete for the cores; the tests of a module that share a
    module-scoped fixture (a service with auth on, say) run on one worker, which sets it
    up once; so do those on the shared Redis Cluster. Tests marked ``matrix`` are left
    out unless ``-m`` names that marker (``.ci/run`` runs ``-m matrix`` after the default
    suite)."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("processes"))
        elif _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]
        elif "redis-cluster" in getattr(getattr(item, "callspec", None), "id", ""):
            item.add_marker(pytest.mark.xdist_group("redis-cluster"))
    if "matrix" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("matrix") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if item.get_closest_marker("matrix") is not None]
        )
        items[:] = keep


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        d.scope in ("module", "class") for defs in info.name2fixturedefs.values() for d in defs
    )


def selected_stores() -> list[str]:
    """The store kinds of this run (``HIVEMEM_TEST_STORES``, comma-separated, or the default)."""
    raw = os.environ.get("HIVEMEM_TEST_STORES", "").strip()
    if not raw:
        return list(DEFAULT_STORES)
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STORES]
    if unknown:
        raise pytest.UsageError(f"HIVEMEM_TEST_STORES: unknown kinds {unknown}; know {STORES}")
    return kinds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A ``hivemem serve`` subprocess on one SQLite store file and one loopback port.

    It can be started, killed with SIGKILL and restarted on the same file and port, which is
    what the crash tests need. Its stdout and stderr go to ``log_path`` (appended across
    restarts) so that a failure to start can show what the service printed.
    """

    def __init__(
        self,
        store_path: Path,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        store_url: str | None = None,
    ) -> None:
        self.store_path = store_path
        self.port = port if port is not None else free_port()
        self.log_path = log_path or store_path.with_name(store_path.name + ".log")
        self.env = env or {}
        self._store_url = store_url
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_url(self) -> str:
        """The store URL: ``store_url`` if given, else the ``sqlite:///`` URL of the file."""
        return self._store_url or f"sqlite:///{self.store_path}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, tail_bytes: int = 20_000) -> str:
        """The last ``tail_bytes`` of what the service wrote to stdout/stderr."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no output>"
        return data[-tail_bytes:].decode("utf-8", "replace")

    def start(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
        """Start the service and wait until GET /healthz answers 200.

        Raises:
            RuntimeError: the process exited or did not become healthy within ``timeout``
                seconds; the message holds its output.
        """
        if self.running:
            raise RuntimeError("service already running")
        cmd = [
            sys.executable,
            "-m",
            "hivemem",
            "serve",
            "--store",
            self.store_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
        """Poll GET /healthz every 0.1 s until it answers 200 (see :meth:`start`)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"service exited with status {code} before it was healthy; output:\n"
                    + self.output()
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(
                    f"service not healthy on {self.url} within {timeout} s; output:\n"
                    + self.output()
                )
            time.sleep(0.1)

    def kill9(self) -> None:
        """SIGKILL the service (its whole process group) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> None:
        """Stop the service with SIGTERM, or SIGKILL if it has not exited after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def restart(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
        """Start the service again on the same store file and port."""
        if self.running:
            self.terminate()
        self.start(timeout)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service for the whole session, on ``sqlite:///<tmp>/svc.db``."""
    svc = ServiceProcess(tmp_path_factory.mktemp("service") / "svc.db")
    svc.start()
    try:
        yield svc
    finally:
        svc.terminate()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Make (and start) dedicated services on fresh store files; all are stopped afterwards.

    Call it as ``service_factory(name="crash", start=True)``.
    """
    made: list[ServiceProcess] = []

    def make(name: str = "dedicated", *, start: bool = True) -> ServiceProcess:
        svc = ServiceProcess(tmp_path / f"{name}-{len(made)}.db")
        made.append(svc)
        if start:
            svc.start()
        return svc

    try:
        yield make
    finally:
        for svc in made:
            svc.terminate()


@pytest.fixture(scope="session")
def sqlite_file_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store file shared by every sqlite-file test of the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('embedded') / 'hive.db'}"


@pytest.fixture(scope="session")
def services_over(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], ServiceProcess]]:
    """``services_over(store_url)``: one service per store URL for the whole session."""
    made: dict[str, ServiceProcess] = {}
    base = tmp_path_factory.mktemp("services")

    def get(store_url: str) -> ServiceProcess:
        svc = made.get(store_url)
        if svc is None:
            svc = ServiceProcess(base / f"svc{len(made)}.db", store_url=store_url)
            made[store_url] = svc
            svc.start()
        return svc

    try:
        yield get
    finally:
        for svc in made.values():
            svc.terminate()


def store_url_of(request: pytest.FixtureRequest, kind: str) -> str:
    """The URL a hive of store kind ``kind`` (one of :data:`STORES`) connects to."""
    if kind == "sqlite-file":
        return str(request.getfixturevalue("sqlite_file_url"))
    if kind == "sqlite-memory":
        return "sqlite://:memory:"
    if kind == "remote":
        svc: ServiceProcess = request.getfixturevalue("service")
        return svc.url
    if kind.startswith("remote-"):
        inner = str(request.getfixturevalue(_SERVER_FIXTURES[kind.removeprefix("remote-")]))
        return request.getfixturevalue("services_over")(inner).url
    return str(request.getfixturevalue(_SERVER_FIXTURES[kind]))


@pytest.fixture(params=selected_stores())
def hive_url(request: pytest.FixtureRequest) -> str:
    """The store URL of each deployment the conformance suite runs against."""
    return store_url_of(request, request.param)


@pytest.fixture
async def hive(hive_url: str) -> AsyncIterator[hivemem.Hive]:
    """An opened async Hive acting as agent ``tester``; closed after the test."""
    h = hivemem.connect(hive_url, agent="tester")
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def ns() -> str:
    """A namespace no other test uses (one segment, e.g. ``t1a2b3c4d``)."""
    return f"t{uuid.uuid4().hex[:8]}"


class Clock:
    """The time a TTL test moves with :meth:`sleep`.

    Embedded hives read the time of their writes, reads and TTLs from ``Area._now``; the
    fixture patches it to wall time plus :attr:`offset`, so :meth:`sleep` moves the offset
    and returns at once. A RemoteHive's service keeps its own clock in another process:
    there :meth:`sleep` really sleeps. Background loops (coordination rounds, lease
    renewals) run on asyncio's clock, which this does not move.
    """

    def __init__(self, remote: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.remote = remote
        self.offset = 0.0  # seconds added to wall time
        if not remote:
            monkeypatch.setattr(Area, "_now", lambda _self: time.time() + self.offset)

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass for the hive under test."""
        if self.remote:
            await asyncio.sleep(seconds)
        else:
            self.offset += seconds
            await asyncio.sleep(0)


@pytest.fixture
def clock(hive_url: str, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The :class:`Clock` of the ``hive`` under test."""
    return Clock(hive_url.startswith(("http://", "https://")), monkeypatch)
