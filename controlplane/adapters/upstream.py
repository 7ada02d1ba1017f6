"""The transport to backends: a small HTTP/1.1 client with keep-alive pools.

Implements :class:`controlplane.core.transport.Transport`. Every proxied request crosses
it, so it does only what a proxy to an OpenAI-compatible backend needs: send one request
(POST with a body, or GET), hand the answer over as soon as its head arrived and its body
as it arrives (:mod:`controlplane.adapters.http1` does the wire), and keep the connection
for the next request. aiohttp's ``ClientSession`` did the same job with request/response
objects, multidicts, URL objects and timers per request; ``bench/gateway.py`` measured
that as the largest part of Synapse's own cost.

Rules:

- **Pools.** Connections are kept per origin (scheme, host, port) and reused last-in
  first-out, so the warm ones stay warm; an idle one older than ``keepalive_s`` is closed
  instead of reused. At most ``limit`` connections are open at once; a request beyond
  that waits for one to be released.
- **A stale connection is retried once.** A reused connection that the backend had
  already closed (its keep-alive timeout raced our request; uvicorn's is 5 s) fails
  before any response byte: the request goes once more over a new connection. Every
  other failure is the caller's to handle (:mod:`controlplane.core.dispatch` tries the
  next backend).
- **Time limits.** Connecting: ``connect_timeout_s`` (``UpstreamConnectError``). The
  response head: the first-byte limit (``UpstreamTimeout``). Each later wait for body
  bytes: ``read_timeout_s`` or the caller's own (``UpstreamReadError``).
- **An answer is its request's.** A backend that writes an extra answer on a keep-alive
  connection *after* the next request went out (a bug, or an attack on whoever shares
  the pool) puts that connection off by one: each request would get the previous one's
  answer, across tenants. No framing shows it, so the request id does: a request sent
  with ``x-request-id`` (the dispatcher sends Synapse's own to every engine) whose
  answer carries another ``x-request-id`` gets ``UpstreamProtocolError`` — the
  dispatcher fails over as for any invalid answer — its connection is closed, the idle
  connections pooled for that origin are closed too (they may be off by one as well),
  and one warning is logged (the origin; no tenant data). Only origins known to echo the
  id are held to it (``UpstreamClient._echoing``): hosted APIs (OpenAI, and most
  OpenAI-compatible ones) answer with an id of their own. An answer with the id sent
  makes its origin an echoing one (ids are unique: that is no coincidence); the first
  answer on a new connection, which cannot be off by one, with another id makes it not.
  So an origin is checked from its first echo on; an extra answer before that goes
  unseen. The engines Synapse starts echo it (vLLM with ``--enable-request-id-headers``,
  the simulator always). One header lookup per answer; a request sent without an id (a
  health probe) is not checked.
- **Errors** are :mod:`controlplane.errors` classes only, translated from foreign
  exceptions in one table (:data:`controlplane.adapters.http1.ERRORS`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Iterable, Mapping

from controlplane import errors
from controlplane.adapters import http1

HIGH_WATER = http1.HIGH_WATER
_TARGETS_MAX = 4096
REQUEST_ID = "x-request-id"

log = logging.getLogger("synapse.controlplane.upstream")


class UpstreamClient:
    def __init__(self, connect_timeout_s: float, first_byte_timeout_s: float,
                 idle_timeout_s: float, *, limit: int = 2048,
                 keepalive_s: float = 60.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self._read_timeout_s = max(first_byte_timeout_s, idle_timeout_s)
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._idle: dict[http1.Origin, list[http1.Connection]] = {}
        self._open = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, http1.Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._started = False
        # Origins whose answers echo the request's x-request-id: only they are held to it.
        self._echoing: set[http1.Origin] = set()
        # The loop start() ran in: every wait and deadline is on it. Kept rather than
        # asked for at each step (asyncio.get_running_loop checks the process id).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
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

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float | None = None) -> http1.UpstreamResponse:
        """Send and return once the response head arrived; the caller must close it.

        The first-byte limit bounds the whole of it (a pool slot, connecting, the head) as
        one deadline handed to each wait, rather than an ``asyncio.timeout`` around it:
        that costs a cancellation scope per request on the hot path."""
        limit = timeout_s or self._first_byte_timeout_s
        loop = self._loop
        if not self._started or loop is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        deadline = loop.time() + limit
        target = self._target(url)
        message = http1.head(method, target, headers, body) + body
        rid = headers.get(REQUEST_ID)
        relayed = method != http1.UNRELAYED_METHOD
        for attempt in (1, 2):
            conn = await self._acquire(loop, target.origin, deadline, limit)
            reused = conn.used
            conn.used = True
            resp = http1.UpstreamResponse(conn, self._read_timeout_s, loop, relayed=relayed)
            conn.response = resp
            try:
                assert conn.transport is not None
                conn.transport.write(message)
                await resp.wait_head(deadline, limit)
                if rid is not None:
                    self._check_id(conn, resp, rid, reused)
                return resp
            except errors.UpstreamReadError:
                resp.close()
                if reused and not resp.received and attempt == 1:
                    continue        # the backend had closed this idle connection
                raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    def _check_id(self, conn: http1.Connection, resp: http1.UpstreamResponse, rid: str,
                  reused: bool) -> None:
        """Raise ``UpstreamProtocolError`` when ``resp`` is another request's answer."""
        got = resp.header(REQUEST_ID)
        if got is None:
            return
        origin = conn.origin
        if got == rid:          # ids are unique: an echo, whatever the connection
            if origin not in self._echoing:
                self._echoing.add(origin)
            return
        if not reused:          # a new connection's first answer is this request's: the
            self._echoing.discard(origin)       # backend answers with ids of its own
            return
        if origin not in self._echoing:
            return
        scheme, host, port = origin
        log.warning("the backend %s://%s:%d answered a request with another request's id "
                    "(an extra answer on a keep-alive connection): its connections are "
                    "closed and the request fails over", scheme, host, port)
        conn.poison()
        self._drop_idle(origin)
        raise errors.UpstreamProtocolError(
            "the backend sent invalid HTTP: an answer to another request (x-request-id "
            "differs)")

    def close_idle(self, urls: Iterable[str], keep: Iterable[str] = ()) -> int:
        """Close the idle connections kept for the origins of ``urls`` (backends that
        left the registry) but not for an origin one of ``keep`` (the URLs still in use)
        shares; returns how many were closed. A connection in use is left to finish."""
        kept = _origins(keep)
        closed = 0
        for origin in _origins(urls) - kept:
            closed += len(self._idle.get(origin, ()))
            self._drop_idle(origin)
            self._echoing.discard(origin)
        return closed

    def _drop_idle(self, origin: http1.Origin) -> None:
        for conn in self._idle.pop(origin, ()):
            self._discard(conn)
            self._wake_slot()

    def _target(self, url: str) -> http1.Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            target = self._targets[url] = http1.Target(url)
        return target

    # -- the pool ------------------------------------------------------------------------
    async def _acquire(self, loop: asyncio.AbstractEventLoop, origin: http1.Origin,
                       deadline: float, limit: float) -> http1.Connection:
        while True:
            conn = self._pop_idle(origin, loop.time())
            if conn is not None:
                return conn
            if self._open < self._limit or self._close_some_idle():
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter, limit)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_slot()       # woken and cancelled at once: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(waiter)
                raise
            finally:
                timer.cancel()
        self._open += 1
        try:
            return await self._connect(loop, origin, deadline, limit)
        except BaseException:
            self._open -= 1
            self._wake_slot()
            raise

    def _pop_idle(self, origin: http1.Origin, now: float) -> http1.Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.reusable and now - conn.idle_since < self._keepalive_s:
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

    async def _connect(self, loop: asyncio.AbstractEventLoop, origin: http1.Origin,
                       deadline: float, limit: float) -> http1.Connection:
        scheme, host, port = origin
        left = deadline - loop.time()
        if left <= 0:
            raise errors.UpstreamTimeout(f"no response within {limit:g}s")
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(min(self._connect_timeout_s, left)):
                with http1.mapped():
                    _, conn = await loop.create_connection(
                        lambda: http1.Connection(self, origin), host, port, ssl=tls,
                        server_hostname=host if tls is not None else None)
        except TimeoutError:
            if left < self._connect_timeout_s:
                raise errors.UpstreamTimeout(f"no response within {limit:g}s") from None
            raise errors.UpstreamConnectError(
                f"cannot connect: timed out after {self._connect_timeout_s:g}s") from None
        return conn

    def release(self, conn: http1.Connection, reusable: bool) -> None:
        conn.response = None
        if reusable and not conn.lost and self._started and self._loop is not None:
            conn.idle_since = self._loop.time()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()
            self._open -= 1
        self._wake_slot()

    def _discard(self, conn: http1.Connection) -> None:
        conn.close()
        self._open -= 1

    def forget_idle(self, conn: http1.Connection) -> None:
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


def _origins(urls: Iterable[str]) -> set[http1.Origin]:
    """The origins of ``urls`` (one that is not an http(s) URL has none)."""
    out = set()
    for url in urls:
        with contextlib.suppress(ValueError):
            out.add(http1.Target(url).origin)
    return out


def _expire(waiter: asyncio.Future[None], limit: float) -> None:
    if not waiter.done():
        waiter.set_exception(errors.UpstreamTimeout(f"no response within {limit:g}s"))
