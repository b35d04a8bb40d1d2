"""A Server-Sent Events reader for aiohttp responses (WHATWG HTML, "Server-sent events")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp


@dataclass(slots=True)
class SSEMessage:
    """One dispatched SSE event: its ``id`` (None if the event set none), type and data."""

    id: str | None
    event: str
    data: str


async def read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[SSEMessage]:
    """Yield the events of a ``text/event-stream`` body until the server closes it.

    Lines may end in LF, CR LF or CR; comment lines (``:``) are keep-alives and are
    skipped; ``data`` lines of one event are joined with LF. Reads raw chunks, so
    no line-length limit of the transport applies.
    """
    buffer = b""
    event_id: str | None = None
    event_type = ""
    data: list[str] = []
    async for chunk in response.content.iter_any():
        buffer += chunk
        while True:
            cut = _line_end(buffer)
            if cut is None:
                break
            end, after = cut
            line = buffer[:end].decode("utf-8", "replace")
            buffer = buffer[after:]
            if not line:
                if data:
                    yield SSEMessage(event_id, event_type or "message", "\n".join(data))
                event_id, event_type, data = None, "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "event":
                event_type = value


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None if no full line is buffered."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 == len(buffer):
        return None  # a CR at the end may be the first half of CR LF
    return cr, cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
