"""What the examples here share: start ``hivemem serve`` on a free loopback port over a
SQLite store in a temporary directory, run the example's pods one after the other (each
a process of its own, given the service URL and its name), stop the service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def run_pods(script: str, names: list[str]) -> int:
    """Run ``python script URL NAME`` for each name in order; returns 0 when all exited
    0 (and prints ``ok``), 1 otherwise."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HIVEMEM_EMBEDDER": "none"}
        serve = [sys.executable, "-m", "hivemem", "serve", "--port", str(port)]
        server = subprocess.Popen(
            [*serve, "--store", f"sqlite:///{tmp}/hive.db", "--log-level", "warning"], env=env
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/readyz", timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        print("the service did not start", file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            for name in names:
                done = subprocess.run([sys.executable, script, url, name], timeout=120)
                if done.returncode != 0:
                    return 1
        finally:
            server.terminate()
            server.wait(timeout=10)
    print("ok")
    return 0
