"""The stacked cache against a real agent: the agent's own Node server embeds with MiniLM
and scores pairs with a real pair scorer (a small file built here, as the agent's tests
do), and the control plane's ``NodeEmbedder`` carries both calls. The stack here weighs
only the verifier (weights [1, 0]), so a decision does not depend on what this untrained
scorer thinks; what is checked is the wire: a real answer is recognised as the stack's
scorer, another scorer id or an agent without a scorer leave the verifier alone to decide.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent import node_service
from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import minilm, pair_scorer, service
from controlplane.core import verifier
from tests import pair_scorers
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import chat, counter, remember
from tests.controlplane.test_response_cache_stack import (
    NEAR_MISS,
    PARAPHRASE,
    STORED,
    build,
)

CFG = EmbedderSettings(kind="minilm", max_texts=64, max_text_chars=4000)


@pytest.fixture(scope="module")
def loaded_scorer(tmp_path_factory: pytest.TempPathFactory) -> pair_scorer.Loaded:
    return pair_scorer.load(pair_scorers.small_file(tmp_path_factory.mktemp("scorer")))


@pytest.fixture
async def agent(loaded_scorer) -> AsyncIterator[Callable[[bool], Awaitable[tuple[str, str]]]]:
    """Starts a real agent Node server, with or without its pair scorer: (address, id)."""
    started = []

    async def start(with_scorer: bool) -> tuple[str, str]:
        emb = minilm.MiniLmEmbedder(CFG, model=support.minilm_model())
        embeddings = service.EmbeddingService(CFG, emb, lru.EmbeddingLru(1000, 10**7))
        scorer = (pair_scorer.PairScorer(CFG, None, loaded=loaded_scorer) if with_scorer
                  else pair_scorer.PairScorer(CFG, None, reason="embedder.pair_scorer: none"))
        server = node_service.NodeServer(embeddings, "127.0.0.1", 0,
                                         token=support.AGENT_TOKEN, scorer=scorer)
        await server.start(embedder_ready=True)
        started.append((server, emb))
        return f"127.0.0.1:{server.port}", loaded_scorer.scorer_id

    yield start
    for server, emb in started:
        await server.stop(0)
        await emb.close()


def stacked_on(scorer_id: str) -> verifier.Verifier:
    data = json.loads(verifier.DEFAULT_PATH.read_text())
    base = verifier.from_json(data)
    data["stack"] = {"pair_scorer": scorer_id, "weights": [1.0, 0.0], "bias": 0.0,
                     "floor": 0.0, "threshold": base.threshold, "target_precision": 0.9}
    return verifier.from_json(data)


def outcome(m, name: str) -> float:
    return counter(m, "synapse_cache_pair_scorer_total", outcome=name)


@pytest.mark.parametrize("with_scorer,same_id,expected", [
    (True, True, "scored"), (True, False, "mismatch"), (False, True, "unavailable")])
async def test_a_real_agent_scores_the_pairs_or_the_verifier_decides_alone(
        agent, milvus_lite_path, with_scorer, same_id, expected):
    address, scorer_id = await agent(with_scorer)
    judge = stacked_on(scorer_id if same_id else "another-scorer@1")
    c, m = await build(address, milvus_lite_path, judge, None, semantic_budget_s=30.0)
    try:
        await remember(c, chat(STORED), "Eat less, move more.")
        hit = (await c.lookup(chat(PARAPHRASE))).hit
        assert (await c.lookup(chat(NEAR_MISS))).status == "miss"
        assert outcome(m, expected) == 2
        # With weights [1, 0] the stacked score is the verifier's: the same hit either way,
        # told apart by the digest it carries.
        assert hit is not None and hit.score >= judge.threshold
        digest = judge.digest if expected == "scored" else judge.base_digest
        assert hit.source.verifier == digest
    finally:
        await c.close()
