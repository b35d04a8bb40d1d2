"""RemoteHive: the Hive API over the service's HTTP API, with aiohttp."""

from __future__ import annotations

import asyncio
import builtins
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from pydantic import BaseModel
from yarl import URL

from hivemem.client.endpoints import Endpoint, Endpoints
from hivemem.client.sse import read_sse
from hivemem.config import Settings
from hivemem.core import validation as check
from hivemem.errors import HivememError, InvalidInput, NotFound, Unavailable, error_from_problem
from hivemem.hive import Hive
from hivemem.models import (
    DeleteOp,
    Event,
    Item,
    Message,
    MessageIn,
    Page,
    PutOp,
    SearchHit,
    Session,
)

__all__ = ["RemoteHive"]

M = TypeVar("M", bound=BaseModel)

AGENT_HEADER = "X-Hivemem-Agent"
REQUEST_ID_HEADER = "X-Hivemem-Request-Id"
#: Answers that say "this replica cannot serve now": tried again elsewhere.
_RETRY_STATUSES = frozenset({502, 503, 504})
START_HEADER = "X-Hivemem-Cursor"

_ItemPage = Page[Item]
_SessionPage = Page[Session]
_EventPage = Page[Event]
_StrPage = Page[str]


class _Shared:
    """The connection pool and replicas that the views of one RemoteHive share."""

    def __init__(self, endpoints: builtins.list[str], settings: Settings) -> None:
        self.endpoints = Endpoints(
            endpoints, settings.client_circuit_failures, settings.client_circuit_open_seconds
        )
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_seconds),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _parse_endpoints(url: str) -> builtins.list[str]:
    endpoints = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    for endpoint in endpoints:
        parsed = URL(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(f"{endpoint!r} is not an http(s)://host:port URL", field="url")
    if not endpoints:
        raise InvalidInput("no service URL given", field="url")
    return endpoints


def _item_path(namespace: str, key: str) -> str:
    if not isinstance(namespace, str) or not isinstance(key, str):
        raise InvalidInput("namespace and key must be strings", field="namespace")
    if "/" in key:  # the path's last '/' separates namespace and key
        raise InvalidInput("key may not contain '/' or control characters", field="key")
    return f"{quote(namespace, safe='/')}/{quote(key, safe='')}"


def _body(payload: Any, field: str) -> bytes:
    try:
        return orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidInput(f"{field} is not a JSON value: {exc}", field=field) from None


class RemoteHive(Hive):
    """A Hive served by ``hivemem serve`` at one or more URLs (replicas of one service).

    Raises the same exceptions as the embedded hive: the service's problem+json
    bodies are mapped back to :mod:`hivemem.errors` classes; a service that cannot
    be reached raises :class:`~hivemem.errors.Unavailable`.

    Requests are spread over the replicas in turn; a replica that fails is taken
    out for a while and probed back (a circuit breaker, :mod:`hivemem.client.endpoints`).
    A request that fails on one replica (connection, timeout, 502/503/504) is tried
    again on another with backoff. Every write carries a request id, so a write
    retried after a lost response is applied once.

    Args:
        url: ``http://host:port`` or several separated by commas.
        agent: the identity sent with every request (``X-Hivemem-Agent``).
        settings: ``request_timeout_seconds`` and the ``client_*`` settings apply.
    """

    def __init__(
        self,
        url: str,
        *,
        agent: str = "anonymous",
        settings: Settings | None = None,
        _shared: _Shared | None = None,
    ) -> None:
        self._settings = settings or Settings()
        self.agent = check.segment(agent, "agent", self._settings)
        self.url = url
        self._shared = _shared or _Shared(_parse_endpoints(url), self._settings)
        self._headers = {AGENT_HEADER: self.agent}

    def __repr__(self) -> str:
        return f"RemoteHive({self.url!r}, agent={self.agent!r})"

    # Transport -------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send a request; return (status, body) for 2xx, raise the mapped error otherwise.

        A write (any method but GET) carries a fresh request id (``X-Hivemem-Request-Id``),
        the same on every try, so the service applies it once however often it is sent.
        Connection failures, timeouts and 502/503/504 answers are tried again on the next
        healthy replica (see :mod:`hivemem.client.endpoints`), up to ``client_attempts``
        tries with exponential backoff and full jitter; other errors are raised at once.
        """
        session = self._shared.open()
        settings = self._settings
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        all_headers = dict(self._headers)
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if method != "GET":
            all_headers[REQUEST_ID_HEADER] = uuid.uuid4().hex
        if headers:
            all_headers.update(headers)
        endpoints = self._shared.endpoints
        last_error: Exception | None = None
        last: Endpoint | None = None
        for attempt in range(settings.client_attempts):
            if attempt:
                cap = min(1.0, settings.client_backoff_seconds * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, cap))
            ep = endpoints.pick(avoid=last)
            last = ep
            url = URL(f"{ep.url}{path}", encoded=True)
            try:
                async with session.request(
                    method, url, params=query or None, data=body, headers=all_headers
                ) as resp:
                    data = await resp.read()
                    status = resp.status
            except aiohttp.ClientConnectorError as exc:  # never reached the service
                last_error = exc
                endpoints.failed(ep, refused=True)
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = exc
                endpoints.failed(ep)
                continue
            if status in _RETRY_STATUSES:
                last_error = _problem(status, data)
                endpoints.failed(ep)
                continue
            endpoints.succeeded(ep)
            if status >= 400:
                raise _problem(status, data)
            return status, data
        if isinstance(last_error, HivememError):
            raise last_error
        raise Unavailable(
            f"{method} {path}: no hivemem replica answered after {settings.client_attempts} "
            f"tries ({', '.join(ep.url for ep in endpoints.all)}): {_describe(last_error)}"
        ) from last_error

    async def _model(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        _, data = await self._request(method, path, **kw)
        return model.model_validate_json(data)

    # Lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        self._shared.open()

    async def close(self) -> None:
        await self._shared.close()

    def as_agent(self, agent: str) -> RemoteHive:
        return RemoteHive(self.url, agent=agent, settings=self._settings, _shared=self._shared)

    async def ping(self) -> None:
        await self._request("GET", "/readyz")

    # Items -----------------------------------------------------------------------

    async def put(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        if_version: int | None = None,
        ttl: float | None = None,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Item:
        payload: dict[str, Any] = {"value": value}
        for name, arg in (
            ("if_version", if_version),
            ("ttl", ttl),
            ("text", text),
            ("metadata", metadata),
        ):
            if arg is not None:
                payload[name] = arg
        return await self._model(
            Item, "PUT", f"/v1/items/{_item_path(namespace, key)}", body=_body(payload, "value")
        )

    async def get(self, namespace: str, key: str) -> Item | None:
        try:
            return await self._model(Item, "GET", f"/v1/items/{_item_path(namespace, key)}")
        except NotFound as exc:
            if exc.field == "key":
                return None
            raise

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        try:
            await self._request(
                "DELETE",
                f"/v1/items/{_item_path(namespace, key)}",
                params={"if_version": if_version},
            )
        except NotFound as exc:
            if exc.field == "key":
                return False
            raise
        return True

    async def list(
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[Item]:
        return await self._model(
            _ItemPage,
            "GET",
            "/v1/items",
            params={"prefix": prefix, "limit": limit, "cursor": cursor},
        )

    async def list_namespaces(
        self,
        prefix: str = "",
        *,
        max_depth: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[str]:
        return await self._model(
            _StrPage,
            "GET",
            "/v1/namespaces",
            params={"prefix": prefix, "max_depth": max_depth, "limit": limit, "cursor": cursor},
        )

    async def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        if not isinstance(ops, Sequence) or isinstance(ops, str | bytes):
            raise InvalidInput("ops must be a list of operations", field="ops")
        wire = [op.model_dump() if isinstance(op, BaseModel) else op for op in ops]
        _, data = await self._request("POST", "/v1/batch", body=_body({"ops": wire}, "ops"))
        results = orjson.loads(data)["results"]
        return [r if isinstance(r, bool) else Item.model_validate(r) for r in results]

    async def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        _, data = await self._request(
            "GET", f"/v1/history/{_item_path(namespace, key)}", params={"limit": limit}
        )
        return [Item.model_validate(i) for i in orjson.loads(data)["items"]]

    async def search(
        self,
        prefix: str,
        query: str,
        *,
        filter: Mapping[str, Any] | None = None,
        author: str | None = None,
        updated_after: datetime | float | None = None,
        updated_before: datetime | float | None = None,
        mode: Literal["hybrid", "vector", "lexical"] = "hybrid",
        limit: int = 10,
    ) -> builtins.list[SearchHit]:
        payload: dict[str, Any] = {"prefix": prefix, "query": query, "mode": mode, "limit": limit}
        for name, arg in (
            ("filter", filter),
            ("author", author),
            ("updated_after", updated_after),
            ("updated_before", updated_before),
        ):
            if arg is not None:
                payload[name] = arg.isoformat() if isinstance(arg, datetime) else arg
        _, data = await self._request("POST", "/v1/search", body=_body(payload, "filter"))
        return [SearchHit.model_validate(h) for h in orjson.loads(data)["hits"]]

    # Sessions --------------------------------------------------------------------

    @staticmethod
    def _sid(session_id: str) -> str:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInput("session_id must be a non-empty string", field="session_id")
        return quote(session_id, safe="")

    async def create_session(
        self,
        *,
        app: str,
        user: str | None = None,
        agent: str | None = None,
        session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
    ) -> Session:
        payload = {
            "app": app,
            "user": user,
            "agent": agent,
            "session_id": session_id,
            "metadata": metadata,
            "state": state,
        }
        return await self._model(Session, "POST", "/v1/sessions", body=_body(payload, "body"))

    async def get_session(self, session_id: str) -> Session:
        return await self._model(Session, "GET", f"/v1/sessions/{self._sid(session_id)}")

    async def list_sessions(
        self,
        *,
        app: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Session]:
        return await self._model(
            _SessionPage,
            "GET",
            "/v1/sessions",
            params={"app": app, "user": user, "agent": agent, "limit": limit, "cursor": cursor},
        )

    async def delete_session(self, session_id: str) -> bool:
        try:
            await self._request("DELETE", f"/v1/sessions/{self._sid(session_id)}")
        except NotFound:
            return False
        return True

    async def append_messages(
        self, session_id: str, messages: Sequence[MessageIn | dict[str, Any]]
    ) -> builtins.list[Message]:
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
            raise InvalidInput("messages must be a list", field="messages")
        wire = [m.model_dump() if isinstance(m, BaseModel) else m for m in messages]
        _, data = await self._request(
            "POST",
            f"/v1/sessions/{self._sid(session_id)}/messages",
            body=_body({"messages": wire}, "messages"),
        )
        return [Message.model_validate(m) for m in orjson.loads(data)["messages"]]

    async def get_messages(
        self, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[Message]:
        _, data = await self._request(
            "GET",
            f"/v1/sessions/{self._sid(session_id)}/messages",
            params={"after": after, "limit": limit},
        )
        return [Message.model_validate(m) for m in orjson.loads(data)["messages"]]

    async def save_state(
        self, session_id: str, state: dict[str, Any], *, if_version: int | None = None
    ) -> Session:
        payload: dict[str, Any] = {"state": state}
        if if_version is not None:
            payload["if_version"] = if_version
        return await self._model(
            Session,
            "PUT",
            f"/v1/sessions/{self._sid(session_id)}/state",
            body=_body(payload, "state"),
        )

    # Events ----------------------------------------------------------------------

    async def read_events(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100
    ) -> Page[Event]:
        return await self._model(
            _EventPage,
            "GET",
            "/v1/events",
            params={"prefix": prefix, "after": after, "limit": limit},
        )

    async def head(self) -> str:
        _, data = await self._request("GET", "/v1/events/head")
        return str(orjson.loads(data)["cursor"])

    async def watch(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[Event]:
        """See :meth:`Hive.watch`. Reconnects by itself with the last cursor when the
        stream drops, trying each endpoint with exponential backoff (0.1 s doubling to
        2 s); raises Unavailable after ``watch_reconnect_seconds`` without a connection."""
        session = self._shared.open()
        cursor = after
        delay = 0.1
        down_since: float | None = None
        stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._settings.request_timeout_seconds,
            sock_read=self._settings.sse_ping_seconds * 3,
        )
        endpoints = self._shared.endpoints
        last: Endpoint | None = None
        while True:
            ep = endpoints.pick(avoid=last)
            last = ep
            endpoint = ep.url
            headers = dict(self._headers)
            if cursor is not None:
                headers["Last-Event-ID"] = cursor
            url = URL(f"{endpoint}/v1/watch", encoded=True)
            try:
                async with session.get(
                    url, params={"prefix": prefix}, headers=headers, timeout=stream_timeout
                ) as resp:
                    if resp.status >= 400:
                        error = _problem(resp.status, await resp.read())
                        if resp.status < 500:
                            raise error
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=error.message
                        )
                    if cursor is None:
                        cursor = resp.headers.get(START_HEADER, "0")
                    endpoints.succeeded(ep)
                    delay, down_since = 0.1, None
                    async for message in read_sse(resp):
                        if message.event != "hivemem":
                            continue
                        event = Event.model_validate_json(message.data)
                        cursor = event.cursor
                        yield event
            except aiohttp.ClientConnectorError:
                endpoints.failed(ep, refused=True)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                endpoints.failed(ep)
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > self._settings.watch_reconnect_seconds:
                raise Unavailable(
                    f"watch lost its connection and could not reconnect for "
                    f"{self._settings.watch_reconnect_seconds:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def publish(self, channel: str, payload: Any) -> Event:
        if not isinstance(channel, str):
            raise InvalidInput("channel must be a string", field="channel")
        return await self._model(
            Event,
            "POST",
            f"/v1/publish/{quote(channel, safe='/')}",
            body=_body({"payload": payload}, "payload"),
        )


def _problem(status: int, data: bytes) -> HivememError:
    try:
        body = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        body = None
    return error_from_problem(status, body if isinstance(body, dict) else None)


def _describe(exc: BaseException | None) -> str:
    """A short description of a transport error for messages to people."""
    if exc is None:
        return "no attempt made"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
