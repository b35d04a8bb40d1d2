"""Helpers to read the change feed in conformance tests."""

from __future__ import annotations

from collections.abc import Iterable

import hivemem
from hivemem import Event


async def events_after(hive: hivemem.Hive, cursor: str, prefix: str = "") -> list[Event]:
    """Every event under ``prefix`` after ``cursor``, following ``next_cursor`` page by page."""
    out: list[Event] = []
    after = cursor
    for _ in range(10_000):
        page = await hive.read_events(prefix, after=after, limit=100)
        assert page.next_cursor is not None, "read_events must always return a next_cursor"
        if not page.items:
            return out
        out.extend(page.items)
        after = page.next_cursor
    raise AssertionError("feed did not end after 10,000 pages")


def mine(events: Iterable[Event], *namespaces: str) -> list[Event]:
    """The events whose namespace is one of ``namespaces`` or under one of them."""
    return [
        e
        for e in events
        if any(e.namespace == n or e.namespace.startswith(n + "/") for n in namespaces)
    ]


async def assert_nothing_written(hive: hivemem.Hive, head_before: str) -> None:
    """Fail if the feed gained an event since ``head_before``.

    ``item.expired`` and ``session.expired`` events are tolerated: on shared stores the
    sweeper may expire items and sessions that earlier tests wrote with a TTL, which is not
    a write of the test.
    """
    swept = ("item.expired", "session.expired")
    new = [e for e in await events_after(hive, head_before) if e.type not in swept]
    assert new == [], f"the feed changed although nothing should have been written: {new}"


def summary(events: Iterable[Event]) -> list[tuple[str, str, str | None, int | None, str]]:
    """(type, namespace, key, version, author) of each event, for comparisons."""
    return [(e.type, e.namespace, e.key, e.version, e.author) for e in events]
