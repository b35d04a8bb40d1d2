"""A real local AWS for the tests and benches: moto's server (DynamoDB, S3, SNS, SQS).

:class:`MotoServer` runs moto's server application (``moto[server]``, installed by the
``test`` extra) in a subprocess on a free 127.0.0.1 port, one request at a time (see
``_moto_main.py`` for why), and stops it. Credentials are dummies: the fixtures set
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION`` in the
environment, which service subprocesses inherit.

Use the session fixtures ``moto_endpoint`` (``http://127.0.0.1:PORT``) and
``dynamodb_url`` (a ``dynamodb://`` store URL with a fresh table prefix), or::

    with MotoServer() as aws:
        hive = hivemem.connect(aws.dynamodb_url("bench"), agent="bench")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = ["MotoServer", "aws_environment", "dynamodb_url", "moto_endpoint"]

#: How long the server may take to answer, and to stop.
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
#: The region every test uses.
REGION = "us-east-1"

_ROOT = Path(__file__).resolve().parents[2]


def aws_environment() -> dict[str, str]:
    """Dummy credentials and the region, for moto (never real AWS: every client in the
    tests is given the local endpoint)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's server on a free loopback port (see the module notes)."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def dynamodb_url(self, prefix: str | None = None) -> str:
        """A ``dynamodb://`` store URL on this server (a fresh table prefix by default)."""
        prefix = prefix or f"hm{uuid.uuid4().hex[:10]}"
        return f"dynamodb://{prefix}?region={REGION}&endpoint={self.endpoint}"

    def start(self) -> None:
        os.environ.update(aws_environment())
        out: Any = subprocess.DEVNULL
        if self._log_path is not None:
            out = self._log = open(self._log_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.servers._moto_main", "127.0.0.1", str(self.port)],
            cwd=_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **aws_environment()},
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self._proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's server did not answer in time") from None
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        log, self._log = self._log, None
        if log is not None:
            log.close()
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> MotoServer:
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
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's server for this test session (DynamoDB, S3, SNS, SQS on one endpoint)."""
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint(moto_server: MotoServer) -> str:
    """The endpoint URL of :func:`moto_server` (``http://127.0.0.1:PORT``)."""
    return moto_server.endpoint


@pytest.fixture(scope="session")
def dynamodb_url(moto_server: MotoServer) -> str:
    """A ``dynamodb://`` store URL with a table prefix of its own, for this session."""
    return moto_server.dynamodb_url()
