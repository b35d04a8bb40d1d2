"""Permission rules: globs, placeholders, deny wins, default deny, built-in roles, the
roots a listing narrows to, and the policy file's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemem.errors import InvalidInput
from hivemem.policy import ACTIONS, Principal
from hivemem.policy.rules import Access, Policy, PolicyHolder, glob_regex, glob_root


@pytest.mark.parametrize(
    ("pattern", "namespace", "matches"),
    [
        ("team/a/**", "team/a", True),
        ("team/a/**", "team/a/x/y", True),
        ("team/a/**", "team/ab", False),
        ("team/a/**", "team", False),
        ("team/*", "team/a", True),
        ("team/*", "team/a/b", False),
        ("team/*", "team", False),
        ("team/a?", "team/ab", True),
        ("team/a?", "team/a/b", False),
        ("**", "x", True),
        ("**", "x/y/z", True),
        ("**/notes", "notes", True),
        ("**/notes", "a/b/notes", True),
        ("**/notes", "a/notesx", False),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/bz", False),
        ("a.b/c", "aXb/c", False),  # '.' is literal
        ("pre*/x", "prefix/x", True),
    ],
)
def test_glob_matches_whole_segments(pattern: str, namespace: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(namespace)) is matches


def test_glob_root_is_the_literal_start() -> None:
    assert glob_root("team/a/**") == "team/a"
    assert glob_root("team/*/notes") == "team"
    assert glob_root("**/x") == ""
    assert glob_root("exact/ns") == "exact/ns"


def access(doc: dict[str, object], agent: str, *roles: str) -> Access:
    return Access(Principal(agent, frozenset(roles)), PolicyHolder(policy=Policy.parse(doc)))


RULES = {
    "rules": [
        {"actions": ["read", "write"], "namespaces": ["team/{agent}/**"], "agents": ["*"]},
        {"actions": ["read"], "namespaces": ["shared/**"], "roles": ["staff"]},
        {"effect": "deny", "actions": ["*"], "namespaces": ["team/*/secret/**"], "agents": ["*"]},
        {"actions": ["*"], "namespaces": ["ops/**"], "agents": ["root"]},
    ]
}


def test_placeholder_gives_every_agent_its_own_space() -> None:
    a, b = access(RULES, "a"), access(RULES, "b")
    assert a.allows("write", "team/a/x") and not a.allows("write", "team/b/x")
    assert b.allows("read", "team/b") and not b.allows("read", "team/a")


def test_deny_wins_over_allow() -> None:
    a = access(RULES, "a")
    assert a.allows("read", "team/a/notes")
    assert not a.allows("read", "team/a/secret/plan")
    assert not access(RULES, "x", "admin").allows("read", "team/a/secret/plan")


def test_default_deny_and_actions_are_separate() -> None:
    a = access(RULES, "a")
    assert not a.allows("search", "team/a/x")  # search was never granted
    assert not a.allows("read", "elsewhere")
    assert not access({"rules": []}, "nobody").allows("read", "x")


def test_roles_grant_through_rules_and_builtins() -> None:
    staff = access(RULES, "s", "staff")
    assert staff.allows("read", "shared/doc") and not staff.allows("write", "shared/doc")
    reader = access({"rules": []}, "r", "reader")
    assert {a for a in ACTIONS if reader.allows(a, "x/y")} == {"read", "search", "watch"}
    writer = access({"rules": []}, "w", "writer")
    assert {a for a in ACTIONS if writer.allows(a, "x/y")} == set(ACTIONS) - {"admin"}
    admin = access({"rules": []}, "r", "admin")
    assert all(admin.allows(a, "x/y") for a in ACTIONS)


def test_hivemems_own_namespaces_need_admin() -> None:
    reader = access({"rules": []}, "r", "reader")
    assert not reader.allows("read", "_auth/keys")
    everything = access({"rules": [{"actions": ["*"], "namespaces": ["**"], "agents": ["*"]}]}, "x")
    assert not everything.allows("read", "_auth/keys")
    assert everything.allows("admin", "_admin")
    assert access({"rules": []}, "r", "admin").allows("admin", "_auth/agents")


def test_roots_narrow_a_listing_to_where_rules_start() -> None:
    a = access(RULES, "a")
    assert a.roots("read", "") == ["team/a"]
    assert a.roots("read", "team") == ["team/a"]
    assert a.roots("read", "team/a/x") == ["team/a/x"]
    assert a.roots("read", "team/b") == []
    staff = access(RULES, "s", "staff")
    assert staff.roots("read", "") == ["shared", "team/s"]
    assert access(RULES, "r", "reader").roots("read", "team") == ["team"]


def test_a_changed_policy_takes_effect_for_existing_accesses() -> None:
    holder = PolicyHolder(policy=Policy.parse({"rules": []}))
    a = Access(Principal("a"), holder)
    assert not a.allows("read", "x")
    holder.replace(
        Policy.parse({"rules": [{"actions": ["read"], "namespaces": ["x"], "agents": ["a"]}]})
    )
    assert a.allows("read", "x")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            {"rules": [{"actions": ["fly"], "namespaces": ["x"], "agents": ["*"]}]},
            "rules.0.actions",
        ),
        ({"rules": [{"actions": ["read"], "namespaces": ["x"]}]}, "rules.0.agents"),
        (
            {"rules": [{"actions": ["read"], "namespaces": [], "agents": ["*"]}]},
            "rules.0.namespaces",
        ),
        (
            {"rules": [{"actions": ["read"], "namespaces": ["a/**b"], "agents": ["*"]}]},
            "rules.0.namespaces",
        ),
        (
            {"rules": [{"actions": ["read"], "namespaces": ["{user}/x"], "agents": ["*"]}]},
            "rules.0.namespaces",
        ),
        (
            {
                "rules": [
                    {"effect": "maybe", "actions": ["read"], "namespaces": ["x"], "agents": ["*"]}
                ]
            },
            "rules.0.effect",
        ),
        (
            {"rules": [{"actions": ["read"], "namespaces": ["x"], "agents": ["*"], "colour": 1}]},
            "rules.0.colour",
        ),
        ({"rule": []}, "rule"),
        ({"rules": {}}, "rules"),
    ],
)
def test_a_malformed_policy_names_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Policy.parse(doc)
    assert info.value.field == field


def test_policy_files_in_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[[rules]]\nactions = ["read"]\nnamespaces = ["x/**"]\nagents = ["a"]\n')
    yaml = tmp_path / "p.yaml"
    yaml.write_text("rules:\n  - actions: [read]\n    namespaces: ['x/**']\n    agents: [a]\n")
    for path in (toml, yaml):
        holder = PolicyHolder(str(path))
        assert Access(Principal("a"), holder).allows("read", "x/y")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]\n")
    with pytest.raises(InvalidInput) as info:
        Policy.load(bad)
    assert info.value.field == "policy_file"
    holder = PolicyHolder(str(toml))
    toml.write_text("not toml [")
    with pytest.raises(InvalidInput):
        holder.reload()
    assert Access(Principal("a"), holder).allows("read", "x/y")  # the old rules stay
