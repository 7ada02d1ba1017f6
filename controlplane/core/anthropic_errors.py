"""Anthropic-shaped errors for ``/v1/messages``, from the control plane's error classes.

Anthropic's error body is ``{"type": "error", "error": {"type", "message"},
"request_id"}``; the HTTP status stays the one our class carries (``http_status``, with
``Retry-After`` from ``headers()``), and the ``type`` follows Anthropic's table for that
status (docs.claude.com/en/api/errors):

=====  ===========================  =====  ========================
400    ``invalid_request_error``    429    ``rate_limit_error``
401    ``authentication_error``     500    ``api_error``
402    ``billing_error``            502    ``api_error``
403    ``permission_error``         503    ``overloaded_error``
404    ``not_found_error``          504    ``timeout_error``
409    ``conflict_error``           529    ``overloaded_error``
413    ``request_too_large``
=====  ===========================  =====  ========================

Any other 4xx is ``invalid_request_error`` and any other 5xx ``api_error``, as Anthropic
says it does. A backend's refusal (:class:`controlplane.errors.BackendRefusal`) keeps
its status and message. In a stream that has already begun, the error is an ``error``
event carrying the same body (:func:`sse_event`), which the SDKs raise as an exception.

``controlplane.errors`` stays the one place that builds the OpenAI envelope; this module
is the one place that builds Anthropic's, and says which paths get it (:func:`covers`),
for the edge to call: the middleware, the Messages handlers, and the server below the app
(a request aiohttp cannot parse, a refused ``Expect``).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import orjson

from controlplane import errors

PATH = "/v1/messages"
_SLASHES = re.compile("/{2,}")


def covers(path: str) -> bool:
    """Whether an error answering a request to ``path`` is in Anthropic's shape: ``path``
    is under :data:`PATH` once normalised (runs of slashes as one, dot segments resolved),
    unknown sub-paths included, as the Anthropic SDKs read only that shape;
    ``//v1/messages/x`` is theirs too."""
    path = posixpath.normpath(_SLASHES.sub("/", path)) if path else path
    return path == PATH or path.startswith(PATH + "/")


TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
         403: "permission_error", 404: "not_found_error", 409: "conflict_error",
         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
         502: "api_error", 503: "overloaded_error", 504: "timeout_error",
         529: "overloaded_error"}


def error_type(status: int) -> str:
    return TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def body(err: errors.SynapseError, request_id: str | None = None) -> dict[str, Any]:
    """The Anthropic error body for ``err``."""
    out: dict[str, Any] = {"type": "error", "error": {
        "type": error_type(err.http_status), "message": err.message}}
    if request_id is not None:
        out["request_id"] = request_id
    return out


def render(err: errors.SynapseError, request_id: str | None = None) -> tuple[int, bytes,
                                                                             dict[str, str]]:
    """(status, JSON body, extra headers) of the HTTP answer for ``err``."""
    return err.http_status, orjson.dumps(body(err, request_id)), err.headers()


def sse_event(err: errors.SynapseError, request_id: str | None = None) -> bytes:
    """The ``error`` event that ends a Messages stream."""
    return b"event: error\ndata: " + orjson.dumps(body(err, request_id)) + b"\n\n"
