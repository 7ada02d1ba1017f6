"""The pair scorer in bfloat16 (:mod:`agent.embedding.pair_scorer_bf16`,
``embedder.pair_scorer_precision``): the rewritten forward computes the torch network's
logits; on a CPU with AMX-BF16 the bfloat16 path is used and stays within its tolerance
under the same scorer id; anywhere else, or when its check fails, the scorer stays
float32 and says why. These pass on any x86-64: what needs AMX is asserted where it is
there and its fallback where it is not.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from agent.config import EmbedderSettings
from agent.embedding import pair_scorer, pair_scorer_bf16
from synapse_common import pair_scorer as scorer_file
from synapse_common import pair_scorer_model

CFG = EmbedderSettings(kind="minilm", max_text_chars=2000, runtime="torch")
QUERY = "How do I lose 5 kg in a month?"
# Paraphrases, near misses, unrelated, unicode, and pairs truncated at max_len.
CANDIDATES = ["How can I lose five kilos in four weeks?", "How can I lose 15 kg in a month?",
              "What is the capital of France?", "été, naïve café — how do I lose weight?",
              " ".join(["what diet makes me lose weight fast"] * 30), "kg", QUERY]
HERE = pair_scorer_bf16.unsupported(pair_scorer_bf16.cpu_flags())  # None: AMX-BF16 here


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _float32(loaded: pair_scorer.Loaded) -> pair_scorer.Loaded:
    return pair_scorer.Loaded(loaded.file, loaded.model, loaded.tokenizer)


@pytest.mark.parametrize("which", ["shipped", "small"])
def test_the_rewritten_forward_gives_the_networks_logits_in_float32(which, small_scorer_path):
    path = scorer_file.SHIPPED if which == "shipped" else small_scorer_path
    loaded = pair_scorer.load(path)
    fast = pair_scorer_model.FastNetwork(loaded.model, torch.float32)
    for query, candidates in ((QUERY, CANDIDATES), (QUERY, CANDIDATES[:1]),
                              (CANDIDATES[4], [QUERY, *CANDIDATES[:3]])):
        got = pair_scorer_model.logits(fast, loaded.tokenizer, [query] * len(candidates),
                                       candidates, loaded.file.max_len)
        want = pair_scorer.score_blocking(loaded, query, candidates)
        assert got.dtype == np.float32 and got.shape == (len(candidates),)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lanes", [2, 3])
def test_rows_split_across_lanes_give_one_passs_logits(small_scorer_path, lanes):
    loaded = pair_scorer.load(small_scorer_path)
    fast = pair_scorer_model.FastNetwork(loaded.model, torch.float32)
    split = pair_scorer_bf16.Lanes(fast, lanes)
    try:
        for candidates in (CANDIDATES, CANDIDATES[:1], CANDIDATES[:2]):   # 14, 2, 4 rows
            n = len(candidates)
            got = pair_scorer_model.logits(split, loaded.tokenizer, [QUERY] * n, candidates,
                                           loaded.file.max_len)
            want = pair_scorer_model.logits(fast, loaded.tokenizer, [QUERY] * n, candidates,
                                            loaded.file.max_len)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finally:
        split.close()


def test_without_amx_the_scorer_stays_float32_and_says_why(small_scorer_path, caplog):
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer"):
        loaded = pair_scorer.load(small_scorer_path, "torch", "", "bfloat16",
                                  cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert loaded.runtime == "torch" and loaded.bf16 is None
    assert any("pair scorer in float32" in r.getMessage() and "no AMX-BF16" in r.getMessage()
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_is_bfloat16_where_amx_holds_and_float32_elsewhere(small_scorer_path, caplog):
    """``auto`` (a default for AMX machines): bfloat16 exactly where ``bfloat16`` would be
    used, else float32 with one quiet line naming the setting."""
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer"):
        plain = pair_scorer.load(small_scorer_path, "torch", "", "auto",
                                 cpu_flags=frozenset({"avx2", "avx512f"}))
    assert plain.runtime == "torch" and plain.bf16 is None
    assert any("pair_scorer_precision is auto" in r.getMessage()
               and "no AMX-BF16" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    here = pair_scorer.load(small_scorer_path, "torch", "", "auto")
    assert here.runtime == ("torch-bfloat16" if HERE is None else "torch"), HERE


def test_auto_is_the_default_and_float32_never_builds_the_bf16_network(small_scorer_path):
    assert EmbedderSettings().pair_scorer_precision == "auto"
    loaded = pair_scorer.load(small_scorer_path, "torch")
    assert loaded.runtime == "torch" and loaded.bf16 is None


def test_bfloat16_on_this_cpu_is_used_within_tolerance_or_refused(small_scorer_path):
    loaded = pair_scorer.load(small_scorer_path, "torch", "", "bfloat16")
    reference = _float32(loaded)
    got = pair_scorer.score_blocking(loaded, QUERY, CANDIDATES)
    want = pair_scorer.score_blocking(reference, QUERY, CANDIDATES)
    if HERE is None:
        assert loaded.runtime == "torch-bfloat16"
        np.testing.assert_allclose(got, want, rtol=0, atol=pair_scorer_bf16.TOLERANCE)
        assert not np.array_equal(got, want)    # really another precision
    else:
        assert loaded.runtime == "torch", HERE
        np.testing.assert_array_equal(got, want)


def test_a_failed_check_keeps_float32(small_scorer_path, monkeypatch, caplog):
    monkeypatch.setattr(pair_scorer_bf16, "TOLERANCE", -1.0)    # nothing can match
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer"):
        loaded = pair_scorer.load(small_scorer_path, "torch", "", "bfloat16",
                                  cpu_flags=frozenset({"amx_bf16"}))
    assert loaded.runtime == "torch"
    # where torch cannot use AMX, that is the reason (said quietly); where it can, the
    # check failed, which is worth a warning
    missing = pair_scorer_bf16.unsupported(frozenset({"amx_bf16"}))
    reason = missing or "bfloat16 logits differ from float32's"
    said = [r for r in caplog.records if reason in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == (logging.INFO if missing else logging.WARNING)


def test_warming_covers_every_size_of_two_pairs_per_lane():
    shapes = []
    pair_scorer_model.warm(lambda ids, mask, types: shapes.append(
        (tuple(ids.shape), tuple(mask.shape), tuple(types.shape))), 64)
    assert [s[0] for s in shapes] == [(2, n) for n in range(2, 129)]
    sizes = {rows * n for (rows, n), _, _ in shapes}    # oneDNN's shape: rows x tokens
    assert all(rows * n in sizes for rows in (2, 4) for n in range(2, 65))
    assert all(a == b == c for a, b, c in shapes)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert pair_scorer_bf16.cpu_flags(info) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert pair_scorer_bf16.cpu_flags(tmp_path / "missing") == frozenset()
    assert pair_scorer_bf16.unsupported(frozenset({"avx512_bf16"})) == "the CPU has no AMX-BF16"


async def test_the_agents_scorer_runs_the_configured_precision(small_scorer_path):
    cfg = CFG.model_copy(update={"pair_scorer": str(small_scorer_path),
                                 "pair_scorer_precision": "bfloat16"})
    scorer = pair_scorer.build(cfg)
    await scorer.start()
    try:
        scores, scorer_id = await scorer.score(QUERY, CANDIDATES)
        reference = pair_scorer.load(small_scorer_path)
        assert scorer_id == reference.scorer_id     # the stack reads them as its scorer's
        np.testing.assert_allclose(scores, pair_scorer.score_blocking(reference, QUERY,
                                                                      CANDIDATES),
                                   rtol=0, atol=pair_scorer_bf16.TOLERANCE)
    finally:
        await scorer.close()
