"""Stateful property test: versions, conditional writes and the feed match a simple model.

For any sequence of puts (unconditional, create-only, with the current or a stale version),
deletes (with or without a version) and gets, an embedded in-memory hive must agree with a
dict model: the versions it returns, exactly when it raises Conflict, and a feed that is
exactly the successful writes, in order, with their versions.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import hivemem
from hivemem import Conflict

NS = "prop/items"
KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.one_of(
    st.integers(-(2**53), 2**53),
    st.text(max_size=8),
    st.lists(st.booleans(), max_size=3),
    st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 9), max_size=2),
    st.none(),
)


class ItemsModel(RuleBasedStateMachine):
    """Drive one hive and a dict model with the same operations and compare them."""

    def __init__(self) -> None:
        super().__init__()
        # Versions and the feed are the subject here, not search: no embedder.
        self.hive = hivemem.connect_sync(
            "sqlite://:memory:", agent="prop", settings=hivemem.Settings(embedder="none")
        )
        self.versions: dict[str, int] = {}
        self.values: dict[str, Any] = {}
        # (type, key, version or None for deletes) of every successful write, in order.
        self.writes: list[tuple[str, str, int | None]] = []

    def teardown(self) -> None:
        self.hive.close()

    def _if_version(self, key: str, mode: str, delta: int, up: bool) -> int | None:
        current = self.versions.get(key, 0)
        if mode == "none":
            return None
        if mode == "zero":
            return 0
        if mode == "correct":
            return current
        if up or current - delta < 0:
            return current + delta
        return current - delta

    @rule(
        key=KEYS,
        value=VALUES,
        mode=st.sampled_from(["none", "zero", "correct", "stale"]),
        delta=st.integers(1, 3),
        up=st.booleans(),
    )
    def put(self, key: str, value: Any, mode: str, delta: int, up: bool) -> None:
        current = self.versions.get(key, 0)
        if_version = self._if_version(key, mode, delta, up)
        if if_version is not None and if_version != current:
            with pytest.raises(Conflict) as info:
                self.hive.put(NS, key, value, if_version=if_version)
            assert info.value.current_version == current
            return
        item = self.hive.put(NS, key, value, if_version=if_version)
        assert item.version == current + 1
        assert item.value == value
        assert item.author == "prop"
        self.versions[key] = item.version
        self.values[key] = value
        self.writes.append(("item.put", key, item.version))

    @rule(
        key=KEYS,
        mode=st.sampled_from(["none", "zero", "correct", "stale"]),
        delta=st.integers(1, 3),
        up=st.booleans(),
    )
    def delete(self, key: str, mode: str, delta: int, up: bool) -> None:
        present = key in self.versions
        current = self.versions.get(key, 0)
        if_version = self._if_version(key, mode, delta, up)
        if if_version is not None and (not present or if_version != current):
            with pytest.raises(Conflict) as info:
                self.hive.delete(NS, key, if_version=if_version)
            assert info.value.current_version == current
            return
        assert self.hive.delete(NS, key, if_version=if_version) is present
        if present:
            del self.versions[key]
            del self.values[key]
            self.writes.append(("item.deleted", key, None))

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        item = self.hive.get(NS, key)
        if key not in self.versions:
            assert item is None
        else:
            assert item is not None
            assert (item.version, item.value) == (self.versions[key], self.values[key])

    @invariant()
    def versions_match_the_model(self) -> None:
        listed = {i.key: (i.version, i.value) for i in self.hive.list(NS).items}
        assert listed == {k: (v, self.values[k]) for k, v in self.versions.items()}

    @invariant()
    def feed_is_exactly_the_successful_writes(self) -> None:
        feed: list[tuple[str, str, int | None]] = []
        after = "0"
        while True:
            page = self.hive.read_events(NS, after=after, limit=50)
            if not page.items:
                break
            for e in page.items:
                assert e.namespace == NS and e.author == "prop"
                feed.append((e.type, e.key or "", e.version if e.type == "item.put" else None))
            assert page.next_cursor is not None
            after = page.next_cursor
        assert feed == self.writes


TestItemsModel = ItemsModel.TestCase
TestItemsModel.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
