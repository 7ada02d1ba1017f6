"""Isolation suite: two requests that differ only in one scope dimension never share an entry.

For every dimension of the scope (tenant, model, embedder, system prompt, earlier turns,
tools / functions / tool_choice, response_format, each sampling parameter, an unknown
field), the *same* question and an accepted paraphrase of it are asked in a variant of a
base request. Before the variant has an entry of its own it must miss — exactly and
semantically — although an identical question sits in the neighbouring scope. After
every variant stored its own answer, every lookup must return the answer of its own
scope: zero cross-scope hits, in either direction, with L1 in-process or in Redis.
"""

from __future__ import annotations

import dataclasses

import pytest

from controlplane.adapters import l1
from controlplane.core import response_cache
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import answer, build_cache, chat

node_address = support.node_address       # fixture: a real Node.Embed server

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
EARLIER = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

VARIANTS = {
    "base": {},
    "tenant": {"tenant": "globex"},
    "model": {"model": "mistral"},
    "system prompt": {"system": "Answer in French."},
    "earlier turns": {"earlier": EARLIER},
    "tools": {"tools": [TOOL]},
    "functions": {"functions": [TOOL["function"]]},
    "tool_choice": {"tool_choice": "none"},
    "response_format": {"response_format": {"type": "json_object"}},
    "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.9},
    "max_tokens": {"max_tokens": 16},
    "max_completion_tokens": {"max_completion_tokens": 16},
    "stop": {"stop": ["\n"]},
    "seed": {"seed": 42},
    "n": {"n": 1},
    "presence_penalty": {"presence_penalty": 0.3},
    "frequency_penalty": {"frequency_penalty": 0.3},
    "logit_bias": {"logit_bias": {"1234": -100}},
    "logprobs": {"logprobs": True},
    "top_logprobs": {"logprobs": True, "top_logprobs": 3},
    "unknown field": {"reasoning_effort": "high"},
}


def request(variant: str, question: str):
    spec = dict(VARIANTS[variant])
    earlier = spec.pop("earlier", None)
    req = chat(question, **spec)
    if earlier:
        messages = list(req.body["messages"])
        req.body["messages"] = [messages[0], *earlier, messages[-1]]
    return req


def content(decision) -> str:
    return decision.hit.response["choices"][0]["message"]["content"]


@pytest.fixture(params=["memory", "redis"])
async def cache(request, node_address, milvus_lite_path):
    store = None
    if request.param == "redis":
        store = l1.RedisL1(request.getfixturevalue("redis_server").url, timeout_s=1.0)
    c, _ = await build_cache(node_address, milvus_lite_path, store=store)
    yield c
    await c.close()


async def test_no_entry_is_ever_served_across_a_scope_dimension(cache):
    decision = await cache.lookup(request("base", QUESTION))
    cache.store(decision, answer("answer of base"))
    await cache.drain()
    for variant in VARIANTS:
        if variant == "base":
            continue
        for question in (QUESTION, PARAPHRASE):
            decision = await cache.lookup(request(variant, question))
            assert decision.hit is None, f"{variant}: {question!r} hit base's entry"
        decision = await cache.lookup(request(variant, QUESTION))
        cache.store(decision, answer(f"answer of {variant}"))
        await cache.drain()

    for variant in VARIANTS:
        exact = await cache.lookup(request(variant, QUESTION))
        semantic = await cache.lookup(request(variant, PARAPHRASE))
        assert exact.status == "hit-exact" and content(exact) == f"answer of {variant}"
        assert semantic.status == "hit-semantic", variant
        assert content(semantic) == f"answer of {variant}", variant


async def test_another_embedder_never_sees_the_vectors_of_this_one(node_address,
                                                                  milvus_lite_path):
    first, m = await build_cache(node_address, milvus_lite_path)
    decision = await first.lookup(chat(QUESTION))
    first.store(decision, answer("from embedder A"))
    await first.drain()
    # Same L1 and L2 stores; only the configured embedder differs.
    other = response_cache.TieredCache(
        options=dataclasses.replace(first.options, embed_model="other-embedder"), l1=first.l1,
        l2=first.l2, embedder=first.embedder, verifier_model=first.judges, metrics=m)
    assert (await other.lookup(chat(QUESTION))).hit is None
    assert (await other.lookup(chat(PARAPHRASE))).hit is None
    assert (await first.lookup(chat(PARAPHRASE))).status == "hit-semantic"
    await first.close()
