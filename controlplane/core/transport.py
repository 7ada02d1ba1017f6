"""The seam to backends: one small ``Transport`` protocol (the shape of httpx's
``_transports/base.py``).

A transport sends one request and returns as soon as the answer's head arrived; the body
is then read from the :class:`Response`, which the caller must close (closing an answer
not read to its end is how a backend learns that the request was abandoned).

Every failure a transport or its responses raise is one of :mod:`controlplane.errors`'
upstream classes — :class:`~controlplane.errors.UpstreamConnectError`,
:class:`~controlplane.errors.UpstreamProtocolError`,
:class:`~controlplane.errors.UpstreamReadError`, and
:class:`~controlplane.errors.UpstreamTimeout` when no answer head came within the
first-byte limit. A transport translates its own foreign exceptions in one table; the
messages never name an address. (A header value with CR, LF or NUL is refused with
``ValueError`` before anything is sent: that is the caller's bug, not the backend's.)

Implementations: :class:`controlplane.adapters.upstream.UpstreamClient` (HTTP/1.1
keep-alive pools) and :class:`controlplane.core.mock_transport.MockTransport` (tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

# Statuses no relayed answer may have: a redirect (the OpenAI SDK follows its Location
# with the tenant's prompt), 204 and 205 (no answer to relay). Every transport fails such
# an answer with ``UpstreamProtocolError`` before its head is handed over, and so one whose
# body is encoded (:func:`encoded`: bodies are relayed as they came and never decoded).
NOT_RELAYED = frozenset({*range(300, 400), 204, 205})


def encoded(content_encoding: str | None) -> bool:
    """Whether an answer's ``Content-Encoding`` says its body is encoded."""
    return content_encoding is not None and content_encoding.strip().lower() not in (
        "", "identity")


class Response(Protocol):
    """A backend's answer whose head has arrived."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> list[tuple[str, str]]: ...

    def header(self, name: str) -> str | None:
        """The first value of the header ``name`` (any case), or None."""
        ...

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters (``text/event-stream``)."""
        ...

    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        ...

    async def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: what arrived first (for an error's detail)."""
        ...

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        """The body bytes that arrived since the last call, or None at the end;
        ``timeout_s`` bounds the wait (default: the transport's read timeout)."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent)."""
        ...


class Transport(Protocol):
    async def start(self) -> None: ...

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float | None = None) -> Response:
        """Send one request; return once the answer's head arrived within ``timeout_s``
        (default: the transport's first-byte limit), else raise ``UpstreamTimeout``."""
        ...

    async def close(self) -> None: ...
