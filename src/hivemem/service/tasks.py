"""HTTP routes of the task queue: submit, claim (a long poll), heartbeat, complete, fail,
release, result (a long poll), cancel, requeue, get, list and stats.

A request's ``wait`` is cut to ``max_wait_seconds`` (a longer one is not an error); the
client repeats the request until its own wait ends. Each route acts through the calling
principal's view (action ``tasks``): a claimed task belongs to the authenticated agent,
and only that agent's heartbeat, complete, fail or release of the attempt it holds is
accepted (with a policy in force, a task of a queue the caller may not use is 404, as an
absent one: the hive checks).

A task id is one path segment (ids are hex digits): a path with more segments is no
task route (404, or 405 for a route of another method), so the client refuses an id
with a ``/`` itself, naming ``task_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hivemem.core.tasks import (
    MAX_ATTEMPTS,
    MAX_BACKOFF_SECONDS,
    MAX_ERROR_CHARS,
    MAX_LEASE_SECONDS,
    MAX_PRIORITY,
    MAX_TIMEOUT_SECONDS,
    MIN_LEASE_SECONDS,
)
from hivemem.errors import NotFound
from hivemem.models import JsonInt, Page, QueueStats, Task
from hivemem.service.deps import TasksHive, capped
from hivemem.service.routing import JSONRoute, model_response, models_response

router = APIRouter(tags=["tasks"], route_class=JSONRoute)

#: The states a listing may select.
TaskState = Literal["ready", "delayed", "running", "completed", "dead", "cancelled"]


@dataclass(frozen=True, slots=True)
class Held:
    """What a worker names of a task it holds: its ``id`` and ``attempt`` (a heartbeat
    without a lease renews for the claim's lease, which the hive reads)."""

    id: str
    attempt: int


class SubmitBody(BaseModel):
    """Body of POST /v1/queues/{queue}/tasks."""

    model_config = ConfigDict(extra="forbid", strict=True)

    payload: Any = Field(default=None, description="Any JSON value (at most 64 KiB by default).")
    idempotency_key: str | None = Field(
        default=None, description="1-512 bytes; a repeat with the key returns the first task."
    )
    timeout: float | None = Field(
        default=None,
        ge=MIN_LEASE_SECONDS,
        le=MAX_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Seconds one attempt may run; null: no limit.",
    )
    max_attempts: JsonInt = Field(
        default=3, ge=1, le=MAX_ATTEMPTS, description="Claims before the task is dead."
    )
    backoff: float = Field(
        default=1.0,
        ge=0,
        le=MAX_BACKOFF_SECONDS,
        allow_inf_nan=False,
        description="Seconds before the first retry; doubles with each further one.",
    )
    priority: JsonInt = Field(
        default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Higher is claimed first."
    )
    delay: float = Field(
        default=0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds before the task may be claimed (at most max_ttl_seconds).",
    )


class ClaimBody(BaseModel):
    """Body of POST /v1/queues/{queue}/claim."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lease: float = Field(
        default=30.0,
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds the task is held unless renewed by a heartbeat.",
    )
    wait: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait for a task (cut to max_wait_seconds); null or 0: none.",
    )


class HeartbeatBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/heartbeat."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attempt: JsonInt = Field(ge=1, le=MAX_ATTEMPTS, description="The attempt held (from claim).")
    lease: float | None = Field(
        default=None,
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="Seconds from now; null: the claim's lease.",
    )


class CompleteBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/complete."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attempt: JsonInt = Field(ge=1, le=MAX_ATTEMPTS, description="The attempt held (from claim).")
    result: Any = Field(default=None, description="Any JSON value (at most 64 KiB by default).")


class FailBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/fail."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attempt: JsonInt = Field(ge=1, le=MAX_ATTEMPTS, description="The attempt held (from claim).")
    error: str = Field(max_length=MAX_ERROR_CHARS, description="What went wrong.")
    retryable: bool = Field(default=True, description="false: the task is dead at once.")


class ReleaseBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/release."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attempt: JsonInt = Field(ge=1, le=MAX_ATTEMPTS, description="The attempt held (from claim).")


class CancelBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/cancel (empty)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RequeueBody(BaseModel):
    """Body of POST /v1/tasks/{task_id}/requeue."""

    model_config = ConfigDict(extra="forbid", strict=True)

    delay: float = Field(
        default=0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds before it may be claimed (at most max_ttl_seconds).",
    )


@router.post(
    "/v1/queues/{queue:anypath}/tasks",
    status_code=201,
    response_model=Task,
    summary="Submit a task (a repeat with the same idempotency_key returns the first).",
)
async def submit(queue: str, body: SubmitBody, hive: TasksHive) -> Response:
    """Put a task on ``queue``; 201 with the task."""
    task = await hive.submit(
        queue,
        body.payload,
        idempotency_key=body.idempotency_key,
        timeout=body.timeout,
        max_attempts=body.max_attempts,
        backoff=body.backoff,
        priority=body.priority,
        delay=body.delay,
    )
    return model_response(task, 201)


@router.post(
    "/v1/queues/{queue:anypath}/claim",
    response_model=Task,
    summary="Claim the next due task, waiting up to `wait` seconds; 204 if none came.",
    responses={204: {"description": "No task was due within the wait."}},
)
async def claim(queue: str, hive: TasksHive, body: ClaimBody | None = None) -> Response:
    """Take the next due task of ``queue``, or answer 204 when none came in the wait."""
    body = body or ClaimBody()
    task = await hive.claim(queue, lease=body.lease, wait=capped(hive, body.wait))
    if task is None:
        return Response(status_code=204)
    return model_response(task)


@router.get(
    "/v1/queues/{queue:anypath}/tasks",
    response_model=Page[Task],
    summary="The queue's tasks in submission order.",
)
async def list_tasks(
    queue: str,
    hive: TasksHive,
    state: Annotated[
        TaskState | None, Query(description="Only tasks in this state (ready includes delayed).")
    ] = None,
    limit: Annotated[int, Query(le=2**63 - 1, description="Page size, 1..1000.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    """One page of the tasks of ``queue``."""
    page = await hive.list_tasks(queue, state=state, limit=limit, cursor=cursor)
    return model_response(page)


@router.get(
    "/v1/queues",
    response_model=list[QueueStats],
    summary="The queues holding a task that the caller may use, each with its counts.",
)
async def queues(hive: TasksHive) -> Response:
    """Every queue with at least one task (at most max_page_size), by name."""
    found = await hive.queues()
    return models_response(found)


@router.get(
    "/v1/queues/{queue:anypath}/stats",
    response_model=QueueStats,
    summary="How many tasks of the queue are in each state.",
)
async def queue_stats(queue: str, hive: TasksHive) -> Response:
    """The counts of ``queue``."""
    return model_response(await hive.queue_stats(queue))


@router.get(
    "/v1/tasks/{task_id}/result",
    response_model=Task,
    summary="The task once it is done, or when `wait` seconds have passed (a long poll).",
)
async def result(
    task_id: str,
    hive: TasksHive,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            allow_inf_nan=False,
            description="Seconds to wait for the task to finish (cut to max_wait_seconds).",
        ),
    ] = None,
) -> Response:
    """The task when done or when the wait ends (check its state)."""
    return model_response(await hive.result(task_id, wait=capped(hive, wait)))


@router.get("/v1/tasks/{task_id}", response_model=Task, summary="Get a task (404 if none).")
async def get_task(task_id: str, hive: TasksHive) -> Response:
    """The task, or 404 naming ``task_id``."""
    task = await hive.get_task(task_id)
    if task is None:
        raise NotFound(f"task {task_id!r} does not exist", field="task_id")
    return model_response(task)


@router.post(
    "/v1/tasks/{task_id}/heartbeat",
    response_model=Task,
    summary="Extend the lease of the attempt this agent holds.",
)
async def heartbeat(task_id: str, body: HeartbeatBody, hive: TasksHive) -> Response:
    """Renew the lease of attempt ``body.attempt`` (default: the claim's lease)."""
    task = await hive.heartbeat(Held(task_id, body.attempt), lease=body.lease)  # type: ignore[arg-type]
    return model_response(task)


@router.post(
    "/v1/tasks/{task_id}/complete",
    response_model=Task,
    summary="Finish the attempt this agent holds with a result.",
)
async def complete(task_id: str, body: CompleteBody, hive: TasksHive) -> Response:
    """Complete the task; result waiters get it."""
    task = await hive.complete(Held(task_id, body.attempt), body.result)  # type: ignore[arg-type]
    return model_response(task)


@router.post(
    "/v1/tasks/{task_id}/fail",
    response_model=Task,
    summary="Fail the attempt this agent holds (retried after its backoff, or dead).",
)
async def fail(task_id: str, body: FailBody, hive: TasksHive) -> Response:
    """Fail the attempt with ``body.error``."""
    task = await hive.fail(
        Held(task_id, body.attempt),  # type: ignore[arg-type]
        body.error,
        retryable=body.retryable,
    )
    return model_response(task)


@router.post(
    "/v1/tasks/{task_id}/release",
    response_model=Task,
    summary="Give back the attempt this agent holds without running it.",
)
async def release_task(task_id: str, body: ReleaseBody, hive: TasksHive) -> Response:
    """Release the task: ready again at once; the attempt does not count."""
    task = await hive.release_task(Held(task_id, body.attempt))  # type: ignore[arg-type]
    return model_response(task)


@router.post(
    "/v1/tasks/{task_id}/cancel",
    response_model=Task,
    summary="Cancel a ready, delayed or running task.",
)
async def cancel(task_id: str, hive: TasksHive, body: CancelBody | None = None) -> Response:
    """Cancel the task (409 naming ``task_id`` when it is already done)."""
    return model_response(await hive.cancel(task_id))


@router.post(
    "/v1/tasks/{task_id}/requeue",
    response_model=Task,
    summary="Put a dead or cancelled task back on its queue with fresh attempts.",
)
async def requeue(task_id: str, hive: TasksHive, body: RequeueBody | None = None) -> Response:
    """Requeue the task after ``body.delay`` seconds."""
    body = body or RequeueBody()
    return model_response(await hive.requeue(task_id, delay=body.delay))
