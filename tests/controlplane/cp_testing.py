"""Helpers for the control-plane tests: an in-process control plane on a free port and a
tiny OpenAI-compatible backend whose behaviour a test sets (the stand-in used where a
test needs a failure mode the simulator has no knob for, e.g. a 500 or a cut stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import openai
from aiohttp import web

from controlplane import config
from controlplane.api import app as app_mod
from controlplane.api import grpc_server
from controlplane.api import server as server_mod
from controlplane.api import services as services_mod
from controlplane.core import cache_port
from tests import harness
from tests.http_standins import served as served  # the tests' t.served

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
KEY_A = "sk-tenant-a-0123456789"
KEY_B = "sk-tenant-b-0123456789"
ADMIN = "sk-admin-0123456789"


class FakeBackend:
    """An OpenAI-compatible backend; ``mode`` picks its behaviour for the next requests.

    ``ok``: answers; ``500``: fails; ``hang``: never answers; ``break``: a stream that
    stops after two chunks without ``[DONE]``; ``empty``: a stream whose connection closes
    after the head, before any chunk; ``slow``: a stream with a pause per chunk.
    """

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self.mode = mode
        self.bodies: list[bytes] = []
        self.headers: list[Mapping[str, str]] = []
        self.cancelled = 0
        self.healthy = True
        self.health_hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/rerank", self.pooling)
        app.router.add_post("/v1/score", self.pooling)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        self.health_hits += 1
        return web.json_response({}, status=200 if self.healthy else 500)

    async def _hang(self) -> None:
        """Never answer; count the cancellation when the control plane gives up."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(await request.read())
        if self.mode == "hang":
            await self._hang()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i, _ in enumerate(inputs)], "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def pooling(self, request: web.Request) -> web.Response:
        """Rerank and score: the body recorded, an empty answer (or none: ``hang``)."""
        self.bodies.append(await request.read())
        if self.mode == "hang":
            await self._hang()
        return web.json_response({"id": "x", "object": "list", "data": [], "results": [],
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        body = json.loads(raw)
        chat = request.path.endswith("chat/completions")
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "400":
            return web.json_response({"detail": "bad thing"}, status=400)
        if self.mode == "hang":
            await self._hang()
        text = f"hello from {self.name}"
        if not body.get("stream"):
            return web.json_response(_whole(body["model"], text, chat))
        return await self._stream(request, body, text, chat)

    async def _stream(self, request: web.Request, body: dict[str, Any], text: str,
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = _chunks(body["model"], text, chat)
        try:
            for i, chunk in enumerate(chunks):
                if (self.mode == "break" and i == 2) or (self.mode == "empty" and i == 0):
                    request.transport.close()  # type: ignore[union-attr]
                    return resp
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if self.mode == "slow":
                    await asyncio.sleep(0.5)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "x", "object": "chat.completion.chunk", "created": 1,
                         "model": body["model"], "choices": [], "usage": _USAGE}
                await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        return resp


_USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _whole(model: str, text: str, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "stop", "logprobs": None} if chat else
                              {"index": 0, "text": text, "finish_reason": "stop",
                               "logprobs": None})
    return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": _USAGE}


def _chunks(model: str, text: str, chat: bool) -> list[dict[str, Any]]:
    base = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1, "model": model}
    words = text.split(" ")
    out = []
    if chat:
        out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                         "finish_reason": None}]})
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                  else {"index": 0, "text": piece, "finish_reason": None})
        out.append({**base, "choices": [choice]})
    end = ({"index": 0, "delta": {}, "finish_reason": "stop"} if chat
           else {"index": 0, "text": "", "finish_reason": "stop"})
    out.append({**base, "choices": [end]})
    return out


def settings(**overrides: Any) -> config.ControlPlaneSettings:
    base: dict[str, Any] = {
        "replica_id": "test",
        "http": {"host": "127.0.0.1", "port": 0, "upstream_first_byte_timeout_s": 2.0,
                 "upstream_idle_timeout_s": 2.0, "max_body_bytes": 64 * 1024},
        "grpc": {"host": "127.0.0.1", "port": 0},
        # tests play the agents (agent tokens: tests/security/test_agent_auth.py)
        "auth": {"admin_key": ADMIN, "allow_unauthenticated_agents": True, "tenants": [
            {"name": "a", "keys": [KEY_A]},
            {"name": "b", "keys": [KEY_B]}]},
        "models": [{"name": MODEL, "aliases": ["llama"]}],
        "registry": {"upstream_probe_interval_s": 0.2},
        "logging": {"level": "warning"},
    }
    harness.with_sections(base, overrides)
    return config.ControlPlaneSettings.model_validate(base)


def upstream(name: str, url: str, models: list[str] | None = None,
             task: str = "generate") -> dict[str, Any]:
    return {"name": name, "url": url, "models": models or [MODEL], "task": task}


def hosted_api(chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
               model: str = MODEL) -> web.Application:
    """A hosted OpenAI-compatible API (upstream kind ``openai``) for :func:`served`:
    ``chat`` answers /v1/chat/completions and /v1/models lists ``model`` (what the
    prober asks a hosted API)."""
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def hosted(name: str, url: str, api_key: str = "k") -> dict[str, Any]:
    """A static upstream of kind ``openai`` serving ``MODEL`` at ``url`` (a served
    :func:`hosted_api`'s base URL) with ``api_key``."""
    return {"name": name, "url": f"{url}/v1", "kind": "openai", "models": [MODEL],
            "api_key": api_key}


def round_robin(*started: FakeBackend, **overrides: Any) -> config.ControlPlaneSettings:
    """Settings whose upstreams are ``started`` (each named after its backend), taken in
    turn (router policy ``round_robin``)."""
    return settings(upstreams=[upstream(b.name, b.url) for b in started],
                    router={"policy": "round_robin"}, **overrides)


@dataclasses.dataclass
class RunningCP:
    url: str
    services: services_mod.Services
    grpc_port: int = 0
    clients: list[openai.AsyncOpenAI] = dataclasses.field(default_factory=list)

    def client(self, key: str = KEY_A) -> openai.AsyncOpenAI:
        """A client of this control plane, closed with it: a client left to the garbage
        collector closes itself in whatever loop runs then, and a later test's loop logs
        its "Event loop is closed" as an error."""
        made = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                                  timeout=20)
        self.clients.append(made)
        return made


@contextlib.asynccontextmanager
async def running(s: config.ControlPlaneSettings,
                  cache: cache_port.ResponseCache | None = None,
                  with_grpc: bool = False, *, primary: bool = True) -> AsyncIterator[RunningCP]:
    """The control plane app (and optionally its gRPC server) in this event loop, served
    as ``synapse controlplane`` serves it (the fast lane when ``http.fast_lane``); as a
    pod's serving worker's when not ``primary``."""
    svc = services_mod.build(s, response_cache=cache, commands_agents=primary)
    app = app_mod.create_app(s, services=svc)
    runner = server_mod.Runner(app, s.http, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server = None
    cp = RunningCP(f"http://127.0.0.1:{runner.addresses[0][1]}", svc)
    try:
        if with_grpc:
            server, cp.grpc_port = await grpc_server.start(
                "127.0.0.1", 0, [grpc_server.control_plane(svc)])
        yield cp
    finally:
        for made in cp.clients:
            with contextlib.suppress(Exception):    # the server's cleanup runs regardless
                await made.close()
        if server is not None:
            await server.stop(0)
        await runner.cleanup()


async def seats_mid_stream(cp: RunningCP, backend: str, **create: Any) -> tuple[int, int]:
    """The (in flight, sequences) the ledger counts for the static upstream ``backend``
    while a streamed completions request (``create``: its arguments) is under way, read
    after its first chunk; returns once the answer has ended and its seats are given back
    (in flight back to zero)."""
    stream = await cp.client().completions.create(stream=True, **create)
    await anext(stream)
    load = cp.services.ledger.load(f"static/{backend}")
    held = (load.in_flight, load.sequences)
    async for _ in stream:
        pass
    await harness.until(lambda: load.in_flight == 0, 5, "the answer settled")
    return held


@contextlib.asynccontextmanager
async def backends(*names_modes: tuple[str, str]) -> AsyncIterator[list[FakeBackend]]:
    started = [FakeBackend(n, m) for n, m in names_modes]
    try:
        for b in started:
            await b.start()
        yield started
    finally:
        for b in started:
            await b.stop()
