"""Bad input raises InvalidInput or TooLarge naming the field, and writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import hivemem
from hivemem import InvalidInput, PutOp, TooLarge
from tests.conftest import selected_stores, store_url_of

from ._feed import assert_nothing_written

#: Bad input is refused in core (embedded) or in the service (remote) before any store
#: is touched, so the cases below run on one embedded kind and on the service; what
#: reaches a store (the limits themselves) runs on every kind.
_BEFORE_THE_STORE = [k for k in ("sqlite-memory", "remote") if k in selected_stores()] or [
    selected_stores()[0]
]


@pytest.fixture(params=_BEFORE_THE_STORE)
async def checked_hive(request: pytest.FixtureRequest) -> AsyncIterator[hivemem.Hive]:
    h = hivemem.connect(store_url_of(request, request.param), agent="tester")
    await h.open()
    try:
        yield h
    finally:
        await h.close()


MiB = 1024 * 1024

Call = Callable[[hivemem.Hive, str], Awaitable[Any]]


def _session_with_ttl(ttl: Any) -> Call:
    async def call(h: hivemem.Hive, ns: str) -> Any:
        return await h.create_session(app=ns, ttl=ttl)

    return call


# (id, call, expected error class, expected .field)
CASES: list[tuple[str, Call, type[hivemem.HivememError], str]] = [
    ("namespace-space", lambda h, ns: h.put(f"{ns}/bad ns", "k", 1), InvalidInput, "namespace"),
    ("namespace-hash", lambda h, ns: h.put(f"{ns}/a#b", "k", 1), InvalidInput, "namespace"),
    ("namespace-slash-run", lambda h, ns: h.put(f"{ns}//x", "k", 1), InvalidInput, "namespace"),
    ("namespace-trailing", lambda h, ns: h.put(f"{ns}/", "k", 1), InvalidInput, "namespace"),
    ("namespace-reserved", lambda h, ns: h.put(f"{ns}/_x", "k", 1), InvalidInput, "namespace"),
    ("namespace-empty", lambda h, ns: h.put("", "k", 1), InvalidInput, "namespace"),
    (
        "namespace-unicode",
        lambda h, ns: h.put(f"{ns}/caf\u00e9", "k", 1),
        InvalidInput,
        "namespace",
    ),
    (
        "namespace-9-deep",
        lambda h, ns: h.put("/".join([ns, *"abcdefgh"]), "k", 1),
        InvalidInput,
        "namespace",
    ),
    (
        "namespace-long-segment",
        lambda h, ns: h.put(f"{ns}/{'s' * 129}", "k", 1),
        InvalidInput,
        "namespace",
    ),
    ("key-empty", lambda h, ns: h.put(ns, "", 1), InvalidInput, "key"),
    ("key-slash", lambda h, ns: h.put(ns, "a/b", 1), InvalidInput, "key"),
    ("key-513-bytes", lambda h, ns: h.put(ns, "k" * 513, 1), InvalidInput, "key"),
    ("key-514-utf8-bytes", lambda h, ns: h.put(ns, "\u00e9" * 257, 1), InvalidInput, "key"),
    ("key-nul", lambda h, ns: h.put(ns, "a\x00b", 1), InvalidInput, "key"),
    ("key-newline", lambda h, ns: h.put(ns, "a\nb", 1), InvalidInput, "key"),
    ("key-control", lambda h, ns: h.put(ns, "a\x1fb", 1), InvalidInput, "key"),
    ("value-over-1mib", lambda h, ns: h.put(ns, "k", "x" * (MiB + 1)), TooLarge, "value"),
    (
        "text-over-256kib",
        lambda h, ns: h.put(ns, "k", 1, text="t" * (256 * 1024 + 1)),
        TooLarge,
        "text",
    ),
    (
        "metadata-over-16kib",
        lambda h, ns: h.put(ns, "k", 1, metadata={"m": "x" * (16 * 1024 + 1)}),
        TooLarge,
        "metadata",
    ),
    ("ttl-zero", lambda h, ns: h.put(ns, "k", 1, ttl=0), InvalidInput, "ttl"),
    ("ttl-negative", lambda h, ns: h.put(ns, "k", 1, ttl=-1.5), InvalidInput, "ttl"),
    ("delete-bad-key", lambda h, ns: h.delete(ns, "a/b"), InvalidInput, "key"),
    (
        "batch-bad-key",
        lambda h, ns: h.batch(
            [PutOp(namespace=ns, key="fine", value=1), PutOp(namespace=ns, key="a/b", value=2)]
        ),
        InvalidInput,
        "ops.1.key",
    ),
    ("batch-empty", lambda h, ns: h.batch([]), InvalidInput, "ops"),
    (
        "batch-101-ops",
        lambda h, ns: h.batch([PutOp(namespace=ns, key=f"k{i}", value=i) for i in range(101)]),
        InvalidInput,
        "ops",
    ),
    ("publish-bad-channel", lambda h, ns: h.publish(f"{ns}/bad ch", 1), InvalidInput, "channel"),
    (
        "publish-payload-over-64kib",
        lambda h, ns: h.publish(ns, "p" * (64 * 1024 + 1)),
        TooLarge,
        "payload",
    ),
    ("list-prefix-bad", lambda h, ns: h.list(f"{ns}/bad ns"), InvalidInput, "prefix"),
    ("list-limit-0", lambda h, ns: h.list(ns, limit=0), InvalidInput, "limit"),
    ("list-limit-100000", lambda h, ns: h.list(ns, limit=100_000), InvalidInput, "limit"),
    (
        "namespaces-limit-0",
        lambda h, ns: h.list_namespaces(ns, limit=0),
        InvalidInput,
        "limit",
    ),
    (
        "namespaces-limit-100000",
        lambda h, ns: h.list_namespaces(ns, limit=100_000),
        InvalidInput,
        "limit",
    ),
    ("events-limit-0", lambda h, ns: h.read_events(ns, limit=0), InvalidInput, "limit"),
    (
        "events-limit-100000",
        lambda h, ns: h.read_events(ns, limit=100_000),
        InvalidInput,
        "limit",
    ),
    ("sessions-limit-0", lambda h, ns: h.list_sessions(app=ns, limit=0), InvalidInput, "limit"),
    (
        "sessions-limit-100000",
        lambda h, ns: h.list_sessions(app=ns, limit=100_000),
        InvalidInput,
        "limit",
    ),
    (
        "session-bad-id",
        lambda h, ns: h.create_session(app=ns, session_id="has space"),
        InvalidInput,
        "session_id",
    ),
    ("session-bad-app", lambda h, ns: h.create_session(app="a/b"), InvalidInput, "app"),
    *[
        (f"session-ttl-{name}", _session_with_ttl(ttl), InvalidInput, "ttl")
        for name, ttl in [
            ("zero", 0),
            ("negative", -1),
            ("nan", float("nan")),
            ("infinite", float("inf")),
            ("string", "60"),
            ("bool", True),
            ("over-max", 1e12),
        ]
    ],
    ("key-prefix-no-namespace", lambda h, ns: h.list("", key_prefix="a"), InvalidInput, "prefix"),
    ("key-prefix-slash", lambda h, ns: h.list(ns, key_prefix="a/b"), InvalidInput, "key_prefix"),
    (
        "key-prefix-control",
        lambda h, ns: h.list(ns, key_prefix="a\x00"),
        InvalidInput,
        "key_prefix",
    ),
    ("key-prefix-number", lambda h, ns: h.list(ns, key_prefix=7), InvalidInput, "key_prefix"),
]


@pytest.mark.parametrize(
    ("call", "error", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_input_raises_with_field_and_writes_nothing(
    checked_hive: hivemem.Hive,
    ns: str,
    call: Call,
    error: type[hivemem.HivememError],
    field: str,
) -> None:
    hive = checked_hive
    head = await hive.head()
    with pytest.raises(error) as info:
        await call(hive, ns)
    assert type(info.value) is error
    assert info.value.field == field
    await assert_nothing_written(hive, head)
    assert (await hive.list(ns)).items == []


async def test_invalid_agent_identity_is_rejected(hive: hivemem.Hive) -> None:
    with pytest.raises(InvalidInput) as info:
        hive.as_agent("not an agent/id")
    assert info.value.field == "agent"


async def test_limits_are_inclusive(hive: hivemem.Hive, ns: str) -> None:
    deepest = "/".join([ns, *"abcdefg"])
    item = await hive.put(deepest, "k" * 512, "x" * (MiB - 2))
    assert (item.namespace, item.version) == (deepest, 1)
    got = await hive.get(deepest, "k" * 512)
    assert got is not None and len(got.value) == MiB - 2
    assert len((await hive.list(ns, limit=1000)).items) == 1
    segment = "s" * 128
    assert (await hive.put(f"{ns}/{segment}", "\u00e9" * 256, 1)).version == 1
