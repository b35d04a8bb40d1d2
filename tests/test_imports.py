"""The public face and the client load no heavy library: numpy, onnxruntime and the
stemmer load only when a local hive or search needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
