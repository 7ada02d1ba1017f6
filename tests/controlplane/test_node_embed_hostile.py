"""A compromised node's ``Node.Embed`` / ``Node.ScorePairs`` answers, through the control
plane's client and the cache's embedder adapter, against small real grpc.aio servers on
port 0: vectors that are not finite, not of unit length or not of the embedder's
dimension, and logits no cross-encoder gives, are refused like an agent's error (the
adapter goes on to another agent), with one warning naming the agent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from controlplane.adapters import embedder, node_embed
from controlplane.core import verifier
from controlplane.core.l2 import schema
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from tests.controlplane import node_testing
from tests.controlplane.l2.fakes import FakeStore

TOKEN = "hostile-node-test-token"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CLAIMED = "minilm-l6-v2@0.1.0"
SCORER = "minilm-l6-v2@0.1.0+pair-test"
BOUND = 50.0            # node_embed.MAX_PAIR_LOGIT: a cross-encoder's logits sit well inside
WIDE = 8_192            # past the L2 index's bound, within Node.Embed's
HUGE = 20_000           # over node_embed.MAX_EMBED_DIM


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def answer(mode: str, count: int) -> tuple[np.ndarray, str]:
    """(vectors, embedder id) a node in ``mode`` answers for ``count`` texts."""
    if mode == "nan":
        return np.full((count, 384), np.nan, np.float32), CLAIMED
    if mode == "inf":
        return np.full((count, 384), np.inf, np.float32), CLAIMED
    if mode == "dim1":
        return np.ones((count, 1), np.float32), CLAIMED
    if mode == "wide":                      # a large embedder a tenant may ask for
        return unit_rows(count, WIDE), "some-large-embedder@1"
    if mode == "huge":
        return unit_rows(count, HUGE), "something@1"
    if mode == "const":                     # finite, 384, but not normalised
        return np.ones((count, 384), np.float32), CLAIMED
    if mode == "zero":                      # the agent leaves a zero vector zero
        return np.zeros((count, 384), np.float32), CLAIMED
    if mode == "some-zero":                 # one text the embedder maps to zero
        rows = unit_rows(count, 384)
        rows[0] = 0.0
        return rows, CLAIMED
    if mode == "short":                     # one row neither zero nor of unit length
        rows = unit_rows(count, 384)
        rows[-1] *= 0.5
        return rows, CLAIMED
    if mode == "other-id-dim128":           # another name, the wrong size for MiniLM
        return unit_rows(count, 128), "BAAI/bge-small-en-v1.5@legit"
    if mode == "tuned-dim64":               # a tuned MiniLM id with the wrong size
        return unit_rows(count, 64), "minilm-l6-v2@0.1.0+tuned-abc"
    return unit_rows(count, 384, seed=count), CLAIMED


class Agent(node_pb2_grpc.NodeServicer):
    def __init__(self, mode: str = "ok", logit: float = 2.0) -> None:
        self.mode = mode
        self.logit = logit
        self.calls = 0

    async def Embed(self, request, context):
        self.calls += 1
        vectors, embedder_id = answer(self.mode, len(request.texts))
        return node_pb2.EmbedResponse(model=request.model, dim=vectors.shape[1],
                                      vectors=vectors.astype("<f4").tobytes(),
                                      embedder_id=embedder_id)

    async def ScorePairs(self, request, context):
        self.calls += 1
        return node_pb2.ScorePairsResponse(scores=[self.logit] * len(request.candidates),
                                           scorer_id=SCORER)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[str, Agent]]]]:
    async with node_testing.agents(Agent) as start:
        yield start


@pytest.mark.parametrize("mode,match", [
    ("nan", "not all finite"),
    ("inf", "not all finite"),
    ("dim1", "dimension 1, expected 384"),
    ("huge", f"dimension {HUGE}"),
    ("const", "not of unit length"),
    ("short", "not of unit length"),
    ("other-id-dim128", "dimension 128, expected 384"),
])
async def test_embed_answers_out_of_the_rules_are_refused(serve, caplog, mode, match):
    address, _ = await serve(mode)
    client = node_embed.NodeEmbedClient(TOKEN)
    with caplog.at_level(logging.WARNING, logger="synapse.controlplane.node_embed"):
        for _ in range(3):
            with pytest.raises(node_embed.EmbedError, match=match) as refused:
                await client.embed(address, MINILM, ["hello", "world"], 5.0, "acme")
    assert address not in str(refused.value)            # messages may reach a client
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and address in warnings[0]  # the log names the agent, once
    await client.close()


async def test_a_known_embedder_id_fixes_the_dimension_whatever_model_was_asked(serve):
    address, _ = await serve("tuned-dim64")
    client = node_embed.NodeEmbedClient(TOKEN)
    with pytest.raises(node_embed.EmbedError, match="dimension 64, expected 384"):
        await client.embed(address, "some-model", ["hello"], 5.0)
    await client.close()


async def test_honest_answers_pass_and_an_unknown_embedder_keeps_its_own_dimension(serve):
    address, _ = await serve("ok")
    client = node_embed.NodeEmbedClient(TOKEN)
    vectors, embedder_id = await client.embed(address, MINILM, ["a", "b", "c"], 5.0)
    assert vectors.shape == (3, 384) and embedder_id == CLAIMED
    other, _ = await serve("other-id-dim128")
    vectors, embedder_id = await client.embed(other, "BAAI/bge-small-en-v1.5", ["a"], 5.0)
    assert vectors.shape == (1, 128)                # a model not in KNOWN_DIMS: its own
    await client.close()


async def test_a_tenants_embedding_past_the_caches_bound_passes_the_node(serve):
    """Node.Embed's bound is for any embedder a tenant may ask of it; the L2 index's is
    for the ones a cache indexes: a vector between them is an answer, never a collection."""
    assert schema.MAX_INDEX_DIM < WIDE <= node_embed.MAX_EMBED_DIM
    address, _ = await serve("wide")
    client = node_embed.NodeEmbedClient(TOKEN)
    vectors, _ = await client.embed(address, "some-large-embedder", ["hello"], 5.0)
    assert vectors.shape == (1, WIDE)
    with pytest.raises(schema.DimensionError, match="outside"):
        schema.Schema(FakeStore(), "c").creatable([WIDE])
    await client.close()


@pytest.mark.parametrize("mode", ["zero", "some-zero"])
async def test_a_zero_vector_passes_as_the_agent_leaves_it(serve, mode):
    """The agent normalises every row but a zero one, which it leaves zero (there is no
    direction to keep); Node.Embed also serves tenants' /v1/embeddings, so a text an
    embedder maps to zero is an answer, not a refused node."""
    address, _ = await serve(mode)
    client = node_embed.NodeEmbedClient(TOKEN)
    vectors, _ = await client.embed(address, MINILM, ["hello", "world"], 5.0)
    assert vectors.shape == (2, 384) and not vectors[0].any()
    await client.close()


async def test_the_cache_adapter_goes_on_to_an_honest_agent(serve):
    hostile, bad = await serve("dim1")
    honest, _ = await serve("ok")
    client = embedder.NodeEmbedder(lambda: [hostile, honest], MINILM, timeout_s=5,
                                   token=TOKEN, cooldown_s=60)
    for _ in range(4):          # whichever agent comes first in the rotation
        result = await client.embed(["hello"], tenant="acme")
        assert result.vectors.shape == (1, 384) and result.address == honest
    assert bad.calls == 1, "a refused agent cools down as a failing one does"
    only_hostile = embedder.NodeEmbedder(lambda: [hostile], MINILM, timeout_s=5, token=TOKEN)
    with pytest.raises(embedder.EmbedUnavailable, match="answer refused"):
        await only_hostile.embed(["hello"])
    await client.close()
    await only_hostile.close()


@pytest.mark.parametrize("logit", [1e30, -1e30, BOUND + 1, float("nan"), float("inf")])
async def test_score_pairs_answers_beyond_any_logit_are_refused(serve, caplog, logit):
    address, _ = await serve(logit=logit)
    client = node_embed.NodeEmbedClient(TOKEN)
    with caplog.at_level(logging.WARNING, logger="synapse.controlplane.node_embed"):
        for _ in range(2):
            with pytest.raises(node_embed.EmbedError, match="not logits") as refused:
                await client.score_pairs(address, "q", ["a", "b"], 5.0, "acme")
    assert address not in str(refused.value)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    await client.close()


async def test_a_logit_at_the_bound_is_a_logit(serve):
    address, _ = await serve(logit=-BOUND)
    client = node_embed.NodeEmbedClient(TOKEN)
    assert await client.score_pairs(address, "q", ["a"], 5.0) == ([-BOUND], SCORER)
    assert node_embed.MAX_PAIR_LOGIT == verifier.MAX_PAIR_LOGIT == BOUND
    assert node_embed.MAX_EMBED_DIM < HUGE
    await client.close()


async def test_a_hostile_scorer_is_an_error_for_the_cache_not_a_time_out(serve):
    """The response cache counts ``EmbedUnavailable`` under ``outcome="error"`` and lets the
    verifier decide alone; a ``TimeoutError`` would count as a time-out."""
    hostile, _ = await serve(logit=1e30)
    client = embedder.NodeEmbedder(lambda: [hostile], MINILM, timeout_s=5, token=TOKEN)
    with pytest.raises(embedder.EmbedUnavailable, match="not logits") as failed:
        await client.score_pairs("q", ["a"], tenant="acme")
    assert not isinstance(failed.value, TimeoutError)
    honest, _ = await serve(logit=3.0)
    both = embedder.NodeEmbedder(lambda: [hostile, honest], MINILM, timeout_s=5, token=TOKEN)
    for _ in range(2):
        assert await both.score_pairs("q", ["a"]) == ([3.0], SCORER)
    await client.close()
    await both.close()


def test_the_stack_clamps_a_logit_to_the_bound_it_accepts():
    stack = verifier.load().stack or verifier.with_stack(verifier.load()).stack
    assert stack is not None
    p = [0.01, 0.5]
    bound = BOUND
    np.testing.assert_array_equal(stack.probabilities(p, [1e30, 1e30]),
                                  stack.probabilities(p, [bound, bound]))
    np.testing.assert_array_equal(stack.probabilities(p, [-np.inf, -1e30]),
                                  stack.probabilities(p, [-bound, -bound]))
    assert not stack.probabilities([0.5], [np.nan])[0] >= 0.0     # never at any cut


def test_the_agents_embedder_name_is_known():
    from synapse_common import embedder_tuning

    assert node_embed.KNOWN_DIMS[embedder_tuning.BASE_NAME] == 384


async def test_the_warning_comes_again_after_its_interval_and_per_agent(serve, caplog):
    first, _ = await serve("nan")
    second, _ = await serve("dim1")
    now = [0.0]
    client = node_embed.NodeEmbedClient(TOKEN, clock=lambda: now[0], warn_interval_s=60.0)

    async def refused(address: str) -> None:
        with pytest.raises(node_embed.EmbedError, match="answer refused"):
            await client.embed(address, MINILM, ["hello"], 5.0)

    with caplog.at_level(logging.WARNING, logger="synapse.controlplane.node_embed"):
        for address in (first, second, first, second):
            await refused(address)
        now[0] = 59.0
        await refused(first)
        now[0] = 60.0
        await refused(first)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [first in w for w in warned] == [True, False, True]
    await client.close()
