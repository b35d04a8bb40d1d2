"""hivemem's lock-free metric families for the per-request paths expose exactly what
prometheus-client's own Counter and Histogram expose for the same observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hivemem.metrics import LATENCY_BUCKETS, HotCounter, HotHistogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_hot_families_expose_what_prometheus_client_exposes() -> None:
    rng = random.Random(7)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h1 = HotHistogram("x_seconds", "x", ["route", "method"], LATENCY_BUCKETS, ours)
    h2 = Histogram("x_seconds", "x", ["route", "method"], buckets=LATENCY_BUCKETS, registry=theirs)
    c1 = HotCounter("x_requests", "x", ["route", "status"], ours)
    c2 = Counter("x_requests", "x", ["route", "status"], registry=theirs)
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(200)]  # on the bounds: le is <=
    values += [rng.expovariate(50) for _ in range(2000)] + [0.0, 11.0, 1e9]
    for v in values:
        route, method = rng.choice("ab"), rng.choice(["GET", "PUT"])
        h1.labels(route, method).observe(v)
        h2.labels(route, method).observe(v)
        status = rng.choice(["200", "404"])
        c1.labels(route, status).inc()
        c2.labels(route, status).inc()
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for key, expected in want.items():
        assert got[key] == pytest.approx(expected, rel=1e-12), key


def test_hot_histogram_refuses_unordered_buckets() -> None:
    with pytest.raises(ValueError, match="ascending"):
        HotHistogram("y", "y", [], (0.1, 0.05), CollectorRegistry())
