"""The pair scorer (:mod:`agent.embedding.pair_scorer`) on the real all-MiniLM-L6-v2, and
``Node.ScorePairs`` over real gRPC.

The scorer file is made here from the installed base weights (the top layer, so loading
puts layers in) and the fresh, untrained head the fitting starts from: its scores mean
nothing, but they are the network's, finite, symmetric and repeatable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from agent import node_service
from agent.config import EmbedderSettings
from agent.embedding import errors, pair_scorer
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from synapse_common import embedder_tuning
from synapse_common import pair_scorer as scorer_file
from tests import node_auth

CFG = EmbedderSettings(kind="minilm", max_text_chars=200)
QUERY = "How do I lose 5 kg in a month?"
OTHER = "What is the capital of France?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(small_scorer_path: pathlib.Path) -> pair_scorer.Loaded:
    return pair_scorer.load(small_scorer_path)


@pytest.fixture
def scorer(loaded: pair_scorer.Loaded, small_scorer_path: pathlib.Path) -> pair_scorer.PairScorer:
    return pair_scorer.PairScorer(CFG, small_scorer_path, loaded=loaded)


async def _serve(scorer: pair_scorer.PairScorer | None
                 ) -> tuple[node_service.NodeServer, list[str]]:
    observed: list[str] = []
    server = node_service.NodeServer(None, "127.0.0.1", 0, token=node_auth.TOKEN,
                                     scorer=scorer,
                                     observe_scores=lambda code, s: observed.append(code))
    await server.start(embedder_ready=False)
    return server, observed


@pytest.fixture
async def node(scorer: pair_scorer.PairScorer
               ) -> AsyncIterator[tuple[node_pb2_grpc.NodeStub, list[str]]]:
    server, observed = await _serve(scorer)
    async with node_auth.aio_channel(f"127.0.0.1:{server.port}") as channel:
        yield node_pb2_grpc.NodeStub(channel), observed
    await server.stop(0)


async def _refusal(stub: node_pb2_grpc.NodeStub, query: str, candidates: list[str]
                   ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ScorePairs(node_pb2.ScorePairsRequest(query=query, candidates=candidates),
                              timeout=30)
    return info.value


# -- the scorer ------------------------------------------------------------------------

async def test_scores_are_finite_symmetric_and_repeatable(scorer, loaded):
    scores, scorer_id = await scorer.score(QUERY, [QUERY, OTHER])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert np.all(np.isfinite(scores))
    assert scorer_id == loaded.file.scorer_id and scorer_id.startswith(
        embedder_tuning.base_id() + "+pair-")
    again, _ = await scorer.score(QUERY, [QUERY, OTHER])
    np.testing.assert_array_equal(again, scores)
    # both orders are averaged: which text is the query does not matter
    forward, _ = await scorer.score(QUERY, [OTHER])
    backward, _ = await scorer.score(OTHER, [QUERY])
    np.testing.assert_allclose(forward, backward, atol=1e-5)
    np.testing.assert_allclose(forward, scores[1:], atol=1e-5)   # alone or in a batch


async def test_scores_are_the_averaged_logits_of_the_network(scorer, loaded):
    candidates = [OTHER, "How can I lose five kilos in four weeks?"]
    scores, _ = await scorer.score(QUERY, candidates)
    tok, net = loaded.tokenizer, loaded.model
    for candidate, score in zip(candidates, scores, strict=True):
        logits = []
        for a, b in ((QUERY, candidate), (candidate, QUERY)):
            enc = tok([a], [b], truncation="longest_first", max_length=64,
                      return_tensors="pt")
            with torch.inference_mode():
                logits.append(float(net(enc["input_ids"], enc["attention_mask"],
                                        enc["token_type_ids"])[0]))
        assert score == pytest.approx(sum(logits) / 2, abs=1e-5)


@pytest.mark.parametrize(("query", "candidates", "words"), [
    ("", ["a"], "query is empty"),
    ("q", [], "candidates is empty"),
    ("q", ["a"] * 17, "17 candidates; at most 16"),
    ("q", ["a", ""], "candidates[1] is empty"),
    ("q" * 201, ["a"], "query has 201 characters; at most 200"),
    ("q", ["a", "b" * 201], "candidates[1] has 201 characters"),
])
async def test_bad_input_names_the_field(scorer, query, candidates, words):
    with pytest.raises(errors.InvalidInput) as info:
        await scorer.score(query, candidates)
    assert words in str(info.value)


async def test_a_file_for_other_base_weights_leaves_the_scorer_unavailable(tmp_path, caplog):
    path = tmp_path / "other.npz"
    scorer_file.save(path, "minilm-l6-v2@0.0.1", {}, np.ones((1, 384)), np.zeros(1),
                     {"max_len": 64, "pooling": "mean"})
    scorer = pair_scorer.PairScorer(CFG, path)
    with caplog.at_level(logging.ERROR):
        await scorer.start()
        await scorer.start()
    assert not scorer.ready
    with pytest.raises(pair_scorer.ScorerUnavailable) as info:
        await scorer.score("q", ["a"])
    assert str(path) in str(info.value) and "fitted on minilm-l6-v2@0.0.1" in str(info.value)
    assert len([r for r in caplog.records if "pair scorer unavailable" in r.message]) == 1


async def test_an_unreadable_file_leaves_the_scorer_unavailable(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"\x00" * 64)
    scorer = pair_scorer.PairScorer(CFG, path)
    await scorer.start()
    with pytest.raises(pair_scorer.ScorerUnavailable, match="is not a synapse-pair-scorer"):
        await scorer.score("q", ["a"])


def test_build_says_why_there_is_no_scorer(tmp_path):
    none = pair_scorer.build(CFG.model_copy(update={"pair_scorer": "none"}))
    tei = pair_scorer.build(EmbedderSettings(kind="tei", tei_url="http://tei:80"))
    given = pair_scorer.build(CFG.model_copy(update={"pair_scorer": str(tmp_path / "x.npz")}))
    assert "embedder.pair_scorer: none" in str(none.unavailable())
    assert "embedder.kind: minilm" in str(tei.unavailable())
    assert not given.ready and "loading" in str(given.unavailable())
    assert EmbedderSettings().pair_scorer == "shipped"  # control planes stack it by default


# -- Node.ScorePairs -------------------------------------------------------------------

async def test_score_pairs_answers_with_the_scorer_logits(node, scorer):
    stub, observed = node
    resp = await stub.ScorePairs(node_pb2.ScorePairsRequest(query=QUERY,
                                                            candidates=[QUERY, OTHER]),
                                 timeout=60)
    expected, scorer_id = await scorer.score(QUERY, [QUERY, OTHER])
    assert resp.scorer_id == scorer_id
    np.testing.assert_array_equal(np.asarray(resp.scores, np.float32), expected)
    assert observed == ["OK"]


async def test_score_pairs_needs_the_agent_token(scorer):
    server, observed = await _serve(scorer)
    address = f"127.0.0.1:{server.port}"
    try:
        for channel in (grpc.aio.insecure_channel(address),
                        node_auth.aio_channel(address, token="sk-not-the-token")):
            async with channel:
                err = await _refusal(node_pb2_grpc.NodeStub(channel), QUERY, [OTHER])
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # refused before the servicer ran, and counted as ScorePairs calls (not Embed)
        assert observed == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    finally:
        await server.stop(0)


async def test_score_pairs_refuses_bad_input_naming_the_field(node):
    stub, observed = node
    cases = [("", ["a"], "query is empty"), ("q", [], "candidates is empty"),
             ("q", ["a"] * 17, "at most 16"), ("q", ["a", "x" * 201], "candidates[1]")]
    for query, candidates, words in cases:
        err = await _refusal(stub, query, candidates)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details()
    assert observed == ["INVALID_ARGUMENT"] * len(cases)


async def test_score_pairs_without_a_scorer_is_failed_precondition():
    server, _ = await _serve(pair_scorer.build(CFG.model_copy(update={"pair_scorer": "none"})))
    try:
        async with node_auth.aio_channel(f"127.0.0.1:{server.port}") as channel:
            err = await _refusal(node_pb2_grpc.NodeStub(channel), QUERY, [OTHER])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "embedder.pair_scorer: none" in err.details()
    finally:
        await server.stop(0)


class _FailingTokenizer:
    def __call__(self, first: list[str], second: list[str], **kwargs: object) -> object:
        raise ValueError(f"cannot tokenize {first[0]!r}")


async def test_an_internal_failure_is_internal_and_never_logs_the_texts(loaded, caplog):
    broken = pair_scorer.Loaded(loaded.file, loaded.model, _FailingTokenizer())
    server, observed = await _serve(pair_scorer.PairScorer(CFG, None, loaded=broken))
    try:
        async with node_auth.aio_channel(f"127.0.0.1:{server.port}") as channel:
            with caplog.at_level(logging.DEBUG):
                err = await _refusal(node_pb2_grpc.NodeStub(channel), "secret query", ["a"])
        assert err.code() == grpc.StatusCode.INTERNAL
        assert err.details() == "internal error while scoring pairs"
        assert "ScorePairs failed: ValueError" in caplog.text
        assert "secret query" not in caplog.text
        assert observed == ["INTERNAL"]
    finally:
        await server.stop(0)


class _GatedNetwork:
    """A stand-in network whose passes each wait for the test to open its gate."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.passes = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self._count = threading.Lock()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor
                 ) -> torch.Tensor:
        with self._count:
            self.inside += 1
            self.passes += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.set()
        self.gate.wait()
        with self._count:
            self.inside -= 1
        return torch.zeros(ids.shape[0])


class _StubTokenizer:
    def __call__(self, first: list[str], second: list[str], **kwargs: object
                 ) -> dict[str, torch.Tensor]:
        ids = torch.zeros((len(first), 4), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}


class _CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(4)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_a_cancelled_call_keeps_the_next_one_waiting_until_its_thread_ends(
        small_scorer_path):
    executor = _CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    net = _GatedNetwork()
    loaded = pair_scorer.Loaded(scorer_file.load(small_scorer_path), net, _StubTokenizer())
    scorer = pair_scorer.PairScorer(CFG, None, loaded=loaded)
    try:
        await _cancel_mid_run(scorer, net, executor)
    finally:
        net.gate.set()  # never leave a thread behind, whatever failed


async def _cancel_mid_run(scorer: pair_scorer.PairScorer, net: _GatedNetwork,
                          executor: _CountingExecutor) -> None:
    first = asyncio.create_task(scorer.score(QUERY, [OTHER]))
    await asyncio.to_thread(net.entered.wait)  # its thread is in the network
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    started = executor.submitted
    given_up = asyncio.create_task(scorer.score(QUERY, ["never scored"]))
    second = asyncio.create_task(scorer.score(QUERY, [OTHER]))
    for _ in range(10):
        await asyncio.sleep(0)
    given_up.cancel()  # it gave up while waiting: its work never starts
    for _ in range(10):
        await asyncio.sleep(0)
    assert executor.submitted == started  # no thread for either while the first runs
    net.gate.set()  # the abandoned thread ends; only now the next call runs
    scores, _ = await asyncio.wait_for(second, 30)
    assert scores.tolist() == [0.0]
    assert given_up.cancelled() and net.passes == 2 and net.most_inside == 1


def test_long_texts_are_read_only_as_far_as_a_pair_reaches(loaded, monkeypatch):
    """The fast tokenizer builds every overflowing piece of both texts before truncating a
    pair, in time and memory growing with the square of their length: one ScorePairs call
    with two 32,768-character texts took gigabytes (probe finding). Each text is cut to
    what a pair can read first, which changes no token of a real text."""
    from synapse_common import pair_scorer_model
    seen: list[int] = []
    tok = loaded.tokenizer

    def measured(a, b, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(len(t) for t in [*a, *b])
        return tok(a, b, **kwargs)
    long_a = " ".join(["weight loss plan for a month"] * 2000)
    long_b = " ".join(["capital cities of europe"] * 2000)
    cut = pair_scorer_model.MAX_LEN * pair_scorer_model.CHARS_PER_TOKEN
    got = pair_scorer_model.logits(loaded.model, measured, [long_a], [long_b])
    assert max(seen) == cut
    whole = tok([long_a], [long_b], truncation="longest_first", max_length=64)
    part = tok([long_a[:cut]], [long_b[:cut]], truncation="longest_first", max_length=64)
    assert whole["input_ids"] == part["input_ids"]      # the same tokens reach the network
    assert np.all(np.isfinite(got))
