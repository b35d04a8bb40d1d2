"""Real Redis servers for the tests and benches: one standalone, or a Redis Cluster.

The binaries are ``redis-server`` and ``redis-cli`` from ``PATH`` (Debian's Redis 7).
Every server listens on 127.0.0.1 only, on free ports, with its files in a fresh
temporary directory; a Redis already running on the machine (say on 6379) is never
used. :class:`RedisServer` runs one ``redis-server`` (append-only file on, fsynced on
every write by default, so an acknowledged write survives a crash);
:class:`RedisClusterServers` runs a cluster of masters with one replica each, made
with ``redis-cli --cluster create``, and can stop or kill a master and wait until its
replica has taken over (what the failover tests need).

Use the session fixtures ``redis_url`` and ``redis_cluster_url``, or the classes::

    with RedisClusterServers() as cluster:
        hive = hivemem.connect(cluster.url, agent="bench")
        dead = cluster.kill_master()          # SIGKILL the master of some slots
        cluster.wait_for_failover(dead)       # its replica is master, cluster_state:ok
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

__all__ = [
    "ClusterNodeInfo",
    "RedisClusterServers",
    "RedisServer",
    "redis_cluster_url",
    "redis_url",
]

#: How long a server may take to answer PING, and to stop.
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
#: How long a new cluster (or one that lost a master) may take to report cluster_state:ok.
CLUSTER_TIMEOUT_SECONDS = 60.0


#: Where the servers' ports are picked: below Linux's default ephemeral range (32768-
#: 60999), which the system hands to every outgoing connection. A port picked there could
#: be taken by some client's connection before the server binds it (a cluster's twelve
#: ports wait for all six nodes to start): CI lost a cluster to it once.
PORT_RANGE = (20000, 32767)


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports of :data:`PORT_RANGE` that nothing listens on right now."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randint(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH (apt-get install redis-server)")
    return path


def command(port: int, *args: str, timeout: float = 5.0) -> str:
    """Run one command with ``redis-cli -h 127.0.0.1 -p PORT`` and return its output.

    Raises:
        RuntimeError: redis-cli failed (its output is in the message).
    """
    proc = subprocess.run(
        [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"redis-cli -p {port} {' '.join(args)} failed ({proc.returncode}): "
            f"{out}{proc.stderr.decode('utf-8', 'replace')}"
        )
    return out


def _ping(port: int) -> bool:
    """Whether a server on ``port`` answers PING with PONG (not LOADING or an error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1.

    Args:
        directory: where its files go (AOF, log, cluster config); a new temporary
            directory (removed at :meth:`stop`) by default.
        port: the TCP port; a free one by default.
        appendfsync: ``always`` (default: an acknowledged write is on disk),
            ``everysec`` or ``no``; the append-only file is always on.
        config: extra settings, as ``redis-server --name value`` pairs.

    :meth:`start` (or ``with``) runs it; :meth:`kill9` crashes it and :meth:`restart`
    brings it back on the same files and port; :meth:`stop` shuts it down for good.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        config: dict[str, str] | None = None,
    ) -> None:
        self.port = port if port is not None else _free_port()
        self.appendfsync = appendfsync
        self.config = dict(config or {})
        self._own_dir = directory is None
        self.dir = (
            directory if directory is not None else Path(tempfile.mkdtemp(prefix="hm-redis-"))
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, tail_bytes: int = 20_000) -> str:
        """The end of the server log (for error messages)."""
        try:
            return self.log_path.read_bytes()[-tail_bytes:].decode("utf-8", "replace")
        except FileNotFoundError:
            return "<no log>"

    def command(self, *args: str, timeout: float = 5.0) -> str:
        """Run one command on this server with redis-cli (see :func:`command`)."""
        return command(self.port, *args, timeout=timeout)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds; the
                message holds its log.
        """
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.dir),
            "daemonize": "no",
            "logfile": str(self.log_path),
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": "",
            **self.config,
        }
        cmd = [_binary("redis-server")]
        for name, value in settings.items():
            cmd += [f"--{name}", value]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"redis-server exited with status {code} before answering; log:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(
                    f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout} s;"
                    f" log:\n{self.output()}"
                )
            time.sleep(0.02)

    def kill9(self) -> None:
        """SIGKILL the server (a crash); :meth:`restart` starts it again on its files."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)

    def terminate(self) -> None:
        """Shut the server down cleanly (SIGTERM), SIGKILL if it takes too long; keeps files."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill9()

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the server again on the same directory and port."""
        self.terminate()
        self.start(timeout)

    def stop(self) -> None:
        """Shut the server down and remove its directory if it made it."""
        self.terminate()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``: node id, port, role and (for a replica) its master."""

    id: str
    port: int
    master: bool
    master_id: str | None
    failed: bool
    connected: bool


def _parse_nodes(text: str) -> list[ClusterNodeInfo]:
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        addr = parts[1].split("@", 1)[0]
        flags = parts[2].split(",")
        nodes.append(
            ClusterNodeInfo(
                id=parts[0],
                port=int(addr.rsplit(":", 1)[1]) if ":" in addr and addr[-1] != ":" else 0,
                master="master" in flags,
                master_id=None if parts[3] == "-" else parts[3],
                failed="fail" in flags or "fail?" in flags,
                connected=parts[7] == "connected",
            )
        )
    return nodes


class RedisClusterServers:
    """A Redis Cluster on 127.0.0.1: ``masters`` masters with ``replicas`` replicas each.

    Args:
        directory: where the nodes' directories go; a new temporary directory (removed
            at :meth:`stop`) by default.
        masters: number of masters (at least 3, Redis Cluster's minimum).
        replicas: replicas per master.
        node_timeout_ms: ``cluster-node-timeout``: how long a master may be unreachable
            before its replica is promoted (short, so failover tests are quick).
        appendfsync: as for :class:`RedisServer`.

    :attr:`url` is ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`` (every node).
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        appendfsync: str = "always",
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self._own_dir = directory is None
        self.dir = (
            directory if directory is not None else Path(tempfile.mkdtemp(prefix="hm-rcluster-"))
        )
        count = masters * (1 + replicas)
        ports = _free_ports(2 * count)
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        self._replicas_of: dict[int, set[int]] = {}
        for i in range(count):
            self.nodes.append(
                RedisServer(
                    self.dir / f"node{i}",
                    port=ports[2 * i],
                    appendfsync=appendfsync,
                    config={
                        "cluster-enabled": "yes",
                        "cluster-config-file": "nodes.conf",
                        "cluster-port": str(ports[2 * i + 1]),
                        "cluster-node-timeout": str(node_timeout_ms),
                        "cluster-replica-validity-factor": "0",
                        "cluster-require-full-coverage": "yes",
                    },
                )
            )

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, port: int) -> RedisServer:
        """The node listening on ``port``."""
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def start(self) -> None:
        """Start every node, make the cluster, wait until every node reports it ok.

        Raises:
            RuntimeError: a node did not start or the cluster did not form; the message
                says which and holds the output.
        """
        try:
            for n in self.nodes:
                n.start()
            out = subprocess.run(
                [
                    _binary("redis-cli"),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=CLUSTER_TIMEOUT_SECONDS,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(
                    "redis-cli --cluster create failed:\n"
                    + out.stdout.decode("utf-8", "replace")
                    + out.stderr.decode("utf-8", "replace")
                )
            self.wait_ok()
            self._wait_replicas_synced()
        except BaseException:
            self.stop()
            raise

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running]

    def cluster_nodes(self) -> list[ClusterNodeInfo]:
        """The cluster's view of its nodes, as seen by some running node."""
        last: Exception | None = None
        for n in self.live_nodes():
            try:
                return _parse_nodes(n.command("cluster", "nodes"))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last = exc
        raise RuntimeError(f"no running node answered CLUSTER NODES: {last}")

    def master_ports(self) -> list[int]:
        """Ports of the masters that are running and not marked failed."""
        running = {n.port for n in self.live_nodes()}
        return sorted(
            i.port for i in self.cluster_nodes() if i.master and not i.failed and i.port in running
        )

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT_SECONDS) -> None:
        """Wait until every running node reports ``cluster_state:ok``.

        Raises:
            RuntimeError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            for n in self.live_nodes():
                try:
                    info = n.command("cluster", "info")
                except (RuntimeError, subprocess.TimeoutExpired):
                    info = ""
                states[n.port] = "cluster_state:ok" in info
            if states and all(states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout} s: {states}")
            time.sleep(0.1)

    def _wait_replicas_synced(self, timeout: float = CLUSTER_TIMEOUT_SECONDS) -> None:
        """Wait until every running replica has finished its first sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for n in self.live_nodes():
                info = n.command("info", "replication")
                if "role:slave" in info and "master_link_status:up" not in info:
                    pending.append(n.port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {pending} did not sync within {timeout} s")
            time.sleep(0.1)

    def _pick_master(self, port: int | None) -> RedisServer:
        if port is None:
            port = self.master_ports()[0]
        node = self.node(port)
        nodes = self.cluster_nodes()
        me = next((i.id for i in nodes if i.port == port), None)
        self._replicas_of[port] = {i.port for i in nodes if me is not None and i.master_id == me}
        return node

    def kill_master(self, port: int | None = None) -> RedisServer:
        """SIGKILL a master (the one on ``port``, else the first); returns its node."""
        node = self._pick_master(port)
        node.kill9()
        return node

    def stop_master(self, port: int | None = None) -> RedisServer:
        """Shut a master down with SIGTERM (it stops answering); returns its node."""
        node = self._pick_master(port)
        node.terminate()
        return node

    def wait_for_failover(self, dead: RedisServer, timeout: float = CLUSTER_TIMEOUT_SECONDS) -> int:
        """Wait until a replica of the master ``dead`` (stopped by :meth:`kill_master` or
        :meth:`stop_master`) is master and every running node reports
        ``cluster_state:ok``. Returns the port of the promoted node.

        Raises:
            RuntimeError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        candidates = self._replicas_of.get(dead.port, set())
        while True:
            nodes = self.cluster_nodes()
            promoted = [i.port for i in nodes if i.port in candidates and i.master and not i.failed]
            if promoted:
                self.wait_ok(timeout=max(0.1, deadline - time.monotonic()))
                return promoted[0]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no replica of 127.0.0.1:{dead.port} ({sorted(candidates)}) took over "
                    f"within {timeout} s: "
                    + ", ".join(f"{i.port}:{'M' if i.master else 'R'}" for i in nodes)
                )
            time.sleep(0.1)

    def restart_node(self, node: RedisServer) -> None:
        """Start a stopped node again on its files; it rejoins (a former master as a
        replica of the node that replaced it)."""
        node.start()

    def stop(self) -> None:
        """Stop every node and remove the directory if this object made it."""
        for n in self.nodes:
            n.terminate()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a standalone Redis started for this test session (AOF, fsync always)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ``redis+cluster://`` URL of a 3-master, 3-replica Redis Cluster for this session."""
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.url
