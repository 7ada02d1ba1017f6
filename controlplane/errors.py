"""The control plane's one error hierarchy.

Every failure a client can see is one of these classes; the HTTP error middleware renders
it as the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` with
``http_status``, and the gRPC servicers map the same class to a status code through
``grpc_code`` (a name of ``grpc.StatusCode``: this module stays free of grpc so that the
core, which raises these, never imports it).

::

    SynapseError (500, internal_error)
    ├── BadRequest (400, invalid_request_error)        bad JSON, a bad field (``param``)
    ├── Unauthorized (401, authentication_error)       missing / unknown API key
    ├── Forbidden (403, permission_error)              model not allowed for the tenant
    ├── NotFound (404, invalid_request_error)          unknown model or route
    ├── Conflict (409, invalid_request_error)          operation not possible in this state
    ├── PayloadTooLarge (413, invalid_request_error)   body over ``http.max_body_bytes``
    ├── RateLimited (429, rate_limit_error)            carries ``retry_after_s``
    ├── UpstreamError (502, upstream_error)            every candidate failed
    ├── Unavailable (503, service_unavailable)         no backend can serve the model
    └── UpstreamTimeout (504, timeout_error)           no first byte in time
"""

from __future__ import annotations

from typing import Any


class SynapseError(Exception):
    http_status = 500
    error_type = "internal_error"
    grpc_code = "INTERNAL"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error object for this error."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries (``Retry-After``)."""
        return {}


class BadRequest(SynapseError):
    http_status = 400
    error_type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(SynapseError):
    http_status = 401
    error_type = "authentication_error"
    grpc_code = "UNAUTHENTICATED"
    default_code = "invalid_api_key"


class Forbidden(SynapseError):
    http_status = 403
    error_type = "permission_error"
    grpc_code = "PERMISSION_DENIED"
    default_code = "model_not_allowed"


class NotFound(SynapseError):
    http_status = 404
    error_type = "invalid_request_error"
    grpc_code = "NOT_FOUND"
    default_code = "model_not_found"


class Conflict(SynapseError):
    """The request is valid but the fleet's state refuses it (e.g. no node fits)."""

    http_status = 409
    error_type = "invalid_request_error"
    grpc_code = "FAILED_PRECONDITION"


class PayloadTooLarge(SynapseError):
    http_status = 413
    error_type = "invalid_request_error"
    grpc_code = "RESOURCE_EXHAUSTED"
    default_code = "request_too_large"


class RateLimited(SynapseError):
    http_status = 429
    error_type = "rate_limit_error"
    grpc_code = "RESOURCE_EXHAUSTED"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit

    def headers(self) -> dict[str, str]:
        # Retry-After is whole seconds; never 0, which clients read as "now".
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}


class UpstreamError(SynapseError):
    http_status = 502
    error_type = "upstream_error"
    grpc_code = "UNAVAILABLE"
    default_code = "upstream_failed"


class Unavailable(SynapseError):
    http_status = 503
    error_type = "service_unavailable"
    grpc_code = "UNAVAILABLE"
    default_code = "no_backend"


class UpstreamTimeout(SynapseError):
    http_status = 504
    error_type = "timeout_error"
    grpc_code = "DEADLINE_EXCEEDED"
    default_code = "upstream_timeout"


def internal(message: str = "internal error") -> SynapseError:
    """The error shown for an unexpected exception (details stay in the log)."""
    return SynapseError(message)
