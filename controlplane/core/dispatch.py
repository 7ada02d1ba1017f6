"""Dispatch: the routed request to its backends, attempt by attempt.

The one home of the serving path's upstream policy; the API layer only relays bytes.

* **Plan** (:meth:`Dispatcher.plan`): route the canonical model, else each model of its
  fallback chain (:meth:`Dispatcher.chain`: its fallbacks in order, then theirs; models
  the tenant may not use are skipped). When none can serve: a prompt certainly longer
  than the context (``max_model_len``) of every routable backend of those models, each
  reporting it, is the client's error (400 ``context_length_exceeded`` naming the prompt
  field; the floor of :mod:`context_length`, never the router's estimate), and so is a
  request larger than the KV cache of every backend of those models (400 naming
  ``max_tokens``, or the prompt field when the prompt alone is too long); otherwise 503,
  "try again shortly".
* **Attempts** (:meth:`Dispatcher.exchange`): the candidates in rank order, at most
  ``router.max_attempts``. A connect error, an invalid answer, a 5xx, no answer head
  within the first-byte limit, or an answer that breaks before its first byte reached the
  caller (a stream before its first chunk, a whole answer before its end) moves on to the
  next candidate, counted in ``synapse_upstream_retries_total{reason}`` (``connect``,
  ``5xx``, ``timeout``, ``stream``, ``read``); a 4xx is the client's and is passed back as
  it is — except a 401, 403 or 407: the backend refused *Synapse's* credentials (its
  ``api_key``, or the engine key), never the client's, which no backend is sent. That
  backend is failed over like a 5xx (reason ``auth``) and its answer is not relayed: it
  would tell the client its own key was wrong, and hosted APIs quote the key they were
  given in that message. Any other refusal is relayed, and it and a 5xx's quoted detail
  have the backend's key masked (:func:`controlplane.errors.masked`). A whole answer
  the transport refused because the process's memory for whole answers is spent (code
  :data:`controlplane.errors.BUSY_CODE`) is no backend's fault and is not failed over
  (every backend would recompute an answer to be refused alike): the request gets
  :class:`controlplane.errors.Busy`, a 503 with
  ``Retry-After``; an answer over the per-answer cap is its backend's, failed over. Once
  the caller has taken an attempt nothing is retried: whatever breaks later is the
  caller's to report (an SSE error event).
* **Runtime fallback**: when every candidate of a model failed, the next model of the
  chain is routed and tried the same way — all within one **request deadline**
  (``Policy.deadline_s``: the first byte over all attempts; each attempt also has the
  first-byte limit). The attempt handed over says which model answered
  (:attr:`Attempt.model`); a fallback that served is counted in
  ``synapse_fallbacks_total``.
* **Model names**: a backend that knows a model by another name (a static upstream's
  ``model_names``) is sent the body with its name, and its answer is renamed back to the
  name the client asked for (:mod:`controlplane.core.model_rename`); the bytes of every
  other backend pass untouched.
* **The ledger**: each attempt is an async context manager, :class:`Attempt`. Entering
  records the dispatch (ledger, prefix index, session affinity); the first byte is marked
  when the whole answer, or a stream's first token, arrived; leaving closes the answer,
  finishes the ticket and lets the router learn from it (:meth:`Router.observe`, with the
  engine's ``usage`` read from the answer's last bytes) — on success, failure, retry, and
  cancellation alike (aiohttp cancels the handler when the client goes away, which closes
  the upstream connection and so cancels the request on the backend).

* **The id engines get** is Synapse's, never the client's ``x-request-id``: vLLM names
  (and aborts) a request by the id it is sent, and a client could send another tenant's
  (:mod:`request_ids`).

Error messages name the backend by its key (``static/name``, ``node/backend``), never by
its address; the transport's own detail rides along as the exception's cause, for logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from controlplane import errors, metrics
from controlplane.core import attempt as attempt_mod
from controlplane.core import (
    cache_salt,
    catalog,
    model_rename,
    registry,
    request_ids,
    stream_shapes,
    transport,
    types,
    upstream_kinds,
)
from controlplane.core import router as router_mod
from synapse_common import clock as clocks
from synapse_common import tracing

log = logging.getLogger("synapse.controlplane.dispatch")

ERROR_DETAIL_BYTES = 300
ERROR_DETAIL_TIMEOUT_S = 1.0
# Statuses by which a backend refuses the credentials Synapse presented (never a client's).
REFUSED_CREDENTIALS = frozenset({401, 403, 407})
_CHAINS_MAX = 4096      # fallback chains kept (models are few; guards a leak)
Failure = errors.UpstreamError | errors.UpstreamTimeout
Allows = Callable[[str], bool]
T = TypeVar("T")
R = TypeVar("R")


Attempt = attempt_mod.Attempt


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int               # candidates tried before the first byte, per model
    first_byte_timeout_s: float     # an answer's head must arrive within this
    idle_timeout_s: float           # longest gap between a stream's chunks
    deadline_s: float | None = None  # the first byte over all attempts and fallback models

    @property
    def request_deadline_s(self) -> float:
        return self.deadline_s or self.max_attempts * self.first_byte_timeout_s


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    route: types.RouteDecision
    fallback: str = ""              # the fallback model used, if any
    chain: tuple[str, ...] = ()     # the canonical model and the fallbacks it may use


class _Run:
    """One request's way through its candidates and fallback models."""

    __slots__ = ("bodies", "body", "deadline", "engine_id", "last", "origin", "path",
                 "requested", "salt", "why")

    def __init__(self, route: types.RouteDecision, path: str, body: bytes, engine_id: str,
                 origin: str, requested: str, deadline: float, salt: str = "") -> None:
        self.path = path
        self.body = body
        # (wire name, salted) -> the bytes sent; the body carries the routed model's name
        self.bodies = {(route.model, False): body}
        self.salt = salt                # the tenant's prefix-cache salt ("" = none)
        self.engine_id = engine_id      # the x-request-id engines get (never the client's)
        self.origin = origin            # the canonical model the client asked for
        self.requested = requested      # the name the client used for it
        self.deadline = deadline
        # The last failure (None: nothing failed yet). Built only when one happens: an
        # exception object per request was a measurable part of the hot path.
        self.last: errors.SynapseError | None = None
        self.why = ""                   # why the last attempt failed ("" = none failed yet)

    def body_for(self, backend: types.BackendState, model: str) -> bytes:
        """The body with the name ``backend`` knows ``model`` by, and the tenant's
        ``cache_salt`` when ``backend`` is an engine that takes it (``core.cache_salt``)."""
        wire = backend.wire_model(model)
        salted = bool(self.salt) and (backend.engine in cache_salt.ENGINES
                                      or backend.takes_salt)
        found = self.bodies.get((wire, salted))
        if found is None:
            found = self.bodies.get((wire, False))
            if found is None:
                found = self.bodies[(wire, False)] = model_rename.in_body(self.body, wire)
            if salted:
                found = self.bodies[(wire, True)] = cache_salt.salted(found, self.salt)
        return found

    def rename_for(self, backend: types.BackendState, model: str) -> str | None:
        """The name answers must carry when ``backend`` knows ``model`` by another."""
        if backend.wire_model(model) == model:
            return None
        return self.requested if model == self.origin and self.requested else model


class Dispatcher:
    def __init__(self, transport_: transport.Transport, router: router_mod.Router,
                 catalog_: catalog.Catalog, registry_: registry.Registry,
                 metrics_: metrics.Metrics, policy: Policy, *,
                 clock: clocks.Clock = clocks.monotonic) -> None:
        self.transport = transport_
        self.router = router
        self.catalog = catalog_
        self.registry = registry_
        self.metrics = metrics_
        self.policy = policy
        self._clock = clock
        self._chains: dict[str, tuple[str, ...]] = {}     # chain() before the allow-list

    # -- plan -----------------------------------------------------------------------------

    def chain(self, canonical: str, allows: Allows | None = None) -> tuple[str, ...]:
        """``canonical``, then its fallback models in the order they are tried: its own
        fallbacks, then theirs (the config refuses cycles; a model comes once). Models
        ``allows`` refuses (the tenant's allow-list) are left out."""
        full = self._chains.get(canonical)
        if full is None:        # the catalog never changes: walked once per model
            if len(self._chains) >= _CHAINS_MAX:
                self._chains.clear()
            full = self._chains[canonical] = self._walk(canonical)
        if allows is None or len(full) == 1:
            return full
        return (canonical, *(m for m in full[1:] if allows(m)))

    def _walk(self, canonical: str) -> tuple[str, ...]:
        order: list[str] = []
        queue = [canonical]
        while queue:
            for model in self.catalog.fallbacks(queue.pop(0)):
                if model != canonical and model not in order:
                    order.append(model)
                    queue.append(model)
        return (canonical, *order)

    def plan(self, canonical: str, prompt: router_mod.Prompt,
             fields: tuple[str, str] = ("messages", "max_tokens"),
             task: types.Task = "generate", allows: Allows | None = None) -> Plan:
        """The route for ``canonical`` or the first model of its chain that can serve;
        ``fields`` names the prompt and max-tokens fields for a 400 on a request too
        large, ``allows`` the models the tenant may use."""
        models = self.chain(canonical, allows)
        for model in models:
            decision = self.router.route(model, prompt, task)
            if decision is not None:
                return Plan(decision, model if model != canonical else "", models)
        self._refuse_too_long(models, prompt, fields[0], task)
        self._refuse_oversized(models, prompt, fields, task)
        raise errors.Unavailable(f"no backend can serve the model {canonical!r} right now "
                                 f"(tried: {', '.join(models)}); try again shortly")

    def _refuse_too_long(self, models: Sequence[str], prompt: router_mod.Prompt,
                         field: str, task: types.Task) -> None:
        """400 ``context_length_exceeded`` naming ``field`` (the prompt's) when the fewest
        tokens the prompt can be (:attr:`Prompt.least_tokens`, ``core.context_length``)
        are more than the context of every routable backend of ``models`` and each of
        them reports its context; one that does not (0) may hold it, so then nothing is
        refused here. The message says the largest context, never a backend's name."""
        least = prompt.least_tokens
        if not least:
            return
        lengths = [b.max_model_len for m in models for b in self.registry.routable(m, task)]
        if not lengths or not all(lengths) or least <= max(lengths):
            return
        raise errors.BadRequest(
            f"{field}: the prompt is longer than the context of {models[0]!r}: it is at "
            f"least {least} tokens, and the model's context length is {max(lengths)} "
            "tokens; shorten the prompt", param=field, code="context_length_exceeded")

    def _refuse_oversized(self, models: Sequence[str], prompt: router_mod.Prompt,
                          fields: tuple[str, str], task: types.Task) -> None:
        """400 when every backend of ``models`` knows its KV capacity and none holds this
        request (the router's KV capacity rule; an engine's own context limit, which may be
        smaller, is the engine's to enforce); backends down right now count too, so a
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
            f"{max_field} {prompt.max_tokens}); the largest KV cache of any backend of "
            f"{models[0]!r} holds {largest} tokens", param=field,
            code="context_length_exceeded")

    # -- attempts -------------------------------------------------------------------------

    def headers(self, backend: types.BackendState, engine_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "x-request-id": engine_id,
                **upstream_kinds.auth_headers(backend.api_key)}

    def exchange(self, route: types.RouteDecision, prompt: router_mod.Prompt,
                 path: str, body: bytes, request_id: str, *,
                 chain: Sequence[str] = (), requested: str = "",
                 task: types.Task = "generate", engine_id: str = "") -> Exchange:
        """The first attempt whose answer can be handed over (below 500, and not broken
        before its first byte), held open for the caller (``async with``); raises the last
        failure when every candidate of every model failed or the request deadline passed.

        ``body`` carries ``route.model``. ``chain`` (the plan's: the canonical model and
        its usable fallbacks) lets a route that failed everywhere go on to the next
        model after ``route.model``; ``requested`` is the name the client used, which
        answers of a backend that renames the model carry back.

        ``request_id`` is the request's id as its client knows it (maybe the client's
        own choice): it is never sent. Engines get ``engine_id``, an id Synapse generated
        for this request (:mod:`request_ids`), else a fresh one; every attempt of the
        request carries the same."""
        return Exchange(self, route, prompt, path, body, engine_id or request_ids.new(),
                        chain, requested, task)

    async def _first_attempt(self, route: types.RouteDecision, prompt: router_mod.Prompt,
                             run: _Run, chain: Sequence[str], task: types.Task) -> Attempt:
        """:meth:`exchange`'s search: the attempt to hand over, entered (its ticket open)."""
        origin = run.origin
        rest = list(chain[chain.index(route.model) + 1:]) if route.model in chain else []
        decision: types.RouteDecision | None = route
        while decision is not None:
            for index, verdict in enumerate(decision.candidates[:self.policy.max_attempts]):
                if self._expired(run):
                    break
                if run.why:
                    self.metrics.upstream_retries.labels(decision.model, run.why).inc()
                rename = run.rename_for(verdict.backend, decision.model)
                attempt = Attempt(self.router, self.policy.idle_timeout_s, decision,
                                  verdict, prompt, index, path=run.path, rename=rename)
                attempt.open()
                try:
                    failure = await self._try(run, attempt)
                except BaseException as exc:
                    attempt.settle(exc)
                    raise
                if failure is None:
                    if decision.model != origin:
                        self.metrics.fallbacks.labels(origin, decision.model).inc()
                    return attempt
                run.why, run.last = failure
                attempt.error = failure[1].message
                attempt.settle()
            decision = None if self._expired(run) else self._next_route(rest, prompt, task)
        raise run.last or errors.Unavailable("no backend could be tried")

    def _expired(self, run: _Run) -> bool:
        return run.deadline - self._clock() <= 0

    def _next_route(self, rest: list[str], prompt: router_mod.Prompt,
                    task: types.Task) -> types.RouteDecision | None:
        """The route of the next model of the chain that has routable backends."""
        while rest:
            decision = self.router.route(rest.pop(0), prompt, task)
            if decision is not None:
                return decision
        return None

    async def _try(self, run: _Run, attempt: Attempt,
                   ) -> tuple[str, errors.SynapseError] | None:
        """Send one attempt; None when its answer can be handed over, else (reason,
        failure)."""
        backend = attempt.backend
        headers = self.headers(backend, run.engine_id)
        tracing.inject(headers, attempt.span)   # W3C traceparent to the engine
        timeout = min(self.policy.first_byte_timeout_s, run.deadline - self._clock())
        try:
            attempt.response = await self.transport.send(
                "POST", backend.url + run.path, run.body_for(backend, attempt.model),
                headers, timeout)
        except (errors.UpstreamError, errors.UpstreamTimeout) as exc:
            return _failed(backend, exc)
        if attempt.status >= 500:
            return "5xx", await _server_error(attempt)
        if attempt.status in REFUSED_CREDENTIALS:
            return "auth", errors.UpstreamError(
                f"backend {backend.key} refused Synapse's credentials (status "
                f"{attempt.status}): its api_key, or the agent token its engine key comes "
                "from, is wrong or lacks access")
        try:
            await attempt.first_bytes()
        except errors.UpstreamError as exc:
            if exc.code == errors.BUSY_CODE:
                raise errors.Busy(f"the answer of backend {backend.key} could not be held: the "
                           "control plane is holding as many large answers as it may; "
                           "try again shortly") from exc
            log.debug("backend %s broke off before the first byte: %s", backend.key, exc)
            stream = attempt.answer.content_type == stream_shapes.EVENT_STREAM
            return ("stream" if stream else "read"), exc
        return None

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


class Exchange:
    """``async with dispatcher.exchange(...) as attempt``: a plain class rather than an
    ``asynccontextmanager`` — every proxied request enters one, and a generator-based
    context manager costs an async generator (registered with the loop) per request."""

    __slots__ = ("_args", "_attempt", "_dispatcher")

    def __init__(self, dispatcher: Dispatcher, route: types.RouteDecision,
                 prompt: router_mod.Prompt, path: str, body: bytes, engine_id: str,
                 chain: Sequence[str], requested: str, task: types.Task) -> None:
        self._dispatcher = dispatcher
        self._args = (route, prompt, path, body, engine_id, chain, requested, task)
        self._attempt: Attempt | None = None

    async def __aenter__(self) -> Attempt:
        route, prompt, path, body, engine_id, chain, requested, task = self._args
        d = self._dispatcher
        run = _Run(route, path, body, engine_id, chain[0] if chain else route.model,
                   requested, d._clock() + d.policy.request_deadline_s, prompt.cache_salt)
        self._attempt = await d._first_attempt(route, prompt, run, chain, task)
        return self._attempt

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._attempt is not None:
            self._attempt.settle(exc)


def _failed(backend: types.BackendState, exc: Failure) -> tuple[str, errors.SynapseError]:
    log.debug("backend %s failed: %s", backend.key, exc.__cause__ or exc)
    if isinstance(exc, errors.UpstreamTimeout):
        return "timeout", exc.reworded(f"backend {backend.key} sent {exc.message}")
    return "connect", exc.reworded(f"backend {backend.key} failed: {exc.message}")


async def _server_error(attempt: Attempt) -> errors.SynapseError:
    """The 5xx as an error that quotes the start of the backend's own message."""
    key = attempt.backend.api_key
    # Read past the cut far enough for a key quoted before it to be masked whole.
    want = ERROR_DETAIL_BYTES + errors.mask_margin(key)
    raw, whole = b"", False
    try:
        async with asyncio.timeout(ERROR_DETAIL_TIMEOUT_S):
            while len(raw) < want and not whole:
                chunk = await attempt.answer.next_chunk()
                whole = chunk is None
                raw += chunk or b""
    except (errors.UpstreamError, TimeoutError):
        pass
    detail = errors.masked_start(raw, key, ERROR_DETAIL_BYTES, whole=whole).decode(
        "utf-8", "replace")
    return errors.UpstreamError(f"backend {attempt.backend.key} answered with status "
                                f"{attempt.status}" + (f": {detail}" if detail else ""))
