"""The app factory: one aiohttp application for each engine mode, plus fault wiring.

* ``build(settings, timing)`` returns the application; the engine loop and the MiniLM
  model are started and stopped through ``cleanup_ctx``; nothing happens at import.
  Which routes exist follows the engine's tasks (``simulator.tasks``).
* One middleware renders every error: OpenAI envelope, TEI's shape on TEI's ``/embed``
  and ``/rerank``, vLLM's Anthropic shape on ``/v1/messages``. Unknown routes are 404
  and wrong methods 405 in the same envelope.
* Inference routes (every ``POST`` but ``/sim/faults``) are wrapped by
  :meth:`Service.inference`, which applies the arrival-time faults (hang, slow start,
  error rate) and counts answered requests for ``crash_after`` — the process exits with
  ``faults.CRASH_EXIT_CODE`` right after the N-th answer has been written.
* Every answer carries ``X-Request-Id``: the request's own, else a new one — vLLM's
  ``--enable-request-id-headers``, which the agent starts vLLM with. The control plane
  checks it to tell an answer that is not its request's (:mod:`controlplane.adapters.upstream`).
* ``/health`` (200 empty body, like vLLM and TEI), ``GET``/``POST /sim/faults``, and
  ``GET /openapi.json`` listing the routes (as vLLM's FastAPI serves it).
* With ``api_key`` set, :mod:`simulator.auth` refuses callers without it on the paths
  the imitated engine guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import orjson
from aiohttp import typedefs, web

from simulator import (
    answer,
    auth,
    embedders,
    errors,
    faults,
    messages_api,
    protocol,
    rerank_api,
    responses_api,
    speech_api,
    tei_api,
    tokenize_api,
    transcribe_api,
    vllm_api,
)
from simulator import engine as sim_engine
from simulator import metrics as sim_metrics
from simulator import scheduler as sched
from simulator import tasks as sim_tasks
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks

log = logging.getLogger("simulator")
TEI_NATIVE_PATHS = frozenset({"/embed", "/rerank"})  # TEI's own error shape (TEI mode)
TEI_INFERENCE_PATHS = frozenset({"/embed", "/v1/embeddings", "/rerank"})
ENGINE: web.AppKey[sim_engine.Engine] = web.AppKey("engine", sim_engine.Engine)
CRASH_DELAY_S = 0.05  # lets the kernel take the last answer before the process dies


def effective_max_model_len(settings: SimulatorSettings) -> int:
    """vLLM refuses to start when one sequence cannot fit in the KV cache; the simulator
    clamps instead (tests use tiny caches) and says so at start-up."""
    p = settings.profile
    return min(p.max_model_len, p.num_gpu_blocks * p.block_size)


class Service:
    """Health, faults and the wrapper every inference route goes through."""

    def __init__(self, settings: SimulatorSettings, timing: clocks.Time) -> None:
        self.settings = settings
        self.faults = faults.Faults(settings.faults, settings.seed, timing)
        self.tei_metrics: sim_metrics.TeiMetrics | None = None
        self.ready = settings.engine != "tei"  # TEI mode: once the embedder is loaded

    def inference(self, handler: typedefs.Handler) -> typedefs.Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if self.faults.settings.hang:
                await _forever()
            self.faults.check_request()
            response = await handler(request)
            if self.faults.count_served():
                await _finish(request, response)
                log.warning("crashing now: fault injection crash_after=%s reached",
                            self.faults.settings.crash_after)
                asyncio.get_running_loop().call_later(CRASH_DELAY_S, os._exit,
                                                      faults.CRASH_EXIT_CODE)
            return response
        return wrapped

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.settings.hang:
            await _forever()
        if self.faults.starting_for() > 0 or not self.ready:
            raise errors.Unavailable("the engine is starting")
        return web.Response(status=200)

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(self.faults.view())

    async def post_faults(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        self.faults.update(body)
        log.info("faults set at run time: %s", body)
        return _json(self.faults.view())

    @web.middleware
    async def errors_middleware(self, request: web.Request,
                                handler: typedefs.Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.SimError as exc:
            return self._error(request, exc)
        except vllm_api.StreamDropped:
            raise asyncio.CancelledError from None  # the connection is gone: answer nothing
        except web.HTTPException as exc:
            if exc.status == 404:
                return self._error(request, errors.NotFound(f"Not Found: {request.path}"))
            if exc.status == 405:
                return self._error(request, errors.MethodNotAllowed(
                    f"Method {request.method} not allowed on {request.path}"))
            raise

    def _error(self, request: web.Request, exc: errors.SimError) -> web.Response:
        if self.tei_metrics is not None:
            if request.path in TEI_INFERENCE_PATHS:
                self.tei_metrics.failure(exc.tei_type.lower())
            if request.path in TEI_NATIVE_PATHS:
                return _json(exc.tei_body(), status=exc.http_status)
        if request.path.startswith("/v1/messages"):
            return _json(exc.anthropic_body(), status=exc.http_status)
        return _json(exc.envelope(), status=exc.http_status)

    async def openapi(self, request: web.Request) -> web.Response:
        """The routes, as the ``paths`` of an OpenAPI document (vLLM's FastAPI serves
        one; the registry can learn an engine's tasks from its paths either way)."""
        paths: dict[str, dict[str, Any]] = {}
        for route in request.app.router.routes():
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            if path and route.method != "HEAD":
                paths.setdefault(path, {})[route.method.lower()] = (
                    _SALTED_BODY if path in _SALTED_PATHS and route.method == "POST" else {})
        return _json({"openapi": "3.1.0", "paths": paths, "info": {
            "title": "synapse-simulator", "version": vllm_api.VLLM_VERSION,
            "x-tasks": self.settings.tasks}, "components": {"schemas": _SCHEMAS}})


# The request fields the simulator reads that a client of vLLM may rely on: the
# generation requests take cache_salt, as vLLM's request models do, and the control plane
# learns from this schema that a server without a configured kind takes it.
_SALTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_SALTED_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/GenerationRequest"}}}}}
_SCHEMAS = {"GenerationRequest": {"type": "object", "properties": {
    "model": {"type": "string"}, "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer"},
    "cache_salt": {"type": "string", "minLength": 1,
                   "description": "partitions the prefix cache, as vLLM's"}}}}


async def _forever() -> None:
    # The hang fault: never answer; the wait ends only when the client leaves (the
    # handler is cancelled) or the server shuts down.
    await asyncio.get_running_loop().create_future()


async def _finish(request: web.Request, response: web.StreamResponse) -> None:
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")


async def drain(app: web.Application, grace_s: float) -> int:
    """Shutdown: let generation finish for up to ``grace_s``, then abort what is left
    (those clients see their connection close, never a truncated answer posing as
    complete). Returns the number of aborted sequences."""
    engine = app.get(ENGINE)
    if engine is None:
        return 0  # TEI mode: requests are short, aiohttp's own grace period suffices
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(engine.wait_idle(), grace_s)
    return engine.abort_all()


def build(settings: SimulatorSettings, timing: clocks.Time = clocks.Time()) -> web.Application:
    settings = settings.model_copy(update={
        "tasks": list(sim_tasks.resolve(settings.engine, settings.tasks))})
    service = Service(settings, timing)
    middlewares: list[typedefs.Middleware] = [service.errors_middleware]
    if settings.api_key is not None:  # inside the errors middleware, which renders its 401
        middlewares.append(auth.middleware(settings.api_key.get_secret_value()))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_get("/health", service.health)
    app.router.add_get("/sim/faults", service.get_faults)
    app.router.add_post("/sim/faults", service.post_faults)
    app.router.add_get("/openapi.json", service.openapi)
    if settings.engine == "vllm":
        _add_vllm(app, settings, service, timing)
    elif settings.engine == "tei":
        _add_tei(app, settings, service, timing)
    else:
        _add_speech(app, settings, service, timing)
    return app


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """As vLLM with ``--enable-request-id-headers``: the request's id, else a new one."""
    response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or uuid.uuid4().hex


def _add_routes(app: web.Application, service: Service, routes: list[web.RouteDef]) -> None:
    for route in routes:
        handler = route.handler
        if route.method == "POST":
            handler = service.inference(handler)
        app.router.add_route(route.method, route.path, handler)


def _add_vllm(app: web.Application, settings: SimulatorSettings, service: Service,
              timing: clocks.Time) -> None:
    max_model_len = effective_max_model_len(settings)
    profile = settings.profile.model_copy(update={"max_model_len": max_model_len})
    scheduler = sched.Scheduler(profile, timing.monotonic)
    served = settings.served_model_names or [settings.model]
    metrics = sim_metrics.VllmMetrics(scheduler, served[0], profile, max_model_len)
    engine = sim_engine.Engine(scheduler, metrics, settings.time_scale, timing.monotonic)
    api = vllm_api.VllmApi(settings, engine, metrics, service.faults, timing.wall,
                           max_model_len)
    _add_routes(app, service, api.routes())
    _add_routes(app, service, _vllm_task_routes(settings, engine, service, timing,
                                                max_model_len))

    async def run_engine(_app: web.Application) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(run_engine)
    app[ENGINE] = engine


def _vllm_task_routes(settings: SimulatorSettings, engine: sim_engine.Engine,
                     service: Service, timing: clocks.Time,
                     max_model_len: int) -> list[web.RouteDef]:
    tasks, served = settings.tasks, settings.served_model_names or [settings.model]
    answers = answer.Answers(settings, engine, max_model_len)
    routes: list[web.RouteDef] = []
    if sim_tasks.RESPONSES in tasks:
        routes += responses_api.ResponsesApi(answers, served, service.faults, timing.wall,
                                             settings.responses_store).routes()
    if sim_tasks.MESSAGES in tasks:
        routes += messages_api.MessagesApi(answers, served, service.faults).routes()
    if sim_tasks.TOKENIZE in tasks:
        routes += tokenize_api.TokenizeApi(served, max_model_len).routes()
    routes += rerank_api.VllmRerankApi(settings, served, sim_tasks.RERANK in tasks,
                                       sim_tasks.SCORE in tasks).routes()
    if sim_tasks.TRANSCRIPTION in tasks:
        routes += transcribe_api.TranscribeApi(settings, served).routes()
    return routes


def _add_speech(app: web.Application, settings: SimulatorSettings, service: Service,
                timing: clocks.Time) -> None:
    served = settings.served_model_names or [settings.model]
    api = speech_api.SpeechApi(settings, served, settings.tasks, int(timing.wall()))
    _add_routes(app, service, api.routes())

    async def version(request: web.Request) -> web.Response:
        return _json({"version": "simulated", "simulator": vllm_api.FINGERPRINT,
                      "simulated": True, "tasks": settings.tasks})

    app.router.add_get("/version", version)


def _add_tei(app: web.Application, settings: SimulatorSettings, service: Service,
             timing: clocks.Time) -> None:
    metrics = sim_metrics.TeiMetrics()
    service.tei_metrics = metrics
    holder = _EmbedderHolder(settings)
    api = tei_api.TeiApi(settings, holder, metrics, timing.monotonic)
    _add_routes(app, service, api.routes())
    if sim_tasks.RERANK in settings.tasks:
        _add_routes(app, service, rerank_api.TeiRerankApi(settings).routes())

    async def load_embedder(_app: web.Application) -> AsyncIterator[None]:
        await holder.load()
        service.ready = True
        yield

    app.cleanup_ctx.append(load_embedder)


class _EmbedderHolder:
    """The configured embedder, loaded at start-up (MiniLM takes seconds)."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self._inner: embedders.Embedder = embedders.HashEmbedder(settings.embed_dim)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def dim(self) -> int:
        return self._inner.dim

    async def load(self) -> None:
        if self.settings.embedder == "minilm":
            self._inner = await embedders.MiniLmEmbedder.load()

    async def embed(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        return await self._inner.embed(texts, normalize)
