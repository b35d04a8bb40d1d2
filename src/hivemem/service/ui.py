"""The web console (``/ui``), the API documentation pages (``/docs``, ``/redoc``) and
``GET /v1/info``, all served from files in the wheel: no build step, no CDN.

- ``/ui`` is one HTML page; its script and style come from ``/ui/assets/``
  (``hivemem/service/console/``). The page holds no data: it is served without
  credentials, and every figure it shows comes from the JSON API, called with the key,
  token or agent name the user enters (kept in the browser tab's ``sessionStorage``), so
  the console sees what that agent's policy lets it see and nothing more.
- ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) load their scripts from
  ``/ui/assets/vendor/`` (copies of the npm packages, see ``console/vendor/README.md``).
- ``/`` redirects to ``/ui``.

Each service also keeps a row of its own in the store while it runs (namespace
``_hivemem/replicas``: hivemem's bookkeeping, which no feed shows), written every
:data:`REPLICA_BEAT` seconds with a TTL of three beats and deleted when it stops, so
``GET /v1/info`` lists the replicas sharing the store (``replicas``) whichever one
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from importlib import resources

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.responses import Response

import hivemem
from hivemem.backends.rows import DeleteWrite, PutWrite
from hivemem.core import LocalHive
from hivemem.errors import HivememError
from hivemem.service.deps import ReadHive, service_state
from hivemem.service.routing import model_response

__all__ = ["ASSETS", "REPLICAS", "REPLICA_BEAT", "Info", "ReplicaBeat", "install"]

log = logging.getLogger("hivemem.service")

#: Namespace of the replicas' rows (``_hivemem/``: no watcher sees its events).
REPLICAS = "_hivemem/replicas"
#: Seconds between a replica's writes of its row; the row lives three of them.
REPLICA_BEAT = 10.0

#: Where the console's files are (a directory inside the installed package).
ASSETS = resources.files("hivemem.service") / "console"

_VENDOR = "/ui/assets/vendor"

#: Content-Security-Policy of the pages: their scripts, styles, images and requests come
#: from this service only (ReDoc's sidebar asks a CDN for a logo: refused without a
#: request, its image hides itself). Inline scripts and styles are allowed for the
#: documentation pages (FastAPI's Swagger UI page starts it with an inline script).
_CSP_DOCS = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; font-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_CSP_CONSOLE = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class Replica(BaseModel):
    """A replica of the service (a ``hivemem serve`` process on the store)."""

    id: str = Field(description="host-pid-random: unique per process.")
    host: str = Field(description="Its host name (a pod's name on Kubernetes).")
    pid: int
    version: str = Field(description="Its hivemem version.")
    started_at: datetime = Field(description="When its service started (UTC).")
    uptime_seconds: float


class Info(BaseModel):
    """Response of ``GET /v1/info``: what this service is and who is asking."""

    version: str = Field(description="hivemem's version.")
    store: str = Field(description="The store kind: sqlite, postgres, redis, redis-cluster.")
    auth: bool = Field(description="Whether credentials are checked (hivemem serve --auth).")
    agent: str = Field(description="The calling agent, as authenticated.")
    roles: list[str] = Field(description="The calling agent's roles.")
    metrics: bool = Field(description="Whether GET /metrics answers (setting metrics).")
    index_mode: str = Field(description="deferred or sync (setting index_mode).")
    head: str = Field(description="Cursor of the newest event of the feed.")
    replica: Replica = Field(description="The replica that answered.")
    replicas: list[Replica] = Field(
        description=f"The replicas on this store that wrote their row within the last "
        f"{3 * REPLICA_BEAT:g} s, by id (this one included)."
    )


class ReplicaBeat:
    """This process's row in :data:`REPLICAS`, written every :data:`REPLICA_BEAT` seconds
    with a TTL of three beats from :meth:`run` (a task of the service's lifespan), and
    deleted by :meth:`stop`. A store that is away costs a logged warning per beat."""

    def __init__(self, hive: LocalHive) -> None:
        self.hive = hive
        self.started = datetime.now(UTC)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host[:40]}-{self.pid}-{uuid.uuid4().hex[:6]}"

    def _row(self) -> bytes:
        return orjson.dumps(
            {
                "host": self.host,
                "pid": self.pid,
                "version": hivemem.__version__,
                "started_at": self.started.timestamp(),
            }
        )

    async def beat(self) -> None:
        now = self.hive._now()
        put = PutWrite(REPLICAS, self.id, self._row(), None, None, now + 3 * REPLICA_BEAT, None)
        await self.hive.backend.write_items([put], author="hivemem", now=now, history_limit=0)

    async def run(self) -> None:
        """Beat every :data:`REPLICA_BEAT` seconds (the first beat is the lifespan's, at
        start); until cancelled."""
        while True:
            await asyncio.sleep(REPLICA_BEAT)
            try:
                await self.beat()
            except HivememError as exc:
                log.warning("could not write this replica's row (%s); retrying", exc)

    async def stop(self) -> None:
        with contextlib.suppress(HivememError):
            await self.hive.backend.write_items(
                [DeleteWrite(REPLICAS, self.id, None)],
                author="hivemem",
                now=self.hive._now(),
                history_limit=0,
            )

    def me(self) -> Replica:
        """This process as a :class:`Replica`."""
        return Replica(
            id=self.id,
            host=self.host,
            pid=self.pid,
            version=hivemem.__version__,
            started_at=self.started,
            uptime_seconds=round(time.time() - self.started.timestamp(), 3),
        )

    async def seen(self) -> list[Replica]:
        """The live rows, by id."""
        now = self.hive._now()
        rows = await self.hive.backend.list_items(REPLICAS, None, 1000, now, key_prefix="")
        out = []
        for row in rows:
            data = orjson.loads(row.value)
            started = datetime.fromtimestamp(float(data["started_at"]), UTC)
            out.append(
                Replica(
                    id=row.key,
                    host=str(data["host"]),
                    pid=int(data["pid"]),
                    version=str(data["version"]),
                    started_at=started,
                    uptime_seconds=round(max(0.0, now - started.timestamp()), 3),
                )
            )
        return out


def install(app: FastAPI, store_kind: str, beat: ReplicaBeat) -> None:
    """Add the console, the documentation pages and ``GET /v1/info`` to ``app`` (built
    with ``docs_url=None, redoc_url=None``: the pages here replace FastAPI's, which load
    their scripts from a CDN). ``beat`` is this process's replica row (the lifespan
    runs it)."""
    app.mount("/ui/assets", StaticFiles(directory=str(ASSETS)), name="console-assets")
    index = (ASSETS / "index.html").read_text(encoding="utf-8")
    title = f"{app.title} - API"

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui", status_code=307)

    @app.get("/ui", include_in_schema=False)
    async def console() -> Response:
        return HTMLResponse(
            index, headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP_CONSOLE}
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> Response:
        return _docs_page(
            get_swagger_ui_html(
                openapi_url=app.openapi_url or "/openapi.json",
                title=title,
                swagger_js_url=f"{_VENDOR}/swagger-ui/swagger-ui-bundle.js",
                swagger_css_url=f"{_VENDOR}/swagger-ui/swagger-ui.css",
                swagger_favicon_url=f"{_VENDOR}/swagger-ui/favicon-32x32.png",
                oauth2_redirect_url="/docs/oauth2-redirect",
            )
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Response:
        return _docs_page(
            get_redoc_html(
                openapi_url=app.openapi_url or "/openapi.json",
                title=title,
                redoc_js_url=f"{_VENDOR}/redoc/redoc.standalone.js",
                redoc_favicon_url=f"{_VENDOR}/swagger-ui/favicon-32x32.png",
                with_google_fonts=False,
            )
        )

    @app.get(
        "/v1/info",
        response_model=Info,
        tags=["health"],
        summary="What this service is (version, store, auth) and who the caller is.",
    )
    async def info(request: Request, hive: ReadHive) -> Response:
        state = service_state(request)
        principal = request.state.principal
        replica = beat.me()
        replicas = await beat.seen()
        if all(r.id != beat.id for r in replicas):  # its first beat has not landed yet
            replicas = sorted([*replicas, replica], key=lambda r: r.id)
        return model_response(
            Info(
                version=hivemem.__version__,
                store=store_kind,
                auth=state.auth,
                agent=principal.agent,
                roles=sorted(principal.roles),
                metrics=state.settings.metrics,
                index_mode=state.settings.index_mode,
                head=await hive.head(),
                replica=replica,
                replicas=replicas,
            )
        )


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = _CSP_DOCS
    return page
