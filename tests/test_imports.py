"""The public face and the client load no heavy library: numpy, onnxruntime and the
stemmer load only when a local hive or search needs them. The layers import downwards
only: the service's modules never import its app factory, the client and the wire
contract never import core or the service."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hivemem

HEAVY = ("numpy", "onnxruntime", "Stemmer", "tokenizers", "psycopg", "redis", "fastapi")


@pytest.mark.parametrize(
    "statement",
    ["import hivemem", "import hivemem.client", "import hivemem; hivemem.connect('http://h:1')"],
)
def test_the_client_loads_no_heavy_library(statement: str) -> None:
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = sorted({m.split(".")[0] for m in loaded} & set(HEAVY))
    assert heavy == [], heavy


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import hivemem", ("aiohttp", "tenacity", "hivemem.client", "hivemem.wire")),
        ("import hivemem.wire", ("aiohttp", "tenacity", "starlette", "hivemem.core")),
        # the framework adapters: no framework until an adapter module is imported
        (
            "import hivemem.integrations",
            ("langgraph", "strands", "mcp", "agents", "google", "agentscope", "a2a", "openai"),
        ),
    ],
)
def test_the_public_face_and_the_wire_contract_load_no_transport(
    statement: str, absent: tuple[str, ...]
) -> None:
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert sorted(set(absent) & loaded) == []
    assert sorted({m.split(".")[0] for m in loaded} & set(HEAVY)) == []


SERVICE = Path(hivemem.__file__).parent / "service"


def _imports(path: Path) -> set[str]:
    """The hivemem modules ``path`` imports (``from hivemem.x import y`` counts x and
    x.y, since y may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("hivemem")}


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in SERVICE.glob("*.py") if p.stem not in ("__init__", "app"))
)
def test_no_service_module_imports_the_app_factory(module: str) -> None:
    assert "hivemem.service.app" not in _imports(SERVICE / f"{module}.py")


def test_the_client_and_the_wire_contract_import_no_core_and_no_service() -> None:
    client = Path(hivemem.__file__).parent / "client"
    for path in [*client.glob("*.py"), client.parent / "wire.py"]:
        bad = {
            name
            for name in _imports(path)
            if name.startswith(("hivemem.core", "hivemem.service", "hivemem.backends"))
        }
        assert bad == set(), (path.name, bad)
