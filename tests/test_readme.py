"""README.md runs as pasted: every ```python and ```bash block, in order, twice in a row.

Each section of the README (a ``##`` heading) runs in a fresh scratch directory of its
own: its blocks in order, then all of them again (the second pass finds what the first
left: ./hive.db, ./auth.db, policy.toml), so a reader may start at any section. The
sections run at the same time, each with its own ports: one after the other they take
too long (about 40 process starts of one second each). There is no ``HIVEMEM_*``
variable from the caller's environment, and the embedder is the default (offline
MiniLM) one, since the search snippet finds its item by meaning. Each block runs alone:
a Python block as ``python -c``, a bash block as ``bash -euo pipefail -c``; it must exit
0, print no traceback, no "Unclosed client session" and no "Exception ignored", and
leave no process behind. Ports the README names (``localhost:8765``, ``--port 8766``) are
rewritten to free loopback ports chosen here, and ``--host 0.0.0.0`` to loopback.

Two kinds of block get explicit handling:

- ``pip install ... && rest``: the package is already installed editable from this
  checkout (checked), so only ``rest`` runs;
- a bash block whose last command is a foreground ``hivemem serve`` (it runs until
  Ctrl-C) runs in the background until /healthz answers, and stays up for the blocks
  after it, until the next such block on its port or the end of the pass (as a reader
  would stop one service before starting the next on the same port).

A block the README precedes with ``<!-- readme-test: skip (why) -->`` is not run, only
parsed (``compile`` / ``bash -n``): the full test suite (it would run itself), and the
cluster section, which needs PostgreSQL and Redis on other hosts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import hivemem
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->$")
PIP_PREFIX = re.compile(r"^pip install [^&]+&&\s*")
PORT_REF = re.compile(r"(?P<lead>(?:localhost|127\.0\.0\.1):|--port[ =])(?P<port>\d+)")
DEFAULT_PORT = 8765  # `hivemem serve` without --port (the test sets HIVEMEM_PORT instead)
BAD_OUTPUT = ("Traceback", "Unclosed client session", "Unclosed connector", "Exception ignored")
#: What some blocks must print: (text of the block, text of its output).
EXPECTED = [
    ("why did customers leave?", "finding-7"),  # search by meaning found the finding
    ("team/other notes '\"theirs\"'", "may not write in namespace 'team/other'"),  # the 403
]
BLOCK_TIMEOUT = 60.0
#: Seconds a README service has to answer /healthz. It starts in 3-5 s on an idle 2-core
#: machine and in about 11 s beside four busy processes; two sections start theirs at
#: once while the other pytest workers run, and CI once saw both exceed 20 s.
HEALTH_TIMEOUT = 60.0


@dataclass
class Block:
    lang: str  # "python" or "bash"
    line: int  # line of README.md where the block's code starts
    code: str
    skip: str | None  # the reason of a readme-test skip comment, if any
    section: str  # the ## heading the block is under

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks() -> list[Block]:
    """The ```python and ```bash blocks of README.md, in order."""
    blocks: list[Block] = []
    lines = README.read_text("utf-8").splitlines()
    previous = ""  # the last non-blank line outside a fence
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("```"):
            if line.strip():
                previous = line.strip()
            if line.startswith("## "):
                section = line[3:].strip()
            i += 1
            continue
        lang, start = line[3:].strip(), i + 1
        i = start
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        assert i < len(lines), f"README.md:{start}: fence never closed"
        if lang in ("python", "bash"):
            marker = SKIP.match(previous)
            code = "\n".join(lines[start:i]) + "\n"
            why = marker["why"].strip() if marker else None
            blocks.append(Block(lang, start + 1, code, why, section))
        previous, i = "", i + 1
    return blocks


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def new_port() -> int:
    """A free loopback port that no other section of this test was given."""
    with _ports_lock:
        while (port := free_port()) in _ports_given:
            pass
        _ports_given.add(port)
        return port


class Run:
    """One scratch directory, its ports and environment, and the services started."""

    def __init__(self, cwd: Path, logs: Path) -> None:
        self.cwd, self.logs = cwd, logs
        cwd.mkdir()
        logs.mkdir()
        self.ports: dict[int, int] = {DEFAULT_PORT: new_port()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMEM_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["HIVEMEM_PORT"] = str(self.ports[DEFAULT_PORT])
        self.env = env
        self.services: dict[int, tuple[subprocess.Popen[bytes], Path, str]] = {}
        self.count = 0

    def rewrite(self, code: str) -> str:
        """``code`` with every port it names replaced by a free loopback port."""

        def port(m: re.Match[str]) -> str:
            wanted = int(m["port"])
            if wanted not in self.ports:
                self.ports[wanted] = new_port()
            return f"{m['lead']}{self.ports[wanted]}"

        code = re.sub(r"--host[ =]0\.0\.0\.0\b", "--host 127.0.0.1", code)  # loopback only
        return PORT_REF.sub(port, code)

    def log(self) -> Path:
        self.count += 1
        return self.logs / f"block{self.count}.log"

    def run(self, where: str, lang: str, code: str) -> str:
        """Run ``code`` to completion; fail unless it exits 0 and leaves nothing running."""
        cmd = (
            [sys.executable, "-c", code]
            if lang == "python"
            else ["bash", "-euo", "pipefail", "-c", code]
        )
        log = self.log()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code_ = proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            code_ = None
        leftover = not group_gone(proc.pid, timeout=10.0)
        kill_group(proc)
        output = log.read_text("utf-8", "replace")
        assert code_ is not None, f"{where} still running after {BLOCK_TIMEOUT} s:\n{output}"
        assert code_ == 0, f"{where} exited {code_}:\n{output}"
        assert not leftover, f"{where} left processes running:\n{output}"
        return output

    def serve(self, where: str, code: str) -> str:
        """Start a foreground-service block in the background and wait for /healthz."""
        ports = [int(p) for p in re.findall(r"--port[ =](\d+)", code)]
        port = ports[-1] if ports else self.ports[DEFAULT_PORT]
        for before, output in self.stop(port):  # the reader stops it before starting this one
            check_output(before, "", output)
        log = self.log()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", code],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.services[port] = (proc, log, where)
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while not healthy(port):
            status = proc.poll()
            assert status is None, f"{where} exited {status}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{where} not healthy:\n{log.read_text()}"
            time.sleep(0.1)
        return log.read_text("utf-8", "replace")

    def stop(self, port: int | None = None) -> list[tuple[str, str]]:
        """Stop the service on ``port`` (all when None); return (where, output) of each."""
        stopped = []
        for p in [port] if port is not None else list(self.services):
            if p not in self.services:
                continue
            proc, log, where = self.services.pop(p)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
            stopped.append((where, log.read_text("utf-8", "replace")))
        return stopped


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def group_gone(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for every process of group ``pgid`` to exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def is_server(code: str) -> bool:
    """Whether the block's last command is ``hivemem serve`` in the foreground."""
    commands = [line.split(" #", 1)[0].strip() for line in code.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    return (
        bool(commands)
        and commands[-1].startswith("hivemem serve")
        and not commands[-1].endswith("&")
    )


def check_output(where: str, code: str, output: str) -> None:
    for bad in BAD_OUTPUT:
        assert bad not in output, f"{where} printed {bad!r}:\n{output}"
    for in_code, in_output in EXPECTED:
        if in_code in code:
            assert in_output in output, f"{where} did not print {in_output!r}:\n{output}"


def run_section(blocks: list[Block], cwd: Path, logs: Path) -> None:
    """Run ``blocks`` in order in ``cwd``, then once more; fail on the first bad block."""
    run = Run(cwd, logs)
    try:
        for attempt in (1, 2):
            for block in blocks:
                code = run.rewrite(block.code)
                if block.lang == "bash" and PIP_PREFIX.match(code):
                    # Installed already: `pip install -e .` of this checkout.
                    assert Path(hivemem.__file__).resolve().is_relative_to(REPO / "src")
                    code = PIP_PREFIX.sub("", code, count=1)
                where = f"{block.where}, run {attempt}"
                if block.lang == "bash" and is_server(code):
                    output = run.serve(where, code)
                else:
                    output = run.run(where, block.lang, code)
                check_output(where, block.code, output)
            for service, output in run.stop():
                check_output(f"{service} (service)", "", output)
    finally:
        run.stop()


def test_readme_snippets_run_twice(tmp_path: Path) -> None:
    runnable = [b for b in readme_blocks() if b.skip is None]
    assert {b.lang for b in runnable} == {"python", "bash"}, "README.md: no blocks found?"
    sections: dict[str, list[Block]] = {}
    for block in runnable:
        sections.setdefault(block.section, []).append(block)
    with ThreadPoolExecutor(len(sections)) as pool:
        runs = {
            name: pool.submit(run_section, blocks, tmp_path / f"s{n}", tmp_path / f"s{n}-logs")
            for n, (name, blocks) in enumerate(sections.items())
        }
    failures = [
        f"## {name}: {type(exc).__name__}: {exc}"
        for name, run in runs.items()
        if (exc := run.exception()) is not None
    ]
    assert not failures, "\n\n".join(failures)


def test_readme_skips_say_why_and_parse() -> None:
    skipped = [b for b in readme_blocks() if b.skip is not None]
    for block in skipped:
        assert len(block.skip or "") > 10, f"{block.where}: say why it is skipped"
        if block.lang == "python":
            compile(block.code, block.where, "exec")
        else:
            subprocess.run(["bash", "-n", "-c", block.code], check=True)
    # The exceptions: the test suite itself, and the cluster section (bash and Python).
    assert len(skipped) <= 3, [b.where for b in skipped]
