"""The webhook sink: each event as an HMAC-signed HTTP POST, and the receiver's check.

Each request (aiohttp) is ``POST <url>`` with the event as its JSON body
(:func:`~hivemem.bridges.base.event_body`) and these headers:

- ``Content-Type: application/json``
- ``X-Hivemem-Event-Id``: the event id (the same on every redelivery: drop repeats);
- ``X-Hivemem-Timestamp``: when this try was signed, UNIX seconds (an integer);
- ``X-Hivemem-Signature``: ``sha256=`` and the lowercase hex HMAC-SHA256, keyed with the
  shared secret (its UTF-8 bytes), of ``<timestamp>.<body>``: the timestamp's ASCII
  digits, one ``.``, then the body's bytes exactly as received.

A receiver recomputes the HMAC over the raw body, compares in constant time, and refuses
a timestamp more than a few minutes from its clock (a replayed request);
:func:`verify_signature` does all three. Each try is signed anew, so a retry carries a
fresh timestamp.

Answers: 2xx is delivered; 408, 429 and 5xx are tried again (``Retry-After`` in seconds
is honoured, up to the bridge's longest backoff), as are timeouts and connection
errors; any other answer (3xx: redirects are not followed, since they would carry the
signed body elsewhere; 4xx) is permanent and the event goes to the dead-letter file.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import hivemem
from hivemem.bridges.base import DeliveryFailed, Message, Sink, Undeliverable
from hivemem.errors import InvalidInput

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_SECONDS",
    "WebhookSink",
    "sign",
    "verify_signature",
]

EVENT_ID_HEADER = "X-Hivemem-Event-Id"
TIMESTAMP_HEADER = "X-Hivemem-Timestamp"
SIGNATURE_HEADER = "X-Hivemem-Signature"
#: How far a request's timestamp may be from the receiver's clock (seconds), by default.
TOLERANCE_SECONDS = 300.0
#: Answers that are tried again besides 5xx: Request Timeout, Too Many Requests.
RETRYABLE_STATUSES = frozenset({408, 429})
#: Bytes of an answer's body kept for the error message.
_ERROR_BYTES = 512


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Hivemem-Signature`` value of ``body`` sent at ``timestamp`` (UNIX
    seconds): ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body`` keyed with
    ``secret`` (a str is taken as its UTF-8 bytes)."""
    signed = str(timestamp).encode("ascii") + b"." + body
    return "sha256=" + hmac.new(_key(secret), signed, hashlib.sha256).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()  # a plain dict: find the header whatever its case
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def verify_signature(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | bytes,
    *,
    tolerance_seconds: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether a request received from a webhook bridge is genuine and fresh.

    Args:
        body: the request's body, the raw bytes as received (not re-encoded JSON).
        headers: its headers (any mapping; names are matched whatever their case).
        secret: the bridge's ``--secret``.
        tolerance_seconds: the most the timestamp may differ from ``now``.
        now: the receiver's time, UNIX seconds (default: the clock).

    Returns:
        True if ``X-Hivemem-Signature`` is the HMAC of ``X-Hivemem-Timestamp`` and the
        body under ``secret`` (compared in constant time) and the timestamp is within
        ``tolerance_seconds``; False if a header is missing or malformed, the signature
        differs (a tampered body or timestamp, another secret) or the request is stale.
    """
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if timestamp is None or signature is None or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature.strip())


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (an HTTP date is not honoured: None)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class WebhookSink(Sink):
    """POSTs each event to ``url``, signed with ``secret`` (see the module notes).

    Args:
        url: the receiver, ``http://`` or ``https://``.
        secret: the shared HMAC key (non-empty).
        timeout_seconds: the most one request may take, connection included (> 0); a
            request that takes longer is tried again.
        headers: extra headers sent with every request (e.g. an ``Authorization``).

    Raises:
        InvalidInput: a URL that is not http(s) (field ``url``), an empty secret (field
            ``secret``), a timeout that is not positive (field ``timeout``).
    """

    kind = "webhook"

    def __init__(
        self,
        url: str,
        secret: str | bytes,
        *,
        timeout_seconds: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidInput(f"the webhook URL must be http(s), not {url!r}", field="url")
        if not secret:
            raise InvalidInput("the webhook secret must not be empty", field="secret")
        if not timeout_seconds > 0:
            raise InvalidInput("timeout must be more than 0 seconds", field="timeout")
        self.url = url
        self._secret = _key(secret)
        self.timeout_seconds = float(timeout_seconds)
        self.headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    @property
    def target(self) -> str:
        # Without a query string or user info, which may hold a token.
        head, _, _ = self.url.partition("?")
        scheme, sep, rest = head.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    async def open(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            headers={"User-Agent": f"hivemem-bridge/{hivemem.__version__}", **self.headers},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, message: Message) -> None:
        """POST one event.

        Raises:
            DeliveryFailed: a timeout, a connection error, or a 408, 429 or 5xx answer.
            Undeliverable: any other answer outside 2xx.
        """
        import aiohttp

        session = self._session
        assert session is not None, "open() first"
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: message.id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, message.body),
        }
        try:
            async with session.post(
                self.url, data=message.body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    await resp.read()  # read to the end: the connection is then kept alive
                    return
                text = (await resp.content.read(_ERROR_BYTES)).decode("utf-8", "replace")
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise DeliveryFailed(
                f"no answer from {self.target} within {self.timeout_seconds:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(f"{self.target}: {type(exc).__name__}: {exc}") from None
        what = f"{self.target} answered {status}: {' '.join(text.split())[:200]}"
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise DeliveryFailed(what, retry_after=retry_after)
        raise Undeliverable(what)
