"""``synapsectl cache tune-pair-scorer``: refusals, the stack on a constructed set, a real run.

The constructed set checks the stack's fitting rules without a model: a scorer that knows
something the verifier does not must raise recall at the target precision, the operating
point must reach the target on validation, and a pair under the floor is never accepted
(serving never sends it to the scorer). The real run trains on a small slice of the QQP dev
pairs and checks what a user relies on: both files load, the verifier's stack names the
scorer written, and the scorer scores as the file says.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pytest

from controlplane import calibrate, ctl, pair_scorer_fit
from controlplane.core import verifier
from synapse_common import pair_scorer, pair_scorer_model
from tests import dev_pairs


def write_pairs(path: pathlib.Path, rows: list[tuple[str, str, int]]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"text_a": a, "text_b": b, "label": y}) + "\n"
                            for a, b, y in rows))
    return path


def test_too_few_pairs_are_refused_with_the_reason(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "p.jsonl", [(f"q{i}", f"r{i}", i % 2) for i in range(300)])
    code = ctl.main(["cache", "tune-pair-scorer", "--pairs", str(pairs), "--scorer-out",
                     str(tmp_path / "s.npz"), "--verifier-out", str(tmp_path / "v.json")])
    assert code == 2
    assert "too few pairs: 300" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "v.json").exists()


def test_an_output_for_the_stack_is_required(tmp_path, capsys):
    code = ctl.main(["cache", "tune-pair-scorer", "--pairs", str(tmp_path / "p.jsonl"),
                     "--scorer-out", str(tmp_path / "s.npz")])
    assert code == 2
    assert "--stack-out" in capsys.readouterr().err


def test_the_shipped_stack_belongs_to_the_shipped_verifier_and_scorer():
    stacked = verifier.with_stack(verifier.load())
    assert stacked.stack is not None
    assert stacked.stack.pair_scorer == pair_scorer.peek_id(pair_scorer.SHIPPED)
    assert stacked.base_digest == verifier.load().digest


def test_an_output_for_the_scorer_is_required(tmp_path, capsys):
    code = ctl.main(["cache", "tune-pair-scorer", "--pairs", str(tmp_path / "p.jsonl"),
                     "--verifier-out", str(tmp_path / "v.json")])
    assert code == 2
    assert "--scorer-out" in capsys.readouterr().err


def test_batches_cover_every_item_once_with_alike_lengths():
    items = [("ab" if i % 2 else "ba", i) for i in range(1000)]
    got = pair_scorer_fit.batches(items, lambda o, i: i % 37, 32, np.random.default_rng(1))
    flat = [x for b in got for x in b]
    assert sorted(flat) == sorted(items)
    assert all(len(b) <= 32 for b in got)
    again = pair_scorer_fit.batches(items, lambda o, i: i % 37, 32, np.random.default_rng(1))
    assert got == again                                  # seeded: the same order
    spread = [max(i % 37 for _, i in b) - min(i % 37 for _, i in b) for b in got]
    assert np.median(spread) <= 2                       # lengths alike within a batch


def test_padded_rows_keep_ids_types_and_mask():
    enc = {"input_ids": [[101, 7, 102], [101, 8, 9, 102, 10, 102]],
           "token_type_ids": [[0, 0, 0], [0, 0, 0, 0, 1, 1]]}
    ids, mask, types = pair_scorer_fit.padded([enc, enc], [0, 1], pad=0)
    assert ids.tolist() == [[101, 7, 102, 0, 0, 0], [101, 8, 9, 102, 10, 102]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert types.tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]


def short_training(*argv: str) -> dict[str, np.ndarray]:
    """The arrays of a two-step training (16 pairs, batches of 8) with these options."""
    parser = argparse.ArgumentParser()
    pair_scorer_fit.add_arguments(parser)
    args = parser.parse_args(["--pairs", "-", "--epochs", "1", "--batch", "8", *argv])
    pairs = calibrate.Pairs([f"How do I learn topic {i}?" for i in range(16)],
                            [f"What is the best way to learn topic {i % 5}?" for i in range(16)],
                            (np.arange(16) % 5 == np.arange(16)).astype(np.int8))
    net = pair_scorer_fit.train(pairs, np.arange(16), args)
    layers, head_w, head_b = pair_scorer_model.trained_arrays(net, pair_scorer_fit.FROZEN)
    return {**layers, "head_weight": head_w, "head_bias": head_b}


def test_the_train_seed_changes_only_what_training_draws():
    # A second scorer for the same split (an ensemble, a noise estimate) must differ from
    # the first in its own draws (order, swaps, initial head, dropout) while --seed keeps
    # the split; without --train-seed, training is what it was.
    default = short_training()
    same = short_training("--train-seed", "7")
    other = short_training("--train-seed", "11")
    moved = short_training("--seed", "11")
    assert all(np.array_equal(default[k], same[k]) for k in default)
    assert not all(np.array_equal(default[k], other[k]) for k in default)
    assert all(np.array_equal(other[k], moved[k]) for k in other)   # the draws, nothing else


# -- the stack on a constructed set -------------------------------------------------------
def constructed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, verifier probabilities, scorer logits): the verifier ranks pairs fairly;
    the scorer separates the duplicates the verifier is unsure of."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int8)
    p = np.clip(0.35 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.001, 0.999)
    logits = 2.5 * (y - 0.5) + rng.normal(0, 0.8, n)
    return y, p, logits


@pytest.fixture
def stack_inputs():
    """Validation and held-out halves of a constructed set: no embedding, no model."""
    y, p, s = constructed(2000, 5)
    return (pair_scorer_fit.Scored(y[:1000], p[:1000], s[:1000]),
            pair_scorer_fit.Scored(y[1000:], p[1000:], s[1000:]))


def test_the_stack_raises_recall_at_the_target_precision(stack_inputs):
    validation, heldout = stack_inputs
    base = verifier.load()
    stacked, metrics = pair_scorer_fit.fit_stack(validation, heldout, base, "minilm+pair-x",
                                                 0.90)
    held, alone = metrics["heldout"], metrics["verifier_alone_heldout"]
    assert metrics["validation"]["precision"] >= 0.90
    assert held["recall"] > alone["recall"] + 0.1
    assert held["precision"] >= 0.85 and alone["precision"] >= 0.85
    stack = stacked.stack
    assert stack is not None and stack.pair_scorer == "minilm+pair-x"
    assert stack.threshold == pytest.approx(held["threshold"], abs=1e-6)
    assert stacked.digest != base.digest                 # the stack is part of the scoring
    assert stacked.base_digest == base.digest


def test_the_floor_spares_the_scorer_the_hopeless_pairs(stack_inputs):
    stacked, metrics = pair_scorer_fit.fit_stack(*stack_inputs, verifier.load(), "id", 0.90)
    stack = stacked.stack
    assert stack is not None and 0.0 < stack.floor < 1.0
    # Serving sends only the pairs at or above the floor: fewer than all of them, and the
    # held-out figures above are measured that way.
    assert 0.0 < metrics["sent_to_scorer_heldout"] < 1.0


def test_the_stacked_file_round_trips(stack_inputs, tmp_path):
    stacked, _ = pair_scorer_fit.fit_stack(*stack_inputs, verifier.load(), "id", 0.90)
    stacked.save(tmp_path / "v.json")
    back = verifier.load(tmp_path / "v.json")
    assert back.digest == stacked.digest
    assert back.stack is not None and stacked.stack is not None
    assert back.stack.to_json() == stacked.stack.to_json()


# -- a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run on the first 2,400 dev pairs: (pairs, scorer, verifier, stdout)."""
    folder = tmp_path_factory.mktemp("scorer")
    pairs = dev_pairs.first(tmp_path_factory, "slice.jsonl.gz", 2400)
    args = ["cache", "tune-pair-scorer", "--pairs", str(pairs), "--scorer-out",
            str(folder / "s.npz"), "--verifier-out", str(folder / "v.json"), "--stack-out",
            str(folder / "stack.json"), "--epochs", "1",
            "--max-train-pairs", "192", "--batch", "32", "--threads", "1"]
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = ctl.main(args)
    assert code == 0
    return pairs, folder / "s.npz", folder / "v.json", out.getvalue()


def test_the_stack_alone_goes_over_the_verifier_it_was_fitted_on_and_no_other(trained):
    _, _, verifier_path, _ = trained
    whole = verifier.load(verifier_path)
    stack_path = verifier_path.with_name("stack.json")
    over = verifier.with_stack(verifier.load(), stack_path)     # fitted on the shipped one
    assert over.digest == whole.digest and over.stack is not None and whole.stack is not None
    assert over.stack.to_json() == whole.stack.to_json()
    other = verifier.load(verifier.ANY_EMBEDDER_PATH)
    with pytest.raises(verifier.VerifierError, match="was fitted on verifier"):
        verifier.with_stack(other, stack_path)


def test_a_real_run_writes_a_scorer_and_the_verifier_stacked_on_it(trained):
    _, scorer_path, verifier_path, out = trained
    scorer = pair_scorer.load(scorer_path)
    assert scorer.meta["fit"]["train_pairs"] == 192
    assert "train_seed" not in scorer.meta["fit"]       # a default run's file, as before
    assert "embeddings.word_embeddings.weight" not in scorer.layers   # the installed MiniLM's
    model = verifier.load(verifier_path)
    assert model.stack is not None and model.stack.pair_scorer == scorer.scorer_id
    assert scorer.scorer_id in out and "verifier + scorer" in out
    # The file scores as the network it was written from, whichever text comes first.
    net = pair_scorer_model.build(scorer.layers, scorer.head_weight, scorer.head_bias).eval()
    tok = pair_scorer_model.tokenizer()
    ab = pair_scorer_model.logits(net, tok, ["How do I learn Python?"],
                                  ["Best way to learn Python?"])
    ba = pair_scorer_model.logits(net, tok, ["Best way to learn Python?"],
                                  ["How do I learn Python?"])
    assert np.isfinite(ab).all() and abs(float(ab[0]) - float(ba[0])) < 1e-4


def test_refitting_the_stack_keeps_the_scorer_and_gives_the_same_stack(trained, tmp_path,
                                                                       capsys):
    pairs, scorer_path, verifier_path, _ = trained
    before = scorer_path.read_bytes()
    assert ctl.main(["cache", "tune-pair-scorer", "--pairs", str(pairs), "--scorer",
                     str(scorer_path), "--verifier-out", str(tmp_path / "v2.json"),
                     "--threads", "1"]) == 0
    capsys.readouterr()
    assert scorer_path.read_bytes() == before
    a, b = verifier.load(verifier_path), verifier.load(tmp_path / "v2.json")
    assert a.stack is not None and b.stack is not None
    assert a.stack.to_json() == b.stack.to_json()


# -- transitive pairs ---------------------------------------------------------------------
def transitive_set() -> tuple[calibrate.Pairs, np.ndarray]:
    """Train rows: A~B, B~C, C!~D, D~E, F~G, G~H, F!~H (noisy); rows outside train: X~A
    and B!~Y (questions of another split, as if the split had put them apart)."""
    rows = [("A", "B", 1), ("B", "C", 1), ("C", "D", 0), ("D", "E", 1),
            ("F", "G", 1), ("G", "H", 1), ("F", "H", 0), ("X", "A", 1), ("B", "Y", 0)]
    return (calibrate.Pairs([a for a, _, _ in rows], [b for _, b, _ in rows],
                            np.asarray([y for _, _, y in rows], dtype=np.int8)),
            np.arange(7))


def test_transitive_pairs_follow_from_the_train_pairs_and_no_others():
    pairs, train = transitive_set()
    got = pair_scorer_fit.transitive_pairs(pairs, train, 100, seed=7)
    derived = {(a, b): int(y) for a, b, y in zip(got.text_a, got.text_b, got.label,
                                                 strict=True)}
    # A~B~C: A~C; {A,B,C} and {D,E} apart by C!~D: every pair across them is not a match,
    # C-D itself being labelled already. F, G, H disagree (F!~H): nothing from them.
    assert derived == {("A", "C"): 1,
                       ("A", "D"): 0, ("A", "E"): 0, ("B", "D"): 0, ("B", "E"): 0,
                       ("C", "E"): 0}
    assert not {"X", "Y"} & (set(got.text_a) | set(got.text_b))


def test_transitive_pairs_are_capped_by_a_seeded_sample():
    pairs, train = transitive_set()
    every = pair_scorer_fit.transitive_pairs(pairs, train, 100, seed=7)
    capped = pair_scorer_fit.transitive_pairs(pairs, train, 3, seed=7)
    assert len(capped) == 3
    every_set = set(zip(every.text_a, every.text_b, every.label.tolist(), strict=True))
    capped_set = set(zip(capped.text_a, capped.text_b, capped.label.tolist(), strict=True))
    assert capped_set <= every_set
    again = pair_scorer_fit.transitive_pairs(pairs, train, 3, seed=7)
    assert (again.text_a, again.text_b, again.label.tolist()) == (
        capped.text_a, capped.text_b, capped.label.tolist())     # the same seed, the same


def test_transitive_pairs_added_are_at_most_as_many_as_the_pairs_trained_on():
    pairs, train = transitive_set()
    rows = train[:3]                           # A~B, B~C, C!~D: 3 derivable, 3 allowed
    both, trained = pair_scorer_fit.with_transitive(pairs, rows, seed=7)
    assert both.text_a[:len(pairs)] == pairs.text_a        # the originals untouched
    assert trained[:3].tolist() == rows.tolist() and len(trained) == 6
    added = {(both.text_a[i], both.text_b[i], int(both.label[i])) for i in trained[3:]}
    assert added == {("A", "C", 1), ("A", "D", 0), ("B", "D", 0)}
    one = pair_scorer_fit.with_transitive(pairs, train[:2], seed=7)[1]   # 2 rows: A~C only
    assert len(one) == 3
