"""Permission rules: allow/deny actions on namespace globs, to agents or roles.

A policy file (TOML or YAML) holds a list of rules::

    [[rules]]
    effect = "allow"                       # or "deny"; default "allow"
    actions = ["read", "search", "watch"]  # or ["*"]
    namespaces = ["team/{agent}/**", "shared/**"]
    roles = ["researcher"]                 # and/or agents = ["alice"]; "*" = every agent

Decision for (principal, action, namespace): **deny wins** (any matching deny rule
refuses); otherwise allowed if a matching allow rule exists or one of the principal's
built-in roles grants the action (``admin``: every action, ``writer``: all but admin,
``reader``: read, search and watch — on every namespace); otherwise denied (default
deny).

Globs match whole segments: ``*`` matches within one segment (``team/*``: ``team/a``
but not ``team/a/b``), ``**`` matches any number of segments, none included
(``team/a/**``: ``team/a`` and everything under it), ``?`` one character. ``{agent}``
is replaced by the principal's name, so one rule gives every agent its own space.

Sessions are checked on the namespace ``<app>/<user>`` (``<app>`` without a user)
with the action ``sessions``; published events on their channel with ``publish``
(sending) and ``watch`` (reading the feed).
"""

from __future__ import annotations

import re
import threading
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemem.backends.rows import at_or_under
from hivemem.errors import InvalidInput
from hivemem.policy.principal import ACTIONS, BUILTIN_ROLES, Principal

__all__ = ["Access", "Policy", "PolicyHolder", "Rule", "session_namespace"]

_GLOB_CHARS = re.compile(r"[*?]")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_PLACEHOLDERS = ("agent",)
_RULE_FIELDS = {"effect", "actions", "namespaces", "agents", "roles", "description"}
#: Decisions remembered per principal before the memo starts over.
_MEMO_SIZE = 4096


def session_namespace(app: str, user: str | None) -> str:
    """The namespace a session is checked on: ``<app>/<user>``, or ``<app>``."""
    return app if user is None else f"{app}/{user}"


def _segment_regex(segment: str) -> str:
    out = []
    for part in re.split(r"([*?])", segment):
        if part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(part))
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a namespace glob (placeholders already substituted) to a regex that
    matches whole namespaces. See the module notes for the syntax."""
    segments = pattern.split("/")
    if segments == ["**"]:
        return re.compile(r"(?:[^/]+(?:/[^/]+)*)?\Z")
    out = []
    slash = False  # whether the next literal segment needs a leading '/'
    for i, seg in enumerate(segments):
        if seg == "**":
            if i == 0:
                out.append("(?:[^/]+/)*")
                slash = False
            else:
                out.append("(?:/[^/]+)*")
                slash = True
            continue
        out.append(("/" if slash else "") + _segment_regex(seg))
        slash = True
    return re.compile("".join(out) + r"\Z")


def glob_root(pattern: str) -> str:
    """The literal segments a glob starts with: every namespace it matches is at or
    under this prefix ("" when the first segment is a wildcard)."""
    root: list[str] = []
    for seg in pattern.split("/"):
        if _GLOB_CHARS.search(seg):
            break
        root.append(seg)
    return "/".join(root)


_under = at_or_under


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a policy.

    Attributes:
        allow: True for an allow rule, False for deny.
        actions: the action classes it covers.
        namespaces: namespace globs, possibly with ``{agent}``.
        agents: agent names it applies to (``"*"``: every agent).
        roles: roles it applies to (an agent holding any of them).
    """

    allow: bool
    actions: frozenset[str]
    namespaces: tuple[str, ...]
    agents: frozenset[str]
    roles: frozenset[str]

    def applies_to(self, principal: Principal) -> bool:
        return (
            "*" in self.agents
            or principal.agent in self.agents
            or not self.roles.isdisjoint(principal.roles)
        )

    @classmethod
    def parse(cls, doc: Any, where: str) -> Rule:
        """Build a rule from its file form.

        Raises:
            InvalidInput: naming ``<where>.<field>`` for an unknown field, action or
                placeholder, an empty list, or a rule that names neither agents nor roles.
        """
        if not isinstance(doc, Mapping):
            raise InvalidInput("a rule must be a table", field=where)
        unknown = set(doc) - _RULE_FIELDS
        if unknown:
            raise InvalidInput(
                f"unknown rule field(s) {', '.join(sorted(map(str, unknown)))}; "
                f"known: {', '.join(sorted(_RULE_FIELDS))}",
                field=f"{where}.{sorted(map(str, unknown))[0]}",
            )
        effect = doc.get("effect", "allow")
        if effect not in ("allow", "deny"):
            raise InvalidInput("effect must be 'allow' or 'deny'", field=f"{where}.effect")
        actions = _strings(doc.get("actions"), f"{where}.actions")
        if "*" in actions:
            actions = list(ACTIONS)
        bad = [a for a in actions if a not in ACTIONS]
        if bad:
            raise InvalidInput(
                f"unknown action {bad[0]!r}; actions are {', '.join(ACTIONS)}",
                field=f"{where}.actions",
            )
        namespaces = _strings(doc.get("namespaces"), f"{where}.namespaces")
        for pattern in namespaces:
            _check_glob(pattern, f"{where}.namespaces")
        agents = _strings(doc.get("agents", []), f"{where}.agents", allow_empty=True)
        roles = _strings(doc.get("roles", []), f"{where}.roles", allow_empty=True)
        if not agents and not roles:
            raise InvalidInput(
                "a rule needs agents or roles (agents = ['*'] for every agent)",
                field=f"{where}.agents",
            )
        return cls(
            allow=effect == "allow",
            actions=frozenset(actions),
            namespaces=tuple(namespaces),
            agents=frozenset(agents),
            roles=frozenset(roles),
        )


def _strings(value: Any, field: str, *, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput("must be a list of non-empty strings", field=field)
    if not value and not allow_empty:
        raise InvalidInput("must not be empty", field=field)
    return value


def _check_glob(pattern: str, field: str) -> None:
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        raise InvalidInput(f"namespace glob {pattern!r} has an empty segment", field=field)
    for name in _PLACEHOLDER.findall(pattern):
        if name not in _PLACEHOLDERS:
            raise InvalidInput(
                f"unknown placeholder {{{name}}} in {pattern!r}; known: {{agent}}", field=field
            )
    rest = _PLACEHOLDER.sub("x", pattern)
    if re.search(r"[{}\[\]]", rest):
        raise InvalidInput(f"namespace glob {pattern!r} has a stray brace", field=field)
    for seg in rest.split("/"):
        if "**" in seg and seg != "**":
            raise InvalidInput(f"'**' must be a whole segment in {pattern!r}", field=field)


class Policy:
    """An ordered set of :class:`Rule` plus the built-in roles.

    Args:
        rules: the rules, in any order (order does not matter: deny wins).
        source: where they came from (a path), for messages.
    """

    def __init__(self, rules: Sequence[Rule] = (), source: str | None = None) -> None:
        self.rules = tuple(rules)
        self.source = source

    @classmethod
    def parse(cls, doc: Any, source: str | None = None) -> Policy:
        """A policy from a parsed document ``{"rules": [...]}``.

        Raises:
            InvalidInput: naming the field at fault (``rules.<i>.<field>``).
        """
        if not isinstance(doc, Mapping):
            raise InvalidInput("a policy must be a table with a 'rules' list", field="rules")
        extra = set(doc) - {"rules"}
        if extra:
            raise InvalidInput(
                f"unknown top-level key {sorted(map(str, extra))[0]!r}; a policy holds 'rules'",
                field=str(sorted(map(str, extra))[0]),
            )
        raw = doc.get("rules", [])
        if not isinstance(raw, list):
            raise InvalidInput("rules must be a list of tables", field="rules")
        return cls([Rule.parse(r, f"rules.{i}") for i, r in enumerate(raw)], source)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file: TOML (``.toml``) or YAML (``.yaml``/``.yml``).

        Raises:
            InvalidInput: the file cannot be read or parsed (field ``policy_file``), or a
                rule is malformed (``rules.<i>.<field>``).
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read policy file {p}: {exc}", field="policy_file") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml  # type: ignore[import-untyped]

                doc = yaml.safe_load(text) or {}
            else:
                doc = tomllib.loads(text)
        except Exception as exc:  # tomllib / yaml parse errors have no common base
            raise InvalidInput(
                f"cannot parse policy file {p}: {exc}", field="policy_file"
            ) from None
        return cls.parse(doc, str(p))

    def for_principal(self, principal: Principal) -> tuple[list[_Bound], list[_Bound]]:
        """The allow and deny rules that apply to ``principal``, placeholders filled in."""
        allow: list[_Bound] = []
        deny: list[_Bound] = []
        for role in principal.roles:
            actions = BUILTIN_ROLES.get(role)
            if actions:
                allow.append(_Bound(actions, "**"))
        for rule in self.rules:
            if not rule.applies_to(principal):
                continue
            for pattern in rule.namespaces:
                filled = pattern.replace("{agent}", principal.agent)
                (allow if rule.allow else deny).append(_Bound(rule.actions, filled))
        return allow, deny


class _Bound:
    """One rule's actions and one glob, bound to a principal (placeholders filled)."""

    __slots__ = ("actions", "regex", "root")

    def __init__(self, actions: Iterable[str], pattern: str) -> None:
        self.actions = frozenset(actions)
        self.regex = glob_regex(pattern)
        self.root = glob_root(pattern)


class PolicyHolder:
    """The policy in force, replaceable at run time (``reload`` on SIGHUP).

    Args:
        path: the policy file, or None for the built-in roles only.
    """

    def __init__(self, path: str | None = None, policy: Policy | None = None) -> None:
        self.path = path
        self.policy = policy if policy is not None else (Policy.load(path) if path else Policy())
        self.generation = 0
        self._lock = threading.Lock()

    def reload(self) -> Policy:
        """Read the file again; on error the old policy stays and the error is raised.

        Raises:
            InvalidInput: the file is unreadable or malformed.
        """
        if not self.path:
            return self.policy
        fresh = Policy.load(self.path)
        with self._lock:
            self.policy = fresh
            self.generation += 1
        return fresh

    def replace(self, policy: Policy) -> None:
        """Put ``policy`` in force (tests, programmatic policies)."""
        with self._lock:
            self.policy = policy
            self.generation += 1


class Access:
    """What one principal may do, under the policy a :class:`PolicyHolder` holds.

    Decisions are memoised per (action, namespace) until the policy is replaced.
    Namespaces starting with ``_`` (hivemem's own: ``_auth`` keys, ``_admin`` events)
    are matched only by rules whose glob names them or by the ``admin`` action.
    """

    def __init__(self, principal: Principal, holder: PolicyHolder) -> None:
        self.principal = principal
        self.holder = holder
        self._generation = -1
        self._allow: list[_Bound] = []
        self._deny: list[_Bound] = []
        self._memo: dict[tuple[str, str], bool] = {}

    def _refresh(self) -> None:
        if self._generation != self.holder.generation:
            self._generation = self.holder.generation
            self._allow, self._deny = self.holder.policy.for_principal(self.principal)
            self._memo = {}

    def allows(self, action: str, namespace: str) -> bool:
        """Whether the principal may do ``action`` on ``namespace`` (deny wins)."""
        self._refresh()
        memo_key = (action, namespace)
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        internal = namespace.startswith("_")
        decision = False
        for bound in self._allow:
            if action in bound.actions and bound.regex.match(namespace):
                if internal and bound.root == "" and action != "admin":
                    continue  # a catch-all glob does not reach hivemem's own namespaces
                decision = True
                break
        if decision:
            for bound in self._deny:
                if action in bound.actions and bound.regex.match(namespace):
                    decision = False
                    break
        if len(self._memo) >= _MEMO_SIZE:
            self._memo = {}
        self._memo[memo_key] = decision
        return decision

    def roots(self, action: str, prefix: str) -> list[str]:
        """The prefixes to look under, at or below ``prefix``, that can hold namespaces
        the principal may ``action``: ``[prefix]`` when some allow rule reaches the
        whole of it, several narrower roots when allow rules start below it (sorted,
        none nested in another), ``[]`` when nothing under ``prefix`` can be allowed.
        Results found under them must still be checked with :meth:`allows` (deny rules
        and wildcards inside a root)."""
        self._refresh()
        found: set[str] = set()
        for bound in self._allow:
            if action not in bound.actions:
                continue
            if _under(prefix, bound.root):
                return [prefix]
            if _under(bound.root, prefix):
                found.add(bound.root)
        ordered = sorted(found)
        kept: list[str] = []
        for root in ordered:
            if not any(_under(root, k) for k in kept):
                kept.append(root)
        return kept

    def anywhere(self, action: str) -> bool:
        """Whether any allow rule grants ``action`` somewhere."""
        self._refresh()
        return any(action in b.actions for b in self._allow)
