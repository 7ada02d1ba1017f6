"""The fast lane's HTTP/1.1 wire format: a request head read with ``httptools``
(:class:`Head`, the headers as aiohttp reads them, and whether one is a reason to leave
the request to aiohttp), and a whole answer written in one piece (:func:`serialized`).
The connection's states and the app's calls are :mod:`controlplane.api.fast_lane`'s."""

from __future__ import annotations

import email.utils
import inspect
import time
from typing import Any, cast

from aiohttp import hdrs, http_parser, web, web_protocol
from multidict import CIMultiDict

# Headers whose request aiohttp serves: a framing or a body it decodes, a switch of
# protocol, and the old WebSocket handshake it refuses.
_HANDED_OFF = frozenset({b"transfer-encoding", b"upgrade", b"content-encoding",
                         b"sec-websocket-key1"})
# aiohttp refuses a request with two of these, or with more headers than its limit.
# (Read from aiohttp, so they follow its version; its values as of 3.14 otherwise.)
SINGLETONS = frozenset(name.lower().encode() for name in getattr(
    http_parser, "SINGLETON_HEADERS", ("Host", "Content-Type", "Content-Length",
                                       "User-Agent", "Authorization", "Expect")))
MAX_HEADERS: int = getattr(inspect.signature(web_protocol.RequestHandler.__init__)
                           .parameters.get("max_headers"), "default", 128)


class Head:
    """``httptools`` callbacks for one request head: the headers as aiohttp reads them
    (the value's trailing whitespace dropped, UTF-8 with surrogate escapes), and whether
    one of them is a reason to leave the request to aiohttp."""

    __slots__ = ("complete", "expects", "headers", "odd", "seen", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.odd = False            # a header that sends the request to aiohttp
        self.expects = False        # Expect: 100-continue (any other is aiohttp's 417)
        self.complete = False
        self.seen: set[bytes] = set()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in _HANDED_OFF:
            self.odd = True
        elif low == b"expect":      # a second one, or another expectation: aiohttp's
            self.odd = self.odd or self.expects or (
                value.rstrip(b" \t").lower() != b"100-continue")
            self.expects = True
        elif low in SINGLETONS:
            if low in self.seen:
                self.odd = True
            self.seen.add(low)
        self.headers.add(name.decode("latin-1"),
                         value.rstrip(b" \t").decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self.complete = True


def serialized(resp: web.StreamResponse, keep_alive: bool) -> bytes | None:
    """A whole answer (status line, headers, body) as the bytes to send, or None when
    aiohttp must write it (a streamed or payload body, cookies, compression, a header
    with a line break, which aiohttp refuses)."""
    if type(resp) is not web.Response or resp._cookies or resp.compression or resp.chunked:
        return None
    body = resp.body
    if not isinstance(body, bytes):
        return None
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
    for name, value in resp.headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            return None
        if name.lower() not in _SET_HERE:
            lines.append(f"{name}: {value}")
    if hdrs.CONTENT_TYPE not in resp.headers:
        lines.append("Content-Type: application/octet-stream")
    lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Date: {_date()}")
    if not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8") + body


_SET_HERE = frozenset({"content-length", "date", "connection", "transfer-encoding"})


def _date() -> str:
    """Now as an HTTP date, formatted once a second."""
    now = int(time.time())
    cached = _DATE
    if cached[0] != now:
        cached[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return cast(str, cached[1])


_DATE: list[Any] = [0, ""]
