"""HTTP routes of the events area: feed pages, the SSE watch stream, publish."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import Response

from hivemem.backends.rows import EventRow
from hivemem.core.events import WATCH_BATCH, to_event
from hivemem.models import Event, Page
from hivemem.service.deps import PublishHive, WatchHive, service_state
from hivemem.service.routing import JSONRoute, model_response
from hivemem.wire import CURSOR_HEADER, LAST_EVENT_ID_HEADER, SSE_EVENT, Head

router = APIRouter(tags=["events"], route_class=JSONRoute)


class PublishBody(BaseModel):
    """Body of POST /v1/publish/{channel}."""

    model_config = ConfigDict(extra="forbid")

    payload: Any = Field(description="Any JSON value (at most 64 KiB by default).")


#: Most SSE frames of recent events an app keeps (see :class:`Frames`).
FRAME_CACHE = 20_000


def _sse(event: Event) -> bytes:
    return ServerSentEvent(data=event.model_dump_json(), id=event.cursor, event=SSE_EVENT).encode()


class Frames:
    """SSE frames of recent feed events by cursor, one cache per app (per store): every
    stream that delivers an event sends the bytes encoded once, so a write watched by
    1,000 streams is encoded once, not 1,000 times. What each stream may see is decided
    per stream before the lookup."""

    def __init__(self, size: int = FRAME_CACHE) -> None:
        self.size = size
        self._frames: OrderedDict[str, bytes] = OrderedDict()

    @staticmethod
    def of(request: Request) -> Frames:
        """The cache of the app serving ``request``."""
        frames: Frames | None = getattr(request.app.state, "sse_frames", None)
        if frames is None:
            frames = request.app.state.sse_frames = Frames()
        return frames

    def encoded(self, row: EventRow) -> bytes:
        """The frame of ``row``, from the cache or encoded (and kept) now."""
        frame = self._frames.get(row.cursor)
        if frame is None:
            frame = self._frames[row.cursor] = _sse(to_event(row))
            if len(self._frames) > self.size:
                self._frames.popitem(last=False)
        return frame


@router.get("/v1/events", response_model=Page[Event], summary="One page of the feed.")
async def read_events(
    hive: WatchHive,
    prefix: Annotated[str, Query(description="Namespace prefix; empty for all.")] = "",
    after: Annotated[str | None, Query(description="Cursor; absent: oldest retained.")] = None,
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
) -> Response:
    page = await hive.read_events(prefix, after=after, limit=limit)
    return model_response(page)


@router.get("/v1/events/head", response_model=Head, summary="Cursor of the newest event.")
async def head(hive: WatchHive) -> Response:
    return model_response(Head(cursor=await hive.head()))


@router.get(
    "/v1/watch",
    summary="Follow the feed as Server-Sent Events (resumable with Last-Event-ID).",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def watch(
    request: Request,
    hive: WatchHive,
    prefix: Annotated[str, Query(description="Namespace prefix; empty for all.")] = "",
    after: Annotated[
        str | None, Query(description="Resume after this cursor; absent: from now.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias=LAST_EVENT_ID_HEADER, description="SSE resume cursor; wins over `after`."),
    ] = None,
) -> EventSourceResponse:
    start = last_event_id or after
    if start is None:
        start = await hive.head()
    # Read the first page before answering, so a bad prefix or an expired cursor
    # gets its problem+json status instead of a broken stream.
    first = await hive.read_events(prefix, after=start, limit=WATCH_BATCH)
    state = service_state(request)
    settings = state.hive.settings
    release = state.open_stream(hive.agent)

    frames = Frames.of(request)

    async def stream() -> AsyncIterator[bytes]:
        try:
            for event in first.items:
                yield _sse(event)
            async for rows in hive.watch_batches(prefix, after=first.next_cursor):
                yield b"".join([frames.encoded(row) for row in rows])
        finally:
            release()

    return EventSourceResponse(
        stream(),
        ping=int(settings.sse_ping_seconds),
        headers={CURSOR_HEADER: start, "Cache-Control": "no-store"},
        background=BackgroundTask(release),
    )


@router.post(
    "/v1/publish/{channel:anypath}",
    response_model=Event,
    summary="Publish an agent's own event on a channel (a namespace).",
)
async def publish(channel: str, body: PublishBody, hive: PublishHive) -> Response:
    event = await hive.publish(channel, body.payload)
    return model_response(event)
