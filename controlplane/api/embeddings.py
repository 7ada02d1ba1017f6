"""``POST /v1/embeddings``.

Routed like generation to HTTP backends of task ``embed`` serving the model (TEI, a
vLLM embedding model, a static upstream), proxied with the same retries. When none
exists but an agent's in-process embedder serves the model (``embed_models`` in its
Register), the texts go to that agent's ``Node.Embed`` and the answer is built here in
the OpenAI shape (``encoding_format: base64`` returns the float32 bytes, as OpenAI does).
An agent's embedder takes text: token-id input for a model only agents serve is a 400
(it has no tokenizer of the client's to read them with). Input over an agent's limits
is the client's error (413 or 400, from
:mod:`controlplane.adapters.node_embed`), not retried on another agent; agents are named
by their node in headers and errors, never by their address. Token limits, the budget
and the usage book count embeddings as every other call: the input at admission,
settled from the answer's usage (the agent path's is counted here). An ``input`` array is a
request per input to a vLLM engine: the ledger counts each as a seat
(``Parsed.sequences``), and more than ``http.max_pooling_inputs`` of them is a 400, by the
rule a completions batch is bounded by (:func:`controlplane.core.validation.bound_sequences`).
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.adapters import node_embed
from controlplane.api import context, fairness, proxy, serving
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from controlplane.core import usage as usage_mod
from controlplane.core import validation

log = logging.getLogger("synapse.controlplane.embeddings")

EMBED_TIMEOUT_S = 30.0


async def embeddings(request: web.Request) -> web.StreamResponse:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    parse = functools.partial(validation.embeddings,
                              max_inputs=svc.settings.http.max_pooling_inputs,
                              max_input_bytes=svc.settings.http.max_pooling_input_bytes)
    tenant, parsed, raw, permit = await serving.admit(request, parse)
    failed = True
    try:
        canonical = serving.resolve_model(request, tenant, parsed.model)
        started = time.perf_counter()
        texts = _texts(parsed.body["input"])
        prompt = router_mod.Prompt.from_text(" ".join(texts), 0, parsed.user, exact=False)
        prompt.sequences = parsed.sequences     # each input is a request to the engine
        # per tenant in the engines' prefix caches, as generation is (core.cache_salt)
        prompt.partition(svc.salt_for(tenant.name, parsed.body.get("cache_salt")), tenant.name)
        prompt.tokenize()
        ctx.work_s += time.perf_counter() - started
        # The token limits and budget, as every call's: its input only (settled from usage).
        await fairness.admit(request, tenant.name, canonical, prompt, 1)
        route = svc.router.route(canonical, prompt, "embed")
        if route is not None:
            body = serving.body_for(raw, parsed, canonical)
            resp = await proxy.forward(request, route, prompt, body,
                                       serving.PATHS["embeddings"], False, None)
        else:
            nodes = [n for n in svc.registry.ready_embed_nodes() if canonical in n.embed_models]
            if not nodes:
                raise errors.Unavailable(f"no backend serves embeddings for {canonical!r} now")
            if not _all_text(parsed.body["input"]):
                raise errors.BadRequest(
                    f"input: {canonical!r} is served by the agents' embedders, which embed "
                    "text, not token ids (they would embed the numbers as words); send the "
                    "text", param="input", code="invalid_value")
            resp = await _via_agent(request, canonical, texts, parsed.body, nodes, prompt)
        failed = False
        return resp
    finally:
        ctx.cache = "bypass"
        fairness.finish(request, None, failed)
        serving.release_later(request, permit)


def _all_text(data: Any) -> bool:
    """Whether a valid ``input`` is text only (a string, or an array of strings)."""
    return isinstance(data, str) or all(isinstance(x, str) for x in data)


def _texts(data: Any) -> list[str]:
    """A text per input of a valid ``input``: token ids as their numbers, space-separated
    (what the token estimate and an agent's embedder see of them)."""
    if isinstance(data, str):
        return [data]
    if not isinstance(data[0], (str, list)):
        return [_ids_text(data)]
    return [x if isinstance(x, str) else _ids_text(x) for x in data]


def _ids_text(ids: list[Any]) -> str:
    return " ".join(str(int(i)) for i in ids)   # 3.0 is token 3, as validation reads it


async def _via_agent(request: web.Request, model: str, texts: list[str],
                     body: dict[str, Any], nodes: list[core_types.EmbedNode],
                     prompt: router_mod.Prompt) -> web.Response:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    client = svc.node_embed
    assert client is not None   # made by the app's upstream cleanup context

    async def embed(node: core_types.EmbedNode) -> tuple[Any, str]:
        try:
            return await client.embed(node.address, model, texts, EMBED_TIMEOUT_S, ctx.tenant)
        except node_embed.EmbedError as exc:
            log.debug("Node.Embed of node %s (%s) failed: %s", node.name, node.address, exc)
            raise

    node, (vectors, _) = await svc.dispatcher.first_answer(
        nodes, embed, node_embed.EmbedError, "agent embedder")
    ctx.backend, ctx.route = f"node-embed/{node.name}", "agent-embedder"
    ctx.first_byte = svc.clock()
    answer = _openai_body(model, texts, vectors, body, prompt)
    counted = answer["usage"]["prompt_tokens"]
    ctx.usage = fairness.answered(request, 200, usage_mod.Usage(counted, 0, None))
    return web.json_response(answer, headers=ctx.headers(), dumps=_dumps)


def _openai_body(model: str, texts: list[str], vectors: Any, body: dict[str, Any],
                 prompt: router_mod.Prompt) -> dict[str, Any]:
    """The OpenAI answer; its usage counted by the approximation in ``prompt``'s
    partition (the tenant's memo of pieces, :meth:`Prompt.count_text`)."""
    b64 = body.get("encoding_format") == "base64"
    dims = body.get("dimensions")
    data = []
    for i, vec in enumerate(vectors):
        if isinstance(dims, int) and 0 < dims < len(vec):
            vec = vec[:dims]
        emb: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if b64
                    else vec.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(map(prompt.count_text, texts))
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
