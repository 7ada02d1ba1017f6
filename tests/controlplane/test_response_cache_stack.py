"""The semantic cache with a stacked verifier: the pair scorer's logits decide with the
verifier's probability when the scorer answers as the one the stack was fitted for, and
the verifier alone decides, at its own point, whenever it does not.

A real tiered cache (real agent Node.Embed with MiniLM, Milvus Lite, in-process L1); the
pair scorer is a fake behind its seam (``response_cache.PairScorer``) that answers with
the logits a test sets, names a scorer, fails, or hangs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from controlplane import cache_wiring
from controlplane import metrics as metrics_mod
from controlplane.adapters import embedder as embedder_mod
from controlplane.adapters import l1
from controlplane.core import response_cache, verifier
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import chat, counter, remember

node_address = support.node_address       # fixture: a real Node.Embed server

SCORER = "minilm-l6-ce@test"
STORED = "How can I lose 5 kg in a month?"
PARAPHRASE = "How do I lose 5 kg in one month?"        # the verifier alone accepts it
NEAR_MISS = "How can I lose 15 kg in a month?"         # the verifier alone refuses it


class FakeScorer:
    """Answers ``logits[text]`` (else -9: "no") per candidate as ``scorer_id``, or fails
    as told."""

    def __init__(self, logits: dict[str, float], scorer_id: str = SCORER,
                 mode: str = "ok") -> None:
        self.logits, self.scorer_id, self.mode = logits, scorer_id, mode
        self.calls: list[tuple[str, list[str], str]] = []

    async def score_pairs(self, query: str, candidates: Sequence[str],
                          timeout_s: float | None = None, tenant: str = ""
                          ) -> tuple[list[float], str]:
        self.calls.append((query, list(candidates), tenant))
        if self.mode == "hang":
            await asyncio.sleep(60)
        if self.mode == "error":
            raise RuntimeError("agent exploded")
        if self.mode == "none":
            return [], ""
        return [self.logits.get(c, -9.0) for c in candidates], self.scorer_id


def stacked(floor: float = 0.0) -> verifier.Verifier:
    """The shipped verifier with a stack that trusts the pair scorer alone: stacked =
    sigmoid(pair logit), accepted from 0.5."""
    data = json.loads(verifier.DEFAULT_PATH.read_text())
    data["stack"] = {"pair_scorer": SCORER, "weights": [0.0, 1.0], "bias": 0.0,
                     "floor": floor, "threshold": 0.5, "target_precision": 0.9,
                     "curve": [[0.5, 0.9, 0.4]]}
    return verifier.from_json(data)


class ForgetfulL1(l1.MemoryL1):
    """The in-process L1, except that the keys in ``gone`` read as evicted."""

    def __init__(self) -> None:
        super().__init__(1000, 10**7)
        self.gone: set[str] = set()

    async def get(self, tenant: str, model: str, key: str) -> bytes | None:
        return None if key in self.gone else await super().get(tenant, model, key)


async def build(node_address, milvus_path, judge, scorer, store=None, **options):
    m = metrics_mod.Metrics(CollectorRegistry())
    opts = response_cache.Options(**{"l1_budget_s": 0.5, "semantic_budget_s": 10.0,
                                     **options})
    cache = response_cache.TieredCache(
        options=opts, l1=l1.MemoryL1(1000, 10**7) if store is None else store, metrics=m,
        l2=cache_wiring.milvus_l2(milvus_path, "synapse_cache", flush_interval_s=0.2),
        embedder=embedder_mod.NodeEmbedder(lambda: [node_address], support.MODEL,
                                           timeout_s=10.0, token=support.AGENT_TOKEN),
        verifier_model=judge, pair_scorer=scorer)
    return cache, m


def outcome(m, name: str) -> float:
    return counter(m, "synapse_cache_pair_scorer_total", outcome=name)


async def test_the_stack_accepts_what_the_verifier_refuses_and_refuses_what_it_accepts(
        node_address, milvus_lite_path):
    judge = stacked()
    scorer = FakeScorer({STORED: 4.0})
    c, m = await build(node_address, milvus_lite_path, judge, scorer)
    try:
        await remember(c, chat(STORED), "Eat less, move more.")
        # The verifier alone refuses the near miss; the scorer vouches for it: a hit.
        scorer.logits = {STORED: 4.0}
        hit = (await c.lookup(chat(NEAR_MISS))).hit
        assert hit is not None and hit.layer == "semantic"
        assert hit.score == round(1 / (1 + 2.718281828459045 ** -4.0), 4)
        assert hit.similarity is not None and 0.5 < hit.similarity < 1.0
        assert hit.source is not None and hit.source.verifier == judge.digest
        assert scorer.calls[-1] == (NEAR_MISS, [STORED], "acme")
        # The verifier alone accepts the paraphrase; the scorer says no: a miss.
        scorer.logits = {STORED: -6.0}
        assert (await c.lookup(chat(PARAPHRASE))).status == "miss"
        assert outcome(m, "scored") == 2
    finally:
        await c.close()


def content(hit) -> str:
    assert hit is not None
    return str(hit.response["choices"][0]["message"]["content"])


FIFTEEN = "How could I lose 15 kilos in a month?"
ANSWERS = {STORED: "five", NEAR_MISS: "fifteen"}


async def test_the_verifiers_favourite_is_scored_first_and_alone(node_address,
                                                                milvus_lite_path):
    scorer = FakeScorer({})
    c, m = await build(node_address, milvus_lite_path, stacked(), scorer)
    try:
        for text, answer in ANSWERS.items():
            await remember(c, chat(text), answer)
        scorer.calls.clear()
        before = outcome(m, "scored")
        # Both would be accepted: the favourite alone is scored, and served.
        scorer.logits = {STORED: 3.0, NEAR_MISS: 3.0}
        assert content((await c.lookup(chat(FIFTEEN))).hit) in ANSWERS.values()
        [(_, [favourite], _)] = scorer.calls
        other = next(t for t in ANSWERS if t != favourite)
        assert content((await c.lookup(chat(FIFTEEN))).hit) == ANSWERS[favourite]
        # The stack refuses the favourite: the rest are scored, in one more call.
        scorer.calls.clear()
        scorer.logits = {favourite: -9.0, other: 3.0}
        assert content((await c.lookup(chat(FIFTEEN))).hit) == ANSWERS[other]
        assert [call[1] for call in scorer.calls] == [[favourite], [other]]
        # It refuses both: a miss after the same two calls.
        scorer.calls.clear()
        scorer.logits = {}
        assert (await c.lookup(chat(FIFTEEN))).status == "miss"
        assert [call[1] for call in scorer.calls] == [[favourite], [other]]
        assert outcome(m, "scored") - before == 6       # counted per call
    finally:
        await c.close()


async def test_a_stacked_hit_is_one_the_batched_search_could_serve(node_address,
                                                                  milvus_lite_path):
    """Whatever the logits, the two-step search hits exactly when some candidate's
    stacked probability reaches the operating point, and serves such a candidate."""
    scorer = FakeScorer({})
    judge = stacked()
    c, _ = await build(node_address, milvus_lite_path, judge, scorer)
    try:
        for text, answer in ANSWERS.items():
            await remember(c, chat(text), answer)
        scorer.calls.clear()
        cut = judge.stack_threshold_for(0.9)
        for a, b in [(-9.0, -9.0), (-9.0, 0.5), (0.5, -9.0), (0.5, 2.0), (2.0, 0.5),
                     (-0.1, 0.1), (0.0, 0.0)]:
            scorer.logits = {STORED: a, NEAR_MISS: b}
            accepted = {ANSWERS[t] for t, x in scorer.logits.items()
                        if judge.stacked([0.5], [x])[0] >= cut}
            decision = await c.lookup(chat(FIFTEEN))
            if accepted:
                assert content(decision.hit) in accepted, (a, b)
            else:
                assert decision.status == "miss", (a, b)
    finally:
        await c.close()


class FailsWithout(FakeScorer):
    """Fails every call that does not score ``needed``."""

    def __init__(self, logits: dict[str, float], needed: str) -> None:
        super().__init__(logits)
        self.needed = needed

    async def score_pairs(self, query: str, candidates: Sequence[str],
                          timeout_s: float | None = None, tenant: str = ""
                          ) -> tuple[list[float], str]:
        if self.needed not in candidates:
            self.calls.append((query, list(candidates), tenant))
            raise RuntimeError("agent exploded")
        return await super().score_pairs(query, candidates, timeout_s, tenant)


async def test_when_the_second_call_fails_the_refused_favourite_is_not_served(
        node_address, milvus_lite_path):
    scorer = FailsWithout({STORED: -9.0, NEAR_MISS: 9.0}, needed=STORED)
    judge = stacked()
    c, m = await build(node_address, milvus_lite_path, judge, scorer)
    try:
        for text, answer in ANSWERS.items():
            await remember(c, chat(text), answer)
        scorer.calls.clear()
        # The verifier alone would accept the paraphrase of STORED, its favourite; the
        # stack refused it, and the verifier alone refuses the near miss: a miss.
        assert (await c.lookup(chat(PARAPHRASE))).status == "miss"
        assert [call[1] for call in scorer.calls] == [[STORED], [NEAR_MISS]]
        assert outcome(m, "error") == 1
    finally:
        await c.close()


@pytest.mark.parametrize("scorer,name", [
    (FakeScorer({STORED: 9.0}, mode="none"), "unavailable"),
    (FakeScorer({STORED: 9.0}, scorer_id="another-scorer@2"), "mismatch"),
    (FakeScorer({STORED: 9.0}, mode="error"), "error"),
    (FakeScorer({STORED: 9.0}, mode="hang"), "timeout"),
    (None, "unavailable"),      # an embedder without a pair scorer
])
async def test_without_the_stacks_scorer_the_verifier_alone_decides(
        node_address, milvus_lite_path, scorer, name):
    judge = stacked()
    c, m = await build(node_address, milvus_lite_path, judge, scorer, semantic_budget_s=3.0)
    try:
        await remember(c, chat(STORED), "Eat less, move more.")
        # The scorer would vouch for the near miss: the verifier alone refuses it.
        assert (await c.lookup(chat(NEAR_MISS))).status == "miss"
        # The paraphrase the verifier accepts is a hit with the verifier's own score and
        # the digest of the verifier alone (feedback keeps the two scores apart).
        decision = await c.lookup(chat(PARAPHRASE))
        assert decision.status == "hit-semantic", decision
        hit = decision.hit
        assert hit.score >= judge.threshold_for(0.9) and hit.score < 0.9999
        assert hit.source.verifier == judge.base_digest != judge.digest
        assert outcome(m, name) == 2 and outcome(m, "scored") == 0
        assert counter(m, "synapse_cache_errors_total", layer="semantic") == 0
    finally:
        await c.close()


async def test_no_call_when_no_candidate_reaches_the_floor(node_address, milvus_lite_path):
    scorer = FakeScorer({STORED: -9.0})
    judge = stacked(floor=1.0)
    c, m = await build(node_address, milvus_lite_path, judge, scorer)
    try:
        await remember(c, chat(STORED), "Eat less, move more.")
        hit = (await c.lookup(chat(PARAPHRASE))).hit         # the verifier alone accepts
        assert hit is not None and hit.source.verifier == judge.base_digest
        assert (await c.lookup(chat(NEAR_MISS))).status == "miss"
        assert scorer.calls == [] and outcome(m, "skipped") == 2
    finally:
        await c.close()


async def test_without_a_stack_the_scorer_is_never_asked(node_address, milvus_lite_path):
    scorer = FakeScorer({STORED: -9.0})
    shipped = verifier.load()
    c, m = await build(node_address, milvus_lite_path, shipped, scorer)
    try:
        await remember(c, chat(STORED), "Eat less, move more.")
        hit = (await c.lookup(chat(PARAPHRASE))).hit
        assert hit is not None and hit.source.verifier == shipped.digest
        assert (await c.lookup(chat(NEAR_MISS))).status == "miss"
        assert scorer.calls == []
        assert sum(outcome(m, o) for o in ("scored", "skipped", "unavailable")) == 0
    finally:
        await c.close()


async def test_a_chosen_entry_gone_from_l1_falls_to_the_next_accepted(node_address,
                                                                     milvus_lite_path):
    scorer = FakeScorer({})
    store = ForgetfulL1()
    c, _ = await build(node_address, milvus_lite_path, stacked(), scorer, store=store)
    try:
        keys = {text: (await remember(c, chat(text), answer)).exact_key
                for text, answer in ANSWERS.items()}
        scorer.calls.clear()
        scorer.logits = {STORED: 5.0, NEAR_MISS: 3.0}
        assert content((await c.lookup(chat(FIFTEEN))).hit)
        [(_, [favourite], _)] = scorer.calls
        other = next(t for t in ANSWERS if t != favourite)
        store.gone.add(keys[favourite])     # the favourite's response was evicted
        scorer.calls.clear()
        assert content((await c.lookup(chat(FIFTEEN))).hit) == ANSWERS[other]
        assert [call[1] for call in scorer.calls] == [[favourite], [other]]
    finally:
        await c.close()
