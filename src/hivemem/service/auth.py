"""Who is calling: the service's authentication, rate limiting and per-principal views.

With ``auth`` off (the default, for loopback and development) the caller is whoever
``X-Hivemem-Agent`` names. With ``auth`` on, every route but ``/healthz`` and
``/readyz`` needs ``Authorization: Bearer <credential>``: an API key made by
``hivemem agents add`` (``hm_<id>_<secret>``) or a JWT signed with the configured
key; the agent is the key's agent or the token's ``sub``, whatever a header says.
The view a request gets enforces the policy in core (:mod:`hivemem.policy.rules`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.errors import InvalidInput, RateLimited, Unauthenticated
from hivemem.policy.keys import KeyStore, looks_like_api_key
from hivemem.policy.limits import RateLimiter
from hivemem.policy.principal import Action, Principal
from hivemem.policy.rules import PolicyHolder
from hivemem.policy.tokens import TokenVerifier, looks_like_jwt

__all__ = ["AGENT_HEADER", "REQUEST_ID_HEADER", "ServiceState", "hive_for"]

log = logging.getLogger("hivemem.service")

AGENT_HEADER = "X-Hivemem-Agent"
REQUEST_ID_HEADER = "X-Hivemem-Request-Id"
_MAX_VIEWS = 10_000
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

#: The security scheme shown in the OpenAPI document (the credential is checked by
#: :meth:`ServiceState.authenticate`, not by FastAPI).
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key from `hivemem agents add` (hm_...) or a JWT bearer token. "
    "Required when the service runs with --auth.",
)


class ServiceState:
    """The hive behind the service, how callers are authenticated and limited, and the
    views per principal.

    Args:
        hive: the service's hive (its own agent is ``hivemem``).
        settings: ``auth``, ``policy_file``, the ``jwt_*``, ``rate_limit_*`` and
            ``max_watch_streams*`` settings apply.
    """

    def __init__(self, hive: LocalHive, settings: Settings) -> None:
        self.hive = hive
        self.settings = settings
        self.auth = settings.auth
        self.keys = KeyStore(hive.backend, cache_seconds=settings.auth_cache_seconds)
        self.tokens = TokenVerifier(settings)
        self.limiter = RateLimiter(settings)
        self.views: dict[Principal, LocalHive] = {}
        self.streams: dict[str, int] = {}
        self.streams_total = 0

    @property
    def policy(self) -> PolicyHolder | None:
        return self.hive.policy

    async def authenticate(self, credentials: str | None, agent_header: str | None) -> Principal:
        """The principal a request acts for.

        Raises:
            Unauthenticated: auth is on and the credential is missing, malformed,
                unknown, revoked, expired or wrongly signed.
            InvalidInput: auth is off and the agent header is not a valid identity.
        """
        if not self.auth:
            return Principal("anonymous" if agent_header is None else agent_header, via="header")
        if not credentials:
            raise Unauthenticated(
                "credentials required: send 'Authorization: Bearer <API key or JWT>'",
                field="Authorization",
            )
        if looks_like_api_key(credentials):
            found = await self.keys.verify(credentials)
            if found is None:
                raise Unauthenticated("unknown or revoked API key", field="Authorization")
            return found
        if self.tokens.enabled and looks_like_jwt(credentials):
            return self.tokens.verify(credentials)
        raise Unauthenticated(
            "the bearer credential is neither an API key of this hive nor a JWT it accepts",
            field="Authorization",
        )

    def view(self, principal: Principal) -> LocalHive:
        """The hive view acting for ``principal`` (cached).

        Raises:
            InvalidInput: the agent name is not a valid identity (field ``X-Hivemem-Agent``).
        """
        view = self.views.get(principal)
        if view is None:
            try:
                if self.auth or principal.via != "header":
                    view = self.hive.as_principal(principal)
                else:
                    view = self.hive.as_agent(principal.agent)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, field=AGENT_HEADER) from None
            if len(self.views) >= _MAX_VIEWS:
                self.views.clear()
            self.views[principal] = view
        return view

    async def reload_policy(self) -> None:
        """Read the policy file again (SIGHUP) and record it in the feed; a bad file
        keeps the policy in force and is logged."""
        holder = self.policy
        if holder is None or not holder.path:
            return
        try:
            policy = holder.reload()
        except InvalidInput as exc:
            log.error("policy file not reloaded, the previous rules stay: %s", exc.message)
            return
        self.views.clear()
        await self.admin_event(
            "policy.loaded", {"source": policy.source, "rules": len(policy.rules)}
        )
        log.info("policy reloaded from %s (%d rules)", policy.source, len(policy.rules))

    async def admin_event(self, action: str, data: dict[str, Any]) -> None:
        """Append an administrative event (channel ``_admin``) to the feed; visible to
        principals allowed ``admin``."""
        try:
            await self.hive.backend.publish(
                "_admin",
                orjson.dumps({"action": action, **data}),
                author="hivemem",
                now=time.time(),
            )
        except Exception:  # the feed is a record, not a precondition of the reload
            log.exception("could not record %s in the feed", action)

    def open_stream(self, agent: str) -> Callable[[], None]:
        """Count a new watch stream of ``agent``; returns the function that ends it
        (idempotent, so both the stream's end and the response's cleanup may call it).

        Raises:
            RateLimited: the agent already holds ``max_watch_streams_per_agent`` streams
                on this process, or the process holds ``max_watch_streams``.
        """
        s = self.settings
        if self.streams.get(agent, 0) >= s.max_watch_streams_per_agent:
            raise RateLimited(
                f"agent {agent!r} already has {s.max_watch_streams_per_agent} open watch "
                "streams on this replica (max_watch_streams_per_agent)",
                retry_after=5.0,
            )
        if self.streams_total >= s.max_watch_streams:
            raise RateLimited(
                f"this replica already serves {s.max_watch_streams} watch streams "
                "(max_watch_streams)",
                retry_after=5.0,
            )
        self.streams[agent] = self.streams.get(agent, 0) + 1
        self.streams_total += 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.streams_total -= 1
            left = self.streams.get(agent, 1) - 1
            if left > 0:
                self.streams[agent] = left
            else:
                self.streams.pop(agent, None)

        return release

    async def close(self) -> None:
        await self.limiter.close()


def _request_id(request_id: str | None, idempotency_key: str | None) -> str | None:
    """The request id of a write from ``X-Hivemem-Request-Id`` or, when it is absent,
    ``Idempotency-Key`` (IETF draft-ietf-httpapi-idempotency-key-header: a quoted
    string, quotes optional here)."""
    key = None
    if idempotency_key is not None:
        key = idempotency_key.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1]
        if not _REQUEST_ID.fullmatch(key):
            raise InvalidInput(
                "Idempotency-Key must be 1-128 letters, digits or _ - . : (optionally quoted)",
                field="Idempotency-Key",
            )
    return request_id if request_id is not None else key


def hive_for(action: Action) -> Any:
    """A FastAPI dependency giving the hive view for the calling principal, after
    authentication and the rate limit of ``action`` (async, so FastAPI does not send
    it to its thread pool)."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        x_hivemem_agent: Annotated[
            str | None,
            Header(
                description="Identity of the calling agent when the service runs without "
                "--auth; ignored with --auth (the credential names the agent).",
                max_length=128,
            ),
        ] = None,
        x_hivemem_request_id: Annotated[
            str | None,
            Header(
                description="Idempotency key of a write (1-128 letters, digits, _ - . :). A "
                "write repeated with the same request id by the same agent, on any replica, "
                "within request_retention_seconds, is applied once; the repeat gets the first "
                "result. The same id with a different request is refused (422).",
                pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                description="The IETF Idempotency-Key header: the same as X-Hivemem-Request-Id "
                "(which wins when both are sent)."
            ),
        ] = None,
    ) -> LocalHive:
        state: ServiceState = request.app.state.hivemem
        principal = await state.authenticate(
            None if credentials is None else credentials.credentials, x_hivemem_agent
        )
        request.state.principal = principal
        if state.limiter.enabled:
            await state.limiter.hit(principal.agent, action)
        view = state.view(principal)
        request_id = _request_id(x_hivemem_request_id, idempotency_key)
        if request_id is not None:
            view = view.with_request_id(request_id, field=REQUEST_ID_HEADER)
        return view

    return dependency


ReadHive = Annotated[LocalHive, Depends(hive_for("read"))]
WriteHive = Annotated[LocalHive, Depends(hive_for("write"))]
SearchHive = Annotated[LocalHive, Depends(hive_for("search"))]
WatchHive = Annotated[LocalHive, Depends(hive_for("watch"))]
PublishHive = Annotated[LocalHive, Depends(hive_for("publish"))]
SessionsHive = Annotated[LocalHive, Depends(hive_for("sessions"))]
TasksHive = Annotated[LocalHive, Depends(hive_for("tasks"))]
