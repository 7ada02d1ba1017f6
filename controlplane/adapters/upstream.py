"""The HTTP client to backends: a small HTTP/1.1 client with keep-alive pools.

Every proxied request crosses this client, so it does only what a proxy to an
OpenAI-compatible backend needs: send one request (POST with a body, or GET), parse the
answer with ``httptools`` (llhttp, Node.js's parser), hand the body over as it arrives,
and keep the connection for the next request. aiohttp's ``ClientSession`` did the same
job with request/response objects, multidicts, URL objects and timers per request;
``bench/gateway.py`` measured that as the largest part of Synapse's own cost.

Rules:

- **Pools.** Connections are kept per origin (scheme, host, port) and reused last-in
  first-out, so the warm ones stay warm; an idle one older than ``keepalive_s`` is closed
  instead of reused. At most ``limit`` connections are open at once; a request beyond
  that waits for one to be released.
- **A stale connection is retried once.** A reused connection that the backend had
  already closed (its keep-alive timeout raced our request; uvicorn's is 5 s) fails
  before any response byte: the request goes once more over a new connection. Every
  other failure is the caller's to handle (``proxy`` tries the next backend).
- **Time limits.** Connecting: ``connect_timeout_s`` (an ``UpstreamConnectError``). The
  response head: the first-byte limit (``FirstByteTimeout``). Each later wait for body
  bytes: ``read_timeout_s`` or the caller's own (``TimeoutError``).
- **Back-pressure.** Reading from the backend pauses while more than ``HIGH_WATER`` bytes
  of body wait for the caller, and resumes below ``LOW_WATER``.
- **Release.** :meth:`UpstreamResponse.close` returns the connection to its pool only when
  the body was received to its end and the backend allows keep-alive; otherwise the
  connection is closed — which is how a backend learns that the client went away.
- Bodies pass through byte for byte (no decompression); chunked framing is removed.
  Header names and values are checked for CR, LF and NUL before anything is sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import typing
import urllib.parse
from collections.abc import Mapping

import httptools

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_TARGETS_MAX = 4096
_FORBIDDEN = frozenset("\r\n\0")

Origin = tuple[str, str, int]      # scheme, host, port


class UpstreamConnectError(ConnectionError):
    """No connection to the backend could be made (refused, unreachable, timed out)."""


class UpstreamProtocolError(ConnectionError):
    """The backend's answer was not valid HTTP/1.1."""


class FirstByteTimeout(Exception):
    """The backend sent no response head within the first-byte timeout."""


# Everything a backend call can fail with (time-outs included), for one ``except``.
# ConnectionError (and so both errors above) is an OSError.
FAILURES: tuple[type[BaseException], ...] = (TimeoutError, OSError)


class _Target:
    __slots__ = ("host", "origin", "path")

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.origin: Origin = (parts.scheme, parts.hostname, port)
        path = parts.path or "/"
        self.path = f"{path}?{parts.query}" if parts.query else path
        self.host = parts.netloc.rpartition("@")[2]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to a backend and its response parser."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.used = False            # has carried a request before (so it may be stale)
        self.idle_since = 0.0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None or resp.complete:
            # Bytes nobody asked for: the connection is no longer trustworthy.
            self.close()
            return
        resp.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(UpstreamProtocolError(f"the backend sent invalid HTTP: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False        # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        resp = self.response
        if resp is None:
            self.client._forget_idle(self)
        elif not resp.complete:
            resp.connection_ended(exc)

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.head_received(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.body_received(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.message_complete(self.parser.should_keep_alive())


class UpstreamResponse:
    """A backend's answer, available once its head arrived; ``close()`` it when done."""

    def __init__(self, client: UpstreamClient, conn: _Connection,
                 read_timeout_s: float) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.received = False        # any byte of the answer arrived
        self.complete = False
        self._client = client
        self._conn = conn
        self._read_timeout_s = read_timeout_s
        self._head = False
        self._keep_alive = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    # -- what the caller reads -----------------------------------------------------------
    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for k, v in self.raw_headers:
            if k.lower() == wanted:
                return v.decode("latin-1")
        return None

    @property
    def content_type(self) -> str:
        value = self.header("content-type") or ""
        return value.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        while not self.complete:
            if self._exc is not None:
                raise self._exc
            await self._wait(self._read_timeout_s)
        return self._take()

    async def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body: what arrived first (for error details)."""
        while not self._body and not self.complete:
            if self._exc is not None:
                raise self._exc
            await self._wait(self._read_timeout_s)
        return self._take()[:limit]

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        """The body bytes that arrived since the last call (waiting for some), or None at
        the end. ``timeout_s`` bounds the wait (default: the client's read timeout)."""
        while not self._body:
            if self.complete:
                return None
            if self._exc is not None:
                raise self._exc
            await self._wait(timeout_s if timeout_s is not None else self._read_timeout_s)
        return self._take()

    def close(self) -> None:
        """Release the connection: back to the pool when the answer was read to its end
        and keep-alive holds, closed otherwise (the backend sees the request cancelled)."""
        if self._released:
            return
        self._released = True
        reusable = self.complete and self._keep_alive and self._exc is None
        self._client._release(self._conn, reusable)

    # -- what the connection reports -----------------------------------------------------
    def head_received(self, status: int) -> None:
        if status < 200:        # 1xx (103 Early Hints): informational, the answer follows
            self.raw_headers = []
            return
        self.status = status
        self._head = True
        self._wake()

    def body_received(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn.transport:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def message_complete(self, keep_alive: bool) -> None:
        if not self._head:          # the end of a 1xx message
            return
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def connection_ended(self, exc: Exception | None) -> None:
        # A body without Content-Length or chunked framing ends with the connection.
        if self._head and not self._has_framing():
            self.complete = True
        else:
            where = "in the middle of its answer" if self._head else "before answering"
            detail = f": {exc}" if exc else ""
            self.fail(ConnectionResetError(f"the backend closed the connection {where}"
                                           f"{detail}"))
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    # -- internals -----------------------------------------------------------------------
    async def wait_head(self) -> None:
        while not self._head:
            if self._exc is not None:
                raise self._exc
            await self._wait(None)

    def _has_framing(self) -> bool:
        for k, v in self.raw_headers:
            name = k.lower()
            if name == b"content-length" or (name == b"transfer-encoding"
                                             and b"chunked" in v.lower()):
                return True
        return False

    def _take(self) -> bytes:
        data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self._conn.transport is not None and not self._conn.lost:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_s, _expire, waiter) if timeout_s else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("the backend sent nothing within the read timeout"))


class UpstreamClient:
    def __init__(self, connect_timeout_s: float, first_byte_timeout_s: float,
                 idle_timeout_s: float, *, limit: int = 2048,
                 keepalive_s: float = 60.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self._read_timeout_s = max(first_byte_timeout_s, idle_timeout_s)
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return self._open

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   first_byte_timeout_s: float | None = None) -> UpstreamResponse:
        """POST and return once the response head arrived; the caller must close it."""
        limit = first_byte_timeout_s or self._first_byte_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._request("POST", url, body, headers)
        except TimeoutError:
            raise FirstByteTimeout(f"no response from {url} within {limit:g}s") from None

    async def get(self, url: str, timeout_s: float,
                  headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s):
            resp = await self._request("GET", url, b"", headers or {})
            try:
                return resp.status, await resp.read()
            finally:
                resp.close()

    # -- one request ---------------------------------------------------------------------
    async def _request(self, method: str, url: str, body: bytes,
                       headers: Mapping[str, str]) -> UpstreamResponse:
        if not self._started:
            raise RuntimeError("UpstreamClient.start() was not called")
        target = self._target(url)
        message = _head(method, target, headers, body) + body
        for attempt in (1, 2):
            conn = await self._acquire(target.origin)
            reused = conn.used
            conn.used = True
            resp = UpstreamResponse(self, conn, self._read_timeout_s)
            conn.response = resp
            try:
                assert conn.transport is not None
                conn.transport.write(message)
                await resp.wait_head()
                return resp
            except ConnectionResetError:
                resp.close()
                if reused and not resp.received and attempt == 1:
                    continue        # the backend had closed this idle connection
                raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            target = self._targets[url] = _Target(url)
        return target

    # -- the pool ------------------------------------------------------------------------
    async def _acquire(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            conn = self._pop_idle(origin, loop.time())
            if conn is not None:
                return conn
            if self._open < self._limit or self._close_some_idle():
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot()       # woken and cancelled at once: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(waiter)
                raise
        self._open += 1
        try:
            return await self._connect(origin)
        except BaseException:
            self._open -= 1
            self._wake_slot()
            raise

    def _pop_idle(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.lost and now - conn.idle_since < self._keepalive_s:
                return conn
            self._discard(conn)
        return None

    def _close_some_idle(self) -> bool:
        """At the limit: close an idle connection of any origin to make room."""
        for conns in self._idle.values():
            if conns:
                self._discard(conns.pop(0))
                return True
        return False

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin), host, port, ssl=tls,
                    server_hostname=host if tls is not None else None)
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {host}:{port} timed out after "
                                       f"{self._connect_timeout_s:g}s") from None
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                raise
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: "
                                       f"{exc.strerror or exc}") from None
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        conn.response = None
        if reusable and not conn.lost and self._started:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()
            self._open -= 1
        self._wake_slot()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _forget_idle(self, conn: _Connection) -> None:
        """An idle connection closed by the backend leaves its pool."""
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            self._open -= 1
            self._wake_slot()

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _head(method: str, target: _Target, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.host}\r\n"]
    if method != "GET" or body:
        lines.append(f"Content-Length: {len(body)}\r\n")
    for name, value in headers.items():
        if not _FORBIDDEN.isdisjoint(name) or not _FORBIDDEN.isdisjoint(value):
            raise ValueError(f"the header {name!r} holds a CR, LF or NUL character")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")
