"""Rerank and score: vLLM's cross-encoder routes and TEI's ``/rerank``.

vLLM (``--task rerank`` / ``--task score``), shapes of vLLM 0.32's ``ServingScores``:

* ``POST /rerank`` (also ``/v1/rerank``, ``/v2/rerank``; Jina / Cohere shape)
  ``{"model", "query", "documents": [str], "top_n": 0}`` →
  ``{"id": "score-…", "model", "usage": {"prompt_tokens", "total_tokens"}, "results":
  [{"index", "document": {"text", "multi_modal": null}, "relevance_score"}]}``, most
  relevant first, the first ``top_n`` (0 = all).
* ``POST /score`` (also ``/v1/score``) ``{"model", "text_1" | "queries" | "data_1",
  "text_2" | "documents" | "items" | "data_2"}`` (each a string or a list; 1:1, 1:N or
  N:N pairs, else 400 ``Input lengths must be either 1:1, 1:N or N:N``) →
  ``{"id", "object": "list", "created", "model", "data": [{"index", "object": "score",
  "score"}], "usage"}``.

TEI (``--engine tei --task rerank``): ``POST /rerank`` ``{"query", "texts": [str],
"raw_scores": false, "return_text": false}`` → ``[{"index", "score", "text"?}]``, most
relevant first; TEI's errors (422 over ``max_client_batch_size``).

Scores are simulated: the cosine of the query's and the document's word sets (lower
case), in [0, 1] — a document sharing more words with the query ranks higher, an equal
one scores 1. TEI's ``raw_scores`` gives the logit of that instead. Latency as TEI mode:
``(2 ms + 20 µs x tokens) x time_scale``.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator import errors, protocol, tei_api
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks
from synapse_common import tokens

_WORDS = re.compile(r"\w+")
VLLM_RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")
VLLM_SCORE_PATHS = ("/score", "/v1/score")
PAIR_FIELDS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
               ("data_1", "data_2"))


def relevance(query: str, document: str) -> float:
    q = set(_WORDS.findall(query.lower()))
    d = set(_WORDS.findall(document.lower()))
    if not q or not d:
        return 0.0
    return len(q & d) / math.sqrt(len(q) * len(d))


def logit(score: float) -> float:
    p = min(max(score, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class Scorer:
    """Scores pairs after the simulated model's delay."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.time_scale = settings.time_scale

    async def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        used = sum(tokens.count_tokens(q) + tokens.count_tokens(d) for q, d in pairs)
        delay = (tei_api.BASE_S + tei_api.PER_TOKEN_S * used) * self.time_scale
        if delay > 0:
            await clocks.sleep(delay)
        return [relevance(q, d) for q, d in pairs], used


def _texts(value: Any, name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise errors.BadRequest(f"{name} must be a string or a list of strings.", param=name)
    return texts


class VllmRerankApi:
    def __init__(self, settings: SimulatorSettings, served: list[str], rerank: bool,
                 score: bool) -> None:
        self.scorer = Scorer(settings)
        self.served = served
        self.rerank_on = rerank
        self.score_on = score

    def routes(self) -> list[web.RouteDef]:
        out = [web.post(p, self.rerank) for p in VLLM_RERANK_PATHS] if self.rerank_on else []
        if self.score_on:
            out += [web.post(p, self.score) for p in VLLM_SCORE_PATHS]
        return out

    def _model(self, body: Mapping[str, Any]) -> str:
        return protocol.served_model(protocol.model_name(body), self.served)

    async def rerank(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        model = self._model(body)
        query = body.get("query")
        if not isinstance(query, str):
            raise errors.BadRequest("query must be a string.", param="query")
        documents = _texts(body.get("documents"), "documents")
        top_n = protocol.integer(body, "top_n", 0) or len(documents)
        scores, used = await self.scorer.score([(query, d) for d in documents])
        ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
        results = [{"index": i, "document": {"text": documents[i], "multi_modal": None},
                    "relevance_score": scores[i]} for i in ranked]
        return _json({"id": _request_id(request), "model": model,
                      "usage": {"prompt_tokens": used, "total_tokens": used},
                      "results": results})

    async def score(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        model = self._model(body)
        first, second = next(((a, b) for a, b in PAIR_FIELDS if a in body and b in body),
                             ("text_1", "text_2"))
        left, right = _texts(body.get(first), first), _texts(body.get(second), second)
        if not left or not right:
            raise errors.BadRequest("At least one text element must be given", param=first)
        if len(left) == 1:
            left = left * len(right)
        elif len(left) != len(right):
            raise errors.BadRequest("Input lengths must be either 1:1, 1:N or N:N",
                                    param=first)
        scores, used = await self.scorer.score(list(zip(left, right, strict=True)))
        return _json({"id": _request_id(request), "object": "list", "created": int(time.time()),
                      "model": model,
                      "data": [{"index": i, "object": "score", "score": s}
                               for i, s in enumerate(scores)],
                      "usage": {"prompt_tokens": used, "total_tokens": used,
                                "completion_tokens": 0, "prompt_tokens_details": None}})


class TeiRerankApi:
    def __init__(self, settings: SimulatorSettings) -> None:
        self.scorer = Scorer(settings)
        self.batch_limit = settings.max_client_batch_size

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/rerank", self.rerank)]

    async def rerank(self, request: web.Request) -> web.Response:
        body = tei_api.json_object(await request.read())
        query = body.get("query")
        texts = body.get("texts")
        if not isinstance(query, str) or not query:
            raise errors.Unprocessable("`query` must be a non-empty string", param="query")
        if not isinstance(texts, list) or not texts or not all(
                isinstance(t, str) for t in texts):
            raise errors.Unprocessable("`texts` must be a non-empty list of strings",
                                       param="texts")
        if len(texts) > self.batch_limit:
            raise errors.Unprocessable(
                f"batch size {len(texts)} > maximum allowed batch size {self.batch_limit}",
                param="texts")
        scores, _ = await self.scorer.score([(query, t) for t in texts])
        raw = body.get("raw_scores") is True
        ranked = sorted(range(len(texts)), key=lambda i: -scores[i])
        out = [{"index": i, "score": logit(scores[i]) if raw else scores[i]} for i in ranked]
        if body.get("return_text") is True:
            for entry in out:
                entry["text"] = texts[int(entry["index"])]
        return _json(out)


def _request_id(request: web.Request) -> str:
    return "score-" + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
