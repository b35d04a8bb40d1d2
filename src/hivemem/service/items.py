"""HTTP routes of the items area."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hivemem.errors import Conflict, InvalidInput, NotFound
from hivemem.models import Item, JsonInt, NamespaceCount, Page
from hivemem.service.deps import ReadHive, WriteHive, read_hive, write_hive
from hivemem.service.problems import PreconditionFailed
from hivemem.service.routing import JSONBody, JSONRoute, json_response, model_response
from hivemem.wire import (
    ETAG_HEADER,
    IF_MATCH_HEADER,
    IF_NONE_MATCH_HEADER,
    BatchResult,
    HistoryResult,
    etag,
    split_item_path,
    version_from_etag,
)

router = APIRouter(tags=["items"], route_class=JSONRoute)


class FenceBody(BaseModel):
    """A write's fence: the lease it is made under and the fencing token held."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lease: str = Field(description="The lease's name (from acquire).")
    token: JsonInt = Field(description="The lease's fencing token (1 .. 2**63-1).")


class PutBody(BaseModel):
    """Body of PUT /v1/items/{namespace}/{key}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    value: Any = Field(description="Any JSON value (at most 1 MiB by default).")
    if_version: JsonInt | None = Field(
        default=None, ge=0, le=2**63 - 1, description="0: create only; n: only if at version n."
    )
    ttl: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds until the item expires (at most max_ttl_seconds).",
    )
    text: str | None = Field(default=None, description="Text that search indexes.")
    metadata: dict[str, Any] | None = Field(default=None, description="Filterable attributes.")
    fence: FenceBody | None = Field(
        default=None,
        description="Write only while no newer token of this lease was issued (409 naming "
        "fence otherwise).",
    )


class BatchBody(BaseModel):
    """Body of POST /v1/batch."""

    model_config = ConfigDict(extra="forbid")

    ops: list[dict[str, Any]] = Field(
        description="Operations: {'op':'put',...PutOp} or {'op':'delete',...DeleteOp}."
    )


def item_response(item: Item, status: int = 200) -> Response:
    """The item as JSON with its version as ``ETag``."""
    return model_response(item, status, {ETAG_HEADER: etag(item.version)})


_IF_MATCH_DOC = 'Expected version, e.g. "3".'
_IF_NONE_MATCH_DOC = "'*': create only."
#: The precondition headers of item writes (FastAPI reads them by these names).
_IfMatch = Annotated[str | None, Header(alias=IF_MATCH_HEADER, description=_IF_MATCH_DOC)]


def _param(name: str, where: str, description: str | None = None) -> dict[str, Any]:
    """An OpenAPI parameter as FastAPI would list a ``str`` (path) or ``str | None``
    (header) parameter; service/openapi.py then adds its pattern."""
    schema: dict[str, Any] = {"type": "string", "title": name.title()}
    param: dict[str, Any] = {"name": name, "in": where, "required": where == "path"}
    if description is not None:
        schema["description"] = param["description"] = description
    param["schema"] = schema
    return param


#: The item routes read the item path (and PUT its precondition headers and body) from
#: the request themselves: FastAPI's resolution of those parameters cost about a tenth
#: of a small write's time, and of the body and the hive dependency about as much again.
#: The document lists them as before.
_ITEM_PATH = [_param("path", "path")]
_PUT_BODY = JSONBody(PutBody)
_PUT_OPENAPI = {
    "parameters": [
        *_ITEM_PATH,
        _param(IF_MATCH_HEADER, "header", _IF_MATCH_DOC),
        _param(IF_NONE_MATCH_HEADER, "header", _IF_NONE_MATCH_DOC),
    ],
    **_PUT_BODY.openapi,
}


@router.put(
    "/v1/items/{path:anypath}",
    response_model=Item,
    summary="Create or replace an item (compare-and-set with if_version or If-Match).",
    responses={
        409: {"description": "Version mismatch, or a stale fence"},
        412: {"description": "If-Match failed"},
    },
    openapi_extra=_PUT_OPENAPI,
)
async def put_item(request: Request) -> Response:
    # In FastAPI's order: the body is read and parsed, then the caller is authenticated
    # and rate-limited, then the body is validated.
    data = await _PUT_BODY.read(request)
    hive = await write_hive(request)
    body = _PUT_BODY.validate(data)
    namespace, key = split_item_path(request.path_params["path"])
    headers = request.headers
    if_match, if_none_match = headers.get(IF_MATCH_HEADER), headers.get(IF_NONE_MATCH_HEADER)
    if_version = body.if_version
    from_header = False
    if if_match is not None:
        if_version, from_header = version_from_etag(if_match, IF_MATCH_HEADER), True
    elif if_none_match is not None:
        if if_none_match.strip() != "*":
            raise InvalidInput(
                f"{IF_NONE_MATCH_HEADER} supports only '*'", field=IF_NONE_MATCH_HEADER
            )
        if_version, from_header = 0, True
    if from_header and body.if_version is not None and body.if_version != if_version:
        # Both preconditions must hold and an item is at one version: one of them fails.
        raise Conflict(
            f"if_version {body.if_version} and the precondition header (version {if_version}) "
            "cannot both hold; nothing was written",
            field="if_version",
        )
    try:
        item = await hive.put(
            namespace,
            key,
            body.value,
            if_version=if_version,
            ttl=body.ttl,
            text=body.text,
            metadata=body.metadata,
            fence=None if body.fence is None else (body.fence.lease, body.fence.token),
        )
    except Conflict as exc:
        if from_header and exc.field != "fence":  # a stale fence is no failed precondition
            raise PreconditionFailed(
                exc.message, field=exc.field, current_version=exc.current_version
            ) from None
        raise
    return item_response(item, 201 if item.version == 1 else 200)


@router.get(
    "/v1/items/{path:anypath}",
    response_model=Item,
    summary="Get an item (404 if absent).",
    openapi_extra={"parameters": _ITEM_PATH},
)
async def get_item(request: Request) -> Response:
    # The hive is resolved here, not as a FastAPI dependency: this route has no other
    # parameter to validate first, and the dependency machinery cost a tenth of a GET.
    hive = await read_hive(request)
    namespace, key = split_item_path(request.path_params["path"])
    item = await hive.get(namespace, key)
    if item is None:
        raise NotFound(f"no item {namespace}/{key}", field="key")
    return item_response(item)


@router.delete(
    "/v1/items/{path:anypath}",
    status_code=204,
    summary="Delete an item and its history (404 if absent).",
)
async def delete_item(
    path: str,
    hive: WriteHive,
    if_version: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="Only if at this version.")
    ] = None,
    if_match: _IfMatch = None,
) -> Response:
    namespace, key = split_item_path(path)
    if if_match is not None:
        if_version = version_from_etag(if_match, IF_MATCH_HEADER)
    deleted = await hive.delete(namespace, key, if_version=if_version)
    if not deleted:
        raise NotFound(f"no item {namespace}/{key}", field="key")
    return Response(status_code=204)


@router.get(
    "/v1/items",
    response_model=Page[Item],
    summary="List items under a namespace prefix, or the keys of one namespace by key prefix.",
)
async def list_items(
    hive: ReadHive,
    prefix: Annotated[str, Query(description="Namespace prefix; empty for all.")] = "",
    key_prefix: Annotated[
        str | None,
        Query(
            description="List only namespace `prefix` itself (not the namespaces under it), "
            "its items whose key starts with this (empty: all its items); needs a prefix."
        ),
    ] = None,
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    page = await hive.list(prefix, key_prefix=key_prefix, limit=limit, cursor=cursor)
    return model_response(page)


@router.get(
    "/v1/namespaces", response_model=Page[str], summary="List namespaces holding live items."
)
async def list_namespaces(
    hive: ReadHive,
    prefix: Annotated[str, Query(description="Namespace prefix; empty for all.")] = "",
    max_depth: Annotated[
        int | None, Query(le=2**63 - 1, description="Truncate to this many segments.")
    ] = None,
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    page = await hive.list_namespaces(prefix, max_depth=max_depth, limit=limit, cursor=cursor)
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@router.get(
    "/v1/namespaces/counts",
    response_model=Page[NamespaceCount],
    summary="List namespaces holding live items, each with its number of live items.",
)
async def namespace_counts(
    hive: ReadHive,
    prefix: Annotated[str, Query(description="Namespace prefix; empty for all.")] = "",
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    page = await hive.namespace_counts(prefix, limit=limit, cursor=cursor)
    return model_response(page)


@router.post(
    "/v1/batch",
    response_model=BatchResult,
    summary="Apply puts and deletes atomically (all or none).",
)
async def batch(body: BatchBody, hive: WriteHive) -> Response:
    results = await hive.batch(body.ops)  # type: ignore[arg-type]
    return model_response(BatchResult(results=results))


@router.get(
    "/v1/history/{path:anypath}",
    response_model=HistoryResult,
    summary="Stored versions of an item, newest first.",
)
async def history(
    path: str,
    hive: ReadHive,
    limit: Annotated[
        int, Query(le=2**63 - 1, description="Most versions returned, 1..1000.")
    ] = 100,
) -> Response:
    namespace, key = split_item_path(path)
    items = await hive.history(namespace, key, limit=limit)
    return model_response(HistoryResult(items=items))
