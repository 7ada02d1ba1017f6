"""Dispatch: the routed request to its backends, attempt by attempt.

The one home of the serving path's upstream policy; the API layer only relays bytes.

* **Plan** (:meth:`Dispatcher.plan`): route the canonical model, else each fallback model
  in order. When none can serve: a request larger than the context of every backend of
  those models is the client's error (400 naming ``max_tokens``, or the prompt field when
  the prompt alone is too long); otherwise 503, "try again shortly".
* **Attempts** (:meth:`Dispatcher.exchange`): the candidates in rank order, at most
  ``router.max_attempts``. A connect error, an invalid answer, a 5xx or no answer head
  within the first-byte limit moves on to the next candidate, counted in
  ``synapse_upstream_retries_total{reason}`` (``connect``, ``5xx``, ``timeout``); a 4xx is
  the client's and is passed back as it is. Once the caller has taken an attempt nothing
  is retried: whatever breaks later is the caller's to report (an SSE error event).
* **The ledger**: each attempt is an async context manager, :class:`Attempt`. Entering
  records the dispatch (ledger, prefix index, session affinity); the first byte is marked
  when the whole answer, or a stream's first token, arrived; leaving closes the answer,
  finishes the ticket and lets the router learn from it (:meth:`Router.observe`, with the
  engine's ``usage`` read from the answer's last bytes) — on success, failure, retry, and
  cancellation alike (aiohttp cancels the handler when the client goes away, which closes
  the upstream connection and so cancels the request on the backend).

Error messages name the backend by its key (``static/name``, ``node/backend``), never by
its address; the transport's own detail rides along as the exception's cause, for logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from controlplane import errors, metrics
from controlplane.core import catalog, ledger, registry, stream_shapes, transport, types
from controlplane.core import router as router_mod
from controlplane.core import usage as usage_mod
from synapse_common import tracing

log = logging.getLogger("synapse.controlplane.dispatch")

ERROR_DETAIL_BYTES = 300
ERROR_DETAIL_TIMEOUT_S = 1.0
Failure = errors.UpstreamError | errors.UpstreamTimeout
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int               # candidates tried before the first byte
    first_byte_timeout_s: float     # an answer's head must arrive within this
    idle_timeout_s: float           # longest gap between a stream's chunks


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    route: types.RouteDecision
    fallback: str = ""              # the fallback model used, if any


class Attempt:
    """One try of one backend; ``async with`` settles its ledger ticket on the way out."""

    __slots__ = ("_events", "_first_token_event", "_idle_s", "_ledger", "_path", "_prompt",
                 "_route", "_router", "_tail", "_verdict", "backend", "error", "index",
                 "response", "span", "streaming", "ticket")

    def __init__(self, dispatcher: Dispatcher, route: types.RouteDecision,
                 verdict: types.Verdict, prompt: router_mod.Prompt, index: int,
                 path: str) -> None:
        self._router = dispatcher.router
        self._ledger = dispatcher.router.ledger
        self._idle_s = dispatcher.policy.idle_timeout_s
        self._route = route
        self._verdict = verdict
        self._prompt = prompt
        self.backend = verdict.backend
        self.index = index              # 0 for the first candidate
        self.response: transport.Response | None = None
        self.ticket: ledger.Ticket | None = None
        self.streaming = False          # a chunk went to the caller
        # Chat streams open with a role-only event that engines may send before the
        # prefill is done; the first token is the event after it (stream_shapes: per path).
        self._path = path
        self._first_token_event = stream_shapes.first_token_event(path)
        self._events = 0
        self._tail = b""                # the stream's last bytes: [DONE] and the usage
        self.span: tracing.Span | None = None   # the attempt's trace span (when recorded)
        self.error = ""                 # why it failed, for the span

    async def __aenter__(self) -> Attempt:
        self.ticket = self._router.dispatched(self._route, self._verdict, self._prompt)
        self.span = tracing.start("upstream", {"synapse.backend": self.backend.key,
                                               "synapse.attempt": self.index})
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.response is not None:
            self.response.close()
        if self.ticket is not None:
            self._ledger.finish(self.ticket)
            self._router.observe(self.ticket)   # the router learns from the settled attempt
        if self.span is not None:
            tracing.finish(self.span, {"http.response.status_code": self.status},
                           _span_error(self, exc))

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else 0

    @property
    def answer(self) -> transport.Response:
        """The backend's answer (its head has arrived)."""
        if self.response is None:
            raise RuntimeError("the attempt has no answer yet")
        return self.response

    async def read(self) -> bytes:
        """The whole answer; marks the first byte."""
        try:
            data = await self.answer.read()
        except errors.UpstreamError as exc:
            raise exc.reworded(f"backend {self.backend.key} broke off its answer: "
                               f"{exc.message}") from exc
        self._mark_first_byte()
        if self.ticket is not None and self.answer.status == 200:
            self.ticket.usage = usage_mod.from_tail(data)
        return data

    async def next_chunk(self) -> bytes | None:
        """The next piece of a streamed answer, or None after a complete stream.

        Raises an ``UpstreamError`` when the stream breaks, stays silent longer than the
        idle limit, is empty, or ends without ``[DONE]``; ``streaming`` then says whether
        the caller had sent anything yet.
        """
        try:
            chunk = await self.answer.next_chunk(self._idle_s)
        except errors.UpstreamError as exc:
            where = "broke off" if self.streaming else "broke off before its first chunk"
            raise exc.reworded(f"backend {self.backend.key} {where}: {exc.message}") from exc
        if chunk is None:
            self._check_end()
            return None
        self.streaming = True
        if self._events < self._first_token_event:
            # The ledger moves the request from prefill to decode at its first token.
            self._events += stream_shapes.events_in(chunk, self.answer.content_type)
            if self._events >= self._first_token_event:
                if self.ticket is not None:
                    self.ticket.streamed = True
                self._mark_first_byte()
        self._tail = (self._tail + chunk)[-usage_mod.TAIL_BYTES:]
        return chunk

    def _check_end(self) -> None:
        if not self.streaming:
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


class Dispatcher:
    def __init__(self, transport_: transport.Transport, router: router_mod.Router,
                 catalog_: catalog.Catalog, registry_: registry.Registry,
                 metrics_: metrics.Metrics, policy: Policy) -> None:
        self.transport = transport_
        self.router = router
        self.catalog = catalog_
        self.registry = registry_
        self.metrics = metrics_
        self.policy = policy

    # -- plan -----------------------------------------------------------------------------

    def plan(self, canonical: str, prompt: router_mod.Prompt,
             fields: tuple[str, str] = ("messages", "max_tokens"),
             task: types.Task = "generate") -> Plan:
        """The route for ``canonical`` or its first fallback that can serve; ``fields``
        names the prompt and max-tokens fields for a 400 on a request too large."""
        models = (canonical, *self.catalog.fallbacks(canonical))
        for model in models:
            decision = self.router.route(model, prompt, task)
            if decision is not None:
                if model != canonical:
                    self.metrics.fallbacks.labels(canonical, model).inc()
                    return Plan(decision, model)
                return Plan(decision)
        self._refuse_oversized(models, prompt, fields, task)
        raise errors.Unavailable(f"no backend can serve the model {canonical!r} right now "
                                 f"(tried: {', '.join(models)}); try again shortly")

    def _refuse_oversized(self, models: Sequence[str], prompt: router_mod.Prompt,
                          fields: tuple[str, str], task: types.Task) -> None:
        """400 when every backend of ``models`` knows its context and none holds this
        request (the router's KV capacity rule); backends down right now count too, so a
        request that could be served later still gets 503."""
        sizes = [b.kv_capacity_tokens for m in models for b, _ in self.registry.backends_for(m)
                 if b.serves(task)]
        if not sizes or not all(sizes):
            return
        largest = max(sizes)
        need = prompt.tokens + prompt.max_tokens
        if need <= largest:
            return
        prompt_field, max_field = fields
        field = prompt_field if prompt.tokens > largest or not prompt.max_tokens else max_field
        raise errors.BadRequest(
            f"{field}: the request needs {need} tokens (prompt {prompt.tokens} + "
            f"{max_field} {prompt.max_tokens}); the largest context of any backend of "
            f"{models[0]!r} is {largest} tokens", param=field, code="context_length_exceeded")

    # -- attempts -------------------------------------------------------------------------

    def headers(self, backend: types.BackendState, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "x-request-id": request_id}
        if backend.api_key:
            headers["Authorization"] = f"Bearer {backend.api_key}"
        return headers

    @contextlib.asynccontextmanager
    async def exchange(self, route: types.RouteDecision, prompt: router_mod.Prompt,
                       path: str, body: bytes, request_id: str) -> AsyncIterator[Attempt]:
        """The first attempt that got an answer below 500, held open for the caller;
        raises the last failure when every candidate failed."""
        last: errors.SynapseError = errors.Unavailable("no backend could be tried")
        why = ""
        for index, verdict in enumerate(route.candidates[:self.policy.max_attempts]):
            if index:
                self.metrics.upstream_retries.labels(route.model, why).inc()
            async with Attempt(self, route, verdict, prompt, index, path) as attempt:
                backend = verdict.backend
                try:
                    attempt.response = await self.transport.send(
                        "POST", backend.url + path, body, self.headers(backend, request_id),
                        self.policy.first_byte_timeout_s)
                except (errors.UpstreamError, errors.UpstreamTimeout) as exc:
                    why, last = _failed(backend, exc)
                    continue
                if attempt.status >= 500:
                    why, last = "5xx", await _server_error(attempt)
                    continue
                yield attempt
                return
        raise last


    async def first_answer(self, targets: Sequence[T], call: Callable[[T], Awaitable[R]],
                           retriable: type[Exception], what: str) -> tuple[T, R]:
        """``call`` on each target in order (at most ``max_attempts``) until one answers;
        a ``retriable`` failure moves on, anything else is the caller's. For calls that
        are not HTTP attempts (an agent's ``Node.Embed``): the same retry budget."""
        last = "none could be tried"
        for target in targets[:self.policy.max_attempts]:
            try:
                return target, await call(target)
            except retriable as exc:
                last = str(exc)
        raise errors.UpstreamError(f"every {what} failed; last error: {last}")


def _span_error(attempt: Attempt, exc: BaseException | None) -> str | None:
    """Why an attempt's span failed (None: it did not)."""
    if attempt.error:
        return attempt.error
    if exc is not None:
        return "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc) or repr(exc)
    return None


def _failed(backend: types.BackendState, exc: Failure) -> tuple[str, errors.SynapseError]:
    log.debug("backend %s failed: %s", backend.key, exc.__cause__ or exc)
    if isinstance(exc, errors.UpstreamTimeout):
        return "timeout", exc.reworded(f"backend {backend.key} sent {exc.message}")
    return "connect", exc.reworded(f"backend {backend.key} failed: {exc.message}")


async def _server_error(attempt: Attempt) -> errors.SynapseError:
    """The 5xx as an error that quotes the start of the backend's own message."""
    try:
        async with asyncio.timeout(ERROR_DETAIL_TIMEOUT_S):
            raw = await attempt.answer.read_some(ERROR_DETAIL_BYTES)
        detail = raw.decode("utf-8", "replace")
    except (errors.UpstreamError, TimeoutError):
        detail = ""
    return errors.UpstreamError(f"backend {attempt.backend.key} answered with status "
                                f"{attempt.status}" + (f": {detail}" if detail else ""))
