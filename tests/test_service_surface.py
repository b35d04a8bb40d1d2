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
    # every operation taking a JSON body shows an example of it
    missing = [
        f"{method.upper()} {path}"
        for path, ops in paths.items()
        for method, op in ops.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
        and "example" not in op["requestBody"]["content"]["application/json"]
    ]
    assert missing == []


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


async def test_openapi_names_headers_as_sent_and_declares_key_prefix_and_session_ttl(
    service: ServiceProcess,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/openapi.json") as resp:
            spec = await resp.json()
    put = {p["name"] for p in spec["paths"]["/v1/items/{path}"]["put"]["parameters"]}
    assert {"If-Match", "If-None-Match", "X-Hivemem-Agent", "X-Hivemem-Request-Id"} <= put
    listing = {p["name"]: p for p in spec["paths"]["/v1/items"]["get"]["parameters"]}
    key_prefix = listing["key_prefix"]
    assert key_prefix["required"] is False and key_prefix["in"] == "query"
    assert key_prefix["schema"]["type"] == "string"  # absent when not given, never null
    assert key_prefix["schema"]["pattern"].startswith("^(?:")
    ttl = spec["components"]["schemas"]["CreateBody"]["properties"]["ttl"]
    number = next(o for o in ttl["anyOf"] if o.get("type") == "number")
    assert number["exclusiveMinimum"] == 0 and number["maximum"] == 10 * 365.25 * 86400
    session = spec["components"]["schemas"]["Session"]["properties"]
    assert {"ttl", "expires_at"} <= set(session)


async def test_header_names_are_case_insensitive(service: ServiceProcess) -> None:
    url = f"{service.url}/v1/items/surface/case"
    async with aiohttp.ClientSession() as http:
        headers = {"x-hivemem-agent": "lower", "if-none-match": "*"}
        async with http.put(url, json={"value": 1}, headers=headers) as resp:
            assert resp.status == 201
            assert resp.headers["etag"] == '"1"'
            assert (await resp.json())["author"] == "lower"
        async with http.put(url, json={"value": 2}, headers=headers) as resp:
            assert resp.status == 412
        async with http.put(url, json={"value": 2}, headers={"IF-MATCH": 'W/"1"'}) as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == '"2"'


async def test_listing_by_key_prefix_reads_one_namespace(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("kp/a1", "kp/a2", "kp/b1", "kp/sub/a3"):
            async with http.put(f"{service.url}/v1/items/{path}", json={"value": 1}) as resp:
                assert resp.status in (200, 201)
        query = {"prefix": "kp", "key_prefix": "a"}
        async with http.get(f"{service.url}/v1/items", params=query) as resp:
            assert resp.status == 200
            page = await resp.json()
        assert [(i["namespace"], i["key"]) for i in page["items"]] == [("kp", "a1"), ("kp", "a2")]
        async with http.get(f"{service.url}/v1/items", params={"key_prefix": "a"}) as resp:
            assert resp.status == 422
            assert (await resp.json(content_type=None))["field"] == "prefix"


async def test_a_session_created_with_a_ttl_says_when_it_expires(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"app": "surface", "ttl": 60}
        async with http.post(f"{service.url}/v1/sessions", json=body) as resp:
            assert resp.status == 201
            session = await resp.json()
        assert session["ttl"] == 60 and session["expires_at"] is not None
        for bad in (0, -1, 1e12, "60"):
            body = {"app": "surface", "ttl": bad}
            async with http.post(f"{service.url}/v1/sessions", json=body) as resp:
                assert resp.status == 422, bad
                assert (await resp.json(content_type=None))["field"] == "ttl"
