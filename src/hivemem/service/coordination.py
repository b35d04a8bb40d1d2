"""HTTP routes of coordination: leases with fencing tokens, signals, idempotent calls
and the agent registry.

Waits (acquire, get signal, begin once) are cut to ``max_wait_seconds``; the client
repeats a request until its own wait ends. Each route acts through the calling
principal's view (action ``tasks``): a lease, a once key and a registration belong to
the authenticated agent. The service registers agents without heartbeats: sending them
is the client's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hivemem.core.coordination import MAX_CAPABILITIES
from hivemem.core.tasks import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from hivemem.errors import NotFound
from hivemem.models import AgentRecord, JsonInt, Lease, OnceTicket, Signal
from hivemem.service.deps import TasksHive, capped
from hivemem.service.routing import JSONRoute, model_response, models_response
from hivemem.wire import HEALTHY, Deleted, Healthy, Released

router = APIRouter(tags=["coordination"], route_class=JSONRoute)

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class HeldLease:
    """What a holder names of its lease (the hive reads name, token, version and, for a
    renewal without a ttl, ttl)."""

    name: str
    token: int
    version: int
    ttl: float | None = None


# Bodies ---------------------------------------------------------------------------------


class AcquireBody(BaseModel):
    """Body of POST /v1/leases/{name}/acquire."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ttl: float = Field(
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds the lease lasts unless renewed.",
    )
    wait: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait while another agent holds it (cut to max_wait_seconds).",
    )


class RenewBody(BaseModel):
    """Body of POST /v1/leases/{name}/renew."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token: JsonInt = Field(ge=1, description="The lease's fencing token.")
    version: JsonInt = Field(ge=1, description="The lease's version.")
    ttl: float | None = Field(
        default=None,
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds from now; null: the lease's ttl.",
    )


class ReleaseBody(BaseModel):
    """Body of POST /v1/leases/{name}/release."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token: JsonInt = Field(ge=1, description="The lease's fencing token.")
    version: JsonInt = Field(ge=1, description="The lease's version.")


class SignalBody(BaseModel):
    """Body of PUT /v1/signals/{name}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    value: Any = Field(description="Any JSON value (at most 64 KiB by default).")
    ttl: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds until the signal disappears (at most max_ttl_seconds).",
    )


class BeginOnceBody(BaseModel):
    """Body of POST /v1/once/begin."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(description="1-512 bytes, e.g. session-42:turn-3:send_email.")
    shared: bool = Field(default=False, description="One result for every agent.")
    lease: float = Field(
        default=60.0,
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds the key is held by the runner unless renewed.",
    )
    wait: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait for a running call (cut to max_wait_seconds).",
    )


class RenewOnceBody(BaseModel):
    """Body of POST /v1/once/renew."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    token: JsonInt = Field(description="From begin.")
    shared: bool = False
    lease: float = Field(
        default=60.0, ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS, allow_inf_nan=False
    )


class EndOnceBody(BaseModel):
    """Body of POST /v1/once/end."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    token: JsonInt = Field(description="From begin.")
    shared: bool = False
    result: Any = Field(default=None, description="The call's result (any JSON).")
    error: str | None = Field(default=None, description="The call failed: the key is freed.")
    keep_error: bool = Field(default=False, description="Keep the error for repeats.")
    ttl: float = Field(
        default=86400.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds the result (or kept error) is kept (at most max_ttl_seconds).",
    )


class RegisterBody(BaseModel):
    """Body of PUT /v1/registry/{name}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    capabilities: list[str] | None = Field(
        default=None, max_length=MAX_CAPABILITIES, description="Names others find it by."
    )
    endpoint: str | None = Field(
        default=None, min_length=1, max_length=2048, description="Where to reach it (a URL)."
    )
    metadata: dict[str, Any] | None = None
    ttl: float = Field(
        default=15.0,
        ge=1.0,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds without a heartbeat after which it is down.",
    )


# Leases ---------------------------------------------------------------------------------


@router.post(
    "/v1/leases/{name:anypath}/acquire",
    response_model=Lease,
    summary="Acquire a lease (409 naming `name` while another agent holds it).",
)
async def acquire(name: str, body: AcquireBody, hive: TasksHive) -> Response:
    """Acquire ``name`` for ``body.ttl`` seconds, waiting up to ``body.wait``."""
    return model_response(await hive.acquire(name, body.ttl, wait=capped(hive, body.wait)))


@router.post(
    "/v1/leases/{name:anypath}/renew",
    response_model=Lease,
    summary="Extend a lease this agent holds (409 naming `lease` when it was lost).",
)
async def renew(name: str, body: RenewBody, hive: TasksHive) -> Response:
    """Renew the lease by ``body.ttl`` seconds from now (default: its ttl); the hive
    checks that the authenticated agent holds it at that token and version."""
    lease = HeldLease(name, body.token, body.version)
    return model_response(await hive.renew(lease, ttl=body.ttl))  # type: ignore[arg-type]


@router.post(
    "/v1/leases/{name:anypath}/release",
    response_model=Released,
    summary="End a lease this agent holds; released is false if it had already ended.",
)
async def release(name: str, body: ReleaseBody, hive: TasksHive) -> Response:
    """Release the lease (false unless the authenticated agent holds it)."""
    lease = HeldLease(name, body.token, body.version)
    return model_response(Released(released=await hive.release(lease)))  # type: ignore[arg-type]


# Signals --------------------------------------------------------------------------------


@router.put(
    "/v1/signals/{name:anypath}", response_model=Signal, summary="Set a signal; wakes waiters."
)
async def set_signal(name: str, body: SignalBody, hive: TasksHive) -> Response:
    """Set the signal ``name`` to ``body.value``."""
    return model_response(await hive.set_signal(name, body.value, ttl=body.ttl))


@router.get(
    "/v1/signals/{name:anypath}",
    response_model=Signal,
    summary="Get a signal (404 while unset); with changed_from, wait for another version.",
)
async def get_signal(
    name: str,
    hive: TasksHive,
    changed_from: Annotated[
        int | None,
        Query(ge=0, le=_INT64_MAX, description="A version seen (0: unset); wait for another."),
    ] = None,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            allow_inf_nan=False,
            description="Seconds to wait for a change (cut to max_wait_seconds).",
        ),
    ] = None,
) -> Response:
    """The signal, or 404 naming ``name`` while it is unset."""
    signal = await hive.get_signal(name, changed_from=changed_from, wait=capped(hive, wait))
    if signal is None:
        raise NotFound(f"signal {name!r} is not set", field="name")
    return model_response(signal)


# Idempotent calls -----------------------------------------------------------------------


@router.post(
    "/v1/once/begin",
    response_model=OnceTicket,
    summary="Start an idempotent call: run it, or get the first call's outcome.",
)
async def begin_once(body: BeginOnceBody, hive: TasksHive) -> Response:
    """Begin the call with ``body.key``."""
    ticket = await hive.begin_once(
        body.key, shared=body.shared, lease=body.lease, wait=capped(hive, body.wait)
    )
    return model_response(ticket)


@router.post(
    "/v1/once/renew",
    status_code=204,
    summary="Keep holding a key begun with /v1/once/begin (409 naming `token` if lost).",
)
async def renew_once(body: RenewOnceBody, hive: TasksHive) -> Response:
    """Renew the runner's hold of the key."""
    await hive.renew_once(body.key, body.token, shared=body.shared, lease=body.lease)
    return Response(status_code=204)


@router.post(
    "/v1/once/end",
    status_code=204,
    summary="Finish an idempotent call with its result or error.",
)
async def end_once(body: EndOnceBody, hive: TasksHive) -> Response:
    """End the call: keep the result, or free the key (or keep the error)."""
    await hive.end_once(
        body.key,
        body.token,
        shared=body.shared,
        result=body.result,
        error=body.error,
        keep_error=body.keep_error,
        ttl=body.ttl,
    )
    return Response(status_code=204)


# Agent registry ---------------------------------------------------------------------------


@router.put(
    "/v1/registry/{name}",
    response_model=AgentRecord,
    summary="Register an agent (again: replaces its entry). Heartbeats are the client's.",
)
async def register(name: str, body: RegisterBody, hive: TasksHive) -> Response:
    """Enter ``name`` in the registry, without heartbeats from the service."""
    record = await hive.register(
        name,
        capabilities=body.capabilities or (),
        endpoint=body.endpoint,
        metadata=body.metadata,
        ttl=body.ttl,
        heartbeat=False,
    )
    return model_response(record)


@router.post(
    "/v1/registry/{name}/heartbeat",
    response_model=AgentRecord,
    summary="Record that a registered agent is alive (404 naming `name` if unregistered).",
)
async def heartbeat_agent(name: str, hive: TasksHive) -> Response:
    """The registry heartbeat of ``name``."""
    return model_response(await hive.heartbeat_agent(name))


@router.delete(
    "/v1/registry/{name}",
    response_model=Deleted,
    summary="Remove an agent from the registry; deleted is false if it was absent.",
)
async def unregister(name: str, hive: TasksHive) -> Response:
    """Unregister ``name``."""
    return model_response(Deleted(deleted=await hive.unregister(name)))


@router.get(
    "/v1/registry",
    response_model=list[AgentRecord],
    summary="Registered agents, by name.",
)
async def agents(
    hive: TasksHive,
    capability: Annotated[
        str | None, Query(description="Only agents with this capability.")
    ] = None,
    healthy: Annotated[
        Healthy, Query(description="true: healthy ones; false: down ones; all: both.")
    ] = "true",
) -> Response:
    """The registered agents."""
    found = await hive.agents(capability=capability, healthy=HEALTHY[healthy])
    return models_response(found)
