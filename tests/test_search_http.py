"""Search over HTTP: wrong types and bad filters get a 4xx problem+json naming the field."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import ServiceProcess


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": 5}, "query"),
        ({}, "query"),
        ({"query": "x", "limit": "5"}, "limit"),
        ({"query": "x", "limit": 1000}, "limit"),
        ({"query": "x", "mode": "fuzzy"}, "mode"),
        ({"query": "x", "filter": {"n": {"$near": 1}}}, "filter.n.$near"),
        ({"query": "x", "filter": "kind=pet"}, "filter"),
        ({"query": "x", "updated_after": "yesterday"}, "updated_after"),
        ({"query": "x", "surprise": 1}, "surprise"),
        ({"query": " "}, "query"),
    ],
)
async def test_bad_search_request_is_problem_json_naming_the_field(
    service: ServiceProcess, body: dict[str, Any], field: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/v1/search", json=body) as resp:
            problem = await resp.json(content_type=None)
            assert 400 <= resp.status < 500, problem
            assert resp.content_type == "application/problem+json"
            assert problem["field"] == field or problem["field"].startswith(field + "."), problem


async def test_malformed_search_json_is_a_4xx_naming_the_body(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{service.url}/v1/search",
            data=b'{"query": "x",',
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 422
            assert (await resp.json(content_type=None))["field"] == "body"
