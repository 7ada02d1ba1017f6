"""One try of one backend: the ledger ticket, the answer, and its bytes.

An :class:`Attempt` is an async context manager (:mod:`controlplane.core.dispatch` makes
one per candidate, and calls the same steps synchronously: :meth:`Attempt.open`,
:meth:`Attempt.settle`). Entering records the dispatch (ledger, prefix index, session
affinity); the first byte is marked when the whole answer, or a stream's first token,
arrived; leaving closes the answer, finishes the ticket and lets the router learn from it
(:meth:`Router.observe`, with the engine's ``usage`` read from the answer's last bytes) —
on success, failure, retry, and cancellation alike.

Before the hand-over, :meth:`Attempt.first_bytes` reads what decides whether the answer
can be sent at all — a stream's first piece, a whole successful JSON answer — so an answer
that breaks before the caller got a byte is one more failed attempt, not a failed
request. A backend that knows the model by another name has its answer renamed to the
name the client asked for (:mod:`controlplane.core.model_rename`); one whose prefix cache
tenants share has its cached-token counts zeroed (:mod:`controlplane.core.cache_salt`);
a refusal loses the backend's key (:func:`controlplane.errors.masked`), and so does a
static upstream's 200 of a key of :data:`ANSWER_MASK_FROM` characters or more, whole or
an event stream (:class:`controlplane.errors.StreamMask`), so what the caller relays and
caches never holds it (:func:`_masks_answers`); the stream of a keyless upstream, of a
shorter key or of an agent's engine is not touched.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol

from controlplane import errors
from controlplane.core import cache_salt, ledger, model_rename, stream_shapes, transport, types
from controlplane.core import router as router_mod
from controlplane.core import usage as usage_mod
from synapse_common import tracing

JSON = "application/json"


class Attempt:
    """One try of one backend; ``async with`` settles its ledger ticket on the way out."""

    __slots__ = ("_data", "_ended", "_events", "_first_token_event", "_idle_s", "_ledger",
                 "_outgoing", "_path", "_peeked", "_prompt", "_received", "_rename",
                 "_renamer", "_router", "_tail", "_verdict", "backend", "error", "index",
                 "response", "route", "span", "streaming", "ticket")

    def __init__(self, router: router_mod.Router, idle_timeout_s: float,
                 route: types.RouteDecision, verdict: types.Verdict,
                 prompt: router_mod.Prompt, index: int, path: str,
                 rename: str | None = None) -> None:
        self._router = router
        self._ledger = router.ledger
        self._idle_s = idle_timeout_s
        self.route = route
        self._verdict = verdict
        self._prompt = prompt
        self.backend = verdict.backend
        self.index = index              # 0 for the first candidate of its model
        self.response: transport.Response | None = None
        self.ticket: ledger.Ticket | None = None
        self.streaming = False          # a chunk went to the caller
        # Chat streams open with a role-only event that engines may send before the
        # prefill is done; the first token is the event after it (stream_shapes: per path).
        self._path = path
        self._first_token_event = stream_shapes.first_token_event(path)
        self._events = 0
        self._tail = b""                # the stream's last bytes: [DONE] and the usage
        self._rename = rename           # the model name answers carry (None: as they are)
        self._renamer = model_rename.StreamRenamer(rename) if rename else None
        # What a streamed chunk goes through on its way to the caller, None for nothing (one
        # check a chunk whatever it holds): a backend whose prefix cache tenants share has
        # its cached-token counts zeroed (core.cache_salt; the ledger and the router still
        # read them), a static upstream's event stream its key masked (_masks_answers;
        # added in first_bytes).
        self._outgoing: _Filter | None = (
            cache_salt.StreamHider() if verdict.backend.shares_cache else None)
        self._data: bytes | None = None     # a whole answer, once read
        self._peeked: bytes | None = None   # a stream's first piece, read before hand-over
        self._received = False          # body bytes arrived
        self._ended = False
        self.span: tracing.Span | None = None   # the attempt's trace span (when recorded)
        self.error = ""                 # why it failed, for the span

    async def __aenter__(self) -> Attempt:
        return self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.settle(exc)

    def open(self) -> Attempt:
        """What entering does, synchronously (the dispatcher calls it directly: a
        coroutine per step of every request is not free)."""
        self.ticket = self._router.dispatched(self.route, self._verdict, self._prompt)
        self.span = tracing.start("upstream", {"synapse.backend": self.backend.key,
                                               "synapse.attempt": self.index})
        return self

    def settle(self, exc: BaseException | None = None) -> None:
        """What leaving does, synchronously (``exc``: what ended the block, if anything)."""
        if self.response is not None:
            self.response.close()
        if self.ticket is not None:
            self._ledger.finish(self.ticket)
            self._router.observe(self.ticket)   # the router learns from the settled attempt
        if self.span is not None:
            tracing.finish(self.span, {"http.response.status_code": self.status},
                           _span_error(self, exc))

    @property
    def model(self) -> str:
        """The (canonical) model this attempt asked for: a fallback's, after one."""
        return self.route.model

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else 0

    @property
    def answer(self) -> transport.Response:
        """The backend's answer (its head has arrived)."""
        if self.response is None:
            raise RuntimeError("the attempt has no answer yet")
        return self.response

    async def first_bytes(self) -> None:
        """Before the hand-over, what decides whether this answer can be sent: a stream's
        first piece, a whole successful JSON answer. Raises ``UpstreamError`` when the
        answer breaks first (then another backend may still serve the request)."""
        if self.status != 200:
            return
        content_type = self.answer.content_type
        if content_type == stream_shapes.EVENT_STREAM:
            key = self.backend.api_key
            if key is not None and _masks_answers(self.backend):     # key: str, for mypy
                self._outgoing = _then_masked(self._outgoing, key)
            self._peeked = await self._pull()
        elif content_type == JSON:
            await self.read()

    async def read(self) -> bytes:
        """The whole answer (renamed when the backend knows the model by another name);
        marks the first byte."""
        if self._data is not None:
            return self._data
        answer = self.answer
        try:
            data = await answer.read()
        except errors.UpstreamError as exc:
            raise exc.reworded(f"backend {self.backend.key} broke off its answer: "
                               f"{exc.message}") from exc
        if self._peeked is not None:    # an event stream read whole: what came before
            held = self._outgoing.rest() if self._outgoing is not None else b""
            data = self._peeked + held + data
        self._peeked = None
        self._mark_first_byte()
        if answer.status == 200:
            if self.ticket is not None:
                self.ticket.usage = usage_mod.from_tail(data)
            if self._rename:
                data = model_rename.in_body(data, self._rename)
            if self.backend.shares_cache:
                data = cache_salt.hidden(data)
            if _masks_answers(self.backend):
                data = errors.masked(data, self.backend.api_key)
        elif answer.status >= 400:      # a refusal, relayed in some shape: never the key
            data = errors.masked(data, self.backend.api_key)
        self._data = data
        return data

    async def next_chunk(self) -> bytes | None:
        """The next piece of a streamed answer, or None after a complete stream.

        Raises an ``UpstreamError`` when the stream breaks, stays silent longer than the
        idle limit, is empty, or ends without its end marker; ``streaming`` then says
        whether the caller had sent anything yet.
        """
        chunk, self._peeked = self._peeked, None
        if chunk is None:
            chunk = await self._pull()
        if chunk is not None:
            self.streaming = True
        return chunk

    async def _pull(self) -> bytes | None:
        while not self._ended:
            try:
                raw = await self.answer.next_chunk(self._idle_s)
            except errors.UpstreamError as exc:
                where = "broke off" if self._received else "broke off before its first chunk"
                raise exc.reworded(f"backend {self.backend.key} {where}: "
                                   f"{exc.message}") from exc
            if raw is None:
                self._ended = True
                rest = self._renamer.rest() if self._renamer is not None else b""
                self._account(rest)
                self._check_end()
                if self._outgoing is not None:
                    rest = self._outgoing.feed(rest) + self._outgoing.rest()
                return rest or None
            self._received = True
            chunk = self._renamer.feed(raw) if self._renamer is not None else raw
            if chunk:
                self._account(chunk)
                if self._outgoing is not None:
                    chunk = self._outgoing.feed(chunk)
                if chunk:
                    return chunk
        return None

    def _account(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._events < self._first_token_event:
            # The ledger moves the request from prefill to decode at its first token.
            self._events += stream_shapes.events_in(chunk, self.answer.content_type)
            if self._events >= self._first_token_event:
                if self.ticket is not None:
                    self.ticket.streamed = True
                self._mark_first_byte()
        self._tail = (self._tail + chunk)[-usage_mod.TAIL_BYTES:]

    def _check_end(self) -> None:
        if not self._received:
            raise errors.UpstreamReadError(f"backend {self.backend.key} sent an empty stream")
        if not stream_shapes.ended(self._path, self.answer.content_type, self._tail):
            raise errors.UpstreamReadError(f"backend {self.backend.key}'s stream ended "
                                           f"before {stream_shapes.end_of(self._path)}")
        if self.ticket is not None:
            self.ticket.usage = usage_mod.from_tail(self._tail)

    def _mark_first_byte(self) -> None:
        if self.ticket is not None:
            self._ledger.first_byte(self.ticket)
        if self.span is not None:
            tracing.event(self.span, "first_byte")


ANSWER_MASK_FROM = 16  # characters of a key from which a backend's 200s are masked too


def _masks_answers(backend: types.BackendState) -> bool:
    """Whether a keyed backend's answers (its 200s, whole or streamed) have its key
    masked, as its refusals always do: a static upstream's, whose ``api_key`` a hosted
    provider may quote back (in an error event of its stream too). Not an agent's
    engine: its key is the engine key, presented to an engine its agent started, which
    never quotes it in an answer; its stream is passed on unread, as a keyless one. Nor a
    key shorter than :data:`ANSWER_MASK_FROM` characters: such a key is a
    placeholder (vLLM's conventional ``EMPTY``), not a secret, and masking it in answers
    would replace the same word in the model's text (a key ``data`` would even break the
    event stream's framing)."""
    key = backend.api_key
    return (backend.source == "static" and key is not None
            and len(key) >= ANSWER_MASK_FROM)


class _Filter(Protocol):
    """A stream's bytes changed on their way to the caller, a piece at a time."""

    def feed(self, chunk: bytes) -> bytes:
        """What can be passed on of ``chunk`` (and of what was held before it)."""
        ...

    def rest(self) -> bytes:
        """What was held, once the stream ended."""
        ...


class _Chained:
    """Two filters, the second fed what the first passes on."""

    __slots__ = ("_first", "_then")

    def __init__(self, first: _Filter, then: _Filter) -> None:
        self._first, self._then = first, then

    def feed(self, chunk: bytes) -> bytes:
        return self._then.feed(self._first.feed(chunk))

    def rest(self) -> bytes:
        return self._then.feed(self._first.rest()) + self._then.rest()


def _then_masked(outgoing: _Filter | None, key: str) -> _Filter:
    """``outgoing``, then ``key`` masked (:class:`controlplane.errors.StreamMask`)."""
    mask = errors.StreamMask(key)
    return mask if outgoing is None else _Chained(outgoing, mask)


def _span_error(attempt: Attempt, exc: BaseException | None) -> str | None:
    """Why an attempt's span failed (None: it did not)."""
    if attempt.error:
        return attempt.error
    if exc is not None:
        return "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc) or repr(exc)
    return None
