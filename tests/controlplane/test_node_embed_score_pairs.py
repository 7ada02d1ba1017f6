"""``Node.ScorePairs`` through the control plane's client and the cache's embedder adapter,
against small real grpc.aio servers on port 0 that answer as an agent would (a scorer, no
scorer, bad input, a slow or broken answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from controlplane import errors
from controlplane.adapters import embedder, node_embed
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from synapse_common import call_metadata
from tests.controlplane import node_testing

TOKEN = "score-pairs-test-token"
SCORER = "minilm-l6-ce@test"


class Agent(node_pb2_grpc.NodeServicer):
    """Scores a pair by its shared words; ``mode`` makes it answer otherwise."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.calls: list[tuple[str, list[str], str]] = []
        self.auth = call_metadata.TokenCheck(TOKEN)

    async def ScorePairs(self, request, context):
        if not self.auth.accepts(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        tenant = call_metadata.tenant_from(context.invocation_metadata())
        self.calls.append((request.query, list(request.candidates), tenant))
        if self.mode == "none":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pair scorer loaded")
        if self.mode == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty query")
        if self.mode == "large":
            context.set_trailing_metadata(((call_metadata.ERROR, call_metadata.TOO_LARGE),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text too long")
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "broken":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        words = set(request.query.lower().split())
        scores = [float(len(words & set(c.lower().split()))) for c in request.candidates]
        if self.mode == "short":
            scores = scores[:-1]
        return node_pb2.ScorePairsResponse(scores=scores, scorer_id=SCORER)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[str], Awaitable[tuple[str, Agent]]]]:
    async with node_testing.agents(Agent) as start:
        yield start


async def test_logits_and_scorer_id_with_token_and_tenant(serve):
    address, agent = await serve("ok")
    client = node_embed.NodeEmbedClient(TOKEN)
    logits, scorer = await client.score_pairs(address, "reset my password",
                                              ["reset password", "the sky"], 5.0, "acme")
    assert (logits, scorer) == ([2.0, 0.0], SCORER)
    assert agent.calls == [("reset my password", ["reset password", "the sky"], "acme")]
    await client.close()


@pytest.mark.parametrize("mode,error,match", [
    ("none", node_embed.NoScorer, "no pair scorer"),
    ("bad", errors.BadRequest, "cannot be scored"),
    ("large", errors.PayloadTooLarge, "pair scorer's limits"),
    ("broken", node_embed.EmbedError, "INTERNAL"),
    ("short", node_embed.EmbedError, "1 scores .* for 2 candidates"),
])
async def test_failures_map_through_the_one_table(serve, mode, error, match):
    address, _ = await serve(mode)
    client = node_embed.NodeEmbedClient(TOKEN)
    with pytest.raises(error, match=match) as raised:
        await client.score_pairs(address, "q", ["a", "b"], 5.0)
    assert address not in str(raised.value)       # messages may reach a client
    await client.close()


async def test_a_deadline_and_too_many_candidates(serve):
    address, _ = await serve("slow")
    client = node_embed.NodeEmbedClient(TOKEN)
    with pytest.raises(node_embed.EmbedError) as late:
        await client.score_pairs(address, "q", ["a"], 0.2)
    assert late.value.code == "DEADLINE_EXCEEDED"
    with pytest.raises(errors.BadRequest, match="between 1 and 16"):
        await client.score_pairs(address, "q", ["a"] * 17, 1.0)
    await client.close()


async def test_the_adapter_fails_over_to_an_agent_with_a_scorer(serve):
    none, lacking = await serve("none")
    broken, _ = await serve("broken")
    ok, agent = await serve("ok")
    client = embedder.NodeEmbedder(lambda: [none, broken, ok], "m", timeout_s=5,
                                   token=TOKEN)
    for _ in range(3):      # whichever agent comes first in the rotation
        assert await client.score_pairs("a b", ["a", "b c"], tenant="t") == ([1.0, 1.0],
                                                                             SCORER)
    # The agent without a scorer was asked once, then left alone for a while.
    assert len(lacking.calls) == 1 and len(agent.calls) == 3
    await client.close()


async def test_no_scorer_anywhere_is_an_answer_not_an_error(serve):
    first, a = await serve("none")
    second, b = await serve("none")
    now = [0.0]
    client = embedder.NodeEmbedder(lambda: [first, second], "m", timeout_s=5, token=TOKEN,
                                   clock=lambda: now[0], no_scorer_recheck_s=30.0)
    assert await client.score_pairs("q", ["a"]) == ([], "")
    assert await client.score_pairs("q", ["a"]) == ([], "")       # no call this time
    assert (len(a.calls), len(b.calls)) == (1, 1)
    now[0] = 31.0                                                # asked again later
    assert await client.score_pairs("q", ["a"]) == ([], "")
    assert (len(a.calls), len(b.calls)) == (2, 2)
    await client.close()


async def test_a_slow_or_broken_fleet_raises(serve):
    slow, _ = await serve("slow")
    client = embedder.NodeEmbedder(lambda: [slow], "m", timeout_s=0.3, token=TOKEN)
    with pytest.raises(embedder.ScoreTimeout):
        await client.score_pairs("q", ["a"])
    broken, _ = await serve("broken")
    other = embedder.NodeEmbedder(lambda: [broken], "m", timeout_s=5, token=TOKEN)
    with pytest.raises(embedder.EmbedUnavailable, match="ScorePairs failed") as failed:
        await other.score_pairs("q", ["a"])
    assert not isinstance(failed.value, TimeoutError)
    with pytest.raises(embedder.EmbedUnavailable, match="no ready agent"):
        await embedder.NodeEmbedder(lambda: [], "m").score_pairs("q", ["a"])
    await client.close()
    await other.close()
