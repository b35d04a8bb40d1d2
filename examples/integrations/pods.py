"""What the examples here share: start ``hivemem serve`` on a free loopback port over a
SQLite store in a temporary directory, run the example's pods one after the other (each
a process of its own, given the service URL and its name), stop the service."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until ``url`` answers 2xx; raises RuntimeError if it does not in time or the
    process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.1)


@contextlib.contextmanager
def service() -> Iterator[str]:
    """``hivemem serve`` (no embedder) over a SQLite file in a temporary directory, on a
    free loopback port; yields its URL and stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HIVEMEM_EMBEDDER": "none"}
        serve = [sys.executable, "-m", "hivemem", "serve", "--port", str(port)]
        server = subprocess.Popen(
            [*serve, "--store", f"sqlite:///{tmp}/hive.db", "--log-level", "warning"], env=env
        )
        try:
            wait_ready(f"{url}/readyz", server)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)


def run_pods(script: str, names: list[str]) -> int:
    """Run ``python script URL NAME`` for each name in order; returns 0 when all exited
    0 (and prints ``ok``), 1 otherwise."""
    try:
        with service() as url:
            for name in names:
                done = subprocess.run([sys.executable, script, url, name], timeout=120)
                if done.returncode != 0:
                    return 1
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print("ok")
    return 0
