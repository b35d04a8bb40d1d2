"""API keys, stored in the store itself so that every replica sees the same keys.

A key reads ``hm_<id>_<secret>``: ``id`` is 12 lowercase hex characters (48 random bits,
public: it names the key in listings and in the feed), ``secret`` is 32 random bytes
(256 bits) as base64url without padding (43 characters). Only ``sha256(secret)`` is
stored, never the secret.

Why a fast hash and not a password hash (bcrypt, scrypt, Argon2): a slow, salted hash
protects *low-entropy* secrets chosen by people from offline guessing. These secrets are
256 bits from :mod:`secrets`; nobody can enumerate 2**256 candidates however fast the
hash is, so one SHA-256 is as strong as any KDF here and keeps verification cheap on
every request. This is the guidance of NIST SP 800-63B §5.1.1.2 / §5.2.2 (the
salt-and-iterate rules are for memorized secrets; verifiers of high-entropy, randomly
generated authenticators need no stretching) and of the OWASP Password Storage Cheat
Sheet (its slow hashes are for passwords; random API tokens can be stored with a plain
cryptographic hash). Digests are compared with :func:`hmac.compare_digest`.

Layout, written only through the backend primitives (user namespaces may not start with
``_``, so no agent can read or forge these through the Hive API):

- ``_auth/keys`` / ``<id>`` → ``{"agent": name, "roles": [...], "hash": hex, "created_at": unix}``
- ``_auth/agents`` / ``<name>`` → ``{"roles": [...], "keys": [id, ...], "created_at": unix}``

An agent and its keys are created, and revoked, in one atomic
:meth:`~hivemem.backends.base.Backend.write_items` call, so the feed carries their
``item.put`` / ``item.deleted`` events ("agent added", "agent revoked"); the events name
the key id, never the hash. Both namespaces live under ``_auth``, one Redis partition, so
the write stays atomic on Redis Cluster too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from hivemem.backends.base import Backend
from hivemem.backends.rows import DeleteWrite, ItemRow, PutWrite
from hivemem.config import Settings
from hivemem.errors import Conflict, InvalidInput
from hivemem.policy.principal import Principal
from hivemem.validation import segment

__all__ = [
    "AGENTS_NAMESPACE",
    "KEYS_NAMESPACE",
    "KEY_PREFIX",
    "AgentRecord",
    "KeyStore",
    "looks_like_api_key",
]

#: Reserved namespaces of the stored records.
KEYS_NAMESPACE = "_auth/keys"
AGENTS_NAMESPACE = "_auth/agents"
#: What every API key starts with.
KEY_PREFIX = "hm_"

_ID_HEX = 12
_SECRET_BYTES = 32
_KEY_RE = re.compile(r"hm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
#: Longest token :meth:`KeyStore.verify` looks at (a key is 59 characters).
_MAX_TOKEN_CHARS = 256
#: Most verified keys one process remembers.
_CACHE_MAX_ENTRIES = 10_000
#: Rows per page when listing agents.
_PAGE = 500
#: Attempts of an add (a key id collision) or a revoke (a concurrent change).
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent known to the store.

    Attributes:
        name: the agent's name (one namespace segment).
        roles: its role names, sorted.
        keys: the ids of its API keys (the ``<id>`` part of ``hm_<id>_<secret>``).
        created_at: when it was added, UNIX seconds (UTC).
    """

    name: str
    roles: tuple[str, ...]
    keys: tuple[str, ...]
    created_at: float


def looks_like_api_key(token: str) -> bool:
    """Whether ``token`` has the shape of an API key (``hm_`` + 12 hex + ``_`` + 43
    base64url characters). Says nothing about whether the key is valid."""
    return _KEY_RE.fullmatch(token) is not None


def _hash_secret(secret: str) -> str:
    """Hex SHA-256 of the secret's text (its base64url form, so exactly one string
    verifies: no second encoding of the same bytes)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _roles_of(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(sorted({r for r in value if isinstance(r, str)}))


def _record_of(row: ItemRow) -> AgentRecord | None:
    try:
        doc = orjson.loads(row.value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    keys = doc.get("keys")
    created = doc.get("created_at")
    return AgentRecord(
        name=row.key,
        roles=_roles_of(doc.get("roles")),
        keys=tuple(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else (),
        created_at=float(created) if isinstance(created, int | float) else row.created_at,
    )


class KeyStore:
    """Issue, list, revoke and verify API keys kept in a store.

    The backend must be open; the key store does not open or close it. Every replica
    over the same store sees the same keys. A verified key is remembered by this
    process for ``cache_seconds``, so a key revoked on another replica stops working
    here within that time (:meth:`revoke` clears this process's memory at once).

    Args:
        backend: an opened backend.
        settings: limits used to check names (``max_segment_chars``); default
            ``Settings()``.
        cache_seconds: how long a verified key is remembered, in seconds; ``None``:
            ``settings.auth_cache_seconds``; ``0``: ask the store on every call.

    Raises:
        InvalidInput: ``cache_seconds`` is negative (field ``cache_seconds``).
    """

    def __init__(
        self,
        backend: Backend,
        settings: Settings | None = None,
        *,
        cache_seconds: float | None = None,
    ) -> None:
        self._backend = backend
        self._settings = settings if settings is not None else Settings()
        seconds = self._settings.auth_cache_seconds if cache_seconds is None else cache_seconds
        if not seconds >= 0:
            raise InvalidInput("cache_seconds must be >= 0", field="cache_seconds")
        self._cache_seconds = float(seconds)
        # key id -> (hash of the secret, principal, monotonic expiry)
        self._cache: dict[str, tuple[str, Principal, float]] = {}

    @property
    def cache_seconds(self) -> float:
        """How long a verified key is remembered by this process, in seconds."""
        return self._cache_seconds

    def clear_cache(self) -> None:
        """Forget every key this process verified (the next :meth:`verify` asks the store)."""
        self._cache.clear()

    def _check_roles(self, roles: Iterable[str]) -> list[str]:
        if isinstance(roles, str | bytes):
            raise InvalidInput("roles must be a list of role names", field="roles")
        checked = [
            segment(role, f"roles.{i}", self._settings) for i, role in enumerate(list(roles))
        ]
        return sorted(set(checked))

    async def add(self, name: str, roles: Iterable[str], *, by: str) -> str:
        """Add agent ``name`` with ``roles`` and issue its API key.

        The agent record and its key are written in one atomic step (two ``item.put``
        events in the feed, authored by ``by``).

        Args:
            name: the agent's name, one namespace segment (letters, digits, ``_ - . : @ +``;
                not starting with ``_``).
            roles: role names, each one segment; may be empty.
            by: who adds it (the author of the feed events).

        Returns:
            The API key, ``hm_<id>_<secret>``. It is shown only this once: the store
            keeps only a hash of the secret.

        Raises:
            InvalidInput: a bad name (field ``name``) or role (field ``roles.<i>``).
            Conflict: the agent already exists (field ``name``); revoke it first.
            Unavailable: the store cannot be reached.
        """
        segment(name, "name", self._settings)
        role_list = self._check_roles(roles)
        for _ in range(_ATTEMPTS):
            key_id = secrets.token_hex(_ID_HEX // 2)
            secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES))
            secret_text = secret.rstrip(b"=").decode("ascii")
            now = time.time()
            agent_doc = {"roles": role_list, "keys": [key_id], "created_at": now}
            key_doc = {
                "agent": name,
                "roles": role_list,
                "hash": _hash_secret(secret_text),
                "created_at": now,
            }
            writes = [
                PutWrite(
                    namespace=AGENTS_NAMESPACE,
                    key=name,
                    value=orjson.dumps(agent_doc),
                    text=None,
                    metadata=None,
                    expires_at=None,
                    if_version=0,
                ),
                PutWrite(
                    namespace=KEYS_NAMESPACE,
                    key=key_id,
                    value=orjson.dumps(key_doc),
                    text=None,
                    metadata=None,
                    expires_at=None,
                    if_version=0,
                ),
            ]
            try:
                await self._backend.write_items(writes, author=by, now=now, history_limit=0)
            except Conflict as exc:
                if exc.field == "ops.1.if_version":
                    continue  # a 48-bit key id collided: draw another
                raise Conflict(
                    f"agent {name!r} already exists; revoke it first to issue a new key",
                    field="name",
                ) from None
            return f"{KEY_PREFIX}{key_id}_{secret_text}"
        raise Conflict("could not draw an unused key id; try again", field="name")

    async def revoke(self, name: str, *, by: str) -> bool:
        """Delete agent ``name`` and all its keys, in one atomic step (``item.deleted``
        events authored by ``by``), and clear this process's cache of verified keys.

        Other replicas stop accepting the keys within their ``cache_seconds``.

        Args:
            name: the agent's name.
            by: who revokes it (the author of the feed events).

        Returns:
            True if the agent existed, False if there was nothing to revoke.

        Raises:
            InvalidInput: a bad name (field ``name``).
            Unavailable: the store cannot be reached.
        """
        segment(name, "name", self._settings)
        try:
            for attempt in range(_ATTEMPTS):
                now = time.time()
                row = await self._backend.get_item(AGENTS_NAMESPACE, name, now)
                if row is None:
                    return False
                record = _record_of(row)
                key_ids = record.keys if record is not None else ()
                # Keys are written once (version 1) with their agent and deleted with it,
                # so checking them too detects an agent revoked and re-added since the
                # read (same name, version 1 again, other keys). On the last attempt keys
                # missing for any other reason do not stop the revocation.
                key_version = 1 if attempt < _ATTEMPTS - 1 else None
                writes: list[PutWrite | DeleteWrite] = [
                    DeleteWrite(namespace=AGENTS_NAMESPACE, key=name, if_version=row.version)
                ]
                writes += [
                    DeleteWrite(namespace=KEYS_NAMESPACE, key=k, if_version=key_version)
                    for k in key_ids
                ]
                try:
                    results = await self._backend.write_items(
                        writes, author=by, now=now, history_limit=0
                    )
                except Conflict:
                    continue  # changed since the read: read again
                return bool(results[0])
            return False
        finally:
            self.clear_cache()

    async def list(self) -> list[AgentRecord]:
        """Every agent of the store, ordered by name.

        Raises:
            Unavailable: the store cannot be reached.
        """
        records: list[AgentRecord] = []
        after: tuple[str, str] | None = None
        while True:
            rows = await self._backend.list_items(AGENTS_NAMESPACE, after, _PAGE, time.time())
            for row in rows:
                if row.namespace != AGENTS_NAMESPACE:
                    continue
                record = _record_of(row)
                if record is not None:
                    records.append(record)
            if len(rows) < _PAGE:
                return records
            after = (rows[-1].namespace, rows[-1].key)

    async def verify(self, token: str) -> Principal | None:
        """The agent an API key belongs to.

        Args:
            token: the key as presented (``hm_<id>_<secret>``).

        Returns:
            ``Principal(agent, roles, via="key")``, or None when the token is malformed,
            names no stored key, or carries the wrong secret. Failures are not cached.

        Raises:
            Unavailable: the store cannot be reached (not a verdict on the key).
        """
        return (await self.check(token))[0]

    async def check(self, token: str) -> tuple[Principal | None, str | None]:
        """:meth:`verify`, and on a refusal the agent whose stored key the token's id
        names (its secret was wrong), else None: who a failure concerns, for the
        operators' figures, never a grant.

        Raises:
            Unavailable: the store cannot be reached.
        """
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
            return None, None
        match = _KEY_RE.fullmatch(token)
        if match is None:
            return None, None
        key_id, secret = match.group(1), match.group(2)
        digest = _hash_secret(secret)
        if self._cache_seconds > 0:
            hit = self._cache.get(key_id)
            if hit is not None:
                cached_digest, principal, expires = hit
                if time.monotonic() < expires and hmac.compare_digest(cached_digest, digest):
                    return principal, None
        row = await self._backend.get_item(KEYS_NAMESPACE, key_id, time.time())
        if row is None:
            return None, None
        try:
            doc = orjson.loads(row.value)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(doc, dict):
            return None, None
        stored, agent = doc.get("hash"), doc.get("agent")
        if not isinstance(stored, str) or not isinstance(agent, str) or not agent:
            return None, None
        if not hmac.compare_digest(stored.encode("ascii", "replace"), digest.encode("ascii")):
            return None, agent
        principal = Principal(agent=agent, roles=frozenset(_roles_of(doc.get("roles"))), via="key")
        if self._cache_seconds > 0:
            self._remember(key_id, digest, principal)
        return principal, None

    def _remember(self, key_id: str, digest: str, principal: Principal) -> None:
        now = time.monotonic()
        if key_id not in self._cache and len(self._cache) >= _CACHE_MAX_ENTRIES:
            for k in [k for k, v in self._cache.items() if v[2] <= now]:
                del self._cache[k]
            while len(self._cache) >= _CACHE_MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key_id] = (digest, principal, now + self._cache_seconds)
