"""``hivemem serve`` freezes the objects alive once it has started (and again once its
search indexes are loaded) out of the garbage collector, so full collections traverse
only what requests create; an app that shares its process leaves the collector alone.
Each case runs in a fresh interpreter: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import gc, json, sys, time
import hivemem
from fastapi.testclient import TestClient
from hivemem.service.app import create_app

app = create_app(f"sqlite:///{sys.argv[1]}/g.db", hivemem.Settings(embedder="none"),
                 serving=sys.argv[2] == "serving")
before = gc.get_freeze_count()
with TestClient(app) as client:
    started = gc.get_freeze_count()
    assert client.put("/v1/items/gc/k", json={"value": 1},
                      headers={"X-Hivemem-Agent": "t"}).status_code == 201
    tracked = len(gc.get_objects())  # the generations only, not the frozen objects
print(json.dumps({"before": before, "started": started, "tracked": tracked}))
"""


@pytest.mark.parametrize("serving", [True, False])
def test_serving_freezes_the_startup_objects_out_of_the_collector(
    tmp_path: Path, serving: bool
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), "serving" if serving else "shared"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["before"] == 0
    if serving:
        # the process holds ~150,000 objects once started; a full collection then
        # traverses a small fraction of them
        assert found["started"] > 50_000, found
        assert found["tracked"] < found["started"] / 4, found
    else:
        assert found["started"] == 0, found
        assert found["tracked"] > 50_000, found
