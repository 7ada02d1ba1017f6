"""The fast lane: the serving routes without aiohttp's request machinery.

Every connection on the API port starts here. A request that is plainly one of the
serving routes (``POST /v1/chat/completions`` or ``/v1/completions``, HTTP/1.1, a
``Content-Length`` within ``http.max_body_bytes``, no ``Transfer-Encoding`` or
``Upgrade``, no ``Expect`` but ``100-continue``) is parsed with ``httptools`` and handed
to the app's own middleware and handler as a :class:`LaneRequest`, a small object with
the part of ``web.Request`` that the serving path reads. Responses are the app's own
(``web.Response``, ``web.StreamResponse``): a whole one is serialised by the lane in one
write (:func:`controlplane.api.lane_wire.serialized`, or by aiohttp when it has cookies,
compression or a payload body), a stream goes through aiohttp's ``StreamWriter``, so
headers, errors and streaming are exactly the app's.

Anything else — another route, a head that ``httptools`` refuses or that is over
``http.max_header_bytes``, a chunked or ``Content-Encoding`` body, a head aiohttp would
refuse (no ``Host``, a second ``Host``, ``Content-Type`` or other of aiohttp's
``SINGLETON_HEADERS``, more headers than its ``max_headers``), bytes that cannot be the
start of a lane request — is *handed off*: at a message boundary, the
connection's transport is given to aiohttp's protocol (:mod:`controlplane.api.server`'s)
with every byte not yet consumed, and aiohttp serves that connection from then on.
Nothing is parsed twice and no byte is lost: the lane consumes a message only once it
has decided to serve it.

Rules kept from aiohttp's server and :mod:`controlplane.api.server`, without a timer per
request (one sweep a second per server, :class:`Sweeper`):

* a request head must arrive within ``http.header_timeout_s`` of its first byte, else
  the connection is closed;
* a body within ``http.body_timeout_s`` of its head, else 408 (the envelope of
  :class:`controlplane.errors.RequestTimeout`) and the connection is closed;
* an idle connection is closed after ``http.keepalive_timeout_s``;
* a client that goes away cancels its request's handler (``handler_cancellation``);
* a body still to come is never held for a request refused at its head (:func:`_admits`:
  no valid key, or its tenant over its rate or concurrency): the app answers (401, 429)
  at once, while the body is read and dropped; the connection then goes on, as aiohttp's
  does. Reading it matters: a client that writes its whole body before it reads (httpx's
  async client, so the official ``openai`` one, pauses reading while it writes) and whose
  write fails closes its socket, losing the answer: a connection closed with its body
  unread resets it, and such a client sees a connection error instead of its 429;
* ``Expect: 100-continue`` is answered ``100 Continue`` only for a head the app would not
  refuse at once (the routes' expect handler's rule on aiohttp's path, plus the rate). A
  refused one gets its 401 or 429 instead, with ``Connection: close`` (it need not send its
  body). Any answer with ``Connection: close`` while a body is still to come half-closes
  the connection after it (RFC 9112 §9.6: the closing is the server's to begin), reads
  and drops what still comes, and closes once the client does, or the body is in, or at
  ``http.body_timeout_s``;
* a request of a tenant with a rate or concurrency limit whose body is still to come is
  handed to the app at its head (:class:`_Arriving`, its body awaited by the handler as
  on aiohttp's path), so it takes its token and slot (``serving.acquire``) before its
  body is read, as on aiohttp's path: a body that never comes (408) still costs its
  token, and a tenant's heads cannot each pass :meth:`RateLimiter.peek` (which takes
  nothing) while its bucket stays full. A 429 then comes at the head, and the body is
  read and dropped. With a shared (Redis) limit store this is also what tells it at all:
  ``peek`` knows only the rate refusals the store gave this replica, a concurrency slot
  or a refusal given another replica only ``acquire`` finds out. Such a head with
  ``Expect: 100-continue`` gets its ``100 Continue`` when the app reads the body, so
  after the slot is granted: a 429 comes instead of the invitation. A request whose body
  came with its head, the usual case, is handed over whole as before (no extra step
  either way);
* one tenant's connections may wait for at most :data:`TENANT_BODIES_SHARE` of
  ``http.max_connections`` request bodies at once (``Lane.bodies_pending``); its next
  head whose body is still to come is answered 429 ``too_many_pending_bodies``
  (:class:`controlplane.errors.BodiesPendingFull`, through the app's middleware) and its
  connection closes (the body read and dropped as for any refused head), other tenants
  unaffected. With the server's eviction of slow bodies under pressure
  (:meth:`controlplane.api.server.LaneServer._make_room`), no tenant trickling bodies
  holds every slot. With tenant keys off (``auth.enabled: false``) every client is the
  one tenant ``anonymous``, and no share is kept (it would be the whole deployment's);
* requests on one connection are answered in order; bytes of the next request wait
  (reading pauses above ``PIPELINE_BYTES``) until the current one is answered;
* each request is served in a task of its own started from the context the connection
  was accepted in, as on aiohttp's path: what a request sets in its context (whose share
  of the whole-answer budget it is charged to, ``http1.charge``) ends with it, whatever
  context the next request's task is created in (often the last one's, when pipelined);
* at shutdown, a request in flight gets the grace period (``http.shutdown_grace_s``) and
  is then cut (:meth:`Connection.cut`, by :class:`controlplane.api.server.LaneServer`),
  idle connections close.

It is off with TLS (``http.tls_cert_file``): aiohttp serves those connections. Reading a
head and writing a whole answer (the HTTP/1.1 wire format) are
:mod:`controlplane.api.lane_wire`'s; the connection's states are this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
from aiohttp import base_protocol, http_writer, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDictProxy

from controlplane import config, errors
from controlplane.api import context, lane_wire

if TYPE_CHECKING:
    from controlplane.api import server as server_mod

log = logging.getLogger("synapse.controlplane.http")

PIPELINE_BYTES = 256 * 1024     # bytes of later requests buffered while one is served
SWEEP_S = 1.0
# The share of http.max_connections one tenant's connections may hold waiting for a
# request body: half, as one tenant's share of the memory whole answers may hold
# (controlplane.adapters.http1.TENANT_SHARE). The rest stays for every other tenant
# whatever one does; beyond it that tenant's new heads are refused (BodiesPendingFull).
TENANT_BODIES_SHARE = 0.5
# How long Retry-After tells a tenant over its share to wait: one of its bodies arriving
# frees a place.
BODIES_RETRY_AFTER_S = 1.0
_HEAD_END = b"\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Complete:
    """``request.content`` of a lane request: its body has arrived whole."""

    __slots__ = ()

    @staticmethod
    def is_eof() -> bool:
        return True


_COMPLETE = _Complete()


class _Pending(_Complete):
    """``request.content`` of an :class:`_Arriving` request: whole once its body is in."""

    __slots__ = ("arrived",)

    def __init__(self, arrived: asyncio.Future[bytes]) -> None:
        self.arrived = arrived

    def is_eof(self) -> bool:  # type: ignore[override]  # of the instance, not the class
        return self.arrived.done()


def _match_info(path: str) -> Any:
    """What the middleware reads of aiohttp's match info: the route's canonical path."""
    return types.SimpleNamespace(route=types.SimpleNamespace(
        resource=types.SimpleNamespace(canonical=path)))


class LaneRequest(dict[Any, Any]):
    """The part of ``web.Request`` the serving path and its middleware use, for a request
    whose head and body have arrived whole. Itself the request's state mapping (what
    ``request[key]`` reads and writes, as in aiohttp): the serving path reads it many
    times per request, and a lookup in C beats a method of ours."""

    __slots__ = ("_body", "_keep_alive", "_writer", "app", "headers",
                 "match_info", "method", "path", "protocol", "transport", "version")

    def __init__(self, conn: Connection, route: Route, headers: CIMultiDictProxy[str],
                 body: bytes, keep_alive: bool) -> None:
        self.app = route.app
        self.method = "POST"
        self.path = route.path
        self.match_info = route.match_info
        self.headers = headers
        self.version = HttpVersion11
        self._keep_alive = keep_alive
        self.protocol = conn
        self.transport = conn.transport
        self._body = body
        self._writer: http_writer.StreamWriter | None = None

    @property
    def keep_alive(self) -> bool:
        """Whether its answer keeps the connection: as the client asked, until the server
        drains (:meth:`controlplane.api.server.LaneServer.drain`: ``Connection: close``)."""
        return self._keep_alive and not self.protocol.draining

    @keep_alive.setter
    def keep_alive(self, value: bool) -> None:
        self._keep_alive = value

    # A request, not a value, as aiohttp's: true, and equal and hashed by identity
    # (a dict's are by contents).
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__
    __ne__ = object.__ne__

    def __bool__(self) -> bool:
        return True

    @property
    def _payload_writer(self) -> http_writer.StreamWriter:
        """The writer aiohttp's responses write through, made when one is prepared (a whole
        answer the lane writes itself needs none)."""
        if self._writer is None:
            self._writer = http_writer.StreamWriter(self.protocol, self.protocol.loop)
        return self._writer

    @property
    def content_length(self) -> int:
        return len(self._body)

    @property
    def content(self) -> _Complete:
        return _COMPLETE

    async def read(self) -> bytes:
        return self._body

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        """aiohttp's ``on_response_prepare`` signal, as aiohttp sends it."""
        if self.app.on_response_prepare:
            await self.app.on_response_prepare.send(cast(web.Request, self), response)


class _Arriving(LaneRequest):
    """A lane request handed to the app at its head, its body still arriving: ``read``
    waits for it (the handler bounds the wait by ``http.body_timeout_s``, 408).

    With ``Expect: 100-continue``, the ``100 Continue`` is sent by the first ``read``: by
    then the app has taken the request's slot from the shared store, so a head the store
    refuses is never invited. An answer that comes before it closes the connection (its
    body may never come), as for a head refused by the lane (``Connection._refuse``)."""

    __slots__ = ("_arrived", "_invite", "_length")

    def __init__(self, conn: Connection, route: Route, headers: CIMultiDictProxy[str],
                 length: int, keep_alive: bool, expects: bool) -> None:
        super().__init__(conn, route, headers, b"", keep_alive and not expects)
        self._length = length
        self._arrived: asyncio.Future[bytes] = conn.loop.create_future()
        self._invite = keep_alive if expects else None  # keep_alive once invited

    @property
    def content_length(self) -> int:
        return self._length

    @property
    def content(self) -> _Pending:
        return _Pending(self._arrived)

    @property
    def uninvited(self) -> bool:
        """Its client waits for a ``100 Continue`` not yet sent."""
        return self._invite is not None

    async def read(self) -> bytes:
        if self._invite is not None:
            self.keep_alive, self._invite = self._invite, None
            if self.protocol.transport is not None:
                self.protocol.transport.write(_CONTINUE)
                self.protocol.invited()
        return await self._arrived

    def arrived(self, body: bytes) -> None:
        if not self._arrived.done():        # (not if the handler stopped waiting)
            self._arrived.set_result(body)


class Route:
    """One route of the lane: its path and the app's handler wrapped in its middlewares,
    as aiohttp would call it."""

    __slots__ = ("app", "call", "match_info", "path")

    def __init__(self, app: web.Application, path: str, handler: Handler) -> None:
        call: Any = handler
        for mw in reversed(app.middlewares):
            call = functools.partial(mw, handler=call)
        self.app = app
        self.path = path
        self.call: Handler = call
        self.match_info = _match_info(path)


class Lane:
    """The routes a server's connections serve themselves, and the limits they keep."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, routes: dict[bytes, Route], http: config.HttpSettings,
                 admits: Callable[[CIMultiDictProxy[str]], tuple[int, str | None]] = (
                     lambda _: (ADMITTED, None)),
                 ) -> None:
        self.routes = routes
        # whether a request head carries a key the app accepts, of a tenant not refused by
        # RateLimiter.peek (read before a body that has not arrived yet: a client without
        # one, or over its rate or concurrency, never has its body held); REFUSED,
        # ADMITTED or AT_HEAD, with the tenant's name (None: not known)
        self.admits = admits
        # connections waiting for a request body, by tenant (none at zero): at most
        # TENANT_BODIES_SHARE of the server's connections each
        self.bodies_pending: dict[str, int] = {}
        # how each of its requests starts: other bytes are aiohttp's as soon as they come
        self.request_lines = tuple(b"POST " + path + b" HTTP/1.1\r\n" for path in routes)
        self.max_header_bytes = http.max_header_bytes
        self.max_body_bytes = http.max_body_bytes
        self.header_timeout_s = http.header_timeout_s
        self.body_timeout_s = http.body_timeout_s
        self.keepalive_timeout_s = http.keepalive_timeout_s

    @classmethod
    def for_app(cls, app: web.Application, http: config.HttpSettings) -> Lane | None:
        """The lane of ``app``'s serving routes; None when it has none of them or
        serves over TLS."""
        if http.tls_cert_file and http.tls_key_file:
            return None
        routes: dict[bytes, Route] = {}
        for route in app.router.routes():
            resource = route.resource
            path = resource.canonical if resource is not None else ""
            if route.method == "POST" and path in cls.PATHS:
                routes[path.encode()] = Route(app, path, route.handler)
        return cls(routes, http, _admits(app)) if routes else None


# Set on a request whose body the lane drops unread (its key refused, or its tenant over its
# rate or concurrency at the head): the serving path answers 401 for the key, else 429
# whatever its own rate check finds.
BODY_DROPPED = "synapse.lane.body_dropped"
# What Lane.admits answers of a head whose body is still to come.
REFUSED = 0         # answered at once, the body dropped
ADMITTED = 1        # the body awaited, then the request handed over whole
AT_HEAD = 2         # handed over at once, the handler awaiting the body (_Arriving)


def _admits(app: web.Application,
            ) -> Callable[[CIMultiDictProxy[str]], tuple[int, str | None]]:
    """Whether a head's ``Authorization`` passes the app's authentication (the check
    ``serving.admit`` makes first) by a tenant not over its request rate or concurrency
    (the check it makes next, ``ratelimit.RateLimiter.peek``): the body of any other is
    dropped. AT_HEAD for a tenant with a limit (``RateLimiter.limited``): its request
    takes its token and slot at its head, as on aiohttp's path, not once its body is in
    (a peek takes nothing, so any number of heads would pass while its bucket stays
    full, and a body that never comes would cost nothing)."""
    services = app.get(context.SERVICES)
    if services is None:
        return lambda _: (ADMITTED, None)
    tenants, limiter = services.tenants, services.limiter

    def admits(headers: CIMultiDictProxy[str]) -> tuple[int, str | None]:
        try:
            tenant = tenants.authenticate(headers.get("Authorization"))
        except errors.SynapseError:
            return REFUSED, None
        # With auth off every client is the one tenant 'anonymous': a share of it would
        # be a share of the whole deployment, so its bodies are not counted (None).
        name = tenant.name if tenants.enabled else None
        if not limiter.peek(tenant).allowed:
            return REFUSED, name
        return (AT_HEAD if limiter.limited(tenant) else ADMITTED), name
    return admits


class Connection(base_protocol.BaseProtocol):
    """One client connection, served by the lane until a request is not for it."""

    def __init__(self, server: server_mod.LaneServer, lane: Lane,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.loop = loop
        self._server = server
        self._lane = lane
        self._buf = bytearray()
        self._since = loop.time()       # when the current wait (idle, head, body) began
        self._waiting_body: tuple[Route, CIMultiDictProxy[str], int, bool] | None = None
        # while waiting for a body: when it was asked for (its head, or the 100 Continue
        # the app sent), and the tenant counted in Lane.bodies_pending (None: none)
        self._body_from = self._since
        self._pending_tenant: str | None = None
        self._arriving: _Arriving | None = None     # handed over, its body still to come
        self._task: asyncio.Task[None] | None = None
        # what each request's task starts from, copied per request (module docstring)
        self._context = contextvars.copy_context()
        self._closing = False           # close once the request in flight is answered
        self._paused_for_pipeline = False
        self._done: asyncio.Future[None] | None = None
        # Body bytes of a refused request still to come: read and dropped, never kept;
        # the connection goes on (or closes) once they are in, as aiohttp's does (closing
        # with them unread would reset it, and the client could lose the answer).
        self._discard = 0
        self._keep_after_discard = False

    @property
    def draining(self) -> bool:
        return self._server.draining

    def invited(self) -> None:
        """The app sent the ``100 Continue`` of the body awaited: the body is asked for
        from now (:meth:`body_progress`)."""
        self._body_from = self.loop.time()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.lane_opened(self, cast(asyncio.Transport, transport))

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.lane_closed(self)
        self._buf.clear()
        self._uncount_body()
        if self._task is not None and not self._task.done():
            self._task.cancel()     # the client went away: so does its request

    def data_received(self, data: bytes) -> None:
        if self._discard:
            dropped = min(len(data), self._discard)
            self._discard -= dropped
            if self._discard:
                return
            data = data[dropped:]
            if self._task is None:      # answered already, and now the body is all in
                self._buf += data
                self._finished(self._keep_after_discard)
                return
        if not self._buf and self._task is None and self._waiting_body is None:
            self._since = self.loop.time()      # a head starts: header_timeout_s from now
        self._buf += data
        if self._task is None:
            self._next()
        elif self._arriving is not None:
            self._take_body()
        elif len(self._buf) > PIPELINE_BYTES and not self._paused_for_pipeline:
            self._paused_for_pipeline = True
            self._pause_transport_reading()

    def eof_received(self) -> bool:
        return False        # half-closed: the transport closes itself

    # -- requests ------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the request at the start of the buffer, once it has arrived whole."""
        if self.transport is None or self._closing:
            return
        if self._waiting_body is not None:
            self._take_body()
            return
        buf = self._buf
        if not buf:
            return
        end = buf.find(_HEAD_END, 0, self._lane.max_header_bytes + 4)
        if end < 0:
            if len(buf) > self._lane.max_header_bytes or not any(
                    line.startswith(buf[:len(line)]) for line in self._lane.request_lines):
                self._hand_off()    # too long, or not the lane's: aiohttp answers at once
            return
        head_len = end + 4
        head = lane_wire.Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(bytes(buf[:head_len]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_off()                    # aiohttp answers what it cannot parse
            return
        route = self._lane.routes.get(head.url)
        length = head.headers.get("Content-Length")
        if (not head.complete or head.odd or route is None or "Host" not in head.headers
                or len(head.headers) > lane_wire.MAX_HEADERS or parser.get_method() != b"POST"
                or parser.get_http_version() != "1.1" or length is None
                or not length.isdigit() or int(length) > self._lane.max_body_bytes):
            self._hand_off()
            return
        del buf[:head_len]
        headers = CIMultiDictProxy(head.headers)
        size = int(length)
        admitted, tenant = ADMITTED, None
        if size > len(buf) or head.expects:
            admitted, tenant = self._lane.admits(headers)
            if admitted == REFUSED:
                self._refuse(route, headers, size,
                             parser.should_keep_alive() and not head.expects)
                return
        pending = size > len(buf)
        if pending and tenant is not None and not self._count_body(tenant):
            self._refuse(route, headers, size, False, over_share=tenant)
            return
        at_head = admitted == AT_HEAD and pending
        if head.expects and not at_head:        # (at the head: once the app reads it)
            self.transport.write(_CONTINUE)
        self._waiting_body = (route, headers, size, parser.should_keep_alive())
        self._since = self._body_from = self.loop.time()    # body_timeout_s from the head
        if at_head:
            request = self._arriving = _Arriving(self, route, headers, size,
                                                 parser.should_keep_alive(), head.expects)
            self._task = self.loop.create_task(self._serve(route, request),
                                               context=self._context.copy())
        self._take_body()

    def _refuse(self, route: Route, headers: CIMultiDictProxy[str], size: int,
                keep_alive: bool, over_share: str | None = None) -> None:
        """A head refused at once, its body not held: the app answers (401, 429) as on
        aiohttp's path, without it, while the rest of the body is read and dropped; the
        connection then goes on if ``keep_alive`` (not after an ``Expect``: the body may
        never come). ``over_share``: the tenant, whose connections already wait for
        their share of bodies: 429 ``too_many_pending_bodies`` through the app's
        middleware (as a 408 is, :meth:`_time_out_body`), and the connection closes."""
        buf = self._buf
        have = min(size, len(buf))
        del buf[:have]
        self._discard = size - have
        request = LaneRequest(self, route, headers, b"", keep_alive)
        request[BODY_DROPPED] = True
        if over_share is not None:
            message = (f"tenant {over_share!r} already has as many connections waiting "
                       "for a request body as it may (half of http.max_connections); "
                       f"retry after {BODIES_RETRY_AFTER_S:g}s")

            async def refused(_request: web.Request) -> web.StreamResponse:
                raise errors.BodiesPendingFull(message, retry_after_s=BODIES_RETRY_AFTER_S,
                                               limit="pending_bodies")
            route = Route(route.app, route.path, refused)
        self._task = self.loop.create_task(self._serve(route, request),
                                           context=self._context.copy())

    def _count_body(self, tenant: str) -> bool:
        """Count a connection of ``tenant`` waiting for a body (False: it is over its
        share, :data:`TENANT_BODIES_SHARE` of ``http.max_connections``, so not counted)."""
        pending = self._lane.bodies_pending
        held = pending.get(tenant, 0)
        if held >= max(1, int(self._server.max_connections * TENANT_BODIES_SHARE)):
            return False
        pending[tenant] = held + 1
        self._pending_tenant = tenant
        return True

    def _uncount_body(self) -> None:
        """No longer waiting for a body (it came, or its request ended, or its client):
        its tenant's count down, the entry gone at zero."""
        tenant, self._pending_tenant = self._pending_tenant, None
        if tenant is None:
            return
        pending = self._lane.bodies_pending
        left = pending.get(tenant, 0) - 1
        if left > 0:
            pending[tenant] = left
        else:
            pending.pop(tenant, None)

    def _take_body(self) -> None:
        assert self._waiting_body is not None
        route, headers, length, keep_alive = self._waiting_body
        if len(self._buf) < length:
            return
        body = bytes(self._buf[:length])
        del self._buf[:length]
        self._waiting_body = None
        if self._pending_tenant is not None:    # (counted only when it came after its head)
            self._uncount_body()
        arriving = self._arriving
        if arriving is not None:
            self._arriving = None
            arriving.arrived(body)
            return
        request = LaneRequest(self, route, headers, body, keep_alive)
        self._task = self.loop.create_task(self._serve(route, request),
                                           context=self._context.copy())

    async def _serve(self, route: Route, request: LaneRequest) -> None:
        keep = False
        try:
            resp = await route.call(cast(web.Request, request))
            keep = request.keep_alive and resp.keep_alive is not False  # (as answered)
            whole = (None if resp.prepared or route.app.on_response_prepare  # its hooks
                     else lane_wire.serialized(resp, keep))
            if whole is not None and self.transport is not None:
                self.transport.write(whole)
            else:
                await resp.prepare(cast(web.Request, request))
                await resp.write_eof()
        except asyncio.CancelledError:
            keep = False
            if self.transport is not None:  # cancelled by shutdown, not by the client
                raise
        except ConnectionError as exc:
            keep = False    # the client went away
            log.debug("connection closed while answering: %s", type(exc).__name__)
        except Exception:
            keep = False
            log.exception("unexpected error below the app")
        finally:
            self._finished(keep)

    def _finished(self, keep: bool) -> None:
        if self._arriving is not None:      # answered before its body was in: drop it
            self._arriving = None
            assert self._waiting_body is not None
            length = self._waiting_body[2]
            self._waiting_body = None
            self._uncount_body()
            have = min(length, len(self._buf))
            del self._buf[:have]
            self._discard = length - have
        self._task = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self.transport is None:
            return
        if self._discard:       # goes on once the refused body is in (or its time is up)
            self._keep_after_discard = keep
            self._since = self.loop.time()
            if not keep and self.transport.can_write_eof():
                # Closing: ours to begin (RFC 9112 9.6), not at the client's pace or
                # http.body_timeout_s. Half-closed, what still comes is read and dropped,
                # so the answer is not lost to a reset.
                self.transport.write_eof()
            return
        if not keep or self._closing:
            self.transport.close()
            return
        self._since = self.loop.time()          # idle (or a pipelined head) from now
        if self._paused_for_pipeline:
            self._paused_for_pipeline = False
            self._resume_transport_reading()
        self._next()

    def _hand_off(self) -> None:
        """aiohttp serves this connection from here, starting with the unconsumed bytes."""
        transport = self.transport
        if transport is None:
            return
        self._server.lane_closed(self)
        protocol = self._server.aiohttp_protocol()
        data = bytes(self._buf)
        self._buf.clear()
        self.transport = None
        transport.set_protocol(protocol)
        # (aiohttp's task for the connection copies the context: the accepted one's, not
        # the request's this may be called from)
        self._context.copy().run(protocol.connection_made, transport)
        if self._paused_for_pipeline:
            self._paused_for_pipeline = False
            transport.resume_reading()
        if data:
            protocol.data_received(data)

    # -- time limits and shutdown --------------------------------------------------------

    def idle_since(self) -> float | None:
        """When it went idle (between requests, nothing of the next one received), else
        None."""
        if (self.transport is None or self._task is not None or self._buf
                or self._waiting_body is not None or self._closing):
            return None
        return self._since

    def head_since(self) -> float | None:
        """When the request head it is receiving began to arrive, else None."""
        if (self.transport is None or self._task is not None or not self._buf
                or self._waiting_body is not None or self._discard or self._closing):
            return None
        return self._since

    def body_progress(self) -> tuple[float, int] | None:
        """While its request body is awaited: when it was asked for (its head, or the
        ``100 Continue``), and the bytes of it received since; else None (a body the app
        has not asked for yet, behind ``Expect``, is not the client's to send)."""
        waiting = self._waiting_body
        if (waiting is None or self.transport is None or self._closing
                or (self._arriving is not None and self._arriving.uninvited)):
            return None
        return self._body_from, min(len(self._buf), waiting[2])

    def expire(self, now: float) -> None:
        """Apply the connection's time limits (called by the server's sweep)."""
        if self.transport is None or self._task is not None:
            return
        waited = now - self._since
        if self._discard:
            if waited > self._lane.body_timeout_s:
                self.transport.close()
        elif self._waiting_body is not None:
            if waited > self._lane.body_timeout_s:
                self._time_out_body()
        elif self._buf:
            if waited > self._lane.header_timeout_s:
                log.debug("closing a connection whose request head took over %gs "
                          "(http.header_timeout_s)", self._lane.header_timeout_s)
                self.transport.close()
        elif waited > self._lane.keepalive_timeout_s:
            self.transport.close()

    def _time_out_body(self) -> None:
        """Answer 408 through the app's own middleware, as a handler raising the timeout
        would on aiohttp's path: the same envelope and ``x-request-id``, the request
        counted in the metrics and the access log, and the connection closed after it."""
        assert self._waiting_body is not None
        route, headers, _, _ = self._waiting_body
        self._waiting_body = None
        self._uncount_body()
        self._buf.clear()
        message = (f"the request body did not arrive within {self._lane.body_timeout_s:g}s "
                   "(http.body_timeout_s)")

        async def late(_request: web.Request) -> web.StreamResponse:
            raise errors.RequestTimeout(message)

        request = LaneRequest(self, route, headers, b"", keep_alive=False)
        self._task = self.loop.create_task(
            self._serve(Route(route.app, route.path, late), request),
            context=self._context.copy())

    def force_close(self) -> None:
        """Close the connection now (a client too slow to wait for)."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Stop serving: close now when idle, else once the request in flight is answered."""
        self._closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    def cut(self) -> None:
        """The shutdown grace is over: cancel the request in flight (the app ends it: an
        error event for a stream, a 503 for a request not yet answered)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Give the request in flight ``timeout`` seconds, then cancel it; close."""
        self._closing = True
        task = self._task
        if task is not None:
            self._done = self.loop.create_future()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._done)
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.transport is not None:
            self.transport.close()


class Sweeper:
    """Applies the lane connections' time limits once a second, while any is open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._conns: set[Connection] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: Connection) -> None:
        self._conns.add(conn)
        if self._timer is None:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)

    def discard(self, conn: Connection) -> None:
        self._conns.discard(conn)

    def earliest(self, since_of: Callable[[Connection], float | None]) -> Connection | None:
        """The connection with the earliest time by ``since_of`` (None: not counted), or
        None: the one idle longest (:meth:`Connection.idle_since`), or whose head has been
        arriving longest (:meth:`Connection.head_since`), to close when the server is full."""
        best: Connection | None = None
        best_since = math.inf
        for conn in self._conns:
            since = since_of(conn)
            if since is not None and since < best_since:
                best, best_since = conn, since
        return best

    def _sweep(self) -> None:
        self._timer = None
        now = self._loop.time()
        for conn in list(self._conns):
            conn.expire(now)
        if self._conns:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)
