"""The base of every error an HTTP client of ours sees, and the OpenAI envelope it renders.

Both HTTP servers answer a failure with ``{"error": {"message", "type", "param", "code"}}``:
the control plane with its own string codes (:mod:`controlplane.errors`), the simulator as
vLLM does, with the HTTP status as ``code`` (:mod:`simulator.errors`). Each process keeps
its own hierarchy; the envelope's shape and the way a class states its attributes live
here, once.

A subclass states its attributes in its ``class`` line instead of a block of assignments,
so each class of a hierarchy is one row of that hierarchy's table::

    class NotFound(SynapseError, http_status=404, error_type="invalid_request_error"): ...

Only attributes the hierarchy's base declares can be set this way (a misspelt name is a
``TypeError`` at import, not a silently ignored attribute).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    http_status = 500
    error_type = "internal_error"

    def __init_subclass__(cls, **attributes: Any) -> None:
        super().__init_subclass__()
        for name, value in attributes.items():
            if not hasattr(cls, name):
                raise TypeError(f"{cls.__name__}: {name} is not an attribute of its errors")
            setattr(cls, name, value)

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error object for this error."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}
