"""The FastAPI dependencies of the routes: the hive view a request acts through.

A route names what it does by the annotation of its ``hive`` parameter
(:data:`ReadHive`, :data:`WriteHive`, ...): the dependency authenticates the caller
(:meth:`~hivemem.service.auth.ServiceState.authenticate`), applies the rate limit of that
action and hands the route the caller's view of the hive, bound to the write's request id
when one was sent. Route modules import this module, never :mod:`hivemem.service.app`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from hivemem.core import LocalHive
from hivemem.errors import InvalidInput
from hivemem.policy.principal import Action
from hivemem.service.auth import ServiceState
from hivemem.wire import (
    AGENT_HEADER,
    AUTHORIZATION_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    REQUEST_ID_HEADER,
    REQUEST_ID_PATTERN,
)

__all__ = [
    "PublishHive",
    "ReadHive",
    "SearchHive",
    "SessionsHive",
    "TasksHive",
    "WatchHive",
    "WriteHive",
    "bearer",
    "capped",
    "hive_for",
    "read_hive",
    "service_state",
    "write_hive",
]

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

#: The security scheme the OpenAPI document shows (service/openapi.py; the credential is
#: read by :func:`hive_for` and checked by :meth:`ServiceState.authenticate`).
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key from `hivemem agents add` (hm_...) or a JWT bearer token. "
    "Required when the service runs with --auth.",
)


def service_state(request: Request) -> ServiceState:
    """The :class:`ServiceState` of the app serving ``request``."""
    state: ServiceState = request.app.state.hivemem
    return state


def capped(hive: LocalHive, wait: float | None) -> float | None:
    """``wait`` (seconds) cut to the service's ``max_wait_seconds`` (None and negatives
    pass through: the hive treats None as "no wait" and refuses a negative one, naming
    it)."""
    if wait is None or wait < 0:
        return wait
    return min(wait, hive.settings.max_wait_seconds)


def _request_id(request_id: str | None, idempotency_key: str | None) -> str | None:
    """The request id of a write from ``X-Hivemem-Request-Id`` or, when it is absent,
    ``Idempotency-Key`` (IETF draft-ietf-httpapi-idempotency-key-header: a quoted
    string, quotes optional here).

    Raises:
        InvalidInput: a malformed ``Idempotency-Key`` (field ``Idempotency-Key``).
    """
    key = None
    if idempotency_key is not None:
        key = idempotency_key.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1]
        if not _REQUEST_ID.fullmatch(key):
            raise InvalidInput(
                f"{IDEMPOTENCY_KEY_HEADER} must be 1-128 letters, digits or _ - . : "
                "(optionally quoted)",
                field=IDEMPOTENCY_KEY_HEADER,
            )
    return request_id if request_id is not None else key


def hive_for(action: Action) -> Any:
    """A FastAPI dependency giving the hive view for the calling principal, after
    authentication and the rate limit of ``action`` (async, so FastAPI does not send
    it to its thread pool).

    The dependency raises ``Unauthenticated`` (401), ``RateLimited`` (429) or
    ``InvalidInput`` (422: a malformed agent name or request id, naming the header).
    """

    async def dependency(request: Request) -> LocalHive:
        # The headers are read here rather than declared as FastAPI parameters: that
        # resolution cost a third of a small request's time. The OpenAPI document
        # still lists them (service/openapi.py adds them to every route but the probes).
        headers = request.headers
        # As FastAPI's HTTPBearer reads it: "<scheme> <credentials>", scheme "bearer".
        scheme, _, credentials = (headers.get(AUTHORIZATION_HEADER) or "").partition(" ")
        state = service_state(request)
        principal = await state.authenticate(
            credentials if scheme.lower() == "bearer" and credentials else None,
            headers.get(AGENT_HEADER),
        )
        request.state.principal = principal
        await state.limit(principal.agent, action)
        view = state.view(principal)
        found = _request_id(headers.get(REQUEST_ID_HEADER), headers.get(IDEMPOTENCY_KEY_HEADER))
        if found is not None:
            view = view.with_request_id(found, field=REQUEST_ID_HEADER)
        return view

    return dependency


#: The read and write dependencies themselves, for routes that resolve their hive in
#: their body.
read_hive = hive_for("read")
write_hive = hive_for("write")
ReadHive = Annotated[LocalHive, Depends(read_hive)]
WriteHive = Annotated[LocalHive, Depends(write_hive)]
SearchHive = Annotated[LocalHive, Depends(hive_for("search"))]
WatchHive = Annotated[LocalHive, Depends(hive_for("watch"))]
PublishHive = Annotated[LocalHive, Depends(hive_for("publish"))]
SessionsHive = Annotated[LocalHive, Depends(hive_for("sessions"))]
TasksHive = Annotated[LocalHive, Depends(hive_for("tasks"))]
