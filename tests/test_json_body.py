"""The item PUT reads and validates its body itself (service/routing.py ``JSONBody``):
its answers must be those of a FastAPI body parameter, and in FastAPI's order (the body
parsed, then the caller authenticated, then the body validated). Each case is sent to
the real route and to a reference route on the same app that declares ``PutBody`` and
the write dependency as FastAPI parameters; status, problem field and detail must match.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from starlette.responses import Response

import hivemem
from hivemem.service.app import create_app
from hivemem.service.deps import WriteHive
from hivemem.service.items import PutBody
from hivemem.service.routing import JSONRoute

JSON = "application/json"

#: (body, Content-Type or None): bodies a client can send, valid and not.
CASES: list[tuple[bytes, str | None]] = [
    (b"", None),
    (b"", JSON),
    (b'{"value": 1}', None),
    (b'{"value": 1}', "text/plain"),
    (b'{"value": 1}', "application"),
    (b'{"value": 1}', "application/merge-patch+json"),
    (b'{"value": 1}', "Application/JSON; charset=utf-8"),
    (b'{"value": NaN}', JSON),
    (b'{"value": 1e400}', JSON),
    (b"{bad", JSON),
    (b'{"value": "\xff"}', JSON),
    (b"[1, 2]", JSON),
    (b'"text"', JSON),
    (b"null", JSON),
    (b'{"valu": 1}', JSON),
    (b'{"value": 1, "ttl": -1}', JSON),
    (b'{"value": 1, "ttl": "3"}', JSON),
    (b'{"value": 1, "if_version": "3"}', JSON),
    (b'{"value": 1, "if_version": 99999999999999999999999}', JSON),
    (b'{"value": 1, "fence": {"lease": "l"}}', JSON),
    (b'{"value": 1, "fence": {"lease": "l", "token": 1, "x": 2}}', JSON),
    (b'{"value": 1, "metadata": [1]}', JSON),
    (b'{"value": 1, "text": 5}', JSON),
]


def _app(tmp: Path, auth: bool) -> Any:
    settings = hivemem.Settings(embedder="none", auth=auth)
    app = create_app(f"sqlite:///{tmp}/b.db", settings)
    reference = APIRouter(route_class=JSONRoute)

    @reference.put("/reference/{path:path}")
    async def put_reference(path: str, body: PutBody, hive: WriteHive) -> Response:
        return Response(status_code=299)  # valid: nothing is written

    app.include_router(reference)
    return app


def _answer(resp: Any) -> tuple[int, str | None, str | None]:
    if resp.status_code >= 400:
        problem = resp.json()
        return resp.status_code, problem.get("field"), problem.get("detail")
    return 299, None, None  # the real route's 200/201 against the reference's 299


@pytest.fixture(params=[False, True], ids=["open", "auth"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(_app(tmp_path, request.param)) as c:
        yield c


@pytest.mark.parametrize(("body", "content_type"), CASES)
def test_the_put_answers_as_a_fastapi_body_parameter(
    client: TestClient, body: bytes, content_type: str | None
) -> None:
    headers = {"X-Hivemem-Agent": "tester"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    real = client.put("/v1/items/json/k", content=body, headers=headers)
    reference = client.put("/reference/json/k", content=body, headers=headers)
    assert _answer(real) == _answer(reference), (real.text, reference.text)


def _put(c: TestClient, body: bytes, content_type: str | None) -> tuple[int, str | None]:
    headers = {"X-Hivemem-Agent": "tester"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return _answer(c.put("/v1/items/json/k", content=body, headers=headers))[:2]


def test_the_cases_reach_each_outcome_in_fastapis_order(tmp_path: Path) -> None:
    """The cases reach every branch (accepted; malformed JSON, a missing or non-JSON
    body, refused fields); without credentials, malformed JSON is a 422 (parsed before
    authentication) and everything else a 401 (validated after it)."""
    for mode in ("open", "auth"):
        (tmp_path / mode).mkdir()
    with TestClient(_app(tmp_path / "open", False)) as c:
        seen = {_put(c, body, content_type) for body, content_type in CASES}
    assert seen == {
        (299, None),
        (422, "body"),
        (422, "value"),
        (422, "ttl"),
        (422, "if_version"),
        (422, "text"),
        (422, "metadata"),
        (422, "fence.token"),
        (422, "fence.x"),
    }
    with TestClient(_app(tmp_path / "auth", True)) as c:
        assert _put(c, b"{bad", JSON) == (422, "body")
        assert _put(c, b'{"value": NaN}', JSON) == (422, "body")
        assert _put(c, b'{"valu": 1}', JSON) == (401, "Authorization")
        assert _put(c, b"", None) == (401, "Authorization")
        assert _put(c, b'{"value": 1}', "text/plain") == (401, "Authorization")


def test_the_document_lists_the_body_as_fastapi_does(tmp_path: Path) -> None:
    """The route's request body in the OpenAPI document is the reference route's (which
    FastAPI generated), with the example service/openapi.py adds; the service's own
    document (no reference route) has the PutBody and FenceBody FastAPI generates for
    the reference, with the constraints the document adds to them."""
    doc = _app(tmp_path, False).openapi()
    plain = create_app(f"sqlite:///{tmp_path}/p.db", hivemem.Settings(embedder="none")).openapi()
    real = doc["paths"]["/v1/items/{path}"]["put"]["requestBody"]
    reference = doc["paths"]["/reference/{path}"]["put"]["requestBody"]
    assert real["content"][JSON].pop("example")["value"] is not None
    assert real == reference
    assert reference["content"][JSON]["schema"] == {"$ref": "#/components/schemas/PutBody"}
    schemas = plain["components"]["schemas"]
    for model in ("PutBody", "FenceBody"):
        assert schemas[model] == doc["components"]["schemas"][model]
    assert schemas["PutBody"]["required"] == ["value"]
    assert schemas["PutBody"]["properties"]["if_version"]["anyOf"][0]["minimum"] == 0
    assert "pattern" in schemas["FenceBody"]["properties"]["lease"]
