"""Identities, permissions and rate limits.

Who is calling (:class:`Principal`, from an API key or a JWT bearer token), what it may
touch (:class:`~hivemem.policy.rules.Policy`: allow/deny rules on namespace globs, plus
the built-in roles), and how often (:mod:`hivemem.policy.limits`). The decisions are
made in core (every read and write of a :class:`~hivemem.core.LocalHive` view bound to
a principal); the service only authenticates the request and picks the view.
"""

from __future__ import annotations

from hivemem.policy.principal import ACTIONS, BUILTIN_ROLES, Action, Principal

__all__ = ["ACTIONS", "BUILTIN_ROLES", "Action", "Principal"]
