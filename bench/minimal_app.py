"""The baseline server: the least a FastAPI app can do for our item routes.

``GET /v1/items/{namespace}/{key}`` returns an item from a dict in memory (404 if
absent); ``PUT`` stores the request's ``value`` into it. Responses have the shape of
hivemem's Item JSON, so the same clients (raw aiohttp, wrk, and RemoteHive) can
drive it as they drive the real service. No validation, no storage, no events:
whatever the real service costs beyond this is the price of what it does.

Run by the benchmark as ``uvicorn minimal_app:app --app-dir bench --workers 1``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request

app = FastAPI()
_items: dict[tuple[str, str], dict[str, Any]] = {}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness probe."""
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    """Readiness probe (always ready: the store is a dict)."""
    return {"status": "ok"}


@app.get("/v1/items/{namespace:path}/{key}")
async def get_item(namespace: str, key: str) -> dict[str, Any]:
    """The stored item, or 404."""
    item = _items.get((namespace, key))
    if item is None:
        raise HTTPException(status_code=404, detail="not found")
    return item


@app.put("/v1/items/{namespace:path}/{key}")
async def put_item(namespace: str, key: str, request: Request) -> dict[str, Any]:
    """Store ``{"value": ...}`` at (namespace, key); returns the item, version + 1."""
    body = await request.json()
    now = datetime.now(UTC).isoformat()
    old = _items.get((namespace, key))
    item = {
        "namespace": namespace,
        "key": key,
        "value": body.get("value"),
        "version": (old["version"] + 1) if old else 1,
        "author": request.headers.get("x-hivemem-agent", "anonymous"),
        "created_at": old["created_at"] if old else now,
        "updated_at": now,
        "expires_at": None,
        "text": None,
        "metadata": {},
    }
    _items[(namespace, key)] = item
    return item
