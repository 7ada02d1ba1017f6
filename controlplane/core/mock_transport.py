"""A transport whose answers a test scripts (the shape of httpx's ``_transports/mock.py``).

``MockTransport(handler)`` calls ``handler(request)`` for every request it is sent; the
handler returns a :class:`MockResponse` (or an awaitable of one), or raises one of the
upstream errors a real transport raises (``errors.UpstreamConnectError``,
``errors.UpstreamTimeout``, …). A ``MockResponse``'s body is a list of chunks in which an
exception stands for a failure at that point of the body, so a test states "two chunks,
then the connection broke" without sockets or waiting. Every request and every read
timeout asked for is recorded for the test to check.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence

from controlplane.core import transport


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    body: bytes
    headers: Mapping[str, str]
    timeout_s: float | None


class MockResponse:
    def __init__(self, status: int = 200, chunks: Sequence[bytes | BaseException] = (b"{}",),
                 content_type: str = "application/json",
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.status = status
        self.content_type = content_type
        self.headers = [("Content-Type", content_type), *headers]
        self.read_timeouts: list[float | None] = []
        self.closed = False
        self._chunks = list(chunks)

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def _next(self) -> bytes | None:
        if not self._chunks:
            return None
        item = self._chunks.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def read(self) -> bytes:
        parts = []
        while (chunk := self._next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def read_some(self, limit: int) -> bytes:
        return (self._next() or b"")[:limit]

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        self.read_timeouts.append(timeout_s)
        return self._next()

    def close(self) -> None:
        self.closed = True


Handler = Callable[[Request], MockResponse | Awaitable[MockResponse]]


class MockTransport:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.responses: list[MockResponse] = []

    async def start(self) -> None:
        return None

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float | None = None) -> transport.Response:
        request = Request(method, url, body, dict(headers), timeout_s)
        self.requests.append(request)
        answer = self.handler(request)
        response = await answer if inspect.isawaitable(answer) else answer
        self.responses.append(response)
        return response

    async def close(self) -> None:
        return None
