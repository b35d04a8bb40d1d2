"""Large values in a blob store (core/blobs.py, docs/blobs.md): values and texts over
``blob_threshold_bytes`` go to S3 (moto's server) or a local directory before the write
commits, reads put them back, removed versions free their objects, and the sweeper
removes uploads whose commit never happened. Real servers only: moto for S3, the
session's Redis for a second backend, a ``hivemem serve`` subprocess for the service."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest

import hivemem
from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.core.blobs import Blobs
from hivemem.core.objects import ObjectInfo, ObjectStore
from hivemem.errors import Conflict, InvalidInput, Unavailable
from hivemem.models import DeleteOp, PutOp
from tests.conftest import ServiceProcess
from tests.servers.moto import REGION

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 4096
BIG = {"blob": "b" * 20_000}  # ~20 KB as JSON: over THRESHOLD
SMALL = {"note": "small"}


def _s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture(params=["s3", "dir"])
def blob_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh blob store: a new bucket on moto's server, or a new directory."""
    if request.param == "dir":
        return str(tmp_path / "objects")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"blobs-{uuid.uuid4().hex[:12]}"
    _s3(endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/objects?endpoint={endpoint}&region={REGION}"


def objects(url: str) -> list[str]:
    """The objects in a blob store, listed without hivemem's code."""
    if url.startswith("s3://"):
        bucket, rest = url[5:].split("/", 1)
        prefix, query = rest.split("?", 1)
        endpoint = query.split("endpoint=")[1].split("&")[0]
        reply = _s3(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for o in reply.get("Contents", []))
    root = Path(url)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def settings(blob_url: str, **more: Any) -> Settings:
    return Settings(
        blob_store=blob_url,
        blob_threshold_bytes=THRESHOLD,
        embedder="none",
        history_limit=2,
        **more,
    )


@pytest.fixture(params=["sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store the hive keeps its rows in (a fresh SQLite file unless a test asks
    for Redis too)."""
    if request.param in ("redis", "dynamodb"):
        return str(request.getfixturevalue(f"{request.param}_url"))
    return f"sqlite:///{tmp_path / 'hive.db'}"


@pytest.fixture
async def hive(store_url: str, blob_url: str) -> AsyncIterator[LocalHive]:
    h = hivemem.connect(store_url, agent="tester", settings=settings(blob_url))
    assert isinstance(h, LocalHive)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}/blobs"


async def test_a_large_value_and_text_go_to_the_blob_store_and_every_read_returns_them(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    text = "searchable words " * 500  # ~8.5 KB: over THRESHOLD
    put = await hive.put(ns, "big", BIG, text=text, metadata={"kind": "big"})
    assert put.value == BIG and put.text == text
    assert len(objects(blob_url)) == 2  # one for the value, one for the text

    row = await hive.backend.get_item(ns, "big", time.time())
    assert row is not None and row.value.startswith(b'{"__hivemem_blob__":')
    assert len(row.value) < 300 and row.text is not None and len(row.text) < 300

    got = await hive.get(ns, "big")
    assert got is not None and got.value == BIG and got.text == text
    assert [i.value for i in (await hive.list(ns)).items] == [BIG]
    assert [i.value for i in await hive.history(ns, "big")] == [BIG]
    (hit,) = await hive.search(ns, "searchable words", mode="lexical")
    assert hit.item.value == BIG and hit.item.text == text
    (batched,) = await hive.batch([PutOp(namespace=ns, key="other", value=BIG)])
    assert isinstance(batched, hivemem.Item) and batched.value == BIG
    assert (await hive.get(ns, "other")).value == BIG  # type: ignore[union-attr]


async def test_the_indexer_embeds_a_text_kept_in_the_blob_store(tmp_path: Path, ns: str) -> None:
    url = str(tmp_path / "objects")
    s = Settings(blob_store=url, blob_threshold_bytes=THRESHOLD)  # the offline MiniLM
    async with hivemem.connect(f"sqlite:///{tmp_path / 'h.db'}", settings=s) as hive:
        assert isinstance(hive, LocalHive)
        cats = "Kittens chase a ball of yarn across the kitchen floor. " * 100
        await hive.put(ns, "cats", {"n": 1}, text=cats)
        await hive.put(ns, "money", {"n": 2}, text="Quarterly revenue and interest rates.")
        assert len(objects(url)) == 1
        hits = await hive.search(ns, "young cats playing", mode="vector", consistency="indexed")
        assert hits[0].item.key == "cats" and hits[0].item.text == cats
        # What the indexer stored with the vector is the text, not its reference.
        assert await hive.backend.texts_of([(ns, "cats")]) == {(ns, "cats"): cats}


class CountingStore(ObjectStore):
    """An object store that records every call and passes it on."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.url, self.field = inner, inner.url, inner.field
        self.calls: list[str] = []

    async def put(self, name: str, data: bytes) -> None:
        self.calls.append("put")
        await self.inner.put(name, data)

    async def get(self, name: str) -> bytes | None:
        self.calls.append("get")
        return await self.inner.get(name)

    async def head(self, name: str, length: int) -> bytes | None:
        self.calls.append("head")
        return await self.inner.head(name, length)

    async def delete(self, names: Sequence[str]) -> None:
        self.calls.append("delete")
        await self.inner.delete(names)

    async def scan(self, after: str, limit: int) -> list[ObjectInfo]:
        self.calls.append("scan")
        return await self.inner.scan(after, limit)

    async def close(self) -> None:
        await self.inner.close()


def counting(hive: LocalHive) -> CountingStore:
    blobs = hive._shared.blobs
    assert blobs is not None
    blobs.store = CountingStore(blobs.store)
    return blobs.store


async def test_values_under_the_threshold_never_touch_the_blob_store(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    store = counting(hive)
    await hive.put(ns, "a", SMALL, text="a short text")
    await hive.put(ns, "a", {"note": "x" * (THRESHOLD - 20)})  # just under, as JSON
    await hive.put(ns, "a", SMALL)  # trims a small version
    await hive.get(ns, "a")
    await hive.list(ns)
    await hive.history(ns, "a")
    await hive.search(ns, "short", mode="lexical")
    await hive.batch([PutOp(namespace=ns, key="b", value=SMALL)])
    await hive.delete(ns, "a")
    assert store.calls == []
    assert objects(blob_url) == []


async def test_deleting_an_item_removes_its_objects(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    await hive.put(ns, "k", BIG)
    await hive.put(ns, "k", {"blob": "c" * 20_000}, text="t" * 5000)
    await hive.put(ns, "keep", BIG)
    assert len(objects(blob_url)) == 4
    assert await hive.delete(ns, "k")
    assert len(objects(blob_url)) == 1  # "keep"'s
    assert (await hive.get(ns, "keep")).value == BIG  # type: ignore[union-attr]


@pytest.mark.parametrize("store_url", ["sqlite", "redis", "dynamodb"], indirect=True)
async def test_a_put_that_trims_a_version_beyond_history_limit_frees_its_object(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    # history_limit=2: the current version and one before it are kept.
    await hive.put(ns, "k", {"v": 1, **BIG})
    await hive.put(ns, "k", {"v": 2, **BIG})
    assert len(objects(blob_url)) == 2
    await hive.put(ns, "k", {"v": 3})  # small; version 1 is trimmed
    assert len(objects(blob_url)) == 1
    assert [i.value.get("v") for i in await hive.history(ns, "k")] == [3, 2]
    assert (await hive.history(ns, "k"))[1].value == {"v": 2, **BIG}
    await hive.put(ns, "k", {"v": 4})  # version 2 is trimmed
    assert objects(blob_url) == []
    await hive.batch([PutOp(namespace=ns, key="k", value={"v": 5, **BIG})])
    await hive.batch([DeleteOp(namespace=ns, key="k")])
    assert objects(blob_url) == []


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_on_redis_reads_resolve_and_a_delete_frees_the_objects(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    text = "redis words " * 600
    await hive.put(ns, "k", BIG, text=text)
    assert len(objects(blob_url)) == 2
    got = await hive.get(ns, "k")
    assert got is not None and got.value == BIG and got.text == text
    assert [i.value for i in (await hive.list(ns)).items] == [BIG]
    assert await hive.delete(ns, "k")
    assert objects(blob_url) == []


async def test_a_write_that_conflicts_leaves_no_object(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    with pytest.raises(Conflict):
        await hive.put(ns, "k", BIG, if_version=3)
    assert objects(blob_url) == []
    assert await hive.get(ns, "k") is None


CRASH = """
import asyncio, os, signal, sys
import hivemem
from hivemem.config import Settings

async def main() -> None:
    store, blob, ns = sys.argv[1:4]
    hive = hivemem.connect(store, agent="crasher", settings=Settings(
        blob_store=blob, blob_threshold_bytes=4096, embedder="none"))
    await hive.open()

    async def die(*args, **kwargs):  # the commit: killed before it runs
        os.kill(os.getpid(), signal.SIGKILL)

    hive.backend.write_items = die
    await hive.put(ns, "lost", {"blob": "x" * 50_000})

asyncio.run(main())
"""


async def test_a_crash_before_the_commit_leaves_no_item_and_an_orphan_the_sweeper_removes(
    hive: LocalHive, store_url: str, blob_url: str, ns: str
) -> None:
    await hive.put(ns, "kept", BIG)  # referenced: the sweeper must leave it
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASH, store_url, blob_url, ns],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert len(objects(blob_url)) == 2  # "kept"'s and the orphan
    assert await hive.get(ns, "lost") is None
    assert [i.key for i in (await hive.list(ns)).items] == ["kept"]

    assert await hive.sweep_blobs() == 0  # younger than blob_grace_seconds (1 hour)
    assert await hive.sweep_blobs(grace=0) == 1
    assert len(objects(blob_url)) == 1
    assert (await hive.get(ns, "kept")).value == BIG  # type: ignore[union-attr]


async def test_the_background_sweeper_removes_an_orphan_once_its_grace_period_is_over(
    tmp_path: Path, ns: str
) -> None:
    url = str(tmp_path / "objects")
    s = settings(
        url, blob_grace_seconds=1.0, sweep_interval_seconds=0.1, blob_sweep_interval_seconds=0.1
    )
    async with hivemem.connect(f"sqlite:///{tmp_path / 'h.db'}", settings=s) as hive:
        assert isinstance(hive, LocalHive) and hive._blobs is not None
        await hive.put(ns, "kept", BIG)
        # An upload whose commit never comes: the blob write alone.
        blobs: Blobs = hive._blobs
        written = time.monotonic()
        await blobs._upload([hive._put_write(ns, "lost", BIG, None, None, None, None)])
        assert len(objects(url)) == 2
        while len(objects(url)) == 2:
            assert time.monotonic() - written < 10, "the sweeper did not remove the orphan"
            await asyncio.sleep(0.05)
        assert time.monotonic() - written >= 1.0  # not before the grace period
        assert len(objects(url)) == 1
        assert (await hive.get(ns, "kept")).value == BIG  # type: ignore[union-attr]


async def test_the_objects_of_an_expired_item_go_with_the_sweeper_after_the_grace_period(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    await hive.put(ns, "brief", BIG, ttl=0.3)
    await asyncio.sleep(0.4)
    assert await hive.get(ns, "brief") is None
    assert await hive.sweep() == (1, 0)  # the row is gone, its object not yet
    assert len(objects(blob_url)) == 1
    assert await hive.sweep_blobs() == 0  # younger than blob_grace_seconds
    assert await hive.sweep_blobs(grace=0) == 1
    assert objects(blob_url) == []


async def test_a_missing_object_raises_unavailable_naming_the_blob_store(
    hive: LocalHive, blob_url: str, ns: str
) -> None:
    await hive.put(ns, "k", BIG)
    assert hive._blobs is not None
    await hive._blobs.store.delete(objects(blob_url))
    with pytest.raises(Unavailable) as caught:
        await hive.get(ns, "k")
    assert caught.value.field == "blob_store" and "missing" in caught.value.message


async def test_a_stored_reference_without_a_blob_store_raises_unavailable(
    tmp_path: Path, ns: str
) -> None:
    db = f"sqlite:///{tmp_path / 'h.db'}"
    async with hivemem.connect(db, settings=settings(str(tmp_path / "o"))) as hive:
        await hive.put(ns, "k", BIG)
    async with hivemem.connect(db, settings=Settings(embedder="none")) as plain:
        with pytest.raises(Unavailable) as caught:
            await plain.get(ns, "k")
        assert caught.value.field == "blob_store"


async def test_a_value_shaped_like_a_reference_is_refused_naming_the_field(
    hive: LocalHive, ns: str
) -> None:
    fake = {"__hivemem_blob__": {"v": 1, "object": "x/y", "bytes": 1, "sha256": "00"}}
    with pytest.raises(InvalidInput) as caught:
        await hive.put(ns, "k", fake)
    assert caught.value.field == "value"
    with pytest.raises(InvalidInput) as caught:
        await hive.batch([PutOp(namespace=ns, key="k", value=fake)])
    assert caught.value.field == "ops.0.value"
    await hive.put(ns, "k", {"__hivemem_blob__": 1})  # another shape is an ordinary value
    assert (await hive.get(ns, "k")).value == {"__hivemem_blob__": 1}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "s3://", "s3://bucket/p?bogus=1", "s3://b/p?endpoint=nope"]
)
def test_a_malformed_blob_store_is_refused_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        hivemem.connect("sqlite://:memory:", settings=Settings(blob_store=url))
    assert caught.value.field == "blob_store"


def _db_bytes(path: Path) -> int:
    return sum(os.path.getsize(f) for f in (path, Path(f"{path}-wal")) if os.path.exists(f))


@pytest.mark.slow
@pytest.mark.matrix  # 50 MiB through a service: .ci/run's matrix pass
def test_a_50_mib_value_round_trips_through_the_service_and_the_database_grows_under_1_mib(
    tmp_path: Path, moto_endpoint: str
) -> None:
    bucket = f"big-{uuid.uuid4().hex[:12]}"
    _s3(moto_endpoint).create_bucket(Bucket=bucket)
    blob_url = f"s3://{bucket}/objects?endpoint={moto_endpoint}&region={REGION}"
    service = ServiceProcess(
        tmp_path / "svc.db",
        env={
            "HIVEMEM_BLOB_STORE": blob_url,
            "HIVEMEM_MAX_VALUE_BYTES": str(64 * 1024 * 1024),
            "HIVEMEM_EMBEDDER": "none",
        },
    )
    service.start()
    try:
        client = Settings(request_timeout_seconds=180, client_attempts=1)
        with hivemem.connect_sync(service.url, agent="big", settings=client) as hive:
            hive.put("warm/up", "k", SMALL)  # the schema and first pages exist
            before = _db_bytes(service.store_path)
            value = {"blob": os.urandom(25 * 1024 * 1024).hex()}  # 50 MiB of JSON
            put = hive.put("big/values", "fifty", value)
            assert put.version == 1
            got = hive.get("big/values", "fifty")
            assert got is not None and got.value == value
            grown = _db_bytes(service.store_path) - before
            print(f"the database grew by {grown:,} bytes for a 50 MiB value")
            assert grown < 1024 * 1024, grown
            assert len(objects(blob_url)) == 1
            assert hive.delete("big/values", "fifty")
            assert objects(blob_url) == []
    finally:
        service.terminate()


def test_with_a_blob_store_the_service_accepts_a_body_of_max_value_bytes(
    tmp_path: Path,
) -> None:
    from hivemem.service.guards import body_limit

    plain = Settings(max_request_bytes=4 * 1024 * 1024, max_value_bytes=100 * 1024 * 1024)
    assert body_limit(plain) == 4 * 1024 * 1024
    with_blobs = plain.model_copy(update={"blob_store": str(tmp_path)})
    assert 100 * 1024 * 1024 < body_limit(with_blobs) < 101 * 1024 * 1024
