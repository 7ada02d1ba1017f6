"""``POST /v1/cache/feedback``: a tenant says whether a cached answer was right.

Body: ``{"request_id": "<x-request-id of the answer>", "wrong": true|false}``, with the
tenant's own API key. A wrong hit is evicted from both cache layers at once and, for a
semantic hit, the (query, entry) pair is kept for recalibration; see
:mod:`controlplane.core.cache_feedback`. Answers ``200`` with what was done, ``404``
(``unknown_request_id``) for a request this replica did not answer from the cache
recently for that tenant, ``409`` (``cache_disabled``) when the cache is off, ``503``
naming a layer that could not be reached, ``413`` for a body over
:data:`MAX_BODY_BYTES`. Counted against the tenant's rate limit like any other call.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane import errors
from controlplane.api import context, serving
from controlplane.core import cache_feedback, validation

MAX_ID_CHARS = 128
# A body is an id and a boolean: a larger one is refused (413) unread by the parser, which
# would otherwise spend the event loop on up to http.max_body_bytes of JSON uncharged.
MAX_BODY_BYTES = 4096


async def feedback(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    ctx.cache = "bypass"
    tenant = svc.tenants.authenticate(request.headers.get("Authorization"))
    ctx.tenant = tenant.name
    h = svc.settings.http
    request_id, wrong = _parse(validation.parse_json(
        await serving.read_body(request, MAX_BODY_BYTES, h.body_timeout_s,
                                "a feedback body: an id and a boolean")))
    loop = svc.cache
    if not isinstance(loop, cache_feedback.FeedbackCache):
        raise errors.Conflict("the response cache is off (cache.enabled): there is no cached "
                              "answer to give feedback on", code="cache_disabled")
    permit = await svc.limiter.acquire(tenant, ctx.request_id)
    try:
        outcome = await loop.feedback(tenant.name, request_id, wrong)
    finally:
        serving.release_later(request, permit)
    return web.json_response({"request_id": outcome.request_id, "layer": outcome.layer,
                              "wrong": outcome.wrong, "evicted": outcome.evicted,
                              "recorded": outcome.recorded})


def _parse(body: dict[str, Any]) -> tuple[str, bool]:
    request_id, wrong = body.get("request_id"), body.get("wrong")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise errors.BadRequest("request_id must be the x-request-id of a cached answer "
                                f"(a string of 1 to {MAX_ID_CHARS} characters)",
                                param="request_id", code="invalid_request_id")
    if not isinstance(wrong, bool):
        raise errors.BadRequest("wrong must be true (the cached answer was wrong) or false",
                                param="wrong", code="invalid_value")
    return request_id, wrong
