"""Search filter conditions and how a row is matched against them (the reference every
engine's native filter agrees with)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from hivemem.backends.rows import ItemRow

__all__ = ["Condition", "row_matches"]


@dataclass(slots=True, frozen=True)
class Condition:
    """One search filter condition, already checked.

    ``kind`` is ``"metadata"`` (``field`` = a top-level metadata key), ``"author"``
    or ``"updated_at"`` (value in UNIX seconds); ``op`` is one of
    ``= in > >= < <=``; for ``in``, ``value`` is a non-empty tuple.
    """

    kind: str
    field: str | None
    op: str
    value: Any


def _typed(value: Any) -> tuple[int, Any] | None:
    """(kind, comparable) of a JSON scalar: kind 0 = boolean, 1 = number, 2 = string;
    None for null, arrays and objects (which no condition matches)."""
    if isinstance(value, bool):
        return 0, value
    if isinstance(value, int | float):
        return 1, value
    if isinstance(value, str):
        return 2, value
    return None


def _compare(actual: Any, op: str, wanted: Any) -> bool:
    a, w = _typed(actual), _typed(wanted)
    if a is None or w is None or a[0] != w[0]:
        return False
    x, y = a[1], w[1]
    if op == "=":
        return bool(x == y)
    if a[0] == 0:  # booleans are only equal or not
        return False
    if op == ">":
        return bool(x > y)
    if op == ">=":
        return bool(x >= y)
    if op == "<":
        return bool(x < y)
    return bool(x <= y)


def row_matches(row: ItemRow, conditions: Sequence[Condition]) -> bool:
    """Whether an item satisfies every condition, with the typed semantics every
    backend follows: a value matches only a filter value of the same JSON kind
    (boolean, number, string); booleans match only ``=``/``in``; a missing field,
    null, an array or an object matches nothing; ``in`` is equality with any member.
    """
    meta: Any = None
    for cond in conditions:
        if cond.kind == "metadata":
            if meta is None:
                meta = orjson.loads(row.metadata) if row.metadata else {}
            actual = meta.get(cond.field) if isinstance(meta, dict) else None
        elif cond.kind == "author":
            actual = row.author
        else:
            actual = row.updated_at
        if cond.op == "in":
            if not any(_compare(actual, "=", v) for v in cond.value):
                return False
        elif not _compare(actual, cond.op, cond.value):
            return False
    return True
