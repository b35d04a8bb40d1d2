"""HTTP route of search."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.responses import Response

from hivemem.models import IndexStatus, JsonInt
from hivemem.service.deps import SearchHive
from hivemem.service.routing import JSONRoute, model_response
from hivemem.wire import SearchResult

router = APIRouter(tags=["search"], route_class=JSONRoute)


class SearchBody(BaseModel):
    """Body of POST /v1/search; fields mean what they mean for ``Hive.search``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(description="What to look for (non-empty).")
    prefix: StrictStr = Field(default="", description="Namespace prefix; empty for all.")
    filter: dict[str, Any] | None = Field(
        default=None,
        description='Metadata conditions: {"k": v} or {"k": {"$in"|"$gt"|"$gte"|"$lt"|"$lte"|'
        '"$eq": ...}}.',
    )
    author: StrictStr | None = Field(default=None, description="Only items by this agent.")
    updated_after: datetime | StrictFloat | StrictInt | None = Field(
        default=None, description="Only items updated after (ISO 8601 or UNIX seconds)."
    )
    updated_before: datetime | StrictFloat | StrictInt | None = Field(
        default=None, description="Only items updated before (ISO 8601 or UNIX seconds)."
    )
    mode: Literal["hybrid", "vector", "lexical"] = "hybrid"
    limit: JsonInt = Field(default=10, le=2**63 - 1, description="Most hits, 1..100.")
    consistency: Literal["eventual", "indexed"] = Field(
        default="eventual",
        description="eventual: rank what is indexed now (words at once, vectors as the "
        "indexer stores them); indexed: first wait for the vectors of every earlier write.",
    )


class IndexWaitBody(BaseModel):
    """Body of POST /v1/index/wait."""

    model_config = ConfigDict(extra="forbid")

    cursor: StrictStr | None = Field(
        default=None, description="A feed cursor the caller has seen (covered in any case)."
    )
    timeout: StrictFloat | StrictInt = Field(
        default=10,
        allow_inf_nan=False,
        description="Seconds to wait at most (capped by max_wait_seconds; 0 or less: "
        "answer at once).",
    )


class IndexWaitResult(BaseModel):
    """Answer of POST /v1/index/wait."""

    indexed: bool = Field(description="True when every earlier write has its vector.")


@router.post(
    "/v1/search",
    response_model=SearchResult,
    summary="Hybrid search (BM25 + vectors, reciprocal rank fusion), or one mode alone.",
)
async def search(body: SearchBody, hive: SearchHive) -> Response:
    hits = await hive.search(
        body.prefix,
        body.query,
        filter=body.filter,
        author=body.author,
        updated_after=body.updated_after,
        updated_before=body.updated_before,
        mode=body.mode,
        limit=body.limit,
        consistency=body.consistency,
    )
    return model_response(SearchResult(hits=hits))


@router.get(
    "/v1/index",
    response_model=IndexStatus,
    summary="How far the vectors lag behind the writes (entries waiting, oldest's age).",
)
async def index_status(hive: SearchHive) -> Response:
    return model_response(await hive.index_status())


@router.post(
    "/v1/index/wait",
    response_model=IndexWaitResult,
    summary="Wait (long-poll) until every earlier write has its vector.",
)
async def index_wait(body: IndexWaitBody, hive: SearchHive) -> Response:
    wait = min(max(0.0, float(body.timeout)), hive.settings.max_wait_seconds)
    indexed = await hive.wait_indexed(body.cursor, timeout=wait)
    return model_response(IndexWaitResult(indexed=indexed))
