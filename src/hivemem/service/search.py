"""HTTP route of search."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.responses import Response

from hivemem.models import JsonInt
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
    )
    return model_response(SearchResult(hits=hits))
