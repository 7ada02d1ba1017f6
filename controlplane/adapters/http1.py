"""HTTP/1.1 on the wire for the upstream transport: one connection, its parser, its answer.

A :class:`Connection` is an ``asyncio.Protocol`` that parses the backend's answer with
``httptools`` (llhttp, Node.js's parser) and hands it to the :class:`UpstreamResponse` of
the request in flight: the head first, then the body as it arrives. The pool, connecting
and the request loop live in :mod:`controlplane.adapters.upstream`.

Errors: every failure a response reports is a :mod:`controlplane.errors` class. Foreign
exceptions — socket errors, TLS errors, the parser's — are translated in one table,
:data:`ERRORS` (httpx's ``map_httpcore_exceptions``); conditions this module detects
itself (the backend closed the connection, or went silent) are raised as ours directly.
No message names an address: the numbers of an ``OSError`` become ``os.strerror``'s
words, and a TLS error its reason.

Rules:

- **Back-pressure.** Reading from the backend pauses while more than ``HIGH_WATER`` bytes
  of body wait for the caller, and resumes below ``LOW_WATER``.
- **Release.** :meth:`UpstreamResponse.close` returns the connection to its pool only when
  the body was received to its end, the backend allows keep-alive and the parser is
  between messages; otherwise the connection is closed — which is how a backend learns
  that the client went away.
- **One answer per request.** httptools goes on parsing after a message's end, so bytes
  after a complete answer in the same read would run its callbacks again. A message that
  begins with no request awaiting it — the answer in flight is already complete (its
  final head came), or there is none — is nobody's: the connection is *poisoned*
  (:attr:`Connection.poisoned`): parsing stops there, the connection is closed and never
  pooled, and the complete answer before it is kept as it was (its status, headers and
  body are not touched). A second final (>= 200) head for one request is invalid HTTP.
  Such bytes are a backend bug or an attack on the next request to share the connection
  (another tenant's); a *late* extra answer, after the next request was written, looks
  like a valid answer to it: :mod:`controlplane.adapters.upstream` checks the request id.
- A ``101 Switching Protocols`` is invalid here (nothing asks to upgrade): httptools'
  ``HttpParserUpgrade``, which is no ``HttpParserError``, is in :data:`ERRORS` too.
- Bodies pass through byte for byte (no decompression); chunked framing is removed.
  Header names and values are checked for CR, LF and NUL before anything is sent.
- **Only answers to relay.** A final status in :data:`NOT_RELAYED` (a redirect, 204, 205)
  to a relayed request, and a body with a ``Content-Encoding`` to any, fail the answer with
  ``UpstreamProtocolError`` before its head is handed over: a hostile backend's redirect
  must not send a client (the OpenAI SDK follows them) and its tenant's prompt elsewhere.
  A relayed request is every one but a GET: the dispatcher's are all POSTs, and GETs are
  Synapse's own reads (health probes, metrics, a server's document), whose status their
  caller judges (a health path answering 204 is healthy) and which follow no redirect
  (nothing here ever does). Bodies are relayed and read as they came (usage, renames, the
  cache), so every request asks for ``Accept-Encoding: identity`` and an encoded answer,
  which was not asked for, is refused rather than decoded (no decompression bomb).
  Informational (1xx) heads are skipped, as HTTP requires of a client; they never reach
  the client, and their bytes are bounded as below.
- **Whole answers.** One is read into memory up to :data:`MAX_WHOLE_BODY` (large enough
  for the largest embeddings batch a backend is sent, as JSON), and all of them together
  up to :data:`WHOLE_BODIES_BUDGET` per process (:data:`BUDGET`; a serving worker is a
  process of its own): a body over ``HIGH_WATER`` reserves what it holds as it arrives,
  until its response is closed. Small answers never touch it. An answer over the cap is
  its backend's fault (``UpstreamProtocolError``, code ``upstream_too_large``: failed over
  like any invalid answer); one that finds the budget spent is no backend's (code
  :data:`BUDGET_SPENT`: the dispatcher answers 503 with ``Retry-After`` rather than fail
  over). The budget is module state rather than a client's: it bounds the process's
  memory whichever :class:`~controlplane.adapters.upstream.UpstreamClient` reads.
  Answers read in pieces (streams, a probe's first bytes) never hold it. Once a body
  holds budget, the rest of it must keep coming: each gap between pieces within the read
  timeout (the longer of ``http.upstream_first_byte_timeout_s`` and
  ``http.upstream_idle_timeout_s``), as any read, and each window of that length from
  when it first held budget must bring at least :data:`HELD_MIN_RATE` bytes a second of
  it, else ``UpstreamReadError``: the connection closed and the budget given back, as
  for any read that failed. Without the floor, a backend (a compromised engine) that
  sends most of an answer at once, then a byte at a time within the gap, would hold its
  share of the budget for as long as it liked, and two such answers all of it; with it,
  such a trickle fails one window after it began to hold budget. The floor is an
  average rate far below any LAN's or WAN's, not a bound on the whole read: an honest
  backend, local or remote, sends even a :data:`MAX_WHOLE_BODY` answer whole, however
  long that takes above the floor. The client's copy holds the budget on until it is
  written, its progress bounded in the same spirit (:func:`Budget.hold`; ``send_whole``
  of :mod:`controlplane.api.proxy`).
- **One tenant's share.** Tenants are adversaries: one asking for huge answers (or reading
  them slowly) would otherwise spend the budget, have every other tenant's large answers
  refused, and read in its own refusals how much the others hold. So one tenant's answers
  hold at most :data:`TENANT_SHARE` at once, half the budget: a tenant alone never spends
  it, and what it may hold still fits one :data:`MAX_WHOLE_BODY` answer. A tenant over its
  share is refused as a spent budget is (the same code, the same 503), and only that
  tenant; two tenants together can still spend the budget. The reading side charges the
  tenant the handler named (:data:`charge`, a context variable, so the transport's
  interface carries no tenant; Synapse's own reads are the tenant ``""``), and each answer
  keeps the tenant it was made for, to give its reservation back under the same key; the
  client's copy (``send_whole``) holds its size under the request's tenant (the key is
  ``controlplane.api.proxy.budget_key``'s: with tenant keys off, where every client is
  the tenant ``anonymous``, each request's own). The share is
  per process, as the budget is; a constant, not a setting, for it follows from the two
  bounds above.
- **A bounded head.** httptools sets no limit on a head: a backend (a compromised engine
  runs tenants' inputs) could send headers without end, or one header of a gigabyte, and
  only the first-byte limit stopped it. A head of more than :data:`MAX_HEADERS` lines, or
  whose names and values exceed :data:`MAX_HEAD_BYTES`, fails the answer with
  ``UpstreamProtocolError`` (the dispatcher fails over; the client gets a 502). As
  httptools holds a header's value until the header ends, each read is also checked:
  more than :data:`MAX_HEAD_BYTES` received without a byte of body between them (a head
  still arriving, informational heads one after another, trailers, chunk extensions)
  fails the answer, so what the parser holds stays bounded by that plus one read.
  Trailers are never kept: they are not the answer's headers, and nothing relays them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import logging
import os
import ssl
import typing
import urllib.parse
from collections.abc import Iterator, Mapping

import httptools

from controlplane import errors
from controlplane.core import transport

log = logging.getLogger("synapse.controlplane.upstream")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_WHOLE_BODY = 256 * 1024 * 1024   # a whole (non-streamed) answer read into memory
# What whole answers may hold in memory at once, in one process (see "Whole answers").
WHOLE_BODIES_BUDGET = 512 * 1024 * 1024
# What one tenant's whole answers may hold at once, in one process (see "Whole answers").
TENANT_SHARE = WHOLE_BODIES_BUDGET // 2
# The slowest a whole body that holds budget may arrive, on average over each window of
# the read timeout (see "Whole answers"): half a megabit a second.
HELD_MIN_RATE = 64 * 1024
# A response head: vLLM, TEI and llama.cpp send under ten headers and a few hundred bytes,
# hosted APIs behind a CDN some thirty and a few KiB.
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024
# Final statuses that are no answer to relay: a redirect (the OpenAI SDK would follow its
# Location, taking a tenant's prompt to wherever the backend says), or no content.
NOT_RELAYED = transport.NOT_RELAYED
UNRELAYED_METHOD = "GET"     # Synapse's own reads: their answers are never relayed
BUDGET_SPENT = "upstream_busy"  # the code of a whole answer refused for want of budget
_FORBIDDEN = frozenset("\r\n\0")

Origin = tuple[str, str, int]      # scheme, host, port

# Foreign exception → (our class, what it means). The most specific entry wins (an
# ``ssl.SSLError`` is an ``OSError`` too). Only connecting and parsing raise foreign
# exceptions: a socket error in the middle of an exchange arrives as ``connection_lost``
# and is reported as the connection closing (:meth:`UpstreamResponse.connection_ended`).
ERRORS: dict[type[BaseException], tuple[type[errors.UpstreamError], str]] = {
    OSError: (errors.UpstreamConnectError, "cannot connect"),
    ssl.SSLError: (errors.UpstreamConnectError, "cannot connect over TLS"),
    httptools.HttpParserError: (errors.UpstreamProtocolError, "the backend sent invalid HTTP"),
    httptools.HttpParserUpgrade: (errors.UpstreamProtocolError, "the backend sent invalid HTTP"),
}
# What data_received catches from the parser: ERRORS' parser entries.
_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class _Unrequested(Exception):
    """Raised by ``on_message_begin`` to stop the parser at a message nobody asked for."""


class _Refused(Exception):
    """Raised by a callback to stop the parser at an answer that is not relayed (its
    message says why)."""


def detail(exc: BaseException) -> str:
    """What went wrong, in words that name no address."""
    if isinstance(exc, httptools.HttpParserUpgrade):
        # its text is only the offset of the upgraded bytes
        return "101 Switching Protocols, and no upgrade was asked for"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, OSError):
        # asyncio's own strerror holds the address ("Connect call failed ('10.0.0.7', 80)")
        return os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return str(exc)[:200] or type(exc).__name__


def translate(exc: BaseException) -> errors.UpstreamError:
    """Our error for a foreign exception listed in :data:`ERRORS` (TypeError otherwise)."""
    found: tuple[type[BaseException], tuple[type[errors.UpstreamError], str]] | None = None
    for foreign, entry in ERRORS.items():
        if isinstance(exc, foreign) and (found is None or issubclass(foreign, found[0])):
            found = (foreign, entry)
    if found is None:
        raise TypeError(f"no upstream error is mapped for {type(exc).__name__}")
    cls, meaning = found[1]
    return cls(f"{meaning}: {detail(exc)}")


@contextlib.contextmanager
def mapped() -> Iterator[None]:
    """Translate the foreign exceptions of :data:`ERRORS` raised inside the block."""
    try:
        yield
    except tuple(ERRORS) as exc:
        raise translate(exc) from exc


class Budget:
    """Bytes that whole answers hold in memory, at most ``limit`` at once, and at most
    ``share`` of them for one tenant (``tenants``: what each tenant holds, only those
    that hold some)."""

    __slots__ = ("held", "limit", "share", "tenants")

    def __init__(self, limit: int, share: int) -> None:
        self.limit = limit
        self.share = share
        self.held = 0
        self.tenants: dict[str, int] = {}

    def take(self, size: int, tenant: str) -> bool:
        """Reserve ``size`` bytes for ``tenant``; False (nothing reserved) when they do
        not fit in the budget or in the tenant's share."""
        if not size:        # no entry for a tenant that holds nothing
            return True
        mine = self.tenants.get(tenant, 0)
        if self.held + size > self.limit or mine + size > self.share:
            return False
        self.held += size
        self.tenants[tenant] = mine + size
        return True

    def hold(self, size: int, tenant: str) -> None:
        """Reserve ``size`` bytes for ``tenant`` whether or not they fit: a reservation
        passed on (a whole answer's, from its upstream response to its client's), whose
        first holder gives its own back right after."""
        self.held += size
        self.tenants[tenant] = self.tenants.get(tenant, 0) + size

    def give(self, size: int, tenant: str) -> None:
        """Give back ``size`` bytes ``tenant`` reserved (a tenant left at zero is
        forgotten, so the table holds only the tenants holding budget)."""
        self.held -= size
        left = self.tenants.get(tenant, 0) - size
        if left > 0:
            self.tenants[tenant] = left
        else:       # (never below zero but by a bug: then forgotten, not raised in a close)
            self.tenants.pop(tenant, None)


BUDGET = Budget(WHOLE_BODIES_BUDGET, TENANT_SHARE)
# The tenant whose request reads the upstream answers made in this context: set by the
# handler before it dispatches (:data:`charge`). An answer keeps the tenant it was made
# for, so its reservation goes back to the tenant it was taken from whatever the context
# says by then.
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("synapse_budget_tenant",
                                                             default="")


# charge(tenant): charge the whole answers of the upstream requests made from here on, in
# this context, to ``tenant``'s share of :data:`BUDGET`. aiohttp runs each request's
# handler in a task of its own, so what a handler sets ends with its request. The
# variable's own setter, called once per proxied request: no Python frame around it.
charge = TENANT.set


class Target:
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


class Pool(typing.Protocol):
    """What a connection tells its pool."""

    def release(self, conn: Connection, reusable: bool) -> None: ...

    def forget_idle(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to a backend and its response parser."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.used = False            # has carried a request before (so it may be stale)
        self.idle_since = 0.0
        self.between = True          # the parser is between messages
        self.poisoned = False        # bytes nobody asked for arrived: never reuse it
        # The headers of the head being parsed (its answer's raw_headers); None once it
        # ended, so trailers are never kept.
        self.heading: list[tuple[bytes, bytes]] | None = None

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request (its answer aside)."""
        return self.between and not self.poisoned and not self.lost

    def poison(self) -> None:
        """Never reuse this connection; close it."""
        self.poisoned = True
        self.close()

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
            self._unrequested()
            return
        resp.received = True
        before = resp._buffered     # only the caller takes it: it grows while parsing
        try:
            self.parser.feed_data(data)
        except _PARSER_ERRORS as exc:
            if isinstance(exc.__context__, _Refused):
                self.refuse(resp, str(exc.__context__))
                return
            if self.poisoned:       # on_message_begin stopped it: the answer stands
                self._unrequested()
                return
            resp.fail(translate(exc))
            self.poison()
            return
        # Bytes with no body between them (see "A bounded head"): within one read, all but
        # its body bytes count, wherever the body sat in it.
        body = resp._buffered - before
        resp.framing = len(data) - body if body else resp.framing + len(data)
        if resp.framing > MAX_HEAD_BYTES and not resp.complete:
            self.refuse(resp, f"over {MAX_HEAD_BYTES} bytes of head, trailers or "
                              "framing without body")

    def refuse(self, resp: UpstreamResponse, why: str) -> None:
        """Fail ``resp`` as an answer that is not relayed, and close the connection."""
        resp.fail(errors.UpstreamProtocolError(f"the backend's answer was refused: {why}"))
        self.poison()

    def _unrequested(self) -> None:
        scheme, host, port = self.origin
        log.warning("the backend %s://%s:%d sent bytes after its answer, with no request "
                    "awaiting them: connection closed, not reused", scheme, host, port)
        self.poison()

    def eof_received(self) -> bool:
        return False        # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        resp = self.response
        if resp is None:
            self.pool.forget_idle(self)
        elif not resp.complete:
            resp.connection_ended(exc)

    # -- httptools callbacks -------------------------------------------------------------
    # on_message_begin admits a message only for an answer still awaiting its final head,
    # and stops the parser otherwise; so the callbacks below always concern the answer in
    # flight, and a complete answer is never written to again.
    def on_message_begin(self) -> None:
        resp = self.response
        if resp is None or resp.complete or resp.status:
            self.poisoned = True
            raise _Unrequested
        self.between = False
        self.heading = resp.raw_headers

    # A head's count of lines is checked as each arrives (it bounds what one read can make
    # us hold); its bytes once it ended, as the framing check of data_received bounds a
    # head still arriving.
    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self.heading
        if raw is None:     # a trailer: never kept (bounded as framing)
            return
        raw.append((name, value))
        if len(raw) > MAX_HEADERS:
            raise _Refused(f"a head of over {MAX_HEADERS} headers")

    def on_headers_complete(self) -> None:
        self.heading = None
        resp = self.response
        if resp is None:
            return
        resp.head_bytes += sum(map(len, itertools.chain.from_iterable(resp.raw_headers)))
        if resp.head_bytes > MAX_HEAD_BYTES:
            raise _Refused(f"a head of over {MAX_HEAD_BYTES} bytes")
        status = self.parser.get_status_code()
        if status in NOT_RELAYED and resp.relayed:
            raise _Refused(f"status {status}, which is never relayed")
        if status >= 200:
            if b"content-encoding" in resp.index_headers() and any(
                    transport.encoded(v.decode("latin-1")) for k, v in resp.raw_headers
                    if k.lower() == b"content-encoding"):   # every line of it, not the first
                raise _Refused("an encoded body (Content-Encoding), which was not asked for")
        resp.head_received(status)

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is not None:
            resp.body_received(body)

    def on_message_complete(self) -> None:
        self.between = True
        if self.response is not None:
            self.response.message_complete(self.parser.should_keep_alive())


class UpstreamResponse:
    """A backend's answer, available once its head arrived; ``close()`` it when done."""

    def __init__(self, conn: Connection, read_timeout_s: float,
                 loop: asyncio.AbstractEventLoop, *, relayed: bool = True) -> None:
        self.status = 0
        self.relayed = relayed           # held to "Only answers to relay"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0              # the names and values of its heads (1xx too)
        self.framing = 0                 # bytes received since the last body byte
        self.received = False        # any byte of the answer arrived
        self.complete = False
        self._conn = conn
        self._read_timeout_s = read_timeout_s
        self._loop = loop               # the client's: every wait is on it
        self._head = False
        self._keep_alive = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._exc: errors.UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._content_type: str | None = None
        self._index: dict[bytes, bytes] | None = None   # index_headers, once the head came
        self._reserved = 0              # bytes of BUDGET this answer's body holds
        self._tenant = TENANT.get()     # whose share they count against

    # -- what the caller reads -----------------------------------------------------------
    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]

    def header(self, name: str) -> str | None:
        """The first value of the header ``name`` (any case), or None."""
        index = self._index
        if index is None:           # asked before the final head: not kept
            index = _first_values(self.raw_headers)
        found = index.get(name.lower().encode("latin-1"))
        return None if found is None else found.decode("latin-1")

    def index_headers(self) -> dict[bytes, bytes]:
        """The final head's headers by lower-case name, each name's first value: built
        once, as the connection, the dispatcher and the relay each look some up."""
        index = self._index = _first_values(self.raw_headers)
        return index

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters (read once the head arrived;
        kept, as the dispatcher and the relay each ask for it)."""
        found = self._content_type
        if found is None:
            value = self.header("content-type") or ""
            found = value.partition(";")[0].strip().lower()
            if self._head:
                self._content_type = found
        return found

    async def read(self) -> bytes:
        """The whole body (waits for its end). What has arrived is taken whenever reading
        paused for it, so a body over ``HIGH_WATER`` keeps flowing (it used to wait,
        paused, for the read timeout), reserved from :data:`BUDGET` until :meth:`close`;
        one over :data:`MAX_WHOLE_BODY`, or beyond the budget, fails. Once it holds
        budget, the rest must keep arriving at :data:`HELD_MIN_RATE` (see "Whole
        answers")."""
        parts: list[bytes] = []
        held: _Held | None = None       # the progress of a body holding budget
        while not self.complete:
            if self._exc is not None:
                raise self._exc
            if self._paused:
                self._reserve(self._buffered)
                parts.append(self._take())
                if held is None:
                    held = _Held(self._loop.time(), self._read_timeout_s, self._reserved)
            if held is not None:
                await self._wait_held(held)
            else:
                await self._wait(self._read_timeout_s)
        if not parts:
            return self._take()
        self._reserve(self._buffered)       # the last part counts too
        parts.append(self._take())
        return b"".join(parts)

    def _reserve(self, size: int) -> None:
        if self._reserved + size > MAX_WHOLE_BODY:
            raise errors.UpstreamProtocolError(
                f"the backend's answer is over {MAX_WHOLE_BODY} bytes",
                code="upstream_too_large")
        if not BUDGET.take(size, self._tenant):
            raise errors.UpstreamProtocolError(
                "the backend's answer does not fit in what whole answers may hold at once "
                f"({BUDGET.limit} bytes, {BUDGET.share} for one tenant)", code=BUDGET_SPENT)
        self._reserved += size

    async def _wait_held(self, held: _Held) -> None:
        """:meth:`_wait` for a body that holds budget: the gap between pieces is bounded
        as any, and each window of the read timeout must bring ``HELD_MIN_RATE`` times
        its length (``UpstreamReadError`` otherwise)."""
        loop = self._loop
        now = loop.time()
        if now >= held.window_end:
            arrived = self._reserved + self._buffered
            if arrived - held.window_from < HELD_MIN_RATE * self._read_timeout_s:
                raise errors.UpstreamReadError(
                    f"the backend's answer arrived at under {HELD_MIN_RATE} bytes/s "
                    f"over {self._read_timeout_s:g}s while holding memory for it")
            held.window_end, held.window_from = now + self._read_timeout_s, arrived
        gap_end = held.last + self._read_timeout_s
        try:    # a timer no later than either bound (never 0: that waits unbounded)
            await self._wait(max(min(held.window_end, gap_end) - now, 0.001))
        except errors.UpstreamReadError:
            if gap_end <= held.window_end:
                raise                       # silent for the read timeout
            return                          # the window ended: judged on the next call
        held.last = loop.time()

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
        if self._reserved:
            BUDGET.give(self._reserved, self._tenant)
            self._reserved = 0
        reusable = (self.complete and self._keep_alive and self._exc is None
                    and self._conn.reusable)
        self._conn.pool.release(self._conn, reusable)

    # -- what the connection reports -----------------------------------------------------
    def head_received(self, status: int) -> None:
        if status < 200:        # 1xx (103 Early Hints): informational, the answer follows
            self.raw_headers = []
            return
        if self._head:          # on_message_begin admits none; kept as the rule's guard
            self.fail(errors.UpstreamProtocolError(
                "the backend sent invalid HTTP: a second answer to one request"))
            self._conn.poison()
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
        # _wake, inlined: this runs for every chunk of every stream.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
            why = f": {detail(exc)}" if exc else ""
            self.fail(errors.UpstreamReadError(
                f"the backend closed the connection {where}{why}"))
        self._wake()

    def fail(self, exc: errors.UpstreamError) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    # -- internals -----------------------------------------------------------------------
    async def wait_head(self, deadline: float | None = None, limit: float = 0.0) -> None:
        """Until the head arrived; past ``deadline`` (loop time) ``UpstreamTimeout`` naming
        ``limit`` (the first-byte limit in seconds)."""
        while not self._head:
            if self._exc is not None:
                raise self._exc
            await self._wait(None, deadline, limit)

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

    async def _wait(self, timeout_s: float | None, deadline: float | None = None,
                    limit: float = 0.0) -> None:
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        if deadline is not None:
            timer: asyncio.TimerHandle | None = loop.call_at(deadline, _expire_head,
                                                             waiter, limit)
        else:
            timer = loop.call_later(timeout_s, _expire, waiter) if timeout_s else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


class _Held:
    """Where a whole body that holds budget stands: its current window (of the read
    timeout) ends at ``window_end``, having begun with ``window_from`` bytes of the body
    arrived; ``last`` is when a piece last arrived (loop times)."""

    __slots__ = ("last", "window_end", "window_from")

    def __init__(self, now: float, window_s: float, arrived: int) -> None:
        self.last = now
        self.window_end = now + window_s
        self.window_from = arrived


def _first_values(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in reversed(raw)}    # a name's first value is kept


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(errors.UpstreamReadError(
            "the backend sent nothing within the read timeout"))


def _expire_head(waiter: asyncio.Future[None], limit: float) -> None:
    if not waiter.done():
        waiter.set_exception(errors.UpstreamTimeout(f"no response within {limit:g}s"))


def head(method: str, target: Target, headers: Mapping[str, str], body: bytes) -> bytes:
    given = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    # Each line brings one CR and one LF: any other is in a name or a value.
    if given.count("\n") != len(headers) or given.count("\r") != len(headers) or (
            "\0" in given):
        for name, value in headers.items():
            if not _FORBIDDEN.isdisjoint(name) or not _FORBIDDEN.isdisjoint(value):
                raise ValueError(f"the header {name!r} holds a CR, LF or NUL character")
    length = f"Content-Length: {len(body)}\r\n" if method != "GET" or body else ""
    return (f"{method} {target.path} HTTP/1.1\r\nHost: {target.host}\r\n"
            f"Accept-Encoding: identity\r\n{length}{given}\r\n").encode("latin-1")
