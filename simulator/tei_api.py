"""TEI mode HTTP handlers: ``/embed``, ``/v1/embeddings``, ``/info``, ``/metrics``.

Shapes follow text-embeddings-inference: ``POST /embed`` takes ``{"inputs": str | [str],
"normalize": bool = true, "truncate": bool = false}`` and answers ``[[float, …], …]``;
its errors are TEI's ``{"error": …, "error_type": …}`` with TEI's messages (422
``batch size N > maximum allowed batch size M``, 413 for an input over
``max_input_length`` tokens unless ``truncate``). ``POST /v1/embeddings`` is the
OpenAI shape with OpenAI error envelopes; like TEI, it serves its one model whatever
``model`` says. ``GET /info`` mirrors TEI's ``/info``
(``shared/reference/tei_info_sample.json``) and labels itself simulated.

Latency model: each call waits ``(2 ms + 20 µs x tokens) x time_scale`` — a small
GPU-embedder cost so queueing shows up at large time scales; 0 answers at once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from simulator import embedders, errors, protocol
from simulator import metrics as sim_metrics
from simulator import tasks as sim_tasks
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks
from synapse_common import tokens

TEI_VERSION = "1.8.0"
BASE_S = 0.002
PER_TOKEN_S = 0.00002


class TeiApi:
    def __init__(self, settings: SimulatorSettings, embedder: embedders.Embedder,
                 metrics: sim_metrics.TeiMetrics, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics
        self.clock = clock
        self.served = settings.served_model_names or [settings.model]

    def routes(self) -> list[web.RouteDef]:
        embed = [web.post("/embed", self.embed), web.post("/v1/embeddings", self.openai_embed)]
        return [*(embed if sim_tasks.EMBED in self.settings.tasks else []),
                web.get("/info", self.info), web.get("/metrics", self.metrics_text)]

    async def info(self, request: web.Request) -> web.Response:
        s = self.settings
        # TEI serves one model: an embedder, or (without embed) a reranker
        model_type = ({"embedding": {"pooling": "mean"}} if sim_tasks.EMBED in s.tasks else
                      {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}})
        body = {"model_id": s.model, "model_sha": None, "model_dtype": "float32",
                "model_type": model_type, "tasks": s.tasks,
                "max_concurrent_requests": 512, "max_input_length": s.max_input_length,
                "max_batch_tokens": 16384, "max_batch_requests": None,
                "max_client_batch_size": s.max_client_batch_size, "auto_truncate": False,
                "tokenization_workers": 1, "version": TEI_VERSION, "sha": None,
                "docker_label": "synapse-simulator", "simulated": True,
                "embedder": self.embedder.name, "dim": self.embedder.dim}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    def _inputs(self, value: Any, name: str) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise errors.Unprocessable(f"`{name}` must be a string or a list of strings",
                                       param=name)
        if not texts or any(not t for t in texts):
            raise errors.Unprocessable(f"`{name}` cannot be empty", param=name)
        limit = self.settings.max_client_batch_size
        if len(texts) > limit:
            raise errors.Unprocessable(
                f"batch size {len(texts)} > maximum allowed batch size {limit}", param=name)
        return texts

    def _lengths(self, texts: list[str], truncate: bool) -> list[int]:
        limit = self.settings.max_input_length
        lengths = [tokens.count_tokens(t) for t in texts]
        for n in lengths:
            if n > limit and not truncate:
                raise errors.PayloadTooLarge(
                    f"Input validation error: `inputs` must have less than {limit} tokens. "
                    f"Given: {n}", param="inputs")
        return [min(n, limit) for n in lengths]

    async def _run(self, texts: list[str], lengths: list[int], normalize: bool) -> Any:
        start = self.clock()
        self.metrics.queue_size += 1
        try:
            delay = (BASE_S + PER_TOKEN_S * sum(lengths)) * self.settings.time_scale
            if delay > 0:
                await clocks.sleep(delay)
            self.metrics.batch_current_size = len(texts)
            vectors = await self.embedder.embed(texts, normalize)
        finally:
            self.metrics.queue_size -= 1
        method = "single" if len(texts) == 1 else "batch"
        self.metrics.request_success[method] += 1
        self.metrics.embed_count += len(texts)
        self.metrics.duration.observe(self.clock() - start)
        for n in lengths:
            self.metrics.input_length.observe(n)
        return vectors

    def _count(self, texts: list[str]) -> None:
        self.metrics.request_count["single" if len(texts) == 1 else "batch"] += 1

    async def embed(self, request: web.Request) -> web.Response:
        body = json_object(await request.read())
        texts = self._inputs(body.get("inputs"), "inputs")
        self._count(texts)
        normalize = body.get("normalize", True) is not False
        lengths = self._lengths(texts, bool(body.get("truncate", False)))
        vectors = await self._run(texts, lengths, normalize)
        return web.Response(body=orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    async def openai_embed(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        # TEI serves one model and does not check this field; neither does the simulator.
        model = body.get("model") if isinstance(body.get("model"), str) else self.served[0]
        texts = self._inputs(body.get("input"), "input")
        self._count(texts)
        lengths = self._lengths(texts, truncate=False)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise errors.BadRequest("encoding_format must be 'float' or 'base64'",
                                    param="encoding_format")
        vectors = await self._run(texts, lengths, normalize=True)
        data = [{"object": "embedding", "index": i,
                 "embedding": vectors[i] if encoding == "float" else base64.b64encode(
                     vectors[i].astype("<f4").tobytes()).decode()}
                for i in range(len(texts))]
        usage = {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}
        payload = {"object": "list", "data": data, "model": model, "usage": usage}
        return web.Response(body=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")


TEI_BODY = protocol.BodyRefusal(
    errors.Unprocessable, "Failed to parse the request body as JSON: {}",
    "Failed to deserialize the JSON body: expected an object")
"""TEI answers a body that is not a JSON object 422, with its own messages."""


def json_object(raw: bytes) -> dict[str, Any]:
    return protocol.parse_body(raw, TEI_BODY)
