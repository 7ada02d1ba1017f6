"""Errors the simulator answers with, and how they are rendered.

::

    SimError (500 InternalServerError)
    ├── BadRequest (400 BadRequestError)       invalid JSON, fields, lengths
    ├── NotFound (404 NotFoundError)           unknown model or route
    │   └── ResponseNotFound (404 invalid_request_error)  unknown Responses id
    ├── MethodNotAllowed (405)                 known route, wrong method
    ├── Unprocessable (422)                    TEI validation (batch too large, empty)
    ├── PayloadTooLarge (413)                  TEI input over max_input_length
    ├── Unavailable (503 ServiceUnavailableError)   slow-start fault
    └── InjectedError (500 InternalServerError)     error-rate fault

vLLM mode renders every error as vLLM ≥ 0.10 does, the OpenAI envelope
``{"error": {"message", "type", "param", "code"}}`` (``code`` is the HTTP status, as in
vLLM); on ``/v1/messages`` vLLM's Anthropic shape ``{"type": "error", "error": {"type",
"message"}}`` (:meth:`SimError.anthropic_body`, vLLM's own type names). TEI's native
routes (``/embed``, ``/rerank``) use TEI's ``{"error", "error_type"}`` instead; the
middleware that picks the shape lives in ``simulator.app``.
"""

from __future__ import annotations

from typing import Any


class SimError(Exception):
    status = 500
    type = "InternalServerError"
    tei_type = "Backend"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def tei_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.tei_type}


class BadRequest(SimError):
    status = 400
    type = "BadRequestError"
    tei_type = "Validation"


class NotFound(SimError):
    status = 404
    type = "NotFoundError"


class ResponseNotFound(NotFound):
    """vLLM's answer to an unknown ``previous_response_id`` or ``GET /v1/responses/{id}``."""

    type = "invalid_request_error"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param="response_id")


class MethodNotAllowed(SimError):
    status = 405
    type = "MethodNotAllowed"


class Unprocessable(SimError):
    status = 422
    type = "UnprocessableEntityError"
    tei_type = "Validation"


class PayloadTooLarge(SimError):
    status = 413
    type = "BadRequestError"
    tei_type = "Validation"


class Unavailable(SimError):
    status = 503
    type = "ServiceUnavailableError"
    tei_type = "Unhealthy"


class InjectedError(SimError):
    """The error-rate fault: a deliberate, labelled 500."""
