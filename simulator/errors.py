"""Errors the simulator answers with, and how they are rendered.

::

    SimError (500 InternalServerError)
    ├── BadRequest (400 BadRequestError)       invalid JSON, fields, lengths
    ├── NotFound (404 NotFoundError)           unknown model or route
    │   └── ResponseNotFound (404 invalid_request_error)  unknown Responses id
    ├── Unauthorized (401 AuthenticationError)  no or wrong key (``api_key`` set)
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
middleware that picks the shape lives in ``simulator.app``. The envelope itself, and the
class lines that carry each class's attributes, come from :mod:`synapse_common.api_error`.
"""

from __future__ import annotations

from typing import Any

from synapse_common import api_error


class SimError(api_error.ApiError, error_type="InternalServerError"):
    tei_type = "Backend"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=self.http_status)

    @property
    def status(self) -> int:
        """The HTTP status, by the name vLLM's errors give it."""
        return self.http_status

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}

    def tei_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.tei_type}


class BadRequest(SimError, http_status=400, error_type="BadRequestError",
                 tei_type="Validation"):
    pass


class NotFound(SimError, http_status=404, error_type="NotFoundError"):
    pass


class ResponseNotFound(NotFound, error_type="invalid_request_error"):
    """vLLM's answer to an unknown ``previous_response_id`` or ``GET /v1/responses/{id}``."""

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param="response_id")


class Unauthorized(SimError, http_status=401, error_type="AuthenticationError",
                   tei_type="Unauthorized"):
    pass


class MethodNotAllowed(SimError, http_status=405, error_type="MethodNotAllowed"):
    pass


class Unprocessable(SimError, http_status=422, error_type="UnprocessableEntityError",
                    tei_type="Validation"):
    pass


class PayloadTooLarge(SimError, http_status=413, error_type="BadRequestError",
                      tei_type="Validation"):
    pass


class Unavailable(SimError, http_status=503, error_type="ServiceUnavailableError",
                  tei_type="Unhealthy"):
    pass


class InjectedError(SimError):
    """The error-rate fault: a deliberate, labelled 500."""
