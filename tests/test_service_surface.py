"""The service's own surface: OpenAPI, docs, health and readiness."""

from __future__ import annotations

import aiohttp

from tests.conftest import ServiceProcess


async def test_openapi_lists_every_area_and_docs_page_is_served(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/openapi.json") as resp:
            assert resp.status == 200
            spec = await resp.json()
        async with http.get(f"{service.url}/docs") as resp:
            assert resp.status == 200
            assert "swagger" in (await resp.text()).lower()
    paths = spec["paths"]
    for path in (
        "/v1/items/{path}",
        "/v1/items",
        "/v1/namespaces",
        "/v1/batch",
        "/v1/history/{path}",
        "/v1/sessions",
        "/v1/sessions/{session_id}/messages",
        "/v1/sessions/{session_id}/state",
        "/v1/events",
        "/v1/watch",
        "/v1/publish/{channel}",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert {"put", "get", "delete"} <= set(paths["/v1/items/{path}"])


async def test_healthz_and_readyz_answer_when_the_store_is_reachable(
    service: ServiceProcess,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(f"{service.url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"status": "ready", "store": "sqlite"}


async def test_unknown_route_is_problem_json_404(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/v2/nothing") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/problem+json"
            assert (await resp.json(content_type=None))["status"] == 404
