"""A real Prometheus server for the tests: Debian's ``prometheus`` binary from ``PATH``,
listening on a free loopback port, its data in a fresh temporary directory.

    with PrometheusServer(targets=["127.0.0.1:8765"], rule_files=[...]) as prom:
        prom.query('up{job="hivemem"}')      # the result list of /api/v1/query
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["PrometheusServer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """``prometheus`` scraping ``targets`` (job ``hivemem``) every ``interval`` seconds
    and evaluating ``rule_files`` as often.

    Raises (on start): RuntimeError when the binary is missing or it does not get ready
    within 30 s (the message holds its output).
    """

    def __init__(
        self, targets: list[str], rule_files: list[Path], *, interval: float = 1.0
    ) -> None:
        self.targets = targets
        self.rule_files = rule_files
        self.interval = interval
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hivemem-prom-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not on PATH (Debian: apt-get install prometheus)")
        every = f"{self.interval:g}s"
        config = {
            "global": {"scrape_interval": every, "evaluation_interval": every},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "hivemem",
                    "scrape_timeout": every,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"prometheus did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-5000:]
        except OSError:
            return "<no output>"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The ``result`` of an instant query (``at``: UNIX seconds, default now)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value an instant query returns, or None when it returns nothing."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if hasattr(self, "log"):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
