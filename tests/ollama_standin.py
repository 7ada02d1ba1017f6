"""A stand-in for an Ollama server, following Ollama's documented API — for the tests of
the ``ollama`` upstream kind on machines without Ollama.

What it serves, as Ollama does (docs/api.md, docs/openai.md; ``openai/openai.go``):

* ``GET /`` → ``Ollama is running``; ``GET /api/version`` → ``{"version": …}``;
  ``GET /api/tags`` → the pulled models (``name``, ``model``, ``modified_at``, ``size``,
  ``digest``, ``details``).
* No ``/health``: Go's plain-text ``404 page not found``, like any unknown path.
* The OpenAI-compatible ``/v1`` paths: ``GET /v1/models``, ``POST /v1/chat/completions``,
  ``/v1/completions`` (whole or streamed as ``data:`` events with ``[DONE]``, usage on
  request), ``/v1/embeddings``; answers name the model as Ollama knows it
  (``llama3.1:8b``) and carry ``system_fingerprint: fp_ollama``; compact JSON, as Go
  writes it. A model that was not pulled is a 404 ``not_found_error`` ("model … not
  found, try pulling it first"). The key is ignored — Ollama has no auth — but recorded,
  so a test can see what reached the server; with ``require_key`` (``--require-key-file``) the
  ``/v1`` paths want it as ``Authorization: Bearer`` (401 otherwise), as the reverse proxy
  that usually guards an Ollama does.

Run alone: ``python -m tests.ollama_standin --port 11434 --model llama3.1:8b``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

VERSION = "0.5.7"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


class OllamaStandIn:
    def __init__(self, models: tuple[str, ...] = ("llama3.1:8b",),
                 require_key: str | None = None) -> None:
        self.models = models
        self.require_key = require_key
        self.requests: list[tuple[str, str, Mapping[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def seen(self, path: str) -> list[tuple[Mapping[str, str], bytes]]:
        """Headers and body of every request to ``path``, in order."""
        return [(h, b) for method, p, h, b in self.requests if p == path]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.headers), body))
        wanted = f"Bearer {self.require_key}"
        if self.require_key and request.path.startswith("/v1/") and \
                request.headers.get("Authorization") != wanted:
            return web.Response(text="401 Unauthorized", status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:        # Go's net/http: plain text
            return web.Response(text="404 page not found", status=404)

    # -- Ollama's own API ----------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VERSION})

    async def tags(self, request: web.Request) -> web.Response:
        return _json({"models": [{
            "name": m, "model": m, "modified_at": "2024-07-23T10:00:00.000000000Z",
            "size": 4661224676, "digest": f"{abs(hash(m)):064x}"[:64],
            "details": {"parent_model": "", "format": "gguf", "family": "llama",
                        "families": ["llama"], "parameter_size": "8.0B",
                        "quantization_level": "Q4_0"}} for m in self.models]})

    # -- the OpenAI-compatible /v1 paths -------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1721728800, "owned_by": "library"}
            for m in self.models]})

    def _not_pulled(self, model: str) -> web.Response | None:
        if model in self.models:
            return None
        return _json({"error": {"message": f'model "{model}" not found, try pulling it first',
                                "type": "not_found_error", "param": None, "code": None}}, 404)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(self.requests[-1][3])
        refused = self._not_pulled(body.get("model", ""))
        if refused is not None:
            return refused
        chat = request.path.endswith("chat/completions")
        words = ["Hello", " from", " Ollama"]
        if body.get("stream"):
            return await self._stream(request, body, words, chat)
        text = "".join(words)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"} if chat else
            {"text": text, "index": 0, "finish_reason": "stop"})
        return _json({"id": "chatcmpl-1" if chat else "cmpl-1",
                      "object": "chat.completion" if chat else "text_completion",
                      "created": int(time.time()), "model": body["model"],
                      "system_fingerprint": "fp_ollama", "choices": [choice],
                      "usage": {"prompt_tokens": 12, "completion_tokens": 3,
                                "total_tokens": 15}})

    async def _stream(self, request: web.Request, body: dict[str, Any], words: list[str],
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-1" if chat else "cmpl-1",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"],
                "system_fingerprint": "fp_ollama"}
        for piece, reason in [*((w, None) for w in words), ("", "stop")]:
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"role": "assistant", "content": piece},
                 "finish_reason": reason} if chat else
                {"text": piece, "index": 0, "finish_reason": reason})
            await resp.write(b"data: " + _dumps({**base, "choices": [choice]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
            await resp.write(b"data: " + _dumps({**base, "choices": [], "usage": usage})
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body = json.loads(self.requests[-1][3])
        refused = self._not_pulled(body.get("model", ""))
        if refused is not None:
            return refused
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return _json({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "embedding": [0.25, -0.5, 0.125], "index": i}
            for i, _ in enumerate(inputs)], "usage": {"prompt_tokens": 2, "total_tokens": 2}})


async def _serve(port: int, models: tuple[str, ...], require_key: str | None) -> None:
    server = OllamaStandIn(models, require_key)
    await server.start(port=port)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An Ollama stand-in (tests)")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--require-key-file", default=None,
                        help="answer /v1 only with the key in this file (Bearer)")
    args = parser.parse_args(argv)
    key = (pathlib.Path(args.require_key_file).read_text().strip()
           if args.require_key_file else None)
    asyncio.run(_serve(args.port, tuple(args.model or ["llama3.1:8b"]), key))


if __name__ == "__main__":
    main()
