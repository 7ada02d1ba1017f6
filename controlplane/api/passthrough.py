"""``POST /v1/responses``, ``/v1/rerank``, ``/v1/score``, ``/tokenize``, ``/detokenize``
and ``/v1/audio/speech``: the client's JSON passed to a backend that serves the path's
task, its answer passed back (:mod:`controlplane.api.relay`), through the common front
(:mod:`controlplane.api.calls`).

* **Responses**: the ids a client sees are sealed for its tenant, and a continuation
  (``previous_response_id``) whose id was not sealed for the caller's tenant is answered
  404 here, as an unknown id is, without reaching an engine
  (:mod:`controlplane.core.response_ids`); the engine gets the id it minted and never a
  client's ``request_id``. Each answer's engine id is remembered with the backend that
  made it, and a continuation goes to that backend only
  (:mod:`controlplane.core.response_pins`); stateless calls that ask nothing to be kept
  are answered from the response cache when they can be, under a new sealed id
  (:mod:`controlplane.core.responses_cache`).
* **Rerank**: a TEI reranker (engine ``tei``) speaks its own ``/rerank``; the
  ``/v1/rerank`` body is translated for it and its ranking back
  (:mod:`controlplane.core.rerank_dialects`). One request keeps to one dialect: the
  candidates are those of the best candidate's dialect.
* **Speech**: the audio is streamed back as the backend produces it.
* **Tokenize**: never touches the prefix index (its prompt is not ``exact``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import typedefs, web

from controlplane import errors
from controlplane.api import calls, context, fairness, relay, serving
from controlplane.core import (
    api_calls,
    cache_port,
    dispatch,
    rerank_dialects,
    response_ids,
    response_pins,
    responses_cache,
    sse,
    validation,
)
from controlplane.core import types as core_types
from synapse_common import tracing

log = logging.getLogger("synapse.controlplane.passthrough")

_SEQUENCE = re.compile(rb'"sequence_number":\s*(\d+)')


def _pins(request: web.Request) -> response_pins.Pins:
    svc = request.app[context.SERVICES]
    if svc.response_pins is None:
        svc.response_pins = response_pins.Pins()
    return svc.response_pins


Adapted = tuple[core_types.RouteDecision, bytes, str, relay.Shape]
Adapt = Callable[[web.Request, calls.Front, core_types.RouteDecision], Adapted]


async def _serve(request: web.Request, parse: calls.Parse, adapt: Adapt) -> web.StreamResponse:
    """The common front, then ``adapt`` (the route, the body, the backend path and the
    shape of the answer), then the relay."""
    front = await calls.begin(request, parse)
    try:
        await calls.admit_tokens(request, front)
        routed = await calls.route(request, front, front.call.task)
        started = time.perf_counter()       # a re-encoded body is work on the loop too
        route, body, path, shape = adapt(request, front, routed)
        context.get(request).work_s += time.perf_counter() - started
        assert front.prompt is not None
        resp = await relay.forward(request, route, front.prompt, body, path, shape)
        front.failed = False
        return resp
    finally:
        calls.finish(request, front)


def passthrough(path: str, parse: calls.Parse) -> typedefs.Handler:
    """The handler of a path whose body and answer pass through unchanged."""
    def adapt(request: web.Request, front: calls.Front,
              route: core_types.RouteDecision) -> Adapted:
        return route, calls.body_for(front, route.model), path, relay.Shape()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _serve(request, parse, adapt)
    return handler


# -- /v1/responses -----------------------------------------------------------------------


def _seal(request: web.Request) -> response_ids.Seal:
    """This process's key for Responses ids, made from the settings on first use."""
    pins = _pins(request)
    if pins.seal is None:
        auth = request.app[context.SERVICES].settings.auth
        pins.seal = response_ids.Seal.from_secrets(
            auth.response_id_key.get_secret_value() if auth.response_id_key else None,
            auth.admin_key.get_secret_value() if auth.admin_key else None)
        if pins.seal.weak_admin_key:
            log.warning("Responses ids are sealed with a key of this process: auth.admin_key "
                        "is shorter than %d characters, too short to derive it from (a tenant "
                        "could guess the admin key offline from its ids); set "
                        "auth.response_id_key so that every process accepts them",
                        response_ids.MIN_ADMIN_KEY)
        elif not pins.seal.shared:
            log.warning("Responses ids are sealed with a key of this process (neither "
                        "auth.response_id_key nor auth.admin_key is set): a conversation "
                        "can be continued only on the process that began it")
    return pins.seal


def _previous(request: web.Request, front: calls.Front) -> tuple[str, str] | None:
    """(engine's id, client's id) of the conversation the request continues, None when
    it begins one; 404 when the id was not sealed for this tenant."""
    client = front.body.get("previous_response_id")
    if client is None:
        return None
    if not isinstance(client, str):
        raise errors.BadRequest("previous_response_id: must be a string",
                                param="previous_response_id", code="invalid_type")
    engine = _seal(request).open(front.tenant.name, client)
    if engine is None:
        raise response_ids.not_found(client)
    return engine, client


class _Responses(relay.Shape):
    """Seals the answer's ids for the tenant (:mod:`controlplane.core.response_ids`),
    notes which backend made the answer, and hands a complete text answer to the
    response cache (as the engine wrote it: the cache mints new ids for a hit)."""

    def __init__(self, request: web.Request, front: calls.Front,
                 previous: tuple[str, str] | None,
                 store: cache_port.CacheDecision | None) -> None:
        self._request = request
        self._pins, self._tenant = _pins(request), front.tenant.name
        self._ids = response_ids.AnswerIds(_seal(request), front.tenant.name, previous)
        self._previous = previous
        self._store = store
        self._backend = ""
        self._lines = response_ids.WholeLines()
        self._parser = sse.SSEParser() if store is not None else None
        self._sequence = -1             # the last event's sequence_number

    def start(self, attempt: dispatch.Attempt) -> None:
        self._backend = attempt.backend.key

    def _learn(self, engine_id: str | None) -> None:
        if engine_id is not None and self._ids.engine_id is None:
            self._ids.learn(engine_id)
            self._pins.remember(self._tenant, engine_id, self._backend)

    def _keep(self, response: Any) -> None:
        entry = (responses_cache.entry(response) if isinstance(response, dict) else None)
        if self._store is not None and entry is not None:
            with tracing.span("cache.write"):
                fairness.store(self._request, self._store, entry)

    def whole(self, data: bytes) -> bytes:
        self._learn(response_ids.whole_id(data))
        if self._store is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                self._keep(orjson.loads(data))
        return self._ids.rewrite(data)

    def chunk(self, data: bytes) -> bytes:
        if self._parser is not None:
            for event in self._parser.feed(data):
                if (final := responses_cache.completed(event)) is not None:
                    self._keep(final)
        lines = self._lines.feed(data)
        if found := _SEQUENCE.findall(lines):
            self._sequence = int(found[-1])
        if self._ids.engine_id is None:
            self._learn(response_ids.stream_id(lines))
        return self._ids.rewrite(lines)

    def end(self) -> bytes:
        return self._ids.rewrite(self._lines.rest())

    def broken(self, message: str) -> bytes:
        """The ``error`` event that ends a stream the engine broke off, as the Responses
        streaming API sends one: named ``error``, the error's fields at the top level and
        the next ``sequence_number`` (a bare ``data:`` line with an ``error`` object is
        chat completions' way, not this API's)."""
        err = errors.stream_interrupted(message)["error"]
        event = {"type": "error", "code": err["code"], "message": err["message"],
                 "param": None, "sequence_number": self._sequence + 1}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"

    def refusal(self, status: int, data: bytes) -> tuple[bytes, str]:
        if self._previous is not None:
            engine, client = self._previous
            if status == 404 and engine.encode() in data:   # the engine lost it
                return orjson.dumps(response_ids.not_found(client).envelope()), \
                    "application/json"
            data = data.replace(engine.encode(), client.encode())
        return super().refusal(status, data)


async def responses(request: web.Request) -> web.StreamResponse:
    front = await calls.begin(request, api_calls.responses,
                              turns=validation.RESPONSES_TURNS)
    decision: cache_port.CacheDecision | None = None
    try:
        previous = _previous(request, front)      # before anything reaches an engine
        if (key := responses_cache.cache_body(front.body)) is not None:
            decision = await serving.lookup_cache(request, front.tenant.name, front.canonical,
                                                  "chat", key)
        if decision is not None and decision.hit is not None and (
                hit := responses_cache.answer(decision.hit.response, int(time.time()),
                                              _minted(request, front))):
            fairness.cache_hit(request, front.tenant.name, front.canonical,
                               decision.hit.response)
            resp = await _from_cache(request, hit, front.call.stream)
        else:
            resp = await _responses_from_backend(
                request, front, previous, decision if decision is not None and
                decision.may_store else None)
        front.failed = False
        return resp
    finally:
        calls.finish(request, front, decision)


def _minted(request: web.Request, front: calls.Front) -> Callable[[str], str]:
    """How a cache hit's new id is shown to this tenant: sealed, like any other."""
    seal, tenant = _seal(request), front.tenant.name
    return lambda engine_id: seal.seal(tenant, engine_id)


async def _responses_from_backend(request: web.Request, front: calls.Front,
                                  previous: tuple[str, str] | None,
                                  store: cache_port.CacheDecision | None,
                                  ) -> web.StreamResponse:
    await calls.admit_tokens(request, front)
    route = await calls.route(request, front, front.call.task)
    if previous is not None:
        route = _pins(request).pin(route, front.tenant.name, previous[0])
    assert front.prompt is not None
    started = time.perf_counter()       # a re-encoded body is work on the loop too
    body = (response_ids.engine_body(front.body, previous[0] if previous else None)
            if previous is not None or "request_id" in front.body else None)  # else as sent
    sent = calls.body_for(front, route.model, body)
    context.get(request).work_s += time.perf_counter() - started
    return await relay.forward(request, route, front.prompt, sent, "/v1/responses",
                               _Responses(request, front, previous, store))


async def _from_cache(request: web.Request, answer: dict[str, Any],
                      stream: bool) -> web.StreamResponse:
    return await calls.from_cache(request, answer, stream, responses_cache.replay)


# -- /v1/rerank --------------------------------------------------------------------------


class _TeiRanking(relay.Shape):
    def __init__(self, front: calls.Front, model: str, request_id: str, tokens: int) -> None:
        self._front, self._model, self._rid, self._tokens = front, model, request_id, tokens

    def whole(self, data: bytes) -> bytes:
        return orjson.dumps(rerank_dialects.from_tei(orjson.loads(data), self._front.body,
                                                     self._model, self._rid, self._tokens))


def _one_dialect(route: core_types.RouteDecision) -> tuple[core_types.RouteDecision, bool]:
    """``route`` kept to the best candidate's dialect; whether that is TEI's."""
    tei = route.candidates[0].backend.engine == "tei"
    same = tuple(v for v in route.candidates if (v.backend.engine == "tei") == tei)
    return dataclasses.replace(route, candidates=same), tei


def _rerank(request: web.Request, front: calls.Front,
            route: core_types.RouteDecision) -> Adapted:
    route, tei = _one_dialect(route)
    if not tei:
        return route, calls.body_for(front, route.model), "/v1/rerank", relay.Shape()
    assert front.prompt is not None
    shape = _TeiRanking(front, route.model, context.get(request).request_id,
                        front.prompt.tokens)
    return route, orjson.dumps(rerank_dialects.to_tei(front.body)), "/rerank", shape


async def rerank(request: web.Request) -> web.StreamResponse:
    return await _serve(request, api_calls.rerank, _rerank)


score = passthrough("/v1/score", api_calls.score)
tokenize = passthrough("/tokenize", api_calls.tokenize)
detokenize = passthrough("/detokenize", api_calls.detokenize)
speech = passthrough("/v1/audio/speech", api_calls.speech)
