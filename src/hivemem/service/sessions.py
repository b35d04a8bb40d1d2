"""HTTP routes of the sessions area."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hivemem.errors import NotFound
from hivemem.models import JsonInt, MessageIn, Page, Session
from hivemem.service.deps import SessionsHive
from hivemem.service.routing import JSONRoute, model_response
from hivemem.wire import Messages

router = APIRouter(tags=["sessions"], route_class=JSONRoute)


class CreateBody(BaseModel):
    """Body of POST /v1/sessions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    app: str = Field(description="Application the session belongs to.")
    user: str | None = None
    agent: str | None = None
    session_id: str | None = Field(default=None, description="Your own id; made if absent.")
    metadata: dict[str, Any] | None = None
    state: dict[str, Any] | None = Field(default=None, description="Initial state document.")
    ttl: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds of inactivity after which the session expires, with its "
        "messages (sliding: every append and state save restarts it; at most "
        "max_ttl_seconds); null: never.",
    )


class AppendBody(BaseModel):
    """Body of POST /v1/sessions/{id}/messages."""

    model_config = ConfigDict(extra="forbid")

    messages: list[MessageIn]


class StateBody(BaseModel):
    """Body of PUT /v1/sessions/{id}/state."""

    model_config = ConfigDict(extra="forbid", strict=True)

    state: dict[str, Any]
    if_version: JsonInt | None = Field(
        default=None, ge=0, le=2**63 - 1, description="Only if at this version."
    )


@router.post("/v1/sessions", status_code=201, response_model=Session, summary="Create a session.")
async def create_session(body: CreateBody, hive: SessionsHive) -> Response:
    session = await hive.create_session(
        app=body.app,
        user=body.user,
        agent=body.agent,
        session_id=body.session_id,
        metadata=body.metadata,
        state=body.state,
        ttl=body.ttl,
    )
    return model_response(session, 201)


@router.get("/v1/sessions", response_model=Page[Session], summary="List sessions, oldest first.")
async def list_sessions(
    hive: SessionsHive,
    app: Annotated[str | None, Query(description="Only this app.")] = None,
    user: Annotated[str | None, Query(description="Only this user.")] = None,
    agent: Annotated[str | None, Query(description="Only this agent.")] = None,
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    page = await hive.list_sessions(app=app, user=user, agent=agent, limit=limit, cursor=cursor)
    return model_response(page)


@router.get("/v1/sessions/{session_id}", response_model=Session, summary="Get a session.")
async def get_session(session_id: str, hive: SessionsHive) -> Response:
    return model_response(await hive.get_session(session_id))


@router.delete(
    "/v1/sessions/{session_id}", status_code=204, summary="Delete a session and its messages."
)
async def delete_session(session_id: str, hive: SessionsHive) -> Response:
    if not await hive.delete_session(session_id):
        raise NotFound(f"no session {session_id!r}", field="session_id")
    return Response(status_code=204)


@router.post(
    "/v1/sessions/{session_id}/messages",
    response_model=Messages,
    summary="Append messages (atomic; each gets the next sequence number).",
)
async def append_messages(session_id: str, body: AppendBody, hive: SessionsHive) -> Response:
    stored = await hive.append_messages(session_id, body.messages)
    return model_response(Messages(messages=stored))


@router.get(
    "/v1/sessions/{session_id}/messages",
    response_model=Messages,
    summary="Messages after a sequence number, in order.",
)
async def get_messages(
    session_id: str,
    hive: SessionsHive,
    after: Annotated[
        int, Query(ge=0, le=2**63 - 1, description="Return messages with seq > after.")
    ] = 0,
    limit: Annotated[
        int, Query(le=2**63 - 1, description="Most messages returned, 1..1000.")
    ] = 100,
) -> Response:
    stored = await hive.get_messages(session_id, after=after, limit=limit)
    return model_response(Messages(messages=stored))


@router.put(
    "/v1/sessions/{session_id}/state",
    response_model=Session,
    summary="Replace the state document (compare-and-set with if_version).",
)
async def save_state(session_id: str, body: StateBody, hive: SessionsHive) -> Response:
    session = await hive.save_state(session_id, body.state, if_version=body.if_version)
    return model_response(session)
