"""The HTTP contract both sides share (hivemem.wire): ETags, Retry-After, problem+json
and its decoding, item paths, the registry's ``healthy`` query."""

from __future__ import annotations

import orjson
import pytest

from hivemem.errors import (
    Conflict,
    CursorExpired,
    HivememError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
)
from hivemem.wire import (
    HEALTHY,
    error_from_response,
    etag,
    healthy_param,
    item_path,
    problem_body,
    problem_headers,
    retry_after_header,
    split_item_path,
    version_from_etag,
)


@pytest.mark.parametrize("form", ['"42"', 'W/"42"', "42", '  "42" '])
def test_every_etag_form_names_the_version(form: str) -> None:
    assert version_from_etag(form) == 42


def test_etag_is_the_quoted_version_and_reads_back() -> None:
    assert etag(7) == '"7"'
    assert version_from_etag(etag(10**18 - 1)) == 10**18 - 1  # 18 digits, below 2**63


@pytest.mark.parametrize("bad", ['"x"', '"-1"', "*", '"1234567890123456789"', '"1", "2"', ""])
def test_a_malformed_etag_is_invalid_input_naming_its_header(bad: str) -> None:
    with pytest.raises(InvalidInput) as info:
        version_from_etag(bad, "If-Match")
    assert info.value.field == "If-Match"


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (30.0, "30")]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    seconds: float, header: str
) -> None:
    assert retry_after_header(seconds) == header


ERRORS: list[HivememError] = [
    InvalidInput("bad ttl", field="ttl"),
    TooLarge("value too big", field="value"),
    NotFound("no item ns/k", field="key"),
    Conflict("stale", field="if_version", current_version=3),
    Conflict("duplicate id", field="session_id"),
    CursorExpired("trimmed", field="after"),
    Unauthenticated("no key", field="Authorization"),
    PermissionDenied("not yours", field="namespace"),
    RateLimited("slow down", retry_after=2.5),
    Unavailable("store down"),
    UpstreamFailed("embedder answered nonsense"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_crosses_the_wire_as_itself(error: HivememError) -> None:
    body = problem_body(error, "/v1/items/ns/k")
    assert body["instance"] == "/v1/items/ns/k"
    assert body["status"] == error.status
    back = error_from_response(error.status, orjson.dumps(body))
    assert type(back) is type(error)
    assert (back.message, back.field) == (error.message, error.field)
    assert getattr(back, "current_version", None) == getattr(error, "current_version", None)
    assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (503, b"<html>bad gateway</html>", Unavailable),
        (404, b"", NotFound),
        (412, b"", Conflict),
        (400, b"[1]", InvalidInput),
        (418, b"{}", HivememError),
    ],
)
def test_a_body_that_is_no_problem_is_mapped_by_its_status(
    status: int, body: bytes, cls: type[HivememError]
) -> None:
    assert type(error_from_response(status, body)) is cls


def test_problem_headers_carry_retry_after_and_the_bearer_challenge() -> None:
    assert problem_headers(RateLimited("x", retry_after=0.3)) == {"Retry-After": "1"}
    assert problem_headers(Unauthenticated("x")) == {"WWW-Authenticate": 'Bearer realm="hivemem"'}
    assert problem_headers(NotFound("x")) == {}


def test_an_item_path_is_namespace_then_quoted_key_and_splits_back() -> None:
    path = item_path("team/q 4", "k?#%")
    assert path == "team/q%204/k%3F%23%25"
    assert split_item_path("team/q 4/k?#%") == ("team/q 4", "k?#%")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: item_path("ns", "a/b"), "key"),
        (lambda: item_path(1, "k"), "namespace"),
        (lambda: split_item_path("k"), "namespace"),
        (lambda: split_item_path("/k"), "namespace"),
        (lambda: split_item_path("ns/"), "key"),
    ],
)
def test_an_item_path_without_namespace_or_key_is_refused(call: object, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field


@pytest.mark.parametrize("healthy", [True, False, None])
def test_the_healthy_query_reads_back_as_the_argument(healthy: bool | None) -> None:
    assert HEALTHY[healthy_param(healthy)] is healthy
