"""Our error classes rendered in Anthropic's shape, as the anthropic client reads them."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from controlplane import errors
from controlplane.core import anthropic_errors
from tests.controlplane import anthropic_sdk as sdk

CASES = [
    (errors.BadRequest("max_tokens: required", param="max_tokens"), 400,
     "invalid_request_error", anthropic.BadRequestError),
    (errors.Unauthorized("invalid API key"), 401, "authentication_error",
     anthropic.AuthenticationError),
    (errors.Forbidden("model not allowed"), 403, "permission_error",
     anthropic.PermissionDeniedError),
    (errors.NotFound("no such model"), 404, "not_found_error", anthropic.NotFoundError),
    (errors.Conflict("no node fits"), 409, "conflict_error", anthropic.ConflictError),
    (errors.RequestTimeout("body too slow"), 408, "invalid_request_error",
     anthropic.APIStatusError),
    (errors.PayloadTooLarge("body over 32 MB"), 413, "request_too_large",
     anthropic.RequestTooLargeError),
    (errors.RateLimited("slow down", retry_after_s=2.5, limit="rpm"), 429,
     "rate_limit_error", anthropic.RateLimitError),
    (errors.internal(), 500, "api_error", anthropic.InternalServerError),
    (errors.UpstreamConnectError("every backend failed"), 502, "api_error",
     anthropic.InternalServerError),
    (errors.Unavailable("no backend"), 503, "overloaded_error", anthropic.InternalServerError),
    (errors.UpstreamTimeout("no first byte in time"), 504, "timeout_error",
     anthropic.InternalServerError),
]


@pytest.mark.parametrize(("err", "status", "kind", "raised"), CASES)
def test_each_error_class_reaches_the_client_in_anthropic_shape(
        err: errors.SynapseError, status: int, kind: str,
        raised: type[anthropic.APIStatusError]) -> None:
    code, body, headers = anthropic_errors.render(err, request_id="req_1")

    def answer(_body: object) -> httpx2.Response:
        return httpx2.Response(code, content=body, headers={
            "content-type": "application/json", **headers})

    with sdk.client(answer) as client, pytest.raises(raised) as caught:
        client.messages.create(**sdk.ASK)
    assert caught.value.status_code == status
    assert caught.value.body == {"type": "error", "request_id": "req_1",
                                 "error": {"type": kind, "message": err.message}}
    if isinstance(err, errors.RateLimited):
        assert caught.value.response.headers["retry-after"] == "3"


def test_a_backends_refusal_keeps_its_status_and_message() -> None:
    # vLLM's own Anthropic error body, as its /v1/messages answers it
    refusal = errors.BackendRefusal.from_body(
        400, b'{"type":"error","error":{"type":"BadRequestError",'
             b'"message":"max_tokens is too large"}}')
    assert anthropic_errors.body(refusal) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens is too large"}}
    assert anthropic_errors.render(refusal)[0] == 400
    assert anthropic_errors.error_type(422) == "invalid_request_error"
    assert anthropic_errors.error_type(507) == "api_error"


def test_a_stream_error_event_is_raised_by_the_sdk() -> None:
    event = anthropic_errors.sse_event(errors.Unavailable("no backend left"))
    assert event.startswith(b"event: error\ndata: ")
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk.final_message(event)
    assert caught.value.body == {"type": "error", "error": {
        "type": "overloaded_error", "message": "no backend left"}}
