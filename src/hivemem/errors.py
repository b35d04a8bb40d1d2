"""The exception hierarchy shared by every Hive: embedded, remote and clustered.

Every error a Hive raises is a :class:`HivememError`. The service maps each class
to an HTTP status and an RFC 9457 problem+json body (``status`` and ``type``
below); the client maps the body back to the same class, so callers handle one
set of exceptions whichever deployment they talk to.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "Conflict",
    "CursorExpired",
    "HivememError",
    "InvalidInput",
    "NotFound",
    "OnceFailed",
    "PermissionDenied",
    "RateLimited",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "error_from_problem",
]


class HivememError(Exception):
    """Base class of every error raised by hivemem.

    Attributes:
        message: a sentence for people.
        field: the input field at fault (dotted path such as ``"metadata.tags"``),
            or ``None`` when the error is not about one field.
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def extra(self) -> dict[str, Any]:
        """Extension members of the problem+json body beyond title/detail/field."""
        return {}

    def to_problem(self) -> dict[str, Any]:
        """The RFC 9457 problem+json body for this error."""
        body: dict[str, Any] = {
            "type": f"/problems/{self.type}",
            "title": type(self).__name__,
            "status": self.status,
            "detail": self.message,
        }
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra())
        return body


# Errors about the request itself ------------------------------------------------


class InvalidInput(HivememError):
    """Raised when an argument is malformed: a bad namespace, key, TTL, limit or type."""

    status = 422
    type = "invalid-input"


class TooLarge(HivememError):
    """Raised when a value, text, metadata or request body exceeds its size limit."""

    status = 413
    type = "too-large"


# Errors about the state of the store --------------------------------------------


class NotFound(HivememError):
    """Raised when the item, session or other resource does not exist (or has expired)."""

    status = 404
    type = "not-found"


class Conflict(HivememError):
    """Raised when an expected version does not match; nothing was written.

    Attributes:
        current_version: the version found (0 when the item or document is absent),
            or ``None`` when the conflict is not about a version (e.g. a duplicate id).
    """

    status = 409
    type = "conflict"

    def __init__(
        self, message: str, *, field: str | None = None, current_version: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.current_version = current_version

    def extra(self) -> dict[str, Any]:
        return {} if self.current_version is None else {"current_version": self.current_version}


class OnceFailed(HivememError):
    """Raised by :meth:`~hivemem.Hive.once` when the first call with that key failed and
    its error was kept (``keep_errors``): the call is not run again.

    Attributes:
        holder: the agent whose call failed, if known.
    """

    status = 409
    type = "once-failed"

    def __init__(
        self, message: str, *, field: str | None = None, holder: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.holder = holder


class CursorExpired(HivememError):
    """Raised when a feed cursor points before the retention window: events were trimmed."""

    status = 410
    type = "cursor-expired"


# Errors about who is asking -----------------------------------------------------


class Unauthenticated(HivememError):
    """Raised when the caller's identity is missing or cannot be verified.

    Attributes:
        agent: the agent the refused credential names, where the service could trust
            that much (an API key whose id is stored but whose secret is wrong; a JWT
            whose signature verified but whose claims did not: expired, not valid yet,
            another audience or issuer), else None. For the operators' figures
            (``hivemem_auth_failures_total``); never sent to the caller.
    """

    status = 401
    type = "unauthenticated"

    def __init__(self, message: str, *, field: str | None = None, agent: str | None = None):
        super().__init__(message, field=field)
        self.agent = agent


class PermissionDenied(HivememError):
    """Raised when the caller's identity is known but not allowed to do this."""

    status = 403
    type = "permission-denied"


class RateLimited(HivememError):
    """Raised when the caller exceeded a rate limit.

    Attributes:
        retry_after: seconds to wait before trying again.
    """

    status = 429
    type = "rate-limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after

    def extra(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after}


# Errors about the infrastructure ------------------------------------------------


class Unavailable(HivememError):
    """Raised when the store or every service endpoint cannot be reached in time."""

    status = 503
    type = "unavailable"


class UpstreamFailed(HivememError):
    """Raised when a provider the hive relies on (the embeddings endpoint) answered
    something unusable: a refusal, a malformed or wrongly shaped response. The message
    is generic; the provider's answer is in the hive's log, never sent to callers."""

    status = 502
    type = "upstream-failed"


_BY_TYPE: dict[str, type[HivememError]] = {
    cls.type: cls
    for cls in (
        InvalidInput,
        TooLarge,
        NotFound,
        Conflict,
        CursorExpired,
        Unauthenticated,
        PermissionDenied,
        RateLimited,
        Unavailable,
        UpstreamFailed,
    )
}
_BY_STATUS: dict[int, type[HivememError]] = {cls.status: cls for cls in _BY_TYPE.values()}
_BY_STATUS[400] = InvalidInput
_BY_STATUS[412] = Conflict


def error_from_problem(status: int, body: dict[str, Any] | None) -> HivememError:
    """Rebuild the exception a service raised from its HTTP status and problem+json body.

    Args:
        status: the HTTP status code of the response.
        body: the decoded problem+json body, or ``None`` when the body was not JSON.

    Returns:
        The matching :class:`HivememError` subclass instance; ``HivememError`` itself
        for an unknown status.
    """
    body = body or {}
    type_name = str(body.get("type", "")).rsplit("/", 1)[-1]
    cls = _BY_TYPE.get(type_name) or _BY_STATUS.get(status, HivememError)
    detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
    field = body.get("field")
    field = str(field) if field is not None else None
    if cls is Conflict:
        current = body.get("current_version")
        return Conflict(
            detail, field=field, current_version=int(current) if current is not None else None
        )
    if cls is RateLimited:
        return RateLimited(detail, field=field, retry_after=float(body.get("retry_after", 1.0)))
    return cls(detail, field=field)
