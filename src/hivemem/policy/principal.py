"""The authenticated caller: an agent name, its roles, and how it proved who it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ACTIONS", "BUILTIN_ROLES", "Action", "Principal"]

#: Action classes that rules grant or deny, and that rate limits count.
Action = Literal["read", "write", "search", "watch", "publish", "sessions", "tasks", "admin"]
ACTIONS: tuple[Action, ...] = (
    "read",
    "write",
    "search",
    "watch",
    "publish",
    "sessions",
    "tasks",
    "admin",
)

#: Roles that need no policy file: what each allows, on every namespace.
BUILTIN_ROLES: dict[str, frozenset[Action]] = {
    "admin": frozenset(ACTIONS),
    "writer": frozenset(a for a in ACTIONS if a != "admin"),
    "reader": frozenset(("read", "search", "watch")),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request or an embedded hive acts for.

    Attributes:
        agent: the agent's name (one namespace segment); the author of its writes.
        roles: role names, built-in (``admin``, ``writer``, ``reader``) or the policy's own.
        via: how the identity was established: ``key`` (API key), ``jwt`` (bearer
            token), ``header`` (``X-Hivemem-Agent`` with auth off) or ``local``
            (an embedded hive).
    """

    agent: str
    roles: frozenset[str] = field(default_factory=frozenset)
    via: Literal["key", "jwt", "header", "local"] = "local"
