"""The MCP server: an MCP client (``mcp.Client``) lists and calls every tool in process,
over stdio (``hivemem mcp``) and over streamable HTTP at ``/mcp`` of ``hivemem serve``;
with auth on, a call without credentials is refused and a call with them runs as the
token's agent."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import jwt
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

import hivemem
from hivemem.integrations.mcp import build_server
from tests.conftest import ServiceProcess

TOOLS = {
    "memory_put",
    "memory_get",
    "memory_delete",
    "memory_list",
    "memory_search",
    "memory_history",
    "session_create",
    "session_append",
    "session_get",
    "publish",
    "watch_since",
    "task_submit",
    "task_result",
    "once_begin",
    "once_end",
}
SECRET = "m" * 40


def _token(sub: str) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "iss": "https://issuer.test",
        "aud": "hivemem-mcp",
        "exp": now + 300,
        "roles": ["writer"],
    }
    return jwt.encode(claims, SECRET, "HS256")


async def _call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, (tool, result.content)
    assert result.structured_content is not None, tool
    return result.structured_content


async def _every_tool(client: Client, hive: hivemem.Hive, ns: str) -> None:
    """Calls each tool once and checks what it returns against the hive itself."""
    tools = await client.list_tools()
    assert {t.name for t in tools.tools} == TOOLS
    assert all(t.description and t.output_schema for t in tools.tools)

    put = await _call(client, "memory_put", namespace=ns, key="plan", value={"text": "ship v2"})
    assert put["version"] == 1
    got = await _call(client, "memory_get", namespace=ns, key="plan")
    assert got["found"] and got["item"]["value"] == {"text": "ship v2"}
    assert (await hive.get(ns, "plan")) is not None
    again = await _call(
        client, "memory_put", namespace=ns, key="plan", value={"text": "ship v3"}, if_version=1
    )
    assert again["version"] == 2
    stale = await client.call_tool(
        "memory_put", {"namespace": ns, "key": "plan", "value": 1, "if_version": 1}
    )
    assert stale.is_error and "version 2" in str(stale.content)
    listed = await _call(client, "memory_list", prefix=ns)
    assert [i["key"] for i in listed["items"]] == ["plan"]
    hits = await _call(client, "memory_search", prefix=ns, query="ship v3", mode="lexical")
    assert hits["hits"][0]["item"]["key"] == "plan"
    history = await _call(client, "memory_history", namespace=ns, key="plan")
    assert [v["version"] for v in history["versions"]] == [2, 1]

    session = await _call(client, "session_create", app="mcp-test", user="ann")
    await _call(client, "session_append", session_id=session["id"], role="user", content="hi")
    view = await _call(client, "session_get", session_id=session["id"])
    assert view["session"]["messages"] == 1 and view["messages"][0]["content"] == "hi"

    head = await hive.head()
    event = await _call(client, "publish", channel=f"{ns}/news", payload={"n": 1})
    seen = await _call(client, "watch_since", prefix=ns, after=head)
    assert [e["cursor"] for e in seen["events"]][-1] == event["cursor"]
    assert seen["next_after"]

    task = await _call(client, "task_submit", queue=f"q{ns}", payload={"job": 1})
    claimed = await hive.claim(f"q{ns}", wait=5)
    assert claimed is not None and claimed.id == task["id"]
    await hive.complete(claimed, {"ok": True})
    done = await _call(client, "task_result", task_id=task["id"], wait_seconds=5)
    assert done["state"] == "completed" and done["result"] == {"ok": True}

    ticket = await _call(client, "once_begin", key=f"{ns}:refund")
    assert ticket["status"] == "run" and ticket["token"] is not None
    await _call(client, "once_end", key=f"{ns}:refund", token=ticket["token"], result={"id": 7})
    again = await _call(client, "once_begin", key=f"{ns}:refund")
    assert again["status"] == "done" and again["result"] == {"id": 7}

    deleted = await _call(client, "memory_delete", namespace=ns, key="plan")
    assert deleted == {"deleted": True}
    assert (await _call(client, "memory_get", namespace=ns, key="plan"))["found"] is False


async def test_every_tool_in_process(hive: hivemem.Hive, ns: str) -> None:
    async with Client(build_server(hive)) as client:
        await _every_tool(client, hive, ns)


async def test_bad_arguments_are_an_error_result_naming_the_field(hive: hivemem.Hive) -> None:
    async with Client(build_server(hive)) as client:
        result = await client.call_tool("memory_put", {"namespace": "a//b", "key": "k", "value": 1})
        assert result.is_error and "namespace" in str(result.content)
        result = await client.call_tool("memory_list", {"prefix": "", "limit": 0})
        assert result.is_error and "limit" in str(result.content)


def _stdio(*where: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "hivemem", "mcp", *where, "--agent", "stdio-agent"],
        env={"HIVEMEM_EMBEDDER": "none", "PATH": "/usr/bin:/bin"},
    )


async def test_over_stdio(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/stdio.db"
    settings = hivemem.Settings(embedder="none")
    async with (
        hivemem.connect(store, agent="checker", settings=settings) as hive,
        Client(_stdio("--store", store)) as client,
    ):
        await _every_tool(client, hive, "stdio")
        put = await _call(client, "memory_put", namespace="notes", key="k", value="over stdio")
        assert put["author"] == "stdio-agent"
    async with hivemem.connect(store, agent="reader") as hive:
        item = await hive.get("notes", "k")
        assert item is not None and item.value == "over stdio"


async def test_over_stdio_to_a_service(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "svc.db", env={"HIVEMEM_EMBEDDER": "none"})
    svc.start()
    try:
        async with (
            hivemem.connect(svc.url, agent="checker") as hive,
            Client(_stdio("--url", svc.url)) as client,
        ):
            await _every_tool(client, hive, "viaurl")
            put = await _call(client, "memory_put", namespace="notes", key="k", value=1)
            assert put["author"] == "stdio-agent"
    finally:
        svc.terminate()


@pytest.fixture(scope="module")
def auth_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path_factory.mktemp("mcp") / "svc.db",
        env={
            "HIVEMEM_AUTH": "true",
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_JWT_SECRET": SECRET,
            "HIVEMEM_JWT_ISSUER": "https://issuer.test",
            "HIVEMEM_JWT_AUDIENCE": "hivemem-mcp",
        },
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.terminate()


async def test_over_streamable_http_as_the_tokens_agent(auth_service: ServiceProcess) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    bearer = {"Authorization": f"Bearer {_token('mcp-agent')}"}
    async with (
        httpx2.AsyncClient(headers=bearer, timeout=30) as http,
        Client(streamable_http_client(f"{auth_service.url}/mcp", http_client=http)) as client,
        hivemem.connect(auth_service.url, api_key=_token("checker")) as hive,
    ):
        await _every_tool(client, hive, ns)
        put = await _call(client, "memory_put", namespace=ns, key="who", value=1)
        assert put["author"] == "mcp-agent"


async def test_over_http_without_credentials_is_refused(auth_service: ServiceProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{auth_service.url}/mcp",
            json=body,
            headers={"Accept": "application/json, text/event-stream"},
        ) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            assert (await resp.json(content_type=None))["field"] == "Authorization"
        async with http.post(
            f"{auth_service.url}/mcp",
            json=body,
            headers={
                "Accept": "application/json, text/event-stream",
                "Authorization": "Bearer not-a-token",
            },
        ) as resp:
            assert resp.status == 401


async def test_over_http_a_call_runs_under_the_agents_policy(auth_service: ServiceProcess) -> None:
    """A token without roles may authenticate but not write: the tool call is refused as
    the REST route would refuse it, and nothing is written."""
    now = int(time.time())
    reader = jwt.encode(
        {"sub": "nobody", "iss": "https://issuer.test", "aud": "hivemem-mcp", "exp": now + 300},
        SECRET,
        "HS256",
    )
    ns = f"t{uuid.uuid4().hex[:8]}"
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {reader}"}, timeout=30) as http,
        Client(streamable_http_client(f"{auth_service.url}/mcp", http_client=http)) as client,
    ):
        result = await client.call_tool("memory_put", {"namespace": ns, "key": "k", "value": 1})
        assert result.is_error and "PermissionDenied" in str(result.content)
    async with hivemem.connect(auth_service.url, api_key=_token("checker")) as hive:
        assert await hive.get(ns, "k") is None
