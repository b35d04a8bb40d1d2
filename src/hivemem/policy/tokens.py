"""JWT bearer tokens (RFC 7519), verified with PyJWT against keys from the settings.

Keys (any combination may be configured):

- ``jwt_secret``: an HS256 secret, at least 32 bytes (RFC 7518 §3.2: an HMAC key must be
  at least as long as the hash output).
- ``jwt_public_key_file``: a PEM public key (or certificate). Its type fixes the
  algorithm: RSA (2048 bits or more) → RS256; EC P-256 → ES256, P-384 → ES384,
  P-521 → ES512; Ed25519 → EdDSA.
- ``jwt_jwks_file``: a JWKS document (RFC 7517) of public keys; a token's ``kid`` header
  picks the key, and the key (its ``alg``, or its type and curve) fixes the algorithm.
  Without a ``kid`` the set must hold exactly one key. Symmetric (``oct``) keys are
  refused here: they belong in ``jwt_secret``.

The algorithm a token may use is decided by the key it is checked against, never by the
token: HS256 is only ever verified with ``jwt_secret``, so a token "signed" HS256 with
the public key as the HMAC secret (the algorithm-confusion attack, RFC 8725 §2.1) is
refused, as is ``alg: none``.

Claims: ``exp`` and ``sub`` are required; ``nbf`` and ``iat`` are checked when present;
``iss`` / ``aud`` must match ``jwt_issuer`` / ``jwt_audience`` when those are set (and a
token carrying an ``aud`` is refused when no audience is configured, as RFC 7519 §4.1.3
requires); ``jwt_leeway_seconds`` of clock skew is allowed. ``sub`` is the agent name
(one namespace segment); the roles come from ``jwt_roles_claim`` (default ``roles``): a
list of strings or a space-separated string (like OAuth ``scope``); a dotted name such as
``realm_access.roles`` walks nested objects. Role names that are not valid segments are
ignored (no policy can name them).

Key files are read when the verifier is built and again on :meth:`TokenVerifier.reload`
(the service calls it on SIGHUP).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hivemem.config import Settings
from hivemem.errors import HivememError, InvalidInput, Unauthenticated
from hivemem.policy.principal import Principal
from hivemem.validation import segment

__all__ = ["TokenVerifier", "looks_like_jwt"]

_B64URL = r"[A-Za-z0-9_-]"
_JWT_RE = re.compile(rf"{_B64URL}+\.{_B64URL}+\.{_B64URL}*")
#: Longest bearer token looked at, in characters.
_MAX_TOKEN_CHARS = 16 * 1024
#: Smallest HS256 secret, bytes (RFC 7518 §3.2).
_MIN_SECRET_BYTES = 32
#: Smallest RSA key, bits (NIST SP 800-131A).
_MIN_RSA_BITS = 2048
#: Algorithms a public key (PEM or JWKS) may be used with.
_ASYMMETRIC = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has the shape of a JWS compact serialization: three base64url
    parts separated by dots (the third may be empty, as in an unsigned token, so that
    :meth:`TokenVerifier.verify` can refuse it by name). API keys (``hm_...``) never
    contain a dot."""
    return len(token) <= _MAX_TOKEN_CHARS and _JWT_RE.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class _JwkKey:
    kid: str | None
    algorithm: str
    key: Any


@dataclass(frozen=True, slots=True)
class _Keys:
    """Key material of one load; replaced as a whole by reload()."""

    secret: bytes | None = None
    public_key: Any = None
    public_algorithm: str | None = None
    jwks: tuple[_JwkKey, ...] = field(default_factory=tuple)

    @property
    def enabled(self) -> bool:
        return self.secret is not None or self.public_key is not None or bool(self.jwks)


def _public_key_algorithm(key: Any, source: str, field_name: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise InvalidInput(
                f"{source}: RSA key of {key.key_size} bits; at least {_MIN_RSA_BITS} required",
                field=field_name,
            )
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise InvalidInput(
                f"{source}: EC curve {key.curve.name} is not supported (P-256, P-384 or P-521)",
                field=field_name,
            )
        return alg
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise InvalidInput(
        f"{source}: unsupported public key type {type(key).__name__} (RSA, EC or Ed25519)",
        field=field_name,
    )


def _load_public_key(path: str) -> tuple[Any, str]:
    field_name = "jwt_public_key_file"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field=field_name) from None
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InvalidInput(
            f"{path} is not a PEM public key or certificate"
            + (" (it looks like a private key)" if b"PRIVATE KEY" in data else ""),
            field=field_name,
        ) from None
    return key, _public_key_algorithm(key, path, field_name)


def _load_jwks(path: str) -> tuple[_JwkKey, ...]:
    field_name = "jwt_jwks_file"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field=field_name) from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"{path} is not JSON", field=field_name) from None
    members = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not members:
        raise InvalidInput(
            f"{path}: expected a JWKS object with a non-empty 'keys' list", field=field_name
        )
    keys: list[_JwkKey] = []
    for i, member in enumerate(members):
        where = f"{path}: keys[{i}]"
        if not isinstance(member, dict):
            raise InvalidInput(f"{where} is not an object", field=field_name)
        if member.get("kty") == "oct":
            raise InvalidInput(
                f"{where} is a symmetric key; use jwt_secret for HS256", field=field_name
            )
        if member.get("use", "sig") != "sig":
            continue  # an encryption key: not for verifying signatures
        try:
            jwk = jwt.PyJWK(member)
        except jwt.PyJWTError as exc:
            raise InvalidInput(f"{where} is not a usable key: {exc}", field=field_name) from None
        if jwk.algorithm_name not in _ASYMMETRIC:
            raise InvalidInput(
                f"{where}: algorithm {jwk.algorithm_name} is not accepted", field=field_name
            )
        # The algorithm must suit the key: RS*/PS* for RSA (2048 bits or more), the
        # curve's own ES* for EC, EdDSA for Ed25519.
        natural = _public_key_algorithm(jwk.key, where, field_name)
        if jwk.algorithm_name != natural and not (
            natural == "RS256" and jwk.algorithm_name[:2] in ("RS", "PS")
        ):
            raise InvalidInput(
                f"{where}: algorithm {jwk.algorithm_name} does not suit its key ({natural})",
                field=field_name,
            )
        kid = member.get("kid")
        keys.append(
            _JwkKey(
                kid=kid if isinstance(kid, str) else None, algorithm=jwk.algorithm_name, key=jwk.key
            )
        )
    if not keys:
        raise InvalidInput(f"{path} holds no signature keys", field=field_name)
    return tuple(keys)


def _load(settings: Settings) -> _Keys:
    secret: bytes | None = None
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value().encode("utf-8")
        if len(secret) < _MIN_SECRET_BYTES:
            raise InvalidInput(
                f"jwt_secret is {len(secret)} bytes; HS256 needs at least {_MIN_SECRET_BYTES} "
                "(RFC 7518 §3.2)",
                field="jwt_secret",
            )
    public_key: Any = None
    public_algorithm: str | None = None
    if settings.jwt_public_key_file:
        public_key, public_algorithm = _load_public_key(settings.jwt_public_key_file)
    jwks = _load_jwks(settings.jwt_jwks_file) if settings.jwt_jwks_file else ()
    return _Keys(secret, public_key, public_algorithm, jwks)


def _claim(payload: dict[str, Any], name: str) -> Any:
    if name in payload:
        return payload[name]
    value: Any = payload
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class TokenVerifier:
    """Checks JWT bearer tokens against the keys and rules of ``settings``.

    Args:
        settings: ``jwt_secret``, ``jwt_public_key_file``, ``jwt_jwks_file``,
            ``jwt_issuer``, ``jwt_audience``, ``jwt_roles_claim``, ``jwt_leeway_seconds``
            and ``max_segment_chars`` are used.

    Raises:
        InvalidInput: a key file cannot be read or holds no usable key, or a key is too
            weak (field: the setting at fault).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = _load(settings)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (if not, every token is refused)."""
        return self._keys.enabled

    def reload(self) -> None:
        """Read the key files again (for SIGHUP). The new keys replace the old ones at
        once; if loading fails the old keys stay in use.

        Raises:
            InvalidInput: as for the constructor.
        """
        self._keys = _load(self._settings)

    def _key_for(self, keys: _Keys, header: dict[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Unauthenticated("bearer token is not signed")
        if alg == "HS256":
            if keys.secret is None:
                raise Unauthenticated("bearer token algorithm HS256 is not accepted")
            return keys.secret, alg
        if alg not in _ASYMMETRIC:
            raise Unauthenticated("bearer token algorithm is not accepted")
        kid = header.get("kid")
        if keys.jwks:
            if isinstance(kid, str):
                for k in keys.jwks:
                    if k.kid == kid and k.algorithm == alg:
                        return k.key, alg
            elif kid is None and len(keys.jwks) == 1 and keys.jwks[0].algorithm == alg:
                return keys.jwks[0].key, alg
        if keys.public_key is not None and keys.public_algorithm == alg:
            return keys.public_key, alg
        if keys.jwks and isinstance(kid, str):
            raise Unauthenticated("bearer token key id (kid) is unknown for its algorithm")
        if keys.jwks and kid is None:
            raise Unauthenticated("bearer token has no key id (kid)")
        raise Unauthenticated(f"bearer token algorithm {alg!r} is not accepted")

    def verify(self, token: str) -> Principal:
        """The agent a bearer token speaks for.

        Args:
            token: the JWT (compact serialization) as presented.

        Returns:
            ``Principal(agent=sub, roles=<roles claim>, via="jwt")``.

        Raises:
            Unauthenticated: no key is configured, or the token is malformed, unsigned,
                signed with another algorithm or key, expired, not valid yet, for another
                issuer or audience, lacks ``exp`` or ``sub``, or its ``sub`` is not a valid
                agent name. The message says which, without echoing the token.
        """
        keys = self._keys
        if not keys.enabled:
            raise Unauthenticated("bearer tokens (JWT) are not accepted by this service")
        if not isinstance(token, str) or not looks_like_jwt(token):
            raise Unauthenticated("bearer token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("bearer token is malformed") from None
        key, alg = self._key_for(keys, header)
        s = self._settings
        required = ["exp", "sub"]
        if s.jwt_issuer is not None:
            required.append("iss")
        if s.jwt_audience is not None:
            required.append("aud")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_seconds,
                # sub is checked below, as an agent name (PyJWT >= 2.10 would only
                # check that it is a string, with a less telling error).
                options={"require": required, "verify_sub": False},
            )
        # PyJWT checks the signature before the claims: on these errors it verified,
        # so the token's sub is who the failure concerns (for the operators' figures).
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "bearer token has expired", agent=self._subject(token, key, alg)
            ) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "bearer token is not valid yet (nbf or iat)", agent=self._subject(token, key, alg)
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(
                f"bearer token lacks the {exc.claim!r} claim", agent=self._subject(token, key, alg)
            ) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                "bearer token audience (aud) is not accepted", agent=self._subject(token, key, alg)
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                "bearer token issuer (iss) is not accepted", agent=self._subject(token, key, alg)
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bearer token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated("bearer token algorithm is not accepted") from None
        except jwt.DecodeError:
            raise Unauthenticated("bearer token is malformed") from None
        except jwt.PyJWTError:
            raise Unauthenticated("bearer token is invalid") from None
        sub = payload.get("sub")
        try:
            agent = segment(sub, "sub", s)
        except HivememError:
            raise Unauthenticated("bearer token subject (sub) is not a valid agent name") from None
        return Principal(agent=agent, roles=self._roles(payload), via="jwt")

    def _subject(self, token: str, key: Any, alg: str) -> str | None:
        """The ``sub`` of a token whose signature verifies with ``key`` (its claims
        unchecked), if it is a valid agent name; else None."""
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "require": [],
                },
            )
            return segment(payload.get("sub"), "sub", self._settings)
        except (jwt.PyJWTError, HivememError):
            return None

    def _roles(self, payload: dict[str, Any]) -> frozenset[str]:
        value = _claim(payload, self._settings.jwt_roles_claim)
        if value is None:
            return frozenset()
        if isinstance(value, str):
            names: list[Any] = value.split()
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            names = value
        else:
            raise Unauthenticated(
                f"bearer token claim {self._settings.jwt_roles_claim!r} must be a list of "
                "strings or a space-separated string"
            )
        roles: set[str] = set()
        for name in names:
            try:
                roles.add(segment(name, "role", self._settings))
            except HivememError:
                continue
        return frozenset(roles)
