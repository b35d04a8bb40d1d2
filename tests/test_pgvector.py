"""Vector search in PostgreSQL (pgvector HNSW): the partial index is created and used, and
results agree with brute force within the prefix and filter."""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest

from hivemem.backends.filters import Condition
from hivemem.backends.postgres import PostgresBackend
from hivemem.backends.rows import PutWrite
from hivemem.config import Settings

DIM = 16
N = 1500


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


async def test_hnsw_search_matches_brute_force_within_scope(postgres_url: str) -> None:
    backend = PostgresBackend.from_url(postgres_url, Settings())
    model = f"test-{uuid.uuid4().hex[:8]}"
    ns = f"pgv{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, DIM))
    vectors = unit(centres[rng.integers(0, 20, N)] + 0.5 * rng.standard_normal((N, DIM)))
    await backend.open()
    try:
        writes = [
            PutWrite(
                f"{ns}/g{i % 3}",
                f"k{i}",
                b"1",
                None,
                f'{{"bucket": {i % 4}}}'.encode(),
                None,
                None,
                index_text=f"item {i}",
                vector=vectors[i].tobytes(),
                model=model,
            )
            for i in range(N)
        ]
        for start in range(0, N, 500):
            await backend.write_items(
                writes[start : start + 500], author="t", now=1.0, history_limit=0
            )
        queries = unit(rng.standard_normal((20, DIM)))
        bucket = [Condition("metadata", "bucket", "=", 2)]
        recall = []
        for q in queries:
            for prefix, conds in ((ns, []), (f"{ns}/g1", []), (ns, bucket)):
                got = await backend.search_vectors(prefix, q.tobytes(), model, conds, 10, 2.0)
                keep = [
                    i
                    for i in range(N)
                    if (prefix == ns or f"{ns}/g{i % 3}" == prefix) and (not conds or i % 4 == 2)
                ]
                scores = vectors[keep] @ q
                best = [f"k{keep[j]}" for j in np.argsort(-scores)[:10]]
                assert len(got) == 10
                for g_ns, key, score in got:  # in scope, with its exact similarity
                    i = int(key[1:])
                    assert i in keep and g_ns == f"{ns}/g{i % 3}"
                    assert score == pytest.approx(float(vectors[i] @ q), abs=1e-4)
                assert [s for _, _, s in got] == sorted((s for _, _, s in got), reverse=True)
                recall.append(len({k for _, k, _ in got} & set(best)) / 10)
        # pgvector builds its HNSW graph with random levels that no seed controls: on this
        # data mean recall@10 was 0.89-0.99 over runs. The bound leaves a margin of 0.09
        # below the lowest seen, and still fails for a scan that ignores the vectors
        # (about 0.1 here).
        assert float(np.mean(recall)) >= 0.8
        # The partial HNSW index exists and the planner uses it.
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as c:
            cur = await c.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'hivemem_search' "
                "AND indexdef LIKE %s",
                (f"%{model}%",),
            )
            (indexdef,) = await cur.fetchone() or ("",)
            assert "hnsw" in indexdef and f"vector({DIM})" in indexdef
            await c.execute("SET enable_seqscan = off")
            plan = await c.execute(
                f"EXPLAIN SELECT ns FROM hivemem_search WHERE model = '{model}' AND dim = {DIM} "
                f"ORDER BY vec::vector({DIM}) <=> '[{','.join(['0.25'] * DIM)}]'::vector({DIM}) "
                "LIMIT 10"
            )
            text = " ".join(r[0] for r in await plan.fetchall())
            assert "hivemem_search_hnsw_" in text
    finally:
        await backend.close()
