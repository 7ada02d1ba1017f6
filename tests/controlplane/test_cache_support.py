"""Shared parts of the cache tests: a real ``Node.Embed`` server and a real tiered cache.

The embedder is the agent's own gRPC server with the real all-MiniLM-L6-v2 on port 0;
L2 is Milvus Lite in ``tmp_path``; L1 is the in-process LRU or a real redis-server.
Test modules import the fixtures from here (``from tests.controlplane.test_cache_support
import ...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from agent import node_service
from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import minilm, model, service
from controlplane import cache_wiring
from controlplane import metrics as metrics_mod
from controlplane.adapters import embedder as embedder_mod
from controlplane.adapters import l1
from controlplane.core import cache_port, response_cache, verifier
from controlplane.core.l2 import timing

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
AGENT_TOKEN = "cache-test-agent-token"  # the control plane presents it on every Node call
_MINILM = {}


def minilm_model():
    """The MiniLM weights, loaded once per test process (a few seconds)."""
    if "model" not in _MINILM:
        _MINILM["model"] = model.load_minilm()
    return _MINILM["model"]


@pytest.fixture
async def node_address() -> AsyncIterator[str]:
    """host:port of a real agent ``Node`` gRPC server embedding with MiniLM."""
    cfg = EmbedderSettings(kind="minilm", max_texts=64, max_text_chars=4000)
    emb = minilm.MiniLmEmbedder(cfg, model=minilm_model())
    embeddings = service.EmbeddingService(cfg, emb, lru.EmbeddingLru(1000, 10**7))
    server = node_service.NodeServer(embeddings, "127.0.0.1", 0, token=AGENT_TOKEN)
    await server.start(embedder_ready=True)
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)
    await emb.close()


def counter(m: metrics_mod.Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)


async def build_cache(node_address: str, milvus_path: str, store=None, time=None,
                      judges=None, **options):
    """A real tiered cache (generous budgets: tests check behaviour, not timing); ``time``
    (a ``ManualTime``) drives the wall clock of lookups and of L2 rows; ``judges`` (a
    ``verifier.Judges``) replaces the shipped verifier."""
    m = metrics_mod.Metrics(CollectorRegistry())
    opts = response_cache.Options(**{"l1_budget_s": 2.0, "semantic_budget_s": 10.0,
                                     "temperature_ceiling": 0.7, **options})
    clocks = {"wall_clock": time} if time is not None else {}
    cache = response_cache.TieredCache(
        options=opts, l1=store or l1.MemoryL1(1000, 10**7), metrics=m, **clocks,
        l2=cache_wiring.milvus_l2(milvus_path, "synapse_cache", flush_interval_s=0.2,
                                  time=timing.Time(wall=time) if time else timing.Time()),
        embedder=embedder_mod.NodeEmbedder(lambda: [node_address], MODEL, timeout_s=10.0,
                                           token=AGENT_TOKEN),
        verifier_model=judges or verifier.load())
    return cache, m


def chat(question: str, *, tenant: str = "acme", model: str = "llama", system: str = "Be brief.",
         cache_control: str = "", **fields) -> cache_port.CacheRequest:
    body = {"model": model, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}], **fields}
    return cache_port.CacheRequest(tenant, model, "chat", body, cache_control)


def answer(text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "llama",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


async def remember(cache: response_cache.TieredCache, request: cache_port.CacheRequest,
                   text: str) -> cache_port.CacheDecision:
    """Look up (a miss) and store the answer, waiting for the write to land."""
    decision = await cache.lookup(request)
    assert decision.status == "miss", decision
    cache.store(decision, answer(text))
    await cache.drain()
    return decision
