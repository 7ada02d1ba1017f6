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
    ├── RequestTimeout (408, invalid_request_error)    body not received in ``http.body_timeout_s``
    ├── PayloadTooLarge (413, invalid_request_error)   body over ``http.max_body_bytes``
    ├── RateLimited (429, rate_limit_error)            carries ``retry_after_s``
    │   ├── BudgetExceeded (insufficient_quota)        a tenant's token / cost budget is spent
    │   ├── QueueFull                                  the tenant's share of the fair queue
    │   └── BodiesPendingFull                          its share of connections awaiting a body
    ├── BackendRefusal (4xx of the backend)            a backend's own client error, passed on
    ├── UpstreamError (502, upstream_error)            every candidate failed
    │   ├── UpstreamConnectError                       no connection (refused, unreachable, TLS)
    │   ├── UpstreamProtocolError                      the answer was not valid HTTP/1.1
    │   └── UpstreamReadError                          the connection broke or went silent
    ├── Unavailable (503, service_unavailable)         no backend can serve the model
    │   ├── Busy (upstream_busy)                       no memory left here for a whole answer
    │   ├── UsageStoreUnavailable                      the usage store did not answer (Retry-After)
    │   └── QueueTimeout                               queued past its deadline (Retry-After)
    └── UpstreamTimeout (504, timeout_error)           no first byte in time

Transports raise only the ``Upstream*`` classes (their foreign exceptions are translated
in one table, :data:`controlplane.adapters.http1.ERRORS`), and their messages never name
an address: a client sees which backend failed by its key, never where it lives.

Each class states its status, type, gRPC code and default ``code`` in its ``class`` line
(the way :mod:`synapse_common.api_error` gives a hierarchy, whose base renders the
envelope); the tree above is that table read top-down.

Nothing else in the control plane builds the envelope: handlers, the SSE error event and
the low-level HTTP parse errors all render one of these classes.

A backend's own words reach a client only through :func:`masked`, the one rule for them:
a refusal (4xx) relayed whole or in any API's shape, the quoted start of a 5xx (masked
before it is cut: :func:`masked_start`), and a static upstream's 200, whole or an event
stream read in pieces (:class:`StreamMask`), lose the backend's whole ``api_key`` in
every spelling it is commonly quoted in (hosted APIs quote the key they were given in
their refusals, and in the error events of a stream). A static upstream's 200s only for a
key of ``ANSWER_MASK_FROM`` characters or more; an agent's engine's never
(:func:`controlplane.core.attempt._masks_answers`). Never a piece of it: refusals
quote the tenant's own text too, and a masked piece would tell the tenant that its text
held a piece of the key.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import urllib.parse
from typing import Any

import orjson

from synapse_common import api_error


class SynapseError(api_error.ApiError):
    grpc_code = "INTERNAL"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param,
                         code=code if code is not None else self.default_code)

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries (``Retry-After``)."""
        return {}

    def reworded(self, message: str) -> SynapseError:
        """The same error (class, code, param) with a message that says more."""
        err = copy.copy(self)
        err.message = message
        err.args = (message,)
        return err


class BadRequest(SynapseError, http_status=400, error_type="invalid_request_error",
                 grpc_code="INVALID_ARGUMENT"):
    pass


class Unauthorized(SynapseError, http_status=401, error_type="authentication_error",
                   grpc_code="UNAUTHENTICATED", default_code="invalid_api_key"):
    pass


class Forbidden(SynapseError, http_status=403, error_type="permission_error",
                grpc_code="PERMISSION_DENIED", default_code="model_not_allowed"):
    pass


class NotFound(SynapseError, http_status=404, error_type="invalid_request_error",
               grpc_code="NOT_FOUND", default_code="model_not_found"):
    pass


class Conflict(SynapseError, http_status=409, error_type="invalid_request_error",
               grpc_code="FAILED_PRECONDITION"):
    """The request is valid but the fleet's state refuses it (e.g. no node fits)."""


class RequestTimeout(SynapseError, http_status=408, error_type="invalid_request_error",
                     grpc_code="DEADLINE_EXCEEDED", default_code="request_timeout"):
    """The client did not send its whole request in time (the connection is closed)."""


class PayloadTooLarge(SynapseError, http_status=413, error_type="invalid_request_error",
                      grpc_code="RESOURCE_EXHAUSTED", default_code="request_too_large"):
    pass


class RateLimited(SynapseError, http_status=429, error_type="rate_limit_error",
                  grpc_code="RESOURCE_EXHAUSTED", default_code="rate_limit_exceeded"):
    def __init__(self, message: str, *, retry_after_s: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit

    def headers(self) -> dict[str, str]:
        return retry_after(self.retry_after_s)


class UpstreamError(SynapseError, http_status=502, error_type="upstream_error",
                    grpc_code="UNAVAILABLE", default_code="upstream_failed"):
    pass


class UpstreamConnectError(UpstreamError):
    """No connection to the backend could be made (tried on the next candidate)."""


class UpstreamProtocolError(UpstreamError):
    """The backend's answer was not valid HTTP/1.1."""


class UpstreamReadError(UpstreamError):
    """The connection broke, or the backend went silent, in the middle of an exchange."""


class BackendRefusal(SynapseError, error_type="invalid_request_error",
                     grpc_code="INVALID_ARGUMENT"):
    """A backend's 4xx, passed to the client with the backend's status, in the envelope."""

    def __init__(self, status: int, message: str, *, error_type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.http_status = status
        if error_type:
            self.error_type = error_type

    @classmethod
    def from_body(cls, status: int, data: bytes) -> BackendRefusal:
        """The refusal a backend's 4xx body describes. vLLM sends the envelope with an
        integer ``code``; others send ``{"detail": …}``, ``{"message": …}`` or text."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = data.decode("utf-8", "replace")[:500]
        inner = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(inner, dict):
            code, param = inner.get("code"), inner.get("param")
            return cls(status, str(inner.get("message") or "the backend refused the request"),
                       error_type=str(inner.get("type") or "invalid_request_error"),
                       param=param if isinstance(param, str) else None,
                       code=code if isinstance(code, str) or code is None
                       else f"upstream_{code}")
        if isinstance(parsed, dict):
            parsed = parsed.get("message") or parsed.get("detail") or str(parsed)
        return cls(status, f"backend refused the request: {parsed}", code=f"upstream_{status}")


class Unavailable(SynapseError, http_status=503, error_type="service_unavailable",
                  grpc_code="UNAVAILABLE", default_code="no_backend"):
    pass


# The code of a transport's refusal of a whole answer for want of memory in this process
# (``controlplane.adapters.http1.BUDGET_SPENT``), and when to try again: what whole
# answers hold is given back as soon as they are relayed.
BUSY_CODE = "upstream_busy"
BUSY_RETRY_AFTER_S = 1.0


class Busy(Unavailable, default_code=BUSY_CODE):
    """Whole answers already hold all the memory they may in this process: no backend's
    fault, so not failed over (every backend's answer would be refused alike); 503, and
    ``Retry-After`` (the way :class:`QueueTimeout` says it)."""

    def headers(self) -> dict[str, str]:
        return retry_after(BUSY_RETRY_AFTER_S)


# The code of Admin.GetUsage's refusal when the usage store (Redis) does not answer, and
# when to try again: the store's client reconnects on its next call.
USAGE_STORE_CODE = "usage_store_unavailable"
USAGE_STORE_RETRY_AFTER_S = 5.0


class UsageStoreUnavailable(Unavailable, default_code=USAGE_STORE_CODE):
    """The usage store did not answer a read of usage: every backend may be fine, so not
    ``no_backend``; 503, and ``Retry-After`` (the way :class:`Busy` says it)."""

    def headers(self) -> dict[str, str]:
        return retry_after(USAGE_STORE_RETRY_AFTER_S)


class UpstreamTimeout(SynapseError, http_status=504, error_type="timeout_error",
                      grpc_code="DEADLINE_EXCEEDED", default_code="upstream_timeout"):
    pass


# -- fairness (issue 18): budgets and the fair queue. Kept together, below the rest. ------


class BudgetExceeded(RateLimited, error_type="insufficient_quota",
                     default_code="budget_exceeded"):
    """A tenant's (or tenant x model's) budget for the period is spent; ``Retry-After``
    is the time to the next period."""


class QueueFull(RateLimited, default_code="queue_full"):
    """The tenant already has as many requests waiting in the fair queue as it may."""


class BodiesPendingFull(RateLimited, default_code="too_many_pending_bodies"):
    """The tenant's connections already wait for as many request bodies as one tenant's
    may (its share of ``http.max_connections``): its next one would take a slot other
    tenants need to connect at all."""


class QueueTimeout(Unavailable, default_code="queue_timeout"):
    """A request waited in the fair queue until its deadline (the fleet stayed saturated);
    the queue never holds a request longer, and says when to try again."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return retry_after(self.retry_after_s)


KEY_MASK = b"[its api_key]"
_ENCODED_FROM = 8     # characters of a key from which its encoded spellings are masked too


def masked(data: bytes, key: str | None) -> bytes:
    """``data`` (a backend's answer on its way to a client) with every spelling of the
    backend's whole ``key`` (:func:`_spellings`) replaced by :data:`KEY_MASK`. Covered:
    refusals and error details of every backend, and a static upstream's served answers
    (:func:`controlplane.core.attempt._masks_answers`): whole, and event streams (chat
    completions, Responses and Anthropic Messages alike, error events and content),
    which pass through :class:`StreamMask`, the same rule over pieces, so a key split
    across two reads is masked too. A keyless upstream's stream, an agent's engine's, or
    one whose key is shorter than ``core.attempt.ANSWER_MASK_FROM``, costs nothing: it is
    passed on as it came.

    Only the whole key: a refusal may quote the tenant's own text, and masking pieces of
    the key there told the tenant which of its guesses were pieces of it (a key recovered
    a character at a time). Each spelling is one linear ``bytes.replace`` over what was
    read, so a large echo costs little. Left as they are: a provider that quotes only a
    part of the key (its own choice of what to show), a streamed binary body (speech
    audio, where a key means nothing), and a key quoted inside a larger percent-encoded
    or JSON-escaped text in another spelling than these."""
    if not key or not data:
        return data
    return _replaced(data, _spellings(key))


def _replaced(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    for form in forms:
        if form in data:
            data = data.replace(form, KEY_MASK)
    return data


def masked_start(data: bytes, key: str | None, limit: int, *, whole: bool) -> bytes:
    """The first ``limit`` bytes of ``data`` (the start of an answer, for an error's
    detail), masked before the cut so that no piece of a quoted key survives it. When
    ``data`` is not the whole body, its last bytes may be the start of a quote of the
    key that the read stopped in: as many bytes as a spelling of the key can have, less
    one, are dropped from its end whatever they hold, so what is dropped tells nothing."""
    out = masked(data, key)
    if key and not whole:
        out = out[:max(0, len(out) - mask_margin(key))]
    return out[:limit]


def mask_margin(key: str | None) -> int:
    """How many bytes past a cut a read must go for a quote of ``key`` that starts before
    the cut to be masked whole: its longest spelling, less one."""
    return max(map(len, _spellings(key))) - 1 if key else 0


class StreamMask:
    """:func:`masked` over a stream read in pieces: each piece is masked together with
    the bytes held back from the one before, and its last :func:`mask_margin` bytes are
    held back in turn (they may be the start of a spelling that the next piece ends), so
    a key split across reads at any byte is masked whole. Bytes up to the last newline
    are never held when no spelling holds a newline (none does, but for a key with one
    of its own): no spelling runs across it, so an event stream whose reads end at an
    event's end, as engines write them, is passed on with no delay. :meth:`rest` gives
    what is held once the stream ended; a stream that breaks drops it, as
    :func:`masked_start` drops the end of a cut read (it may be the start of a quoted
    key)."""

    __slots__ = ("_forms", "_held", "_margin", "_newline_splits")

    def __init__(self, key: str) -> None:
        self._forms = _spellings(key)
        self._margin = mask_margin(key)
        self._newline_splits = not any(b"\n" in form for form in self._forms)
        self._held = b""

    def feed(self, piece: bytes) -> bytes:
        """What of ``piece`` (and of the bytes held before it) can go to the client."""
        data = _replaced(self._held + piece, self._forms)
        if self._newline_splits and data.endswith(b"\n"):     # an event's end: hold nothing
            self._held = b""
            return data
        cut = max(0, len(data) - self._margin)
        if self._newline_splits:
            cut = max(cut, data.rfind(b"\n", cut) + 1)
        self._held = data[cut:]
        return data[:cut]

    def rest(self) -> bytes:
        """The bytes held back, at the end of a complete stream."""
        held, self._held = self._held, b""
        return held


@functools.lru_cache(maxsize=256)
def _spellings(key: str) -> tuple[bytes, ...]:
    """How a backend may quote ``key`` whole, longest first: as is, JSON-escaped (with
    and without ``\\/`` and ``\\u`` escapes), percent-encoded (either case of hex, ``+``
    for spaces) and base64 (either alphabet: alone, or its stable middle inside a longer
    base64 text such as HTTP Basic credentials, at each of the three alignments). The
    encoded ones only for keys of :data:`_ENCODED_FROM` characters or more: a short
    key's encodings would match ordinary text."""
    raw = key.encode("utf-8", "surrogatepass")
    forms = {raw}
    for ascii_only in (False, True):
        escaped = json.dumps(key, ensure_ascii=ascii_only)[1:-1]
        forms |= {_utf8(escaped), _utf8(escaped.replace("/", "\\/"))}
    if len(key) >= _ENCODED_FROM:
        for safe in ("", "/"):
            for quoted in (urllib.parse.quote(raw, safe=safe),
                           urllib.parse.quote_plus(raw, safe=safe)):
                forms |= {_utf8(quoted), _utf8(_LOWER_HEX.sub(
                    lambda m: m.group().lower(), quoted))}
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(raw))
            for pad in range(3):
                # Characters that hold bits of the key alone, whatever surrounds it.
                first, last = -(-8 * pad // 6), 8 * (pad + len(raw)) // 6
                forms.add(encode(b"\0" * pad + raw)[first:last])
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


_LOWER_HEX = re.compile(r"%[0-9A-F]{2}")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def retry_after(seconds: float) -> dict[str, str]:
    """The ``Retry-After`` header for a wait of ``seconds``: whole seconds, rounded up,
    never 0 (which clients read as "now")."""
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}


def internal(message: str = "internal error") -> SynapseError:
    """The error shown for an unexpected exception (details stay in the log)."""
    return SynapseError(message)


def stream_interrupted(message: str) -> dict[str, Any]:
    """The envelope of the SSE event that ends a stream broken mid-way."""
    return UpstreamError(message, code="stream_interrupted").envelope()


def with_status(status: int, message: str, *, code: str | None = None) -> SynapseError:
    """An error for an HTTP status that has no class of its own (405, a parse error's
    4xx); its type follows the status class."""
    err: SynapseError = BadRequest(message, code=code) if status < 500 else SynapseError(
        message, code=code)
    err.http_status = status
    return err
