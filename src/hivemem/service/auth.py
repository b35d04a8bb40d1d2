"""Who is calling: the service's authentication, rate limiting and per-principal views.

With ``auth`` off (the default, for loopback and development) the caller is whoever
``X-Hivemem-Agent`` names. With ``auth`` on, every route but ``/healthz`` and
``/readyz`` needs ``Authorization: Bearer <credential>``: an API key made by
``hivemem agents add`` (``hm_<id>_<secret>``) or a JWT signed with the configured
key; the agent is the key's agent or the token's ``sub``, whatever a header says.
The view a request gets enforces the policy in core (:mod:`hivemem.policy.rules`); the
routes get it through the dependencies of :mod:`hivemem.service.deps`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from hivemem.config import Settings
from hivemem.core import LocalHive
from hivemem.errors import InvalidInput, RateLimited, Unauthenticated
from hivemem.policy.keys import KeyStore, looks_like_api_key
from hivemem.policy.limits import RateLimiter
from hivemem.policy.principal import Principal
from hivemem.policy.rules import PolicyHolder
from hivemem.policy.tokens import TokenVerifier, looks_like_jwt
from hivemem.wire import AGENT_HEADER, AUTHORIZATION_HEADER

__all__ = ["ServiceState"]

log = logging.getLogger("hivemem.service")

_MAX_VIEWS = 10_000


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
        try:
            return await self._authenticate(credentials)
        except Unauthenticated as exc:
            if not credentials:
                reason = "missing"
            elif looks_like_api_key(credentials):
                reason = "api_key"
            elif looks_like_jwt(credentials):
                reason = "expired" if "expired" in exc.message else "jwt"
            else:
                reason = "malformed"
            metrics = self.hive.metrics
            # Only an agent the credential could be trusted to name (see Unauthenticated);
            # anything else is "unknown", so a caller cannot mint label values.
            agent = "unknown" if exc.agent is None else metrics.agent_label(exc.agent)
            metrics.auth_failures.labels(reason, agent).inc()
            raise

    async def limit(self, agent: str, action: str) -> None:
        """Apply the rate limit of ``action`` to ``agent`` (nothing when limits are off).

        Raises:
            RateLimited: the agent is over its limit (counted in the metrics).
        """
        if not self.limiter.enabled:
            return
        try:
            await self.limiter.hit(agent, action)
        except RateLimited:
            metrics = self.hive.metrics
            metrics.rate_limited.labels(metrics.agent_label(agent)).inc()
            raise

    async def _authenticate(self, credentials: str | None) -> Principal:
        if not credentials:
            raise Unauthenticated(
                f"credentials required: send '{AUTHORIZATION_HEADER}: Bearer <API key or JWT>'",
                field=AUTHORIZATION_HEADER,
            )
        if credentials.startswith("hm_"):  # the shape is checked once, by check
            found, named = await self.keys.check(credentials)
            if found is None:
                raise Unauthenticated(
                    "unknown or revoked API key, or not an API key of this shape: "
                    "hm_<12 hex>_<43 base64url>",
                    field=AUTHORIZATION_HEADER,
                    agent=named,
                )
            return found
        if self.tokens.enabled and looks_like_jwt(credentials):
            return self.tokens.verify(credentials)
        raise Unauthenticated(
            "the bearer credential is neither an API key of this hive nor a JWT it accepts",
            field=AUTHORIZATION_HEADER,
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
