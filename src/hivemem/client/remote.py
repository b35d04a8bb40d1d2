"""RemoteHive: the Hive API over the service's HTTP API, with aiohttp."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import enum
import math
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NoReturn, TypeVar, cast
from urllib.parse import quote

import aiohttp
import orjson
from pydantic import BaseModel, SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
    wait_random_exponential,
)
from yarl import URL

from hivemem import validation as check
from hivemem.backoff import Backoff
from hivemem.client.endpoints import Endpoint, Endpoints
from hivemem.client.sse import read_sse
from hivemem.config import Settings
from hivemem.errors import (
    Conflict,
    HivememError,
    InvalidInput,
    NotFound,
    RateLimited,
    Unavailable,
)
from hivemem.hive import Heartbeats, Hive
from hivemem.models import (
    AgentRecord,
    DeleteOp,
    Event,
    IndexStatus,
    Item,
    Lease,
    Message,
    MessageIn,
    NamespaceCount,
    OnceTicket,
    Page,
    PutOp,
    QueueStats,
    SearchHit,
    Session,
    Signal,
    Task,
)
from hivemem.wire import (
    AGENT_HEADER,
    AUTHORIZATION_HEADER,
    CURSOR_HEADER,
    JSON_MEDIA_TYPE,
    LAST_EVENT_ID_HEADER,
    LOCATION_HEADER,
    REQUEST_ID_HEADER,
    SSE_EVENT,
    BatchResult,
    Head,
    HistoryResult,
    Messages,
    SearchResult,
    error_from_response,
    healthy_param,
    item_path,
    retry_after_seconds,
)

__all__ = ["RemoteHive"]

M = TypeVar("M", bound=BaseModel)
_T = TypeVar("_T")

#: Answers that say "this replica cannot serve now": tried again elsewhere.
_RETRY_STATUSES = frozenset({502, 503, 504})
#: The longest pause between two tries of one request on the replicas (seconds).
_MAX_BACKOFF_SECONDS = 1.0
#: Shortest pause before a read answered 429 is tried again (seconds), whatever
#: Retry-After says, so that a server answering "Retry-After: 0" is not hammered.
_MIN_RATE_LIMIT_PAUSE = 0.1

_ItemPage = Page[Item]
_SessionPage = Page[Session]
_EventPage = Page[Event]
_StrPage = Page[str]
_TaskPage = Page[Task]
#: What "no timeout" means to a client wait loop: the deadline of a wait of None is
#: this far away (seconds); each request waits at most max_wait_seconds of it.
_FOREVER = 10 * 365 * 86400.0


class _Shared:
    """The connection pool, replicas and credentials that the views of one RemoteHive share.

    Args:
        endpoints: the replicas' base URLs (already checked by :func:`_parse_endpoints`).
        settings: ``request_timeout_seconds``, ``client_ca_file`` and the circuit settings.
        authorization: the whole ``Authorization`` header value, or None to send none.

    Raises:
        InvalidInput: ``client_ca_file`` cannot be read as a PEM CA bundle
            (field ``client_ca_file``).
    """

    def __init__(
        self,
        endpoints: builtins.list[str],
        settings: Settings,
        authorization: str | None = None,
    ) -> None:
        self.endpoints = Endpoints(
            endpoints, settings.client_circuit_failures, settings.client_circuit_open_seconds
        )
        #: How a request is tried again on another replica: up to ``client_attempts``
        #: tries, the n-th after a pause drawn uniformly from 0 .. min(1 s,
        #: ``client_backoff_seconds`` * 2**(n-2)) ("full jitter", M. Brooker, "Exponential
        #: Backoff and Jitter", AWS Architecture Blog, 2015). Only a replica's failure
        #: (:class:`_ReplicaFailed`) is tried again. Each request that needs it uses a
        #: copy (tenacity keeps a running call's state on the object).
        self.retrying = AsyncRetrying(
            stop=stop_after_attempt(settings.client_attempts),
            wait=wait_random_exponential(
                multiplier=settings.client_backoff_seconds, max=_MAX_BACKOFF_SECONDS
            ),
            retry=retry_if_exception_type(_ReplicaFailed),
            reraise=True,
            sleep=asyncio.sleep,
        )
        self.settings = settings
        self.authorization = authorization
        self.ssl_context = _ssl_context(settings.client_ca_file, endpoints)
        self.session: aiohttp.ClientSession | None = None
        #: The registry heartbeats the views of this hive send (register(heartbeat=True)).
        self.heartbeats = Heartbeats()

    def __repr__(self) -> str:  # never shows the credentials
        return f"<_Shared {[ep.url for ep in self.endpoints.all]}>"

    def open(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=256,
                    ttl_dns_cache=300,
                    ssl=self.ssl_context if self.ssl_context is not None else True,
                ),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_seconds),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self.session

    async def close(self) -> None:
        await self.heartbeats.close()
        if self.session is not None:
            await self.session.close()
            self.session = None


def _ssl_context(ca_file: str | None, endpoints: builtins.list[str]) -> ssl.SSLContext | None:
    """The TLS context trusting only ``ca_file`` (PEM), or None for the system's default
    trust store (no CA file set, or no https URL to use it for)."""
    if not ca_file or not any(URL(u).scheme == "https" for u in endpoints):
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"client_ca_file {ca_file!r} is not a readable PEM CA bundle: {exc}",
            field="client_ca_file",
        ) from None


def _authorization(api_key: str | SecretStr | None) -> str | None:
    """The ``Authorization`` header value for ``api_key`` (None or empty: no header).

    Raises:
        InvalidInput: the key is not a string of visible ASCII characters (field
            ``api_key``); the message never shows the key.
    """
    if api_key is None:
        return None
    key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    if not isinstance(key, str):
        raise InvalidInput("api_key must be a string", field="api_key")
    key = key.strip()
    if not key:
        return None
    if not key.isascii() or not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise InvalidInput(
            "api_key may hold only visible ASCII characters (no spaces or line breaks)",
            field="api_key",
        )
    return f"Bearer {key}"


def _parse_endpoints(url: str) -> builtins.list[str]:
    endpoints = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    for endpoint in endpoints:
        parsed = URL(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(f"{endpoint!r} is not an http(s)://host:port URL", field="url")
    if not endpoints:
        raise InvalidInput("no service URL given", field="url")
    return endpoints


def _body(payload: Any, field: str) -> bytes:
    """``payload`` as JSON bytes (orjson).

    orjson writes NaN and ±Infinity as ``null`` without complaint, which would store
    something other than what the caller passed. So when (and only when) the output
    holds ``null``, the payload is walked for a non-finite float; the common path costs
    one substring search.

    Raises:
        InvalidInput: the payload is not a JSON value (field ``field``), or holds NaN or
            ±Infinity (field: its dotted path, e.g. ``metadata.score`` or ``ops.0.ttl``).
    """
    try:
        data = orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidInput(f"{field} is not a JSON value: {exc}", field=field) from None
    if b"null" in data:
        found = _non_finite(payload, "")
        if found is not None:
            path, value = found
            path = path or field
            raise InvalidInput(
                f"{path} is {value!r}: NaN and Infinity are not JSON numbers and cannot be sent",
                field=path,
            )
    return data


def _non_finite(obj: Any, path: str) -> tuple[str, float] | None:
    """The dotted path and value of the first NaN/±Infinity in what orjson serialises
    (dicts, lists, tuples, dataclasses, enums), or None. orjson refuses nesting deeper
    than 255, so the recursion here is bounded once ``orjson.dumps`` succeeded."""
    if type(obj) is float:
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif isinstance(obj, enum.Enum):
        return _non_finite(obj.value, path)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _query(params: Mapping[str, Any] | None) -> dict[str, str]:
    """Query parameters as strings, leaving out None.

    Raises:
        InvalidInput: a parameter is NaN or ±Infinity (field: its name).
    """
    query: dict[str, str] = {}
    for name, value in (params or {}).items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{name} must be a finite number, not {value!r}", field=name)
        query[name] = str(value)
    return query


class _ReplicaFailed(Exception):
    """One try of a request failed on its replica (no connection, a timeout, or a
    502/503/504 answer): the request may go to another replica.

    Attributes:
        cause: the transport error, or the error the 5xx answer's problem names.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _RateLimitWait:
    """The waits of one read answered 429: each pause is what ``Retry-After`` asked (see
    :func:`_rate_limit_pause`), all of them within ``client_rate_limit_wait_seconds`` of
    the first 429. Gives tenacity its wait (:meth:`wait`), stop (:meth:`spent`) and
    last word (:meth:`give_up`); the watch stream asks :meth:`pause` directly.

    Args:
        settings: ``client_rate_limit_wait_seconds`` applies.
        what: the request, for the final error (``GET /v1/events/head``).
    """

    def __init__(self, settings: Settings, what: str) -> None:
        self.settings = settings
        self.what = what
        self.since: float | None = None
        self.waited = 0.0
        self.next: float | None = None

    def pause(self, retry_after: float) -> float | None:
        """Seconds to sleep before trying again after a 429 asking for ``retry_after``
        seconds, or None when that no longer fits in the budget."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.waited = now - self.since
        self.next = _rate_limit_pause(retry_after, self.waited, self.settings)
        return self.next

    def reset(self) -> None:
        """A request got through: the next 429 starts a new budget."""
        self.since = None

    def wait(self, state: RetryCallState) -> float:
        return self.pause(_limited(state).retry_after) or 0.0

    def spent(self, state: RetryCallState) -> bool:
        return self.next is None

    def give_up(self, state: RetryCallState) -> NoReturn:
        """Raise the last 429 as RateLimited, saying how long it was waited out."""
        exc = _limited(state)
        raise RateLimited(
            f"{self.what}: rate limited by the service ({exc.message}); "
            f"still limited after {self.waited:.1f} s of waiting "
            f"(client_rate_limit_wait_seconds="
            f"{self.settings.client_rate_limit_wait_seconds:g}), "
            f"retry after {exc.retry_after:g} s",
            field=exc.field,
            retry_after=exc.retry_after,
        )


async def _retry_after_failure(
    retrying: AsyncRetrying,
    first: BaseException,
    attempt: Callable[..., Awaitable[_T]],
    *args: Any,
) -> _T:
    """``attempt(*args)`` run again under ``retrying`` after a first try that raised
    ``first``: the policy sees that failure as its own first try (it waits, counts and
    stops as if it had run it), then runs ``attempt`` for the further tries.

    The first try is made outside the policy because almost every request succeeds at
    once, and a tenacity call costs about 20 µs (a tenth of a request's client CPU).

    Raises:
        BaseException: what the policy raises when it stops or does not retry.
    """
    replay = [first]

    async def again() -> _T:
        if replay:
            raise replay.pop()
        return await attempt(*args)

    result: _T = await retrying(again)
    return result


def _limited(state: RetryCallState) -> RateLimited:
    """The RateLimited that ended the try ``state`` reports."""
    assert state.outcome is not None  # tenacity asks only after a try ended
    return cast(RateLimited, state.outcome.exception())  # the only one the layer retries


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

    Trust and limits:

    - the API key goes as ``Authorization: Bearer <key>`` with every request, the watch
      stream included; it never appears in ``repr`` or in error messages;
    - with ``client_ca_file``, https replicas are verified against that CA bundle only
      (otherwise against the system's trust store);
    - redirects are never followed (they could carry the key and writes to another
      host): a 3xx answer raises :class:`~hivemem.errors.HivememError` naming its
      ``Location``, without retry;
    - NaN and ±Infinity anywhere in an argument raise
      :class:`~hivemem.errors.InvalidInput` before anything is sent (JSON has no such
      numbers; orjson would send ``null``);
    - a read (GET) answered 429 waits ``Retry-After`` seconds (plus up to 10 % jitter)
      and tries again, for at most ``client_rate_limit_wait_seconds`` in all, then
      raises :class:`~hivemem.errors.RateLimited`; a write answered 429 raises it at
      once. A 429 is an answer, not a replica failure: it never opens a circuit;
    - one line, and one event, of the watch stream may be at most
      ``client_max_sse_bytes`` long.

    Args:
        url: ``http(s)://host:port`` or several separated by commas.
        agent: the identity sent with every request (``X-Hivemem-Agent``).
        api_key: the key sent as ``Authorization: Bearer``; None (the default) takes
            ``settings.api_key`` (env ``HIVEMEM_API_KEY``); ``""`` sends no key.
            Views made with :meth:`as_agent` share it.
        settings: ``request_timeout_seconds``, ``api_key``, ``watch_reconnect_seconds``,
            ``sse_ping_seconds`` and the ``client_*`` settings apply.

    Raises:
        InvalidInput: a malformed URL (field ``url``), agent (``agent``), API key
            (``api_key``) or an unreadable ``client_ca_file`` (``client_ca_file``).
    """

    def __init__(
        self,
        url: str,
        *,
        agent: str = "anonymous",
        api_key: str | SecretStr | None = None,
        settings: Settings | None = None,
        _shared: _Shared | None = None,
    ) -> None:
        self._settings = settings or Settings()
        self.agent = check.segment(agent, "agent", self._settings)
        self.url = url
        if _shared is None:
            authorization = _authorization(
                api_key if api_key is not None else self._settings.api_key
            )
            _shared = _Shared(_parse_endpoints(url), self._settings, authorization)
        self._shared = _shared
        self._headers = {AGENT_HEADER: self.agent}
        if _shared.authorization is not None:
            self._headers[AUTHORIZATION_HEADER] = _shared.authorization

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
        seconds: float | None = None,
    ) -> tuple[int, bytes]:
        """Send a request; return (status, body) for 2xx, raise the mapped error otherwise.

        ``seconds`` (a timeout) replaces ``request_timeout_seconds`` for this request: a
        long poll asking the service to wait ``w`` seconds passes more than ``w``.

        A write (any method but GET) carries a fresh request id (``X-Hivemem-Request-Id``),
        the same on every try, so the service applies it once however often it is sent.
        Connection failures, timeouts and 502/503/504 answers are tried again on the next
        healthy replica (see :mod:`hivemem.client.endpoints`), up to ``client_attempts``
        tries with exponential backoff and full jitter; other errors are raised at once.
        A GET answered 429 is tried again after ``Retry-After`` (see :class:`RemoteHive`).

        Raises:
            InvalidInput: a query parameter is NaN or ±Infinity (before anything is sent).
            RateLimited: 429 on a write, or on a read still limited after
                ``client_rate_limit_wait_seconds``.
            HivememError: a 3xx answer (redirects are not followed), or the error class
                the service's problem+json names.
            Unavailable: no replica answered in ``client_attempts`` tries.
        """
        query = _query(params)
        all_headers = dict(self._headers)
        if body is not None:
            all_headers["Content-Type"] = JSON_MEDIA_TYPE
        if method != "GET":
            all_headers[REQUEST_ID_HEADER] = uuid.uuid4().hex
        if headers:
            all_headers.update(headers)
        if self._settings.tracing:
            return await self._traced(method, path, query, body, all_headers, seconds)
        return await self._answer(method, path, query, body, all_headers, seconds)

    async def _traced(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes | None,
        all_headers: dict[str, str],
        seconds: float | None,
    ) -> tuple[int, bytes]:
        """:meth:`_answer` in a CLIENT span ``hivemem <METHOD>`` whose W3C trace context
        goes with the request (see :mod:`hivemem.tracing`)."""
        from opentelemetry.trace import SpanKind

        from hivemem import tracing

        with tracing.tracer().start_as_current_span(
            f"hivemem {method}",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.path": path.split("?", 1)[0]},
        ) as span:
            tracing.inject(all_headers)
            status, data = await self._answer(method, path, query, body, all_headers, seconds)
            span.set_attribute("http.response.status_code", status)
            return status, data

    async def _answer(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes | None,
        all_headers: dict[str, str],
        seconds: float | None,
    ) -> tuple[int, bytes]:
        """Send, and wait out a GET's rate limit (see :meth:`_request`)."""
        try:
            return await self._send(method, path, query, body, all_headers, seconds)
        except RateLimited as exc:
            if method != "GET":  # a write answered 429 is not sent again
                raise
            first = exc
        limited = _RateLimitWait(self._settings, f"{method} {path}")
        waiting = AsyncRetrying(
            retry=retry_if_exception_type(RateLimited),
            wait=limited.wait,
            stop=limited.spent,
            retry_error_callback=limited.give_up,
            sleep=asyncio.sleep,
        )
        return await _retry_after_failure(
            waiting, first, self._send, method, path, query, body, all_headers, seconds
        )

    async def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes | None,
        headers: Mapping[str, str],
        seconds: float | None = None,
    ) -> tuple[int, bytes]:
        """One request, tried on up to ``client_attempts`` replicas (the policy of
        ``_Shared.retrying``); a 429 raises RateLimited whose ``retry_after`` comes from
        ``Retry-After``.

        Raises:
            HivememError: as :meth:`_request`, and the error of the last 502/503/504 when
                every try was answered so.
            Unavailable: no replica answered in ``client_attempts`` tries.
        """
        session = self._shared.open()
        per_request = session.timeout if seconds is None else aiohttp.ClientTimeout(total=seconds)
        tried: builtins.list[Endpoint] = []
        args = (session, tried, method, path, query, body, headers, per_request)
        try:
            return await self._try(*args)
        except _ReplicaFailed as exc:
            first = exc
        try:
            return await _retry_after_failure(self._shared.retrying.copy(), first, self._try, *args)
        except _ReplicaFailed as failed:
            if isinstance(failed.cause, HivememError):
                raise failed.cause from None
            raise Unavailable(
                f"{method} {path}: no hivemem replica answered after "
                f"{self._settings.client_attempts} tries "
                f"({', '.join(ep.url for ep in self._shared.endpoints.all)}): "
                f"{_describe(failed.cause)}"
            ) from failed.cause

    async def _try(
        self,
        session: aiohttp.ClientSession,
        tried: builtins.list[Endpoint],
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes | None,
        headers: Mapping[str, str],
        per_request: aiohttp.ClientTimeout,
    ) -> tuple[int, bytes]:
        """One try of a request on the next replica (another than the last one in
        ``tried`` when there is a choice), recorded in the replica's circuit.

        Raises:
            _ReplicaFailed: no connection, a timeout, or a 502/503/504 answer.
            RateLimited: a 429 (``retry_after`` from ``Retry-After``).
            HivememError: a 3xx, or the error another 4xx/5xx answer's problem names.
        """
        endpoints = self._shared.endpoints
        ep = endpoints.pick(avoid=tried[-1] if tried else None)
        tried.append(ep)
        url = URL(f"{ep.url}{path}", encoded=True)
        try:
            async with session.request(
                method,
                url,
                params=query or None,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=per_request,
            ) as resp:
                data = await resp.read()
                status = resp.status
                resp_headers = resp.headers
        except aiohttp.ClientConnectorError as exc:  # never reached the service
            endpoints.failed(ep, refused=True)
            raise _ReplicaFailed(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            endpoints.failed(ep)
            raise _ReplicaFailed(exc) from exc
        if status in _RETRY_STATUSES:
            endpoints.failed(ep)
            raise _ReplicaFailed(error_from_response(status, data))
        endpoints.succeeded(ep)  # any other answer, 3xx and 429 included, is health
        if 300 <= status < 400:
            raise _redirect(method, path, ep.url, status, resp_headers)
        if status == 429:
            error = error_from_response(status, data)
            raise RateLimited(
                error.message, field=error.field, retry_after=_retry_after(resp_headers, error)
            )
        if status >= 400:
            raise error_from_response(status, data)
        return status, data

    async def _model(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        _, data = await self._request(method, path, **kw)
        return model.model_validate_json(data)

    # Lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        self._shared.open()

    async def close(self) -> None:
        """Stop the registry heartbeats and close the connections (shared by the views)."""
        await self._shared.close()

    def as_agent(self, agent: str) -> RemoteHive:
        """A view acting as ``agent`` over the same connections, replicas and API key."""
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
        fence: tuple[str, int] | None = None,
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
        if fence is not None:
            if not isinstance(fence, tuple | builtins.list) or len(fence) != 2:
                raise InvalidInput("fence must be a (lease name, token) pair", field="fence")
            payload["fence"] = {"lease": fence[0], "token": fence[1]}
        return await self._model(
            Item, "PUT", f"/v1/items/{item_path(namespace, key)}", body=_body(payload, "value")
        )

    async def get(self, namespace: str, key: str) -> Item | None:
        try:
            return await self._model(Item, "GET", f"/v1/items/{item_path(namespace, key)}")
        except NotFound as exc:
            if exc.field == "key":
                return None
            raise

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        try:
            await self._request(
                "DELETE",
                f"/v1/items/{item_path(namespace, key)}",
                params={"if_version": if_version},
            )
        except NotFound as exc:
            if exc.field == "key":
                return False
            raise
        return True

    async def list(
        self,
        prefix: str = "",
        *,
        key_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Item]:
        if key_prefix is not None:  # a query parameter is text: refuse a number as local does
            check.key_prefix(key_prefix, self._settings)
        return await self._model(
            _ItemPage,
            "GET",
            "/v1/items",
            params={"prefix": prefix, "key_prefix": key_prefix, "limit": limit, "cursor": cursor},
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

    async def namespace_counts(
        self, prefix: str = "", *, limit: int = 100, cursor: str | None = None
    ) -> Page[NamespaceCount]:
        return await self._model(
            Page[NamespaceCount],
            "GET",
            "/v1/namespaces/counts",
            params={"prefix": prefix, "limit": limit, "cursor": cursor},
        )

    async def batch(self, ops: Sequence[PutOp | DeleteOp]) -> builtins.list[Item | bool]:
        if not isinstance(ops, Sequence) or isinstance(ops, str | bytes):
            raise InvalidInput("ops must be a list of operations", field="ops")
        wire = [op.model_dump() if isinstance(op, BaseModel) else op for op in ops]
        _, data = await self._request("POST", "/v1/batch", body=_body({"ops": wire}, "ops"))
        return BatchResult.model_validate_json(data).results

    async def history(self, namespace: str, key: str, *, limit: int = 100) -> builtins.list[Item]:
        _, data = await self._request(
            "GET", f"/v1/history/{item_path(namespace, key)}", params={"limit": limit}
        )
        return HistoryResult.model_validate_json(data).items

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
        consistency: Literal["eventual", "indexed"] = "eventual",
    ) -> builtins.list[SearchHit]:
        payload: dict[str, Any] = {"prefix": prefix, "query": query, "mode": mode, "limit": limit}
        if consistency != "eventual":
            payload["consistency"] = consistency
        for name, arg in (
            ("filter", filter),
            ("author", author),
            ("updated_after", updated_after),
            ("updated_before", updated_before),
        ):
            if arg is not None:
                payload[name] = arg.isoformat() if isinstance(arg, datetime) else arg
        _, data = await self._request("POST", "/v1/search", body=_body(payload, "filter"))
        return SearchResult.model_validate_json(data).hits

    async def wait_indexed(
        self,
        cursor: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bool:
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidInput("cursor must be a cursor string", field="cursor")
        wait = 30.0 if timeout is None else timeout
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < 1e9:
            raise InvalidInput("timeout must be a number of seconds >= 0", field="timeout")
        # The service answers within its max_wait_seconds; ask again until ours ends.
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            _, data = await self._request(
                "POST",
                "/v1/index/wait",
                body=_body({"cursor": cursor, "timeout": left}, "timeout"),
                seconds=self._timeout(left),
            )
            if orjson.loads(data)["indexed"]:
                return True
            if time.monotonic() >= deadline:
                return False

    async def index_status(self) -> IndexStatus:
        _, data = await self._request("GET", "/v1/index")
        return IndexStatus.model_validate_json(data)

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
        ttl: float | None = None,
    ) -> Session:
        payload: dict[str, Any] = {
            "app": app,
            "user": user,
            "agent": agent,
            "session_id": session_id,
            "metadata": metadata,
            "state": state,
        }
        if ttl is not None:
            payload["ttl"] = ttl
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
        return Messages.model_validate_json(data).messages

    async def get_messages(
        self, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[Message]:
        _, data = await self._request(
            "GET",
            f"/v1/sessions/{self._sid(session_id)}/messages",
            params={"after": after, "limit": limit},
        )
        return Messages.model_validate_json(data).messages

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
        return Head.model_validate_json(data).cursor

    async def watch(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[Event]:
        """See :meth:`Hive.watch`. Reconnects by itself with the last cursor when the
        stream drops, trying each endpoint with exponential backoff (0.1 s doubling to
        2 s). Opening the stream answered 429 waits ``Retry-After`` as a read does.

        Raises:
            Unavailable: no connection for ``watch_reconnect_seconds``.
            RateLimited: still answered 429 after ``client_rate_limit_wait_seconds``.
            HivememError: a 3xx answer (redirects are not followed); a stream line or
                event longer than ``client_max_sse_bytes`` (a protocol error: the stream
                is closed, not reopened); or the 4xx error the service answered.
        """
        session = self._shared.open()
        settings = self._settings
        cursor = after
        backoff = Backoff(wait_exponential_jitter(initial=0.1, max=2.0, jitter=0.1))
        down_since: float | None = None
        limited = _RateLimitWait(settings, "watch")
        stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.request_timeout_seconds,
            sock_read=settings.sse_ping_seconds * 3,
        )
        endpoints = self._shared.endpoints
        last: Endpoint | None = None
        while True:
            ep = endpoints.pick(avoid=last)
            last = ep
            endpoint = ep.url
            headers = dict(self._headers)
            if cursor is not None:
                headers[LAST_EVENT_ID_HEADER] = cursor
            url = URL(f"{endpoint}/v1/watch", encoded=True)
            pause: float | None = None
            try:
                async with session.get(
                    url,
                    params={"prefix": prefix},
                    headers=headers,
                    timeout=stream_timeout,
                    allow_redirects=False,
                ) as resp:
                    if 300 <= resp.status < 400:
                        endpoints.succeeded(ep)
                        raise _redirect("GET", "/v1/watch", endpoint, resp.status, resp.headers)
                    if resp.status == 429:
                        endpoints.succeeded(ep)
                        error = error_from_response(resp.status, await resp.read())
                        retry_after = _retry_after(resp.headers, error)
                        pause = limited.pause(retry_after)
                        if pause is None:
                            raise RateLimited(
                                f"watch: rate limited by the service ({error.message}); "
                                f"still limited after {limited.waited:.1f} s of waiting",
                                field=error.field,
                                retry_after=retry_after,
                            )
                    elif resp.status >= 400:
                        error = error_from_response(resp.status, await resp.read())
                        if resp.status < 500:
                            raise error
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=error.message
                        )
                    else:
                        if cursor is None:
                            cursor = resp.headers.get(CURSOR_HEADER, "0")
                        endpoints.succeeded(ep)
                        backoff.reset()
                        down_since = None
                        limited.reset()
                        async for message in read_sse(
                            resp, max_bytes=settings.client_max_sse_bytes
                        ):
                            if message.event != SSE_EVENT:
                                continue
                            event = Event.model_validate_json(message.data)
                            cursor = event.cursor
                            yield event
            except aiohttp.ClientConnectorError:
                endpoints.failed(ep, refused=True)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                endpoints.failed(ep)
            if pause is not None:  # answered 429: the service is up, only busy
                await asyncio.sleep(pause)
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > settings.watch_reconnect_seconds:
                raise Unavailable(
                    f"watch lost its connection and could not reconnect for "
                    f"{settings.watch_reconnect_seconds:.0f} s"
                )
            await asyncio.sleep(backoff.next())

    async def publish(self, channel: str, payload: Any) -> Event:
        if not isinstance(channel, str):
            raise InvalidInput("channel must be a string", field="channel")
        return await self._model(
            Event,
            "POST",
            f"/v1/publish/{quote(channel, safe='/')}",
            body=_body({"payload": payload}, "payload"),
        )

    # Waits -----------------------------------------------------------------------

    def _deadline(self, wait: Any) -> float | None:
        """The monotonic time a client-side wait of ``wait`` seconds ends, or None when
        ``wait`` asks for no waiting (None, 0) or is not a usable number (it is then
        sent as given, once, and the service names it)."""
        if wait is None or isinstance(wait, bool) or not isinstance(wait, int | float):
            return None
        if not math.isfinite(wait) or wait <= 0:
            return None
        return time.monotonic() + min(float(wait), _FOREVER)

    def _ask(self, wait: Any, deadline: float | None) -> Any:
        """What one request asks the service to wait: the time left (at most
        ``max_wait_seconds``), or ``wait`` as given when there is no deadline."""
        if deadline is None:
            return wait
        return max(0.0, min(deadline - time.monotonic(), self._settings.max_wait_seconds))

    def _timeout(self, ask: Any) -> float | None:
        """The per-request timeout of a request asking the service to wait ``ask``
        seconds: that wait plus ``request_timeout_seconds`` (None: the default)."""
        if isinstance(ask, bool) or not isinstance(ask, int | float) or not ask > 0:
            return None
        return min(float(ask), _FOREVER) + self._settings.request_timeout_seconds

    @staticmethod
    def _left(deadline: float | None) -> bool:
        """Whether a client-side wait has time left."""
        return deadline is not None and deadline - time.monotonic() > 0.001

    @staticmethod
    def _segment_path(value: Any, field: str, *, slashes: bool) -> str:
        """``value`` quoted for a URL path (``/`` kept when ``slashes``; otherwise the
        value is one path segment, so it may not hold a ``/`` or be empty: the service
        would find no route for it).

        Raises:
            InvalidInput: not a string, or an empty one or one with ``/`` where one
                segment is expected (naming ``field``).
        """
        if not isinstance(value, str):
            raise InvalidInput(f"{field} must be a string", field=field)
        if not slashes and (not value or "/" in value):
            raise InvalidInput(f"{field} {value!r} is not one path segment", field=field)
        return quote(value, safe="/" if slashes else "")

    # Tasks -----------------------------------------------------------------------

    def _queue_path(self, queue: Any) -> str:
        return f"/v1/queues/{self._segment_path(queue, 'queue', slashes=True)}"

    def _task_path(self, task_id: Any) -> str:
        return f"/v1/tasks/{self._segment_path(task_id, 'task_id', slashes=False)}"

    @staticmethod
    def _held(task: Any) -> tuple[str, Any]:
        """(id, attempt) of a task this agent holds.

        Raises:
            InvalidInput: ``task`` has no id or attempt (field ``task``).
        """
        tid, attempt = getattr(task, "id", None), getattr(task, "attempt", None)
        if tid is None or attempt is None:
            raise InvalidInput("task must be a Task (from claim)", field="task")
        if not isinstance(tid, str):
            raise InvalidInput("task_id is not a task id (1-64 hex digits)", field="task_id")
        return tid, attempt

    async def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the per-attempt limit)
        max_attempts: int = 3,
        backoff: float = 1.0,
        priority: int = 0,
        delay: float = 0,
    ) -> Task:
        body: dict[str, Any] = {
            "payload": payload,
            "max_attempts": max_attempts,
            "backoff": backoff,
            "priority": priority,
            "delay": delay,
        }
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if timeout is not None:
            body["timeout"] = timeout
        return await self._model(
            Task, "POST", f"{self._queue_path(queue)}/tasks", body=_body(body, "payload")
        )

    async def claim(
        self, queue: str, *, lease: float = 30.0, wait: float | None = None
    ) -> Task | None:
        """See :meth:`Hive.claim`: repeats the request (each waiting at most
        ``max_wait_seconds`` at the service) until a task comes or ``wait`` ends."""
        path = f"{self._queue_path(queue)}/claim"
        deadline = self._deadline(wait)
        while True:
            ask = self._ask(wait, deadline)
            body: dict[str, Any] = {"lease": lease}
            if ask is not None:
                body["wait"] = ask
            status, data = await self._request(
                "POST", path, body=_body(body, "lease"), seconds=self._timeout(ask)
            )
            if status != 204 and data:
                return Task.model_validate_json(data)
            if not self._left(deadline):
                return None

    async def heartbeat(self, task: Task, *, lease: float | None = None) -> Task:
        tid, attempt = self._held(task)
        hold = getattr(task, "lease_seconds", None) if lease is None else lease
        body: dict[str, Any] = {"attempt": attempt}
        if hold is not None:
            body["lease"] = hold
        return await self._model(
            Task, "POST", f"{self._task_path(tid)}/heartbeat", body=_body(body, "lease")
        )

    async def complete(self, task: Task, result: Any = None) -> Task:
        tid, attempt = self._held(task)
        return await self._model(
            Task,
            "POST",
            f"{self._task_path(tid)}/complete",
            body=_body({"attempt": attempt, "result": result}, "result"),
        )

    async def fail(self, task: Task, error: str, *, retryable: bool = True) -> Task:
        tid, attempt = self._held(task)
        return await self._model(
            Task,
            "POST",
            f"{self._task_path(tid)}/fail",
            body=_body({"attempt": attempt, "error": error, "retryable": retryable}, "error"),
        )

    async def release_task(self, task: Task) -> Task:
        tid, attempt = self._held(task)
        return await self._model(
            Task,
            "POST",
            f"{self._task_path(tid)}/release",
            body=_body({"attempt": attempt}, "attempt"),
        )

    async def result(self, task_id: str, *, wait: float | None = None) -> Task:
        """See :meth:`Hive.result`: repeats the long poll until the task is done or
        ``wait`` ends."""
        path = f"{self._task_path(task_id)}/result"
        deadline = self._deadline(wait)
        while True:
            ask = self._ask(wait, deadline)
            task = await self._model(
                Task, "GET", path, params={"wait": ask}, seconds=self._timeout(ask)
            )
            if task.done or not self._left(deadline):
                return task

    async def cancel(self, task_id: str) -> Task:
        return await self._model(Task, "POST", f"{self._task_path(task_id)}/cancel", body=b"{}")

    async def requeue(self, task_id: str, *, delay: float = 0) -> Task:
        return await self._model(
            Task,
            "POST",
            f"{self._task_path(task_id)}/requeue",
            body=_body({"delay": delay}, "delay"),
        )

    async def get_task(self, task_id: str) -> Task | None:
        try:
            return await self._model(Task, "GET", self._task_path(task_id))
        except NotFound as exc:
            if exc.field == "task_id":
                return None
            raise

    async def list_tasks(
        self,
        queue: str,
        *,
        state: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Task]:
        return await self._model(
            _TaskPage,
            "GET",
            f"{self._queue_path(queue)}/tasks",
            params={"state": state, "limit": limit, "cursor": cursor},
        )

    async def queue_stats(self, queue: str) -> QueueStats:
        return await self._model(QueueStats, "GET", f"{self._queue_path(queue)}/stats")

    async def queues(self) -> builtins.list[QueueStats]:
        _, data = await self._request("GET", "/v1/queues")
        return [QueueStats.model_validate(q) for q in orjson.loads(data)]

    # Leases and signals ------------------------------------------------------------

    def _lease_path(self, name: Any, field: str = "name") -> str:
        return f"/v1/leases/{self._segment_path(name, field, slashes=True)}"

    @staticmethod
    def _lease_parts(lease: Any) -> tuple[str, Any, Any]:
        name, token, version = (getattr(lease, f, None) for f in ("name", "token", "version"))
        if not isinstance(name, str) or not isinstance(token, int) or not isinstance(version, int):
            raise InvalidInput("lease must be a Lease (from acquire)", field="lease")
        return name, token, version

    async def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease:
        """See :meth:`Hive.acquire`: repeats the request (each waiting at most
        ``max_wait_seconds`` at the service) until the lease is free or ``wait`` ends."""
        path = f"{self._lease_path(name)}/acquire"
        deadline = self._deadline(wait)
        while True:
            ask = self._ask(wait, deadline)
            body: dict[str, Any] = {"ttl": ttl}
            if ask is not None:
                body["wait"] = ask
            try:
                return await self._model(
                    Lease, "POST", path, body=_body(body, "ttl"), seconds=self._timeout(ask)
                )
            except Conflict as exc:
                if exc.field != "name" or not self._left(deadline):
                    raise

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        name, token, version = self._lease_parts(lease)
        hold = getattr(lease, "ttl", None) if ttl is None else ttl
        body: dict[str, Any] = {"token": token, "version": version}
        if hold is not None:
            body["ttl"] = hold
        return await self._model(
            Lease, "POST", f"{self._lease_path(name, 'lease')}/renew", body=_body(body, "ttl")
        )

    async def release(self, lease: Lease) -> bool:
        name, token, version = self._lease_parts(lease)
        _, data = await self._request(
            "POST",
            f"{self._lease_path(name, 'lease')}/release",
            body=_body({"token": token, "version": version}, "lease"),
        )
        return bool(orjson.loads(data)["released"])

    def _signal_path(self, name: Any) -> str:
        return f"/v1/signals/{self._segment_path(name, 'name', slashes=True)}"

    async def set_signal(self, name: str, value: Any, *, ttl: float | None = None) -> Signal:
        body: dict[str, Any] = {"value": value}
        if ttl is not None:
            body["ttl"] = ttl
        return await self._model(Signal, "PUT", self._signal_path(name), body=_body(body, "value"))

    async def get_signal(
        self, name: str, *, changed_from: int | None = None, wait: float | None = None
    ) -> Signal | None:
        """See :meth:`Hive.get_signal`: repeats the long poll until the signal is at a
        version other than ``changed_from`` or ``wait`` ends."""
        path = self._signal_path(name)
        deadline = self._deadline(wait) if changed_from is not None else None
        while True:
            ask = self._ask(wait, deadline)
            try:
                signal: Signal | None = await self._model(
                    Signal,
                    "GET",
                    path,
                    params={"changed_from": changed_from, "wait": ask},
                    seconds=self._timeout(ask),
                )
            except NotFound as exc:
                if exc.field != "name":
                    raise
                signal = None
            version = 0 if signal is None else signal.version
            if version != changed_from or not self._left(deadline):
                return signal

    # Idempotent calls ----------------------------------------------------------------

    async def begin_once(
        self,
        key: str,
        *,
        shared: bool = False,
        lease: float = 60.0,
        wait: float | None = None,
    ) -> OnceTicket:
        """See :meth:`Hive.begin_once`: while another caller runs the call, repeats the
        request (each waiting at most ``max_wait_seconds``) until ``wait`` ends."""
        deadline = self._deadline(wait)
        while True:
            ask = self._ask(wait, deadline)
            body: dict[str, Any] = {"key": key, "shared": shared, "lease": lease}
            if ask is not None:
                body["wait"] = ask
            ticket = await self._model(
                OnceTicket,
                "POST",
                "/v1/once/begin",
                body=_body(body, "key"),
                seconds=self._timeout(ask),
            )
            if ticket.status != "running" or not self._left(deadline):
                return ticket

    async def renew_once(
        self, key: str, token: int, *, shared: bool = False, lease: float = 60.0
    ) -> None:
        body = {"key": key, "token": token, "shared": shared, "lease": lease}
        await self._request("POST", "/v1/once/renew", body=_body(body, "lease"))

    async def end_once(
        self,
        key: str,
        token: int,
        *,
        shared: bool = False,
        result: Any = None,
        error: str | None = None,
        keep_error: bool = False,
        ttl: float = 86400.0,
    ) -> None:
        body: dict[str, Any] = {
            "key": key,
            "token": token,
            "shared": shared,
            "result": result,
            "keep_error": keep_error,
            "ttl": ttl,
        }
        if error is not None:
            body["error"] = error
        await self._request("POST", "/v1/once/end", body=_body(body, "result"))

    # Agent registry -----------------------------------------------------------------

    def _registry_path(self, name: Any) -> str:
        return f"/v1/registry/{self._segment_path(name, 'name', slashes=False)}"

    async def register(
        self,
        name: str,
        *,
        capabilities: Sequence[str] = (),
        endpoint: str | None = None,
        metadata: dict[str, Any] | None = None,
        ttl: float = 15.0,
        heartbeat: bool = True,
    ) -> AgentRecord:
        """See :meth:`Hive.register`. With ``heartbeat``, this client sends the
        heartbeats (every ttl/3 seconds) until :meth:`unregister` or :meth:`close`."""
        if not isinstance(heartbeat, bool):
            raise InvalidInput("heartbeat must be true or false", field="heartbeat")
        if isinstance(capabilities, str) or not isinstance(capabilities, Sequence):
            raise InvalidInput("capabilities must be a list of names", field="capabilities")
        body: dict[str, Any] = {"capabilities": builtins.list(capabilities), "ttl": ttl}
        if endpoint is not None:
            body["endpoint"] = endpoint
        if metadata is not None:
            body["metadata"] = metadata
        record = await self._model(
            AgentRecord, "PUT", self._registry_path(name), body=_body(body, "metadata")
        )
        if heartbeat:
            self._shared.heartbeats.start(self, record.name, record.ttl)
        return record

    async def heartbeat_agent(self, name: str) -> AgentRecord:
        return await self._model(AgentRecord, "POST", f"{self._registry_path(name)}/heartbeat")

    async def unregister(self, name: str) -> bool:
        path = self._registry_path(name)
        if isinstance(name, str):
            self._shared.heartbeats.stop(name)
        _, data = await self._request("DELETE", path)
        return bool(orjson.loads(data)["deleted"])

    async def agents(
        self, *, capability: str | None = None, healthy: bool | None = True
    ) -> builtins.list[AgentRecord]:
        if healthy is not None and not isinstance(healthy, bool):
            raise InvalidInput("healthy must be true, false or null", field="healthy")
        _, data = await self._request(
            "GET",
            "/v1/registry",
            params={"capability": capability, "healthy": healthy_param(healthy)},
        )
        return [AgentRecord.model_validate(r) for r in orjson.loads(data)]


def _retry_after(headers: Mapping[str, str], error: HivememError) -> float:
    """Seconds a 429 answer asks to wait: its ``Retry-After``, else the problem's
    ``retry_after``, else 1 s (see :func:`hivemem.wire.retry_after_seconds`)."""
    return retry_after_seconds(headers, getattr(error, "retry_after", 1.0))


def _redirect(
    method: str, path: str, endpoint: str, status: int, headers: Mapping[str, str]
) -> HivememError:
    """The error for a 3xx answer: redirects are a misconfiguration, never followed."""
    location = headers.get(LOCATION_HEADER)
    where = f"to {location[:300]!r}" if location else "without a Location"
    return HivememError(
        f"{method} {path}: {endpoint} answered HTTP {status}, a redirect {where}; "
        "hivemem does not follow redirects (they could carry the API key and writes "
        "elsewhere): configure the client with the URL the service really answers at"
    )


def _rate_limit_pause(retry_after: float, waited: float, settings: Settings) -> float | None:
    """Seconds to sleep before a read answered 429 is tried again, or None to give up.

    Args:
        retry_after: what the answer asked for (seconds).
        waited: seconds since the first 429 of this request.
        settings: ``client_rate_limit_wait_seconds`` is the budget for all the waits.

    Returns:
        ``retry_after`` (at least 0.1 s) plus up to 10 % (at most 1 s) of jitter, capped
        to the budget left; None when ``retry_after`` does not fit in that budget.
    """
    budget = settings.client_rate_limit_wait_seconds - waited
    pause = max(retry_after, _MIN_RATE_LIMIT_PAUSE)
    if pause > budget:
        return None
    return min(pause + random.uniform(0, min(1.0, 0.1 * pause)), budget)


def _describe(exc: BaseException | None) -> str:
    """A short description of a transport error for messages to people."""
    if exc is None:
        return "no attempt made"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
