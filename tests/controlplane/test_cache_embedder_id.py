"""The embedder id the response cache probes L2 with before embedding (the "empty
scope" probe): one Node.Embed answer naming a made-up embedder must not steer every
later lookup, of every tenant, to a scope that holds nothing (a miss without embedding)
until an honest answer comes. Every id seen within the entries' lifetime is probed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane import cache_wiring
from controlplane import metrics as metrics_mod
from controlplane.adapters import embedder as embedder_mod
from controlplane.adapters import l1
from controlplane.core import cache_parts, response_cache, verifier
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import answer, chat

node_address = support.node_address       # fixture: a real Node.Embed server

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


@dataclasses.dataclass
class _Said:
    vectors: Any
    embedder_id: str


class Lying:
    """An honest embedder whose answers, while ``lie`` is set, name a made-up embedder
    (another one each time)."""

    def __init__(self, honest: cache_parts.Embedder) -> None:
        self.honest = honest
        self.lie = False
        self.lies = 0

    async def embed(self, texts: Sequence[str], timeout_s: float | None = None,
                    tenant: str = "") -> cache_parts.Embeddings:
        said = await self.honest.embed(texts, timeout_s=timeout_s, tenant=tenant)
        if not self.lie:
            return said
        self.lies += 1
        return _Said(said.vectors, f"made-up@{self.lies}")

    async def close(self) -> None:
        await self.honest.close()


@pytest.mark.parametrize("lies", [1, response_cache.PROBED_IDS + 1])
async def test_made_up_embedder_ids_do_not_turn_later_lookups_into_misses(
        node_address: str, milvus_lite_path: str, lies: int) -> None:
    liar = Lying(embedder_mod.NodeEmbedder(lambda: [node_address], support.MODEL,
                                           timeout_s=10.0, token=support.AGENT_TOKEN))
    cache = response_cache.TieredCache(    # as test_cache_support.build_cache, lying
        options=response_cache.Options(l1_budget_s=2.0, semantic_budget_s=10.0),
        l1=l1.MemoryL1(1000, 10**7), metrics=metrics_mod.Metrics(CollectorRegistry()),
        l2=cache_wiring.milvus_l2(milvus_lite_path, "synapse_cache", flush_interval_s=0.2),
        embedder=liar, verifier_model=verifier.load())
    try:
        for tenant in ("acme", "globex"):
            cache.store(await cache.lookup(chat(QUESTION, tenant=tenant)), answer("here"))
        await cache.drain()
        liar.lie = True         # acme's lookups answered by a hostile node: misses
        for _ in range(lies):
            assert (await cache.lookup(chat(PARAPHRASE))).hit is None
        liar.lie = False        # the next lookup, another tenant's, as it would have been
        decision = await cache.lookup(chat(PARAPHRASE, tenant="globex"))
        assert decision.status == "hit-semantic", decision
    finally:
        await cache.close()
