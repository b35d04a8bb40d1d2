"""Identities: API keys kept in the store (KeyStore, on every embedded store kind) and JWT
bearer tokens (TokenVerifier: HS256, RS256 from PEM, ES256 from a JWKS)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

import hivemem
from hivemem import Settings
from hivemem.backends.base import Backend
from hivemem.errors import Conflict, InvalidInput, Unauthenticated
from hivemem.policy import keys as keys_module
from hivemem.policy.keys import AGENTS_NAMESPACE, KEYS_NAMESPACE, KeyStore, looks_like_api_key
from hivemem.policy.principal import Principal
from hivemem.policy.tokens import TokenVerifier, looks_like_jwt
from tests.conftest import selected_stores, store_url_of

SETTINGS = Settings(embedder="none")
KINDS = [k for k in selected_stores() if not k.startswith("remote")]
KEY_RE = re.compile(r"hm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


# API keys -------------------------------------------------------------------------------


class Store:
    """An opened backend of one store kind, and a way to open another on the same store
    (another replica; for in-memory SQLite, the same backend)."""

    def __init__(self, url: str, backend: Backend) -> None:
        self.url = url
        self.backend = backend
        self._others: list[Backend] = []

    async def replica(self) -> Backend:
        if self.url == "sqlite://:memory:":
            return self.backend
        b = hivemem.open_backend(self.url, SETTINGS)
        await b.open()
        self._others.append(b)
        return b

    async def close(self) -> None:
        for b in self._others:
            await b.close()
        await self.backend.close()


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    url = store_url_of(request, request.param)
    b = hivemem.open_backend(url, SETTINGS)
    await b.open()
    s = Store(url, b)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def one_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """One in-memory store, for checks that never reach the store's engine."""
    url = "sqlite://:memory:"
    b = hivemem.open_backend(url, SETTINGS)
    await b.open()
    s = Store(url, b)
    try:
        yield s
    finally:
        await s.close()


def agent_name() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


class CountingBackend:
    """Counts the store reads of ``_auth/keys`` a KeyStore makes."""

    def __init__(self, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        original = backend.get_item

        async def get_item(namespace: str, key: str, now: float) -> Any:
            if namespace == KEYS_NAMESPACE:
                self.reads += 1
            return await original(namespace, key, now)

        monkeypatch.setattr(backend, "get_item", get_item)


async def test_add_verify_list_revoke(store: Store) -> None:
    ks = KeyStore(store.backend, SETTINGS)
    name = agent_name()
    head = await store.backend.head()
    key = await ks.add(name, ["writer", "reader", "writer"], by="admin-1")
    m = KEY_RE.fullmatch(key)
    assert m is not None and looks_like_api_key(key)
    key_id, secret = m.group(1), m.group(2)
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32

    principal = await ks.verify(key)
    assert principal == Principal(agent=name, roles=frozenset({"reader", "writer"}), via="key")

    # Only the hash is stored; the records are not searchable.
    now = time.time()
    key_row = await store.backend.get_item(KEYS_NAMESPACE, key_id, now)
    agent_row = await store.backend.get_item(AGENTS_NAMESPACE, name, now)
    assert key_row is not None and agent_row is not None
    assert secret.encode() not in key_row.value and secret.encode() not in agent_row.value
    doc = orjson.loads(key_row.value)
    assert doc["agent"] == name and doc["roles"] == ["reader", "writer"]
    assert doc["hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert abs(doc["created_at"] - now) < 60
    assert orjson.loads(agent_row.value)["keys"] == [key_id]
    assert key_row.author == "admin-1" and key_row.text is None

    records = {r.name: r for r in await ks.list()}
    assert records[name].roles == ("reader", "writer")
    assert records[name].keys == (key_id,)
    assert abs(records[name].created_at - now) < 60

    assert await ks.revoke(name, by="admin-2") is True
    assert await ks.verify(key) is None
    assert name not in {r.name for r in await ks.list()}
    assert await store.backend.get_item(KEYS_NAMESPACE, key_id, time.time()) is None
    assert await ks.revoke(name, by="admin-2") is False

    # The feed holds the admin events, naming the key id but never the hash.
    events, _ = await store.backend.read_events("_auth", head, 1000)
    mine = [
        (e.type, e.namespace, e.key, e.author)
        for e in events
        if e.key in (name, key_id) and e.type != "item.expired"
    ]
    assert sorted(mine[:2]) == sorted(
        [
            ("item.put", AGENTS_NAMESPACE, name, "admin-1"),
            ("item.put", KEYS_NAMESPACE, key_id, "admin-1"),
        ]
    )
    assert sorted(mine[2:]) == sorted(
        [
            ("item.deleted", AGENTS_NAMESPACE, name, "admin-2"),
            ("item.deleted", KEYS_NAMESPACE, key_id, "admin-2"),
        ]
    )
    for e in events:
        assert e.data is None or doc["hash"].encode() not in e.data


async def test_wrong_secret_and_unknown_ids_are_refused(store: Store) -> None:
    ks = KeyStore(store.backend, SETTINGS, cache_seconds=60)
    name = agent_name()
    key = await ks.add(name, [], by="admin")
    assert (await ks.verify(key)) == Principal(agent=name, roles=frozenset(), via="key")
    prefix, last = key[:-1], key[-1]
    wrong = prefix + ("A" if last != "A" else "B")
    assert await ks.verify(wrong) is None  # a cached id does not accept another secret
    other_id = "hm_" + ("0" * 12) + key[15:]
    assert await ks.verify(other_id) is None
    ks.clear_cache()
    assert await ks.verify(wrong) is None  # nor does the store
    assert (await ks.verify(key)) is not None  # and the failures did not evict the key
    await ks.revoke(name, by="admin")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hm_",
        "hm_abc",
        "hm_0123456789ab",
        "hm_0123456789ab_",
        "hm_0123456789AB_" + "a" * 43,  # upper-case id
        "hm_0123456789a_" + "a" * 43,  # short id
        "hm_0123456789ab_" + "a" * 42,  # short secret
        "hm_0123456789ab_" + "a" * 44,  # long secret
        "hm_0123456789ab_" + "a" * 42 + "=",  # padding
        "hm_0123456789ab_" + "a" * 42 + "+",  # not base64url
        " hm_0123456789ab_" + "a" * 43,
        "hm_0123456789ab_" + "a" * 43 + "\n",
        "HM_0123456789ab_" + "a" * 43,
        "Bearer hm_0123456789ab_" + "a" * 43,
        pytest.param("x" * 100_000, id="very-long"),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
    ],
)
async def test_malformed_keys_are_none(
    one_store: Store, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = one_store
    reads = CountingBackend(store.backend, monkeypatch)
    ks = KeyStore(store.backend, SETTINGS)
    assert await ks.verify(token) is None
    assert reads.reads == 0  # refused before asking the store


async def test_a_well_formed_unknown_key_is_none(store: Store) -> None:
    ks = KeyStore(store.backend, SETTINGS)
    assert await ks.verify("hm_0123456789ab_" + "a" * 43) is None


async def test_duplicate_add_is_a_conflict(store: Store) -> None:
    ks = KeyStore(store.backend, SETTINGS, cache_seconds=0)
    name = agent_name()
    first = await ks.add(name, ["writer"], by="admin")
    with pytest.raises(Conflict) as info:
        await ks.add(name, ["admin"], by="admin")
    assert info.value.field == "name" and "revoke" in info.value.message
    principal = await ks.verify(first)
    assert principal is not None and principal.roles == frozenset({"writer"})  # unchanged
    assert await ks.revoke(name, by="admin")
    second = await ks.add(name, ["reader"], by="admin")
    assert await ks.verify(first) is None
    principal = await ks.verify(second)
    assert principal is not None and principal.roles == frozenset({"reader"})
    await ks.revoke(name, by="admin")


async def test_concurrent_adds_of_one_name_create_one_agent(store: Store) -> None:
    ks = KeyStore(store.backend, SETTINGS, cache_seconds=0)
    name = agent_name()
    results = await asyncio.gather(
        *(ks.add(name, ["writer"], by="admin") for _ in range(5)), return_exceptions=True
    )
    keys = [r for r in results if isinstance(r, str)]
    assert len(keys) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, str))
    assert (await ks.verify(keys[0])) is not None
    records = [r for r in await ks.list() if r.name == name]
    assert len(records) == 1 and len(records[0].keys) == 1
    await ks.revoke(name, by="admin")


@pytest.mark.parametrize(
    ("name", "roles", "field"),
    [
        ("_root", [], "name"),
        ("a/b", [], "name"),
        ("", [], "name"),
        ("x" * 129, [], "name"),
        ("ok", ["writer", "bad role"], "roles.1"),
        ("ok", ["_admin"], "roles.0"),
        ("ok", "writer", "roles"),
    ],
)
async def test_names_and_roles_are_segments(
    one_store: Store, name: str, roles: Any, field: str
) -> None:
    store = one_store
    ks = KeyStore(store.backend, SETTINGS)
    with pytest.raises(InvalidInput) as info:
        await ks.add(name, roles, by="admin")
    assert info.value.field == field


async def test_revoke_is_seen_by_another_replica(store: Store) -> None:
    ks1 = KeyStore(store.backend, SETTINGS, cache_seconds=0)
    ks2 = KeyStore(await store.replica(), SETTINGS, cache_seconds=0)
    name = agent_name()
    key = await ks1.add(name, ["reader"], by="admin")
    assert (await ks2.verify(key)) == Principal(name, frozenset({"reader"}), "key")
    assert name in {r.name for r in await ks2.list()}
    assert await ks1.revoke(name, by="admin")
    assert await ks2.verify(key) is None
    assert name not in {r.name for r in await ks2.list()}


async def test_cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = await store.replica()
    admin = KeyStore(store.backend, SETTINGS, cache_seconds=0)
    name = agent_name()
    key = await admin.add(name, ["writer"], by="admin")

    assert KeyStore(replica, Settings(embedder="none", auth_cache_seconds=7)).cache_seconds == 7
    assert KeyStore(replica, SETTINGS).cache_seconds == 5.0

    counted = CountingBackend(replica, monkeypatch)
    cached = KeyStore(replica, SETTINGS, cache_seconds=60)
    assert await cached.verify(key) is not None
    assert await cached.verify(key) is not None
    assert counted.reads == 1  # the second came from the cache

    # Failed lookups are not cached: each asks the store again.
    unknown = "hm_0123456789ab_" + "a" * 43
    assert await cached.verify(unknown) is None
    assert await cached.verify(unknown) is None
    assert counted.reads == 3

    uncached = KeyStore(replica, SETTINGS, cache_seconds=0)
    assert await uncached.verify(key) is not None
    assert await uncached.verify(key) is not None
    assert counted.reads == 5

    # Revoked elsewhere: remembered until the cache entry ends (the documented window)...
    assert await admin.revoke(name, by="admin")
    assert await cached.verify(key) is not None
    assert await uncached.verify(key) is None
    # ...or until this process clears it.
    cached.clear_cache()
    assert await cached.verify(key) is None

    # Entries end after cache_seconds.
    key2 = await admin.add(name, ["writer"], by="admin")
    short = KeyStore(replica, SETTINGS, cache_seconds=0.2)
    assert await short.verify(key2) is not None
    await admin.revoke(name, by="admin")
    assert await short.verify(key2) is not None
    await asyncio.sleep(0.3)
    assert await short.verify(key2) is None

    # revoke() clears the cache of its own process at once.
    key3 = await admin.add(name, ["writer"], by="admin")
    own = KeyStore(replica, SETTINGS, cache_seconds=60)
    assert await own.verify(key3) is not None
    assert await own.revoke(name, by="admin")
    assert await own.verify(key3) is None


async def test_list_pages_through_every_agent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "_PAGE", 2)
    ks = KeyStore(store.backend, SETTINGS)
    names = sorted(agent_name() for _ in range(5))
    for n in names:
        await ks.add(n, ["reader"], by="admin")
    listed = [r.name for r in await ks.list()]
    assert [n for n in listed if n in names] == names
    assert listed == sorted(listed)
    for n in names:
        assert await ks.revoke(n, by="admin")


async def test_revoke_removes_every_key_of_the_agent(store: Store) -> None:
    """An agent record naming several keys (as a future rotation would write) loses all."""
    ks = KeyStore(store.backend, SETTINGS, cache_seconds=0)
    name = agent_name()
    key = await ks.add(name, ["writer"], by="admin")
    key_id = key[3:15]
    # Give the agent a second key by hand, the way add() writes one.
    from hivemem.backends.rows import PutWrite

    secret = base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode()
    second_id = uuid.uuid4().hex[:12]
    now = time.time()
    doc = {"agent": name, "roles": ["writer"], "hash": hashlib.sha256(secret.encode()).hexdigest()}
    agent_doc = {"roles": ["writer"], "keys": [key_id, second_id], "created_at": now}
    row = await store.backend.get_item(AGENTS_NAMESPACE, name, now)
    assert row is not None
    await store.backend.write_items(
        [
            PutWrite(AGENTS_NAMESPACE, name, orjson.dumps(agent_doc), None, None, None, 1),
            PutWrite(KEYS_NAMESPACE, second_id, orjson.dumps(doc), None, None, None, 0),
        ],
        author="admin",
        now=now,
        history_limit=0,
    )
    second = f"hm_{second_id}_{secret}"
    assert await ks.verify(second) is not None
    assert await ks.revoke(name, by="admin")
    assert await ks.verify(key) is None
    assert await ks.verify(second) is None


# JWT bearer tokens ----------------------------------------------------------------------

SECRET = "s" * 40
ISSUER = "https://idp.example"
AUDIENCE = "hivemem"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "alice", "exp": now + 300, "iat": now, "roles": ["writer"]}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def pem(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A token HMAC-signed with ``key`` whatever it is (PyJWT refuses to use a PEM public
    key as an HMAC secret when signing, which is what an attacker would do by hand)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_keys() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]:
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def rsa_pem_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rsa.pem"
    path.write_bytes(pem(rsa_key.public_key()))
    return path


@pytest.fixture
def jwks_file(
    tmp_path: Path, ec_keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]
) -> Path:
    members = []
    for kid, k in zip(("key-a", "key-b"), ec_keys, strict=True):
        jwk = ECAlgorithm.to_jwk(k.public_key(), as_dict=True)
        members.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": members}))
    return path


def hs_verifier(**extra: Any) -> TokenVerifier:
    return TokenVerifier(Settings(embedder="none", jwt_secret=SecretStr(SECRET), **extra))


def refused(verifier: TokenVerifier, token: str, words: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    message = info.value.message
    assert words in message, message
    assert (len(token) < 3 or token not in message) and SECRET not in message
    assert info.value.status == 401
    return info.value


def test_hs256() -> None:
    v = hs_verifier()
    assert v.enabled
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert looks_like_jwt(token)
    assert v.verify(token) == Principal(agent="alice", roles=frozenset({"writer"}), via="jwt")
    refused(v, jwt.encode(claims(), "t" * 40, algorithm="HS256"), "signature")
    refused(v, token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), "signature")


def test_a_short_hs256_secret_is_refused_at_start() -> None:
    with pytest.raises(InvalidInput) as info:
        TokenVerifier(Settings(embedder="none", jwt_secret=SecretStr("short")))
    assert info.value.field == "jwt_secret"


def test_rs256_from_a_pem_file(rsa_key: rsa.RSAPrivateKey, rsa_pem_file: Path) -> None:
    v = TokenVerifier(Settings(embedder="none", jwt_public_key_file=str(rsa_pem_file)))
    assert v.enabled
    token = jwt.encode(claims(roles="reader writer"), rsa_key, algorithm="RS256")
    assert v.verify(token) == Principal("alice", frozenset({"reader", "writer"}), "jwt")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(v, jwt.encode(claims(), other, algorithm="RS256"), "signature")
    refused(v, jwt.encode(claims(), SECRET, algorithm="HS256"), "HS256 is not accepted")
    ec_token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    refused(v, ec_token, "not accepted")  # an algorithm that does not suit the key


def test_es256_from_a_jwks_by_kid(
    ec_keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey], jwks_file: Path
) -> None:
    v = TokenVerifier(Settings(embedder="none", jwt_jwks_file=str(jwks_file)))
    key_a, key_b = ec_keys
    ta = jwt.encode(claims(sub="a"), key_a, algorithm="ES256", headers={"kid": "key-a"})
    tb = jwt.encode(claims(sub="b"), key_b, algorithm="ES256", headers={"kid": "key-b"})
    assert v.verify(ta).agent == "a"
    assert v.verify(tb).agent == "b"
    # key b's signature under key a's kid
    crossed = jwt.encode(claims(), key_b, algorithm="ES256", headers={"kid": "key-a"})
    refused(v, crossed, "signature")
    unknown = jwt.encode(claims(), key_a, algorithm="ES256", headers={"kid": "key-z"})
    refused(v, unknown, "kid")
    refused(v, jwt.encode(claims(), key_a, algorithm="ES256"), "kid")  # two keys, no kid
    refused(v, jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "key-a"}), "HS256")


def test_a_jwks_of_one_key_needs_no_kid(
    tmp_path: Path, ec_keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]
) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"keys": [ECAlgorithm.to_jwk(ec_keys[0].public_key(), True)]}))
    v = TokenVerifier(Settings(embedder="none", jwt_jwks_file=str(path)))
    assert v.verify(jwt.encode(claims(), ec_keys[0], algorithm="ES256")).agent == "alice"


def test_expiry_and_not_before() -> None:
    v = hs_verifier(jwt_leeway_seconds=30)
    now = int(time.time())
    refused(v, jwt.encode(claims(exp=now - 100), SECRET, algorithm="HS256"), "expired")
    assert v.verify(jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256"))  # leeway
    refused(v, jwt.encode(claims(nbf=now + 100), SECRET, algorithm="HS256"), "not valid yet")
    assert v.verify(jwt.encode(claims(nbf=now + 10), SECRET, algorithm="HS256"))
    strict = hs_verifier(jwt_leeway_seconds=0)
    refused(strict, jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256"), "expired")


def test_issuer_and_audience() -> None:
    v = hs_verifier(jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    good = claims(iss=ISSUER, aud=AUDIENCE)
    assert v.verify(jwt.encode(good, SECRET, algorithm="HS256")).agent == "alice"
    both = claims(iss=ISSUER, aud=["other", AUDIENCE])
    assert v.verify(jwt.encode(both, SECRET, algorithm="HS256")).agent == "alice"
    refused(v, jwt.encode({**good, "aud": "other"}, SECRET, algorithm="HS256"), "audience")
    refused(v, jwt.encode({**good, "iss": "https://evil"}, SECRET, algorithm="HS256"), "issuer")
    no_aud = {k: w for k, w in good.items() if k != "aud"}
    refused(v, jwt.encode(no_aud, SECRET, algorithm="HS256"), "'aud'")
    no_iss = {k: w for k, w in good.items() if k != "iss"}
    refused(v, jwt.encode(no_iss, SECRET, algorithm="HS256"), "'iss'")
    # With no audience configured, a token meant for some audience is not for us.
    refused(hs_verifier(), jwt.encode(good, SECRET, algorithm="HS256"), "audience")


def test_alg_none_is_refused(rsa_pem_file: Path) -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none")
    assert looks_like_jwt(unsigned) and unsigned.endswith(".")
    refused(hs_verifier(), unsigned, "not signed")
    both = TokenVerifier(
        Settings(
            embedder="none", jwt_secret=SecretStr(SECRET), jwt_public_key_file=str(rsa_pem_file)
        )
    )
    refused(both, unsigned, "not signed")
    header = {"alg": "None", "typ": "JWT"}
    crafted = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."
    refused(both, crafted, "not signed")


def test_hs256_signed_with_the_public_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, rsa_pem_file: Path
) -> None:
    """The algorithm-confusion attack: the attacker knows the public key and uses it as an
    HMAC secret. HS256 is checked only against jwt_secret, never a public key."""
    public_pem = rsa_pem_file.read_bytes()
    forged = hs256_by_hand({"alg": "HS256", "typ": "JWT"}, claims(roles=["admin"]), public_pem)
    only_public = TokenVerifier(Settings(embedder="none", jwt_public_key_file=str(rsa_pem_file)))
    refused(only_public, forged, "HS256 is not accepted")
    both = TokenVerifier(
        Settings(
            embedder="none", jwt_secret=SecretStr(SECRET), jwt_public_key_file=str(rsa_pem_file)
        )
    )
    refused(both, forged, "signature")
    # The real thing still works with both configured.
    real = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert both.verify(real).agent == "alice"
    assert both.verify(jwt.encode(claims(), SECRET, algorithm="HS256")).agent == "alice"
    # Same attack against a JWKS: its JWK JSON used as the HMAC secret.
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key())
    forged2 = hs256_by_hand({"alg": "HS256", "kid": "k"}, claims(), jwk.encode())
    refused(only_public, forged2, "HS256 is not accepted")


def test_missing_claims() -> None:
    v = hs_verifier()
    refused(v, jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "'exp'")
    refused(v, jwt.encode(claims(sub=None), SECRET, algorithm="HS256"), "'sub'")


@pytest.mark.parametrize("sub", ["_root", "a/b", "", "x" * 129, 42, "a b"])
def test_sub_must_be_an_agent_name(sub: Any) -> None:
    refused(hs_verifier(), jwt.encode(claims(sub=sub), SECRET, algorithm="HS256"), "sub")


def test_roles_claim_forms() -> None:
    v = hs_verifier()

    def roles_of(verifier: TokenVerifier, **extra: Any) -> frozenset[str]:
        token = jwt.encode(claims(**extra), SECRET, algorithm="HS256")
        return verifier.verify(token).roles

    assert roles_of(v, roles=["writer", "reader"]) == {"writer", "reader"}
    assert roles_of(v, roles="writer  reader") == {"writer", "reader"}
    assert roles_of(v, roles=[]) == frozenset()
    assert roles_of(v, roles="") == frozenset()
    token = jwt.encode({k: w for k, w in claims().items() if k != "roles"}, SECRET, "HS256")
    assert v.verify(token).roles == frozenset()
    assert roles_of(v, roles=["writer", "not a/segment", "_x"]) == {"writer"}
    refused(v, jwt.encode(claims(roles=7), SECRET, algorithm="HS256"), "roles")
    refused(v, jwt.encode(claims(roles=["a", 1]), SECRET, algorithm="HS256"), "roles")
    groups = hs_verifier(jwt_roles_claim="groups")
    assert roles_of(groups, groups=["ops"]) == {"ops"}
    nested = hs_verifier(jwt_roles_claim="realm_access.roles")
    assert roles_of(nested, realm_access={"roles": ["admin"]}) == {"admin"}


def test_a_verifier_without_keys_refuses_everything() -> None:
    v = TokenVerifier(SETTINGS)
    assert not v.enabled
    refused(v, jwt.encode(claims(), SECRET, algorithm="HS256"), "not accepted")


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "a..c", "hm_0123456789ab_x"])
def test_malformed_tokens(token: str) -> None:
    assert not looks_like_jwt(token)
    refused(hs_verifier(), token, "malformed")


def test_garbage_with_the_shape_of_a_jwt() -> None:
    assert looks_like_jwt("abc.def.ghi")
    refused(hs_verifier(), "abc.def.ghi", "malformed")


def test_looks_like_jwt_tells_keys_from_tokens() -> None:
    assert looks_like_jwt(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert not looks_like_jwt("hm_0123456789ab_" + "a" * 43)
    assert not looks_like_jwt("x" * 20_000 + ".a.b")


def test_reload_reads_the_files_again(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(rsa_key.public_key()))
    v = TokenVerifier(Settings(embedder="none", jwt_public_key_file=str(path)))
    old = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert v.verify(old).agent == "alice"
    new_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(pem(new_key.public_key()))
    assert v.verify(old).agent == "alice"  # read once, at construction
    v.reload()
    refused(v, old, "not accepted")
    assert v.verify(jwt.encode(claims(), new_key, algorithm="ES256")).agent == "alice"
    path.write_text("not a key")
    with pytest.raises(InvalidInput) as info:
        v.reload()
    assert info.value.field == "jwt_public_key_file"
    assert v.verify(jwt.encode(claims(), new_key, algorithm="ES256")).agent == "alice"


@pytest.fixture
def bad_files(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Iterator[dict[str, Path]]:
    files = {
        "private.pem": rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "small-rsa.pem": pem(
            rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
        ),
        "garbage.pem": b"hello",
        "oct.json": json.dumps(
            {"keys": [{"kty": "oct", "k": b64(b"k" * 32), "kid": "s"}]}
        ).encode(),
        "empty.json": b'{"keys": []}',
        "notjson.json": b"{",
        "mismatch.json": json.dumps(
            {
                "keys": [
                    {
                        **ECAlgorithm.to_jwk(
                            ec.generate_private_key(ec.SECP256R1()).public_key(), True
                        ),
                        "alg": "ES384",
                    }
                ]
            }
        ).encode(),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    out["missing.pem"] = tmp_path / "missing.pem"
    yield out


@pytest.mark.parametrize("name", ["private.pem", "small-rsa.pem", "garbage.pem", "missing.pem"])
def test_bad_public_key_files(bad_files: dict[str, Path], name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        TokenVerifier(Settings(embedder="none", jwt_public_key_file=str(bad_files[name])))
    assert info.value.field == "jwt_public_key_file"


@pytest.mark.parametrize("name", ["oct.json", "empty.json", "notjson.json", "mismatch.json"])
def test_bad_jwks_files(bad_files: dict[str, Path], name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        TokenVerifier(Settings(embedder="none", jwt_jwks_file=str(bad_files[name])))
    assert info.value.field == "jwt_jwks_file"
