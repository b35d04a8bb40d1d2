"""A Server-Sent Events reader for aiohttp responses (WHATWG HTML, "Server-sent events").

The reader is linear in the size of the stream and bounded in memory: one line, and the
data of one event, may be at most ``max_bytes`` long (the client's
``client_max_sse_bytes``); a server that sends more (an endless line, or ``data:`` lines
without the blank line that ends an event) gets a :class:`~hivemem.errors.HivememError`
instead of making the client buffer without bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from hivemem.errors import HivememError

__all__ = ["DEFAULT_MAX_BYTES", "SSEMessage", "read_sse"]

#: The default bound of one line and of one event's data (8 MiB, as ``client_max_sse_bytes``).
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

_LF = 0x0A
_CR = 0x0D
_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEMessage:
    """One dispatched SSE event: its ``id`` (None if the event set none), type and data."""

    id: str | None
    event: str
    data: str


async def read_sse(
    response: aiohttp.ClientResponse, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> AsyncIterator[SSEMessage]:
    """Yield the events of a ``text/event-stream`` body until the server closes it.

    Lines may end in LF, CR LF or CR (a CR LF split across two reads counts as one line
    end); comment lines (``:``) are keep-alives and are skipped; ``data`` lines of one
    event are joined with LF; an event the stream ends in the middle of is dropped, as
    the standard says. Reads raw chunks (so no line limit of the transport applies) into
    one ``bytearray``: the work is linear in the bytes received.

    Args:
        response: an open aiohttp response whose body is the event stream.
        max_bytes: the longest line, and the most data one event may hold (bytes,
            counting the LFs that join its ``data`` lines); > 0.

    Raises:
        HivememError: a line or an event exceeded ``max_bytes``. This is a protocol
            error of the server, not a dropped connection: callers should not reconnect.
        aiohttp.ClientError, TimeoutError: reading the body failed.
    """
    if max_bytes <= 0:
        raise ValueError("max_bytes must be > 0")
    buffer = bytearray()
    scanned = 0  # bytes of buffer (from 0) known to hold no line end
    skip_lf = False  # the previous line ended in CR: an LF right after it belongs to it
    first = True
    event_id: str | None = None
    event_type = ""
    data: list[str] = []
    data_bytes = 0
    async for chunk in response.content.iter_any():
        if not chunk:
            continue
        buffer += chunk
        if first:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                continue  # may still be the start of a byte order mark
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            first = False
        start = 0  # start of the current line in buffer
        n = len(buffer)
        lf = -2  # the next LF at or after `start`; -1: none in buffer; -2: not searched yet
        while start < n:
            if skip_lf:
                skip_lf = False
                if buffer[start] == _LF:
                    start += 1
                    continue
            # Bytes before `scanned` were searched already, and an LF found is remembered
            # while the CR-terminated lines before it are cut: each byte is looked at once.
            if lf != -1 and lf < start:
                lf = buffer.find(b"\n", max(start, scanned))
            cr = buffer.find(b"\r", max(start, scanned), n if lf == -1 else lf)
            if lf == -1 and cr == -1:
                scanned = n
                break
            end = cr if cr != -1 else lf
            skip_lf = cr != -1
            if end - start > max_bytes:
                raise _too_long("line", max_bytes)
            line = buffer[start:end].decode("utf-8", "replace")
            raw_len = end - start
            start = scanned = end + 1
            if not line:
                if data:
                    yield SSEMessage(event_id, event_type or "message", "\n".join(data))
                event_id, event_type, data, data_bytes = None, "", [], 0
                continue
            if line[0] == ":":
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                # The prefix "data:" / "data: " is ASCII: its characters are its bytes.
                data_bytes += raw_len - (len(line) - len(value)) + (1 if data else 0)
                if data_bytes > max_bytes:
                    raise _too_long("event", max_bytes)
                data.append(value)
            elif name == "id":
                if "\0" not in value:
                    event_id = value
            elif name == "event":
                event_type = value
        if start:
            del buffer[:start]
            scanned = max(0, scanned - start)
        if len(buffer) > max_bytes:
            raise _too_long("line", max_bytes)


def _too_long(what: str, max_bytes: int) -> HivememError:
    return HivememError(
        f"the service sent an event-stream {what} longer than {max_bytes} bytes "
        "(client_max_sse_bytes); the stream was closed"
    )
