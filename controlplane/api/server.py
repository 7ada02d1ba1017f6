"""The HTTP server below the app: connection time limits and unparseable requests.

aiohttp's server has no limit on how long a request head may take to arrive, and answers
a request it cannot parse (a header over ``http.max_header_bytes``, a bad request line)
with a plain-text 400 that quotes part of the offending line. :class:`Runner` serves an
app with a connection handler that

* closes a connection whose request head (request line and headers) has not arrived
  ``http.header_timeout_s`` after its first byte — a client sending one byte every two
  seconds holds a connection for that long, not forever;
* closes connections idle for ``http.keepalive_timeout_s`` (aiohttp's keep-alive timer:
  it also covers a connection that never sends a byte);
* answers a request it cannot parse with a fixed message per kind of fault
  (:data:`PARSE_ERRORS`), never echoing what the client sent, logged at debug level only
  (a stream of garbage must not fill the logs);
* fails the body of a request whose chunked framing breaks after its head was parsed
  (:meth:`_Protocol._body_broke`): aiohttp's parser drops that body without a word, and
  its handler would wait out ``http.body_timeout_s`` (a 408, the connection and the
  handler held that long for one bad byte). The handler reading it gets aiohttp's
  ``RequestPayloadError``, which the app's middleware answers 400 and closes after; a
  request answered already stops being read; the connection closes either way (what
  follows the bad bytes cannot be framed);
* answers a refused ``Expect`` (any but ``100-continue``: aiohttp's 417, raised by the
  routes' expect handler and by aiohttp's own for no route) with a fixed message, not
  aiohttp's plain text that quotes the header;
* keeps at most ``http.max_connections`` open (:func:`connection_cap`): one more closes
  the connection idle longest; when none is idle, the one whose request head has been
  arriving longest, if for :data:`STALLED_HEAD_S` (a slow-head client holding every
  slot); when none has, the one whose request body arrives slowest since it was asked
  for (its head, or its ``100 Continue``), if asked for :data:`STALLED_HEAD_S` ago or
  more and arriving under :data:`controlplane.adapters.http1.HELD_MIN_RATE` on average
  (complete heads each trickling a body a byte at a time, a slow-body client holding
  every slot; the floor a backend's held answer keeps, far below any LAN's or WAN's
  rate, so an upload at any usable speed, however large, is never the one closed; time
  the server held reading it paused is not the client's, :meth:`_Protocol.body_progress`,
  nor is a request being served, its body still coming, a stalled head,
  :meth:`_Protocol.head_since`); else it is closed at once — idle connections, stalled
  heads and stalled bodies held open cannot use up the process's file descriptors or
  lock new clients out. One tenant's connections may also wait for at most half of them
  with a body pending on the lane, for the lane's requests with a ``Content-Length``
  (:data:`controlplane.api.fast_lane.TENANT_BODIES_SHARE`). Idle means idle whoever serves
  the connection: the lane's, and aiohttp's (:meth:`_Protocol.idle_since`), so a client
  cannot shield its idle connections from the cap by making one request the lane hands
  off (``GET /health``, no key needed), nor are they shielded when there is no lane
  (TLS, ``http.fast_lane: false``).

Both answers are in the error shape of the path's API (:func:`error_body`): Anthropic's
under ``/v1/messages`` (:func:`controlplane.core.anthropic_errors.covers`, as the
middleware's), the OpenAI envelope elsewhere. For a request aiohttp could not parse, the
path is read from the start of its head as it arrived (:func:`head_path`; aiohttp's
parser keeps none of it): when the request line itself cannot be read (no target, or
bytes that are not HTTP) there is no path, and the answer is the OpenAI envelope. The
bytes kept are the first :data:`HEAD_KEPT` of a head arriving between requests; a head
pipelined behind a request still being served is not kept, so its fault is answered in
the OpenAI envelope too.

The request body's own limit, ``http.body_timeout_s``, is the handlers'
(:func:`controlplane.api.serving.read_body`, 408).

aiohttp builds each connection's handler in ``Server.__call__`` and offers no hook for
another class, so :meth:`Runner._make_server` re-types the server it built as
:class:`LaneServer`: each connection starts in :mod:`controlplane.api.fast_lane`
(``http.fast_lane``), which hands it to aiohttp's protocol, with these rules, for any
request that is not its own; ``tests/security`` pins the behaviour against a real
process.

At shutdown (:meth:`LaneServer.shutdown`) requests in flight get the grace aiohttp is
given (``http.shutdown_grace_s``); what still runs then is *cut*: ``on_cut`` marks the
cancellation as the server's, so the app ends each request cleanly — a stream with its
error event and its end, a request not yet answered with 503 ``server_shutting_down``,
logged as such (not as a client gone, 499) — before aiohttp closes the connections.
From SIGTERM on (:meth:`LaneServer.drain`, before the drain delay) every answer says
``Connection: close``; a second signal cuts at once (:meth:`LaneServer.hurry`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import http_exceptions, streams, web, web_protocol, web_request, web_server

from controlplane import config, errors
from controlplane.adapters import http1
from controlplane.api import fast_lane
from controlplane.core import anthropic_errors

# A request head arriving for this long is stalled: a client at any usable speed sends its
# head in a round trip or two. Over http.max_connections with none idle, the head stalled
# longest is closed to let a new client in. A body asked for this long ago is judged by
# the average rate it arrives at (http1.HELD_MIN_RATE): before, a round trip's silence
# is no sign of a trickle.
STALLED_HEAD_S = 1.0
# After the shutdown grace, what the handlers cut get to end it (an error event, a 503)
# before aiohttp closes their connections.
CUT_S = 2.0

log = logging.getLogger("synapse.controlplane.http")

# What a parse fault is, by aiohttp's exception class (the most specific first).
PARSE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong,
     "a request line or header is longer than the limit (http.max_header_bytes)"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.BadHttpMethod, "the request method is invalid (HTTPS sent to an "
                                    "HTTP port?)"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.PayloadEncodingError, "the request body's framing is invalid"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP/1.1"),
)


# Bytes kept of the start of a request head, to read its path from should it not parse:
# a request line is the first; a longer target is judged by its start.
HEAD_KEPT = 1024


def parse_error(status: int, exc: BaseException | None) -> errors.SynapseError:
    """The error a client sees for a request aiohttp's parser refused."""
    if status >= 500:
        return errors.with_status(status, "internal error")
    message = next((text for cls, text in PARSE_ERRORS if isinstance(exc, cls)),
                   "the request could not be read")
    return errors.with_status(status, message, code="invalid_http")


def expectation_failed() -> errors.SynapseError:
    return errors.with_status(417, "only 'Expect: 100-continue' is understood",
                              code="expectation_failed")


def error_body(err: errors.SynapseError, path: str | None) -> bytes:
    """``err`` as the body of an answer to a request to ``path``: Anthropic's shape where
    it covers the path, else the OpenAI envelope (``path`` None: not known)."""
    if path is not None and anthropic_errors.covers(path):
        return orjson.dumps(anthropic_errors.body(err))
    return orjson.dumps(err.envelope())


def head_path(head: bytes) -> str | None:
    """The path of the request line that ``head`` starts with, percent-decoded as
    ``request.path`` is; None when the line has no target to read one from. Only a
    line's target is read (what comes after it may be what is malformed)."""
    target = head.split(b"\n", 1)[0].split(b" ", 2)[1:2]
    if not target:
        return None
    raw = target[0].decode("latin-1")
    if not raw.startswith("/"):
        if "://" not in raw:
            return None                         # "*", an authority, bytes not HTTP
        try:
            raw = urllib.parse.urlsplit(raw).path or "/"    # absolute form
        except ValueError:
            return None
    raw = raw.partition("?")[0].partition("#")[0]
    return urllib.parse.unquote_to_bytes(raw).decode("utf-8", "replace")


class _Protocol(web_protocol.RequestHandler):
    def __init__(self, manager: web_server.Server, *, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_seen = 0
        self._head = b""            # the start of the last head that began between requests
        self._head_at = -1          # the count of requests parsed before it
        # the body of the last request parsed: what the parser feeds until it ends, and
        # when its head was parsed
        self._receiving: streams.StreamReader | None = None
        self._body_from = 0.0
        # when the server last paused reading the socket (a body's buffer full, its
        # handler not reading it yet), and the time it held reading paused since
        # ``_body_from``: a body is judged by the time its client could send only
        self._paused_at: float | None = None
        self._held = 0.0

    def _between_requests(self) -> bool:
        """No request is being served or waiting, nor is the last one's body still to
        come: bytes arriving now are the start of a head. (aiohttp's ``start()`` takes a
        parsed request off its queue and runs its handler in a task of its own, marked in
        progress only once that task first runs: body bytes arriving in between are
        still body.)"""
        return (not self._request_in_progress and not self._messages
                and (self._receiving is None or self._receiving.is_eof()))

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            if self._head_timer is None:            # bytes between requests: a head begins
                self._head = data[:HEAD_KEPT]
                self._head_at = self._request_count
            elif len(self._head) < HEAD_KEPT and b"\n" not in self._head:
                self._head += data[:HEAD_KEPT - len(self._head)]    # its line goes on
        super().data_received(data)
        messages = getattr(self, "_messages", ())      # aiohttp's queue of parsed requests
        if messages and getattr(messages[-1][0], "upgrade", False) and not self._close:
            # A request asked to switch protocols (Upgrade: h2c, websocket): no route does,
            # and aiohttp's parser stops at it, so a request pipelined behind it in the same
            # read would wait, unanswered, on an open connection. The connection closes once
            # the request is answered (a client retries what a close left unanswered).
            self.close()
        if self._request_count != self._heads_seen:     # a request head was parsed
            self._heads_seen = self._request_count
            self._cancel_head_timer()
            if messages:        # (none when aiohttp parsed and served them elsewhere)
                msg, payload = messages[-1]
                if type(msg) is web_protocol._ErrInfo:      # or the parser failed
                    self._body_broke(msg.exc)
                else:
                    self._receiving = payload
                    self._body_from = self._loop.time()
                    self._held = 0.0
                    if self._paused_at is not None:
                        self._paused_at = self._body_from
        elif (self._head_timer is None and data and self._between_requests()
              and self.transport is not None):
            # Bytes between requests are the start of a head: it has this long to finish.
            self._head_timer = self._loop.call_later(self._header_timeout_s,
                                                     self._head_timed_out)

    def _body_broke(self, exc: BaseException) -> None:
        """The parser failed (``exc``): when in the body of the last request parsed, that
        body ends in an error now, not at ``http.body_timeout_s``, and the connection
        closes once that request is answered. A failure in a head is answered as such
        (:meth:`handle_error`)."""
        payload, self._receiving = self._receiving, None
        if payload is None or payload.is_eof():
            return
        log.debug("a request body's framing broke: %s", type(exc).__name__)
        self._lingering_time = 0.0      # nothing more of it will come: never wait for it
        if self._request_in_progress or any(p is payload for _, p in self._messages):
            payload.set_exception(web_protocol.RequestPayloadError(
                "the request body's framing is invalid"), exc)
        else:   # answered, its body being read and dropped (aiohttp's lingering): stop
            payload.feed_eof()
        self.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_count == self._heads_seen and not self._request_in_progress:
            log.debug("closing a connection whose request head took over %gs "
                      "(http.header_timeout_s)", self._header_timeout_s)
            self.force_close()

    def idle_since(self) -> float | None:
        """When it went idle (waiting for a next request, nothing of it received), else
        None. aiohttp stamps its keep-alive deadline when a connection is made and after
        each answer; the wait began ``keepalive_timeout`` before it."""
        waiter = self._waiter
        if (self.transport is None or waiter is None or waiter.done() or self._messages
                or self._request_in_progress or self._head_timer is not None
                or self._force_close or self._close):
            return None
        return self._next_keepalive_close_time - self._keepalive_timeout

    def head_since(self) -> float | None:
        """When the request head it is receiving began to arrive, else None (also while a
        request is served or its body still comes: a head pipelined behind it is not
        stalled, nothing waits for it yet)."""
        timer = self._head_timer
        if (timer is None or self.transport is None or self._force_close or self._close
                or not self._between_requests()):
            return None
        return timer.when() - self._header_timeout_s

    def body_progress(self) -> tuple[float, int] | None:
        """While more of the body of its last request is to come and the server reads
        it: when its head was parsed, moved on by the time the server held reading
        paused since, and the bytes of it received; else None. While paused (aiohttp's
        buffer of the body full, its handler not reading it yet: a fair-queue turn, a
        backend's pace) the client cannot send, so that time is not the client's."""
        payload = self._receiving
        if (payload is None or payload.is_eof() or self.transport is None
                or self._force_close or self._paused_at is not None):
            return None
        return self._body_from + self._held, payload.total_bytes

    def pause_reading(self) -> None:
        # aiohttp's StreamReader pauses the protocol when a body's unread bytes pile up
        if self._paused_at is None:
            self._paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        # before aiohttp's own: it parses what is buffered, which may pause again (its
        # arguments are passed on as they are: they differ between aiohttp releases)
        if self._paused_at is not None:
            self._held += self._loop.time() - self._paused_at
            self._paused_at = None
        super().resume_reading(*args, **kwargs)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._receiving = None
        super().connection_lost(exc)

    def handle_error(self, request: web_request.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        path: str | None
        if status >= 500:       # a request that reached the app: its path is its own
            log.error("unexpected error below the app", exc_info=exc)
            path = request.path
        else:                   # one aiohttp could not parse (``request`` is a stand-in)
            log.debug("unparseable request: %s", type(exc).__name__ if exc else status)
            path = self._unparsed_path()
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error answer is possible")
        resp = web.Response(status=status, body=error_body(parse_error(status, exc), path),
                            content_type="application/json")
        resp.force_close()
        return resp

    def _unparsed_path(self) -> str | None:
        """The path of the request aiohttp could not parse, when the head kept is its
        own: the only request counted since that head began (this one)."""
        if self._request_count != self._head_at + 1:
            return None
        return head_path(self._head)

    def finish_response(self, request: web_request.BaseRequest, resp: web.StreamResponse,
                        start_time: float | None,
                        ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # Not a coroutine itself: one call more per answer on aiohttp's path, no more.
        if type(resp) is web.HTTPExpectationFailed:
            resp = web.Response(status=417, body=error_body(expectation_failed(), request.path),
                                content_type="application/json")
        if self._draining:      # (a request in flight at SIGTERM: its stream says
            resp.force_close()  # keep-alive already, the connection closes after it)
        return super().finish_response(request, resp, start_time)

    @property
    def _draining(self) -> bool:
        return isinstance(self._manager, LaneServer) and self._manager.draining


class LaneServer(web_server.Server):
    """aiohttp's server whose connections start in the fast lane (when it has one) and
    keep this module's rules once aiohttp serves them."""

    header_timeout_s = 10.0
    max_connections = 10_000
    lane: fast_lane.Lane | None = None
    sweeper: fast_lane.Sweeper | None = None
    on_cut: Callable[[], None] | None = None
    draining = False            # SIGTERM came: every answer closes its connection
    _hurried = False            # a second signal: cut at once, no grace
    _cutting: asyncio.TimerHandle | None = None
    _refused_logged_at = -math.inf
    _app_request: Callable[..., web.BaseRequest]

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # any protocol
        if len(self._connections) >= self.max_connections and not self._make_room():
            return _Refused(self)
        if self.lane is None:
            return self.aiohttp_protocol()
        if self.sweeper is None:
            self.sweeper = fast_lane.Sweeper(self._loop)
        return fast_lane.Connection(self, self.lane, self._loop)

    def _make_room(self) -> bool:
        """Close the connection idle longest, the lane's or aiohttp's, to admit a new one;
        when none is idle, the one whose request head has been arriving longest, if for
        :data:`STALLED_HEAD_S` or more; when none, the one whose body arrives slowest, if
        under the floor (:meth:`_slowest_body`; False: none of these)."""
        best = self._earliest(fast_lane.Connection.idle_since, _Protocol.idle_since)
        if best is None:
            best = self._earliest(fast_lane.Connection.head_since, _Protocol.head_since,
                                  before=self._loop.time() - STALLED_HEAD_S)
        if best is None:
            best = self._slowest_body()
        if best is None:
            return False
        best.force_close()      # idle or stalled: nothing in flight but a request waiting
        return True             # for its body (aiohttp's close() leaves the transport
                                # open when it cancels its wait)

    def _slowest_body(self) -> fast_lane.Connection | _Protocol | None:
        """The connection, the lane's or aiohttp's, whose request body has arrived at the
        lowest rate since it was asked for :data:`STALLED_HEAD_S` or more ago, if under
        :data:`http1.HELD_MIN_RATE` (a request waiting on it is dropped unanswered, as a
        stalled head is)."""
        now = self._loop.time()
        best: fast_lane.Connection | _Protocol | None = None
        best_rate = float(http1.HELD_MIN_RATE)
        for conn in self._connections:
            if not isinstance(conn, (fast_lane.Connection, _Protocol)):
                continue
            progress = conn.body_progress()
            if progress is None or (waited := now - progress[0]) < STALLED_HEAD_S:
                continue
            if (rate := progress[1] / waited) < best_rate:
                best, best_rate = conn, rate
        return best

    def _earliest(self, lane_since: Callable[[fast_lane.Connection], float | None],
                  aiohttp_since: Callable[[_Protocol], float | None],
                  before: float = math.inf) -> fast_lane.Connection | _Protocol | None:
        """The connection, the lane's or aiohttp's, with the earliest time by
        ``lane_since`` / ``aiohttp_since``, if earlier than ``before``."""
        best: fast_lane.Connection | _Protocol | None = None
        best_since = before
        if self.sweeper is not None and (lane := self.sweeper.earliest(lane_since)) is not None:
            since = lane_since(lane)
            if since is not None and since < best_since:
                best, best_since = lane, since
        for conn in self._connections:
            if isinstance(conn, _Protocol) and (since := aiohttp_since(conn)) is not None \
                    and since < best_since:
                best, best_since = conn, since
        return best

    def drain(self) -> None:
        """From now on every answer says ``Connection: close`` and its connection closes
        after it: clients that pool connections (kube-proxy's established ones, an
        ingress's upstream keep-alive) open new ones, which the Service sends to other
        pods, instead of holding one idle here until the listener closes it under a
        request they may not retry."""
        self.draining = True

    def make_request(self, message: Any, *args: Any) -> web.BaseRequest:
        """aiohttp's request factory (the app's), its request told to close the
        connection once :meth:`drain` began (``request.keep_alive`` is what a response
        prepares its ``Connection`` header from)."""
        if self.draining and not message.should_close:
            message = message._replace(should_close=True)
        return self._app_request(message, *args)

    def hurry(self) -> None:
        """A second signal: no more grace; what runs is :meth:`cut` now (or as soon as
        :meth:`shutdown` begins)."""
        self._hurried = True
        if self._cutting is not None:
            self._cutting.cancel()
            self._cutting = None
            self.cut()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Give the requests in flight ``timeout`` seconds (``http.shutdown_grace_s``); then
        :meth:`cut` what still runs and give the handlers :data:`CUT_S` to end it."""
        if self._hurried:
            timeout = 0.0
        self._cutting = (self._loop.call_later(timeout, self.cut) if timeout is not None
                         else None)
        try:
            await super().shutdown(None if timeout is None else timeout + CUT_S)
        finally:
            if self._cutting is not None:
                self._cutting.cancel()
                self._cutting = None

    def cut(self) -> None:
        """The grace is over: ``on_cut`` (the middleware then reads the cancellation as
        the server's, not the client's), and every request handler still running is
        cancelled, the lane's and aiohttp's, and so is the writing of an answer a client
        does not read (aiohttp would wait for it twice the time it was given)."""
        self._cutting = None
        busy = [conn for conn in self._connections
                if (conn._task is not None if isinstance(conn, fast_lane.Connection)
                    else conn._request_in_progress)]
        if not busy:
            return
        log.warning("shutdown grace over: ending %d request(s) still in flight", len(busy))
        if self.on_cut is not None:
            self.on_cut()
        for conn in busy:
            if isinstance(conn, fast_lane.Connection):
                conn.cut()
            elif conn._task_handler is not None:
                conn._task_handler.cancel()     # as aiohttp does when a client goes away

    def refused(self) -> None:
        now = self._loop.time()
        if now - self._refused_logged_at >= 60.0:
            self._refused_logged_at = now
            log.warning("refusing connections: %d open, none idle (http.max_connections)",
                        len(self._connections))

    def aiohttp_protocol(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, header_timeout_s=self.header_timeout_s,
                         **self._kwargs)

    def lane_opened(self, conn: fast_lane.Connection, transport: asyncio.Transport) -> None:
        # aiohttp's shutdown closes and awaits what this dict holds: lane connections too
        self._connections[conn] = transport     # type: ignore[index]
        assert self.sweeper is not None
        self.sweeper.add(conn)

    def lane_closed(self, conn: fast_lane.Connection) -> None:
        self._connections.pop(conn, None)       # type: ignore[call-overload]
        if self.sweeper is not None:
            self.sweeper.discard(conn)


class _Refused(asyncio.Protocol):
    """A connection over ``http.max_connections`` with none idle to close: closed at once."""

    def __init__(self, server: LaneServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server.refused()
        transport.close()


def connection_cap(configured: int) -> int:
    """``http.max_connections``, at most three quarters of the process's open-file limit
    (the rest for upstream connections, Redis, gRPC and files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft * 3 // 4))


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections keep :mod:`this module <controlplane.api.server>`'s
    rules; the limits come from the ``http`` settings."""

    def __init__(self, app: web.Application, http: config.HttpSettings,
                 on_cut: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=http.keepalive_timeout_s,
                         max_line_size=http.max_header_bytes,
                         max_field_size=http.max_header_bytes, **kwargs)
        self._http = http
        self._on_cut = on_cut

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = LaneServer
        assert isinstance(server, LaneServer)
        server.header_timeout_s = self._http.header_timeout_s
        server.max_connections = connection_cap(self._http.max_connections)
        server.on_cut = self._on_cut
        server._app_request = server.request_factory
        server.request_factory = server.make_request
        if self._http.fast_lane:
            server.lane = fast_lane.Lane.for_app(self._app, self._http)
        return server

    def drain(self) -> None:
        """SIGTERM came: :meth:`LaneServer.drain`."""
        if isinstance(self.server, LaneServer):
            self.server.drain()

    def hurry(self) -> None:
        """A second signal: :meth:`LaneServer.hurry`."""
        if isinstance(self.server, LaneServer):
            self.server.hurry()
