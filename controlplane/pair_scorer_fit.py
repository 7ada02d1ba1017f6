"""``synapsectl cache tune-pair-scorer --pairs FILE``: a pair scorer and its stack on the verifier.

The verifier judges a cached candidate from the two embeddings and lexical guards; the
pair scorer (:mod:`synapse_common.pair_scorer_model`, a cross-encoder the agents run over
``Node.ScorePairs``) reads both texts together. This command trains the scorer on
labelled pairs and fits how the two are combined, writing two files: the scorer
(``--scorer-out``, npz, :mod:`synapse_common.pair_scorer`; agents load it with
``embedder.pair_scorer``) and the verifier with its ``stack`` section (``--verifier-out``;
control planes load it with ``cache.verifier_path``) or the stack alone (``--stack-out``,
naming the verifier it was fitted on: the shipped form, which ``cache.pair_scorer`` puts
over the shipped verifier). ``make pair-scorer`` builds the shipped pair from the QQP dev
pairs.

Design decisions (the measured comparison is ``bench/semantic_cache.py --heldout``'s):

- **Splits**: ``calibrate``'s question-disjoint split (same seed). The scorer learns on
  train, where the verifier's trees learnt too; the stack (a logistic regression over the
  verifier's logit and the scorer's) and its operating point are fitted on validation,
  which neither saw; the report is on the held-out split.
- **What is trained**: every transformer parameter but the word embeddings, which stay
  the installed MiniLM's (half the parameters; the file is smaller, and training faster
  for it), plus the head. Stored in float16.
- **Recipe**: AdamW (lr ``--lr``, weight decay 0.01 except biases and LayerNorms),
  linear warm-up over 6 % of the steps then linear decay, gradient norm clipped at 1,
  binary cross-entropy on the logit, batches of similar lengths. Each epoch shows every
  pair once, in one order: a seeded half are swapped in even epochs and the other half
  in odd ones, so two epochs show both orders of every pair. Three epochs at ``4e-5``
  (the defaults) beat two at ``3e-5`` on the validation split, in the scorer's AUC and in
  the stack's recall at its operating point (README, "pair scorer").
- **Transitive pairs** (``--transitive``, off by default): label 1 means "same meaning",
  so within a group of train questions joined by positive pairs every pair is positive,
  and a negative pair between two such groups makes every pair across them negative.
  Those derived pairs (not already labelled) are added to the training pairs only, at
  most as many as the original training pairs (a seeded sample when there are more).
  They never reach validation or held-out questions: they are drawn among the rows
  trained on, and the split keeps every connected group of texts in one part. A group
  with a negative pair inside it (noisy labels) derives nothing. Not used for the
  shipped scorer: on the QQP dev pairs (seed 7, 3 epochs at 4e-5, 2026-12-06) it adds
  4,470 pairs (3,044 positive) to 35,506, and on the validation split the scorer's AUC
  fell (0.9160 against 0.9182 without) while the stack's recall at its own point rose
  within noise (0.364 against 0.357; the difference's 95 % interval over resampled
  question groups -0.004 to +0.018).
- **Refusals**: the same as ``tune-embedder`` (too few pairs, too one-sided, a split part
  without enough of each label), before any work.
- Reproducible from ``--seed`` on the same software and thread count: ``torch`` runs with
  ``--threads`` threads (2 by default) and every random draw is seeded.
- **A second scorer for the same split** (``--train-seed``): it reseeds training's own
  draws only (the order, the swapped halves, the head's initial values, dropout), while
  the split, the training sample and the derived pairs stay ``--seed``'s; unset, it is
  ``--seed``, and a run's file is what it was before the option existed. Two scorers
  trained alike differ only by that noise, which is what an ensemble of them, or an
  estimate of how much a retrain moves the figures, needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from controlplane import calibrate, progress, tune_embedder
from controlplane.core import verifier
from synapse_common import cli_numbers, embedder_tuning, pair_scorer, pair_scorer_model

FROZEN = ("embeddings.word_embeddings.weight", "pooler.dense.weight", "pooler.dense.bias")
STACK_FLOOR_QUANTILE = 0.01   # of the verifier's scores among stacked acceptances
MAX_THREADS = 4096     # torch threads: more than any machine it runs on has cores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True,
                        help='JSONL(.gz) of {"text_a", "text_b", "label": 0|1}')
    parser.add_argument("--scorer-out", help="pair scorer (.npz) to write (unless --scorer)")
    parser.add_argument("--scorer", default=None, metavar="NPZ",
                        help="keep this pair scorer; refit only the stack")
    parser.add_argument("--verifier", default=str(verifier.DEFAULT_PATH),
                        help="the verifier to stack on (default: the shipped one)")
    parser.add_argument("--verifier-out", default=None,
                        help="the verifier with its stack section (JSON) to write: for "
                        "cache.verifier_path")
    parser.add_argument("--stack-out", default=None,
                        help="the stack alone (JSON naming the verifier it was fitted on) to "
                        "write: the shipped form, controlplane/core/verifier_default_stack.json "
                        "over the shipped verifier (cache.pair_scorer)")
    parser.add_argument("--seed", type=cli_numbers.seed(), default=7,
                        help="split, order and initial values")
    parser.add_argument("--train-seed", type=cli_numbers.seed(), default=None,
                        help="training order, initial values and dropout only (default: "
                        "--seed); the split stays --seed's")
    parser.add_argument("--epochs", type=cli_numbers.count(1), default=3)
    parser.add_argument("--batch", type=cli_numbers.count(1), default=32,
                        help="pairs per training step")
    parser.add_argument("--lr", type=cli_numbers.number(0, 1, low_open=True), default=4e-5)
    parser.add_argument("--threads", type=cli_numbers.integer(1, MAX_THREADS), default=2,
                        help="torch threads")
    parser.add_argument("--max-train-pairs", type=cli_numbers.count(), default=0,
                        help="train on at most this many train pairs, a seeded sample (0: "
                        "all; for a quick trial)")
    parser.add_argument("--transitive", action="store_true",
                        help="also train on the pairs the train pairs imply (A~B and B~C: "
                        "A~C; A~B and B!~C: A!~C), at most as many as the originals")
    parser.add_argument("--target-precision", type=calibrate.PRECISION, default=0.90)
    parser.add_argument("--embed-cache", default=None,
                        help="reuse the verifier's embeddings from / save them to this .npz")


def run(args: argparse.Namespace) -> int:
    if not (args.scorer_out or args.scorer):
        print("tune-pair-scorer: --scorer-out FILE is required (or --scorer NPZ)",
              file=sys.stderr)
        return 2
    if not (args.verifier_out or args.stack_out):
        print("tune-pair-scorer: --verifier-out FILE or --stack-out FILE is required",
              file=sys.stderr)
        return 2
    try:
        pairs = calibrate.read_pairs(args.pairs)
        split = calibrate.split(pairs, args.seed)
        reasons = tune_embedder.refusals(pairs, split)
        if reasons:
            raise tune_embedder.Refused("; ".join(reasons))
        base = verifier.load(args.verifier)
        import torch
        torch.set_num_threads(args.threads)
        if args.scorer:
            scorer = pair_scorer.load(args.scorer)
            net = pair_scorer_model.build(scorer.layers, scorer.head_weight, scorer.head_bias)
        else:
            rows = split["train"]
            if 0 < args.max_train_pairs < len(rows):
                rows = np.sort(np.random.default_rng(args.seed).choice(
                    rows, args.max_train_pairs, replace=False))
            originals = len(rows)
            training, rows = (with_transitive(pairs, rows, args.seed) if args.transitive
                              else (pairs, rows))
            net = train(training, rows, args)
            layers, head_w, head_b = pair_scorer_model.trained_arrays(net, FROZEN)
            fit: dict[str, Any] = {"pairs_file": str(args.pairs).rsplit("/", 1)[-1],
                                   "seed": args.seed, "epochs": args.epochs,
                                   "batch": args.batch, "lr": args.lr,
                                   "train_pairs": originals}
            if args.transitive:     # only then: a default run's file stays as before
                fit["derived_pairs"] = len(rows) - originals
            if train_seed(args) != args.seed:                # likewise
                fit["train_seed"] = train_seed(args)
            meta = {"max_len": pair_scorer_model.MAX_LEN, "pooling": "mean", "fit": fit}
            pair_scorer.save(args.scorer_out, embedder_tuning.base_id(), layers, head_w,
                             head_b, meta)
            scorer = pair_scorer.load(args.scorer_out)   # as the agents will: float16
            net = pair_scorer_model.build(scorer.layers, scorer.head_weight, scorer.head_bias)
        net.eval()
        validation, heldout = score_splits(pairs, split, base, net, args.embed_cache)
        stacked, metrics = fit_stack(validation, heldout, base, scorer.scorer_id,
                                     args.target_precision)
    except (calibrate.PairsError, tune_embedder.Refused, verifier.VerifierError,
            pair_scorer.PairScorerError, embedder_tuning.TuningError) as exc:
        print(f"tune-pair-scorer: {exc}", file=sys.stderr)
        return 2
    written = []
    try:
        if args.verifier_out:
            stacked.save(args.verifier_out)
            written.append(args.verifier_out)
        if args.stack_out:
            pathlib.Path(args.stack_out).write_text(
                json.dumps(verifier.stack_file(stacked), indent=1) + "\n", encoding="utf-8")
            written.append(args.stack_out)
    except OSError as exc:
        print(f"tune-pair-scorer: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    report(metrics, args.target_precision, scorer.scorer_id, " and ".join(written))
    return 0


# -- transitive pairs --------------------------------------------------------------------
def transitive_pairs(pairs: calibrate.Pairs, rows: np.ndarray, cap: int,
                     seed: int) -> calibrate.Pairs:
    """The pairs that ``rows`` imply and do not label (see the module docstring), at most
    ``cap`` of them (a sample seeded by ``seed``), texts in sorted order."""
    find = calibrate.connected((pairs.text_a[i], pairs.text_b[i])
                               for i in rows if pairs.label[i] == 1)
    groups: dict[str, list[str]] = {}
    for text in sorted({t for i in rows for t in (pairs.text_a[i], pairs.text_b[i])}):
        groups.setdefault(find(text), []).append(text)
    labelled = {frozenset((pairs.text_a[i], pairs.text_b[i])) for i in rows}
    apart = sorted({tuple(sorted((find(pairs.text_a[i]), find(pairs.text_b[i]))))
                    for i in rows if pairs.label[i] == 0})
    noisy = {g for g, h in apart if g == h}
    derived: dict[tuple[str, str], int] = {}
    for root in sorted(set(groups) - noisy):
        members = groups[root]
        for k, a in enumerate(members):
            derived.update({(a, b): 1 for b in members[k + 1:]})
    for g, h in apart:
        if g != h and not {g, h} & noisy:
            derived.update({(min(a, b), max(a, b)): 0 for a in groups[g] for b in groups[h]})
    found = sorted(k for k in derived if frozenset(k) not in labelled)
    if len(found) > cap:
        keep = np.random.default_rng(seed + 94).choice(len(found), cap, replace=False)
        found = [found[k] for k in sorted(keep.tolist())]
    return calibrate.Pairs([a for a, _ in found], [b for _, b in found],
                           np.asarray([derived[k] for k in found], dtype=np.int8))


def with_transitive(pairs: calibrate.Pairs, rows: np.ndarray, seed: int,
                    ) -> tuple[calibrate.Pairs, np.ndarray]:
    """``pairs`` with the pairs ``rows`` imply appended (at most ``len(rows)``), and the
    rows to train on: ``rows`` and the appended ones."""
    extra = transitive_pairs(pairs, rows, len(rows), seed)
    print(f"transitive: {len(extra)} derived pairs ({int(extra.label.sum())} positive) "
          f"beside {len(rows)}", file=sys.stderr)
    both = calibrate.Pairs(pairs.text_a + extra.text_a, pairs.text_b + extra.text_b,
                           np.concatenate([pairs.label, extra.label]))
    return both, np.concatenate([rows, np.arange(len(pairs), len(both), dtype=np.int64)])


# -- training ----------------------------------------------------------------------------
def train(pairs: calibrate.Pairs, rows: np.ndarray, args: argparse.Namespace) -> Any:
    """The scorer trained on ``rows`` (see the module docstring for the recipe)."""
    import torch

    seed = train_seed(args)
    torch.manual_seed(seed)
    tok = pair_scorer_model.tokenizer()
    a = [pairs.text_a[i] for i in rows]
    b = [pairs.text_b[i] for i in rows]
    labels = pairs.label[rows].astype(np.float32)
    enc = {order: tok(x1, x2, truncation="longest_first",
                      max_length=pair_scorer_model.MAX_LEN)
           for order, (x1, x2) in (("ab", (a, b)), ("ba", (b, a)))}
    net = pair_scorer_model.build(seed=seed)
    net.train()
    for name, param in net.bert.named_parameters():
        param.requires_grad_(name not in FROZEN)

    def no_decay(name: str) -> bool:
        return name.endswith("bias") or "LayerNorm" in name

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}], lr=args.lr)
    per_epoch = math.ceil(len(rows) / args.batch)
    total = per_epoch * args.epochs
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    swapped = np.random.default_rng(seed + 92).random(len(rows)) < 0.5
    bar = progress.Progress(total, "training the pair scorer")
    losses: list[float] = []
    for epoch in range(args.epochs):
        swap = swapped if epoch % 2 == 0 else ~swapped
        items = [("ba" if s else "ab", i) for i, s in enumerate(swap)]
        for batch in batches(items, lambda o, i: len(enc[o]["input_ids"][i]), args.batch,
                             np.random.default_rng(seed + 93 + epoch)):
            ids, mask, types = padded([enc[o] for o, _ in batch], [i for _, i in batch],
                                      tok.pad_token_id)
            y = torch.from_numpy(labels[[i for _, i in batch]])
            loss = loss_fn(net(torch.from_numpy(ids), torch.from_numpy(mask),
                               torch.from_numpy(types)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1, f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses[-100:]):.3f}")
    bar.close()
    return net


def train_seed(args: argparse.Namespace) -> int:
    """The seed of training's own draws (order, swaps, initial head, dropout): ``--train-seed``
    when given, else ``--seed``; the split and the data drawn for training stay ``--seed``'s."""
    return int(args.seed if args.train_seed is None else args.train_seed)


def batches(items: list[tuple[str, int]], length: Callable[[str, int], int], size: int,
            rng: np.random.Generator) -> list[list[tuple[str, int]]]:
    """``items`` in batches of ``size``, lengths alike within a batch (sorted inside
    shuffled chunks of 50 batches), batches in a shuffled order."""
    order = rng.permutation(len(items))
    chunk = size * 50
    out: list[list[tuple[str, int]]] = []
    for start in range(0, len(order), chunk):
        idx = sorted(order[start:start + chunk].tolist(), key=lambda k: length(*items[k]))
        out += [[items[k] for k in idx[j:j + size]] for j in range(0, len(idx), size)]
    return [out[k] for k in rng.permutation(len(out))]


def padded(encodings: Sequence[Any], rows: Sequence[int], pad: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, attention mask, token types) of ``rows``, right-padded to the longest."""
    width = max(len(e["input_ids"][r]) for e, r in zip(encodings, rows, strict=True))
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    types = np.zeros((len(rows), width), np.int64)
    for k, (e, r) in enumerate(zip(encodings, rows, strict=True)):
        t = e["input_ids"][r]
        ids[k, :len(t)], mask[k, :len(t)], types[k, :len(t)] = t, 1, e["token_type_ids"][r]
    return ids, mask, types


# -- the stack ---------------------------------------------------------------------------
def verifier_scores(pairs: calibrate.Pairs, rows: np.ndarray, model: verifier.Verifier,
                    embed_cache: str | None) -> np.ndarray:
    """The verifier's probability of each pair of ``rows``, (a, b) order as served."""
    part = pairs.take(rows)
    va, vb = calibrate.pair_vectors(part, embed_cache, None)
    feats = calibrate.features(part, va, vb, model.idf)
    return model.probabilities(feats)


@dataclasses.dataclass(frozen=True)
class Scored:
    """One split's pairs as the stack sees them: labels, the verifier's probabilities and
    the scorer's logits."""

    labels: np.ndarray
    verifier: np.ndarray
    scorer: np.ndarray


def score_splits(pairs: calibrate.Pairs, split: dict[str, np.ndarray], base: verifier.Verifier,
                 net: Any, embed_cache: str | None) -> tuple[Scored, Scored]:
    """(validation, held-out) scored by ``base`` and the scorer network ``net``."""
    val, test = split["validation"], split["test"]
    both = verifier_scores(pairs, np.concatenate([val, test]), base, embed_cache)
    tok = pair_scorer_model.tokenizer()
    t0 = time.monotonic()
    out = []
    for rows, p in ((val, both[:len(val)]), (test, both[len(val):])):
        logits = pair_scorer_model.logits(net, tok, [pairs.text_a[i] for i in rows],
                                          [pairs.text_b[i] for i in rows])
        out.append(Scored(pairs.label[rows], p, logits))
    print(f"scored {len(val) + len(test)} pairs in both orders in "
          f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
    return out[0], out[1]


def fit_stack(validation: Scored, heldout: Scored, base: verifier.Verifier, scorer_id: str,
              target: float) -> tuple[verifier.Verifier, dict[str, Any]]:
    """``base`` with a stack over it and the scorer, fitted on ``validation``; its metrics
    on ``heldout`` beside the verifier alone."""
    from sklearn.linear_model import LogisticRegression

    y_val, y_test = validation.labels, heldout.labels
    p_val, p_test = validation.verifier, heldout.verifier
    s_val, s_test = validation.scorer, heldout.scorer
    lr = LogisticRegression(C=1.0).fit(stack_inputs(p_val, s_val), y_val)
    weights = (float(lr.coef_[0][0]), float(lr.coef_[0][1]))
    bias = float(lr.intercept_[0])
    math_only = verifier.Stack(scorer_id, weights, bias, floor=0.0, threshold=1.0,
                               target_precision=target)
    q_val = math_only.probabilities(p_val, s_val)
    q_test = math_only.probabilities(p_test, s_test)
    threshold = calibrate.operating_point(q_val, y_val, target)
    accepted = p_val[q_val >= threshold]
    floor = float(np.quantile(accepted, STACK_FLOOR_QUANTILE)) if len(accepted) else 1.0
    # What serving does: a candidate under the floor is never scored, so never stacked.
    q_val = np.where(p_val >= floor, q_val, 0.0)
    q_test = np.where(p_test >= floor, q_test, 0.0)
    alone = calibrate.operating_point(p_val, y_val, target)
    metrics = {
        "heldout": calibrate.evaluate(q_test, y_test, threshold),
        "validation": calibrate.evaluate(q_val, y_val, threshold),
        "verifier_alone_heldout": calibrate.evaluate(p_test, y_test, alone),
        "pairs": {"validation": len(y_val), "test": len(y_test)},
        "sent_to_scorer_heldout": round(float(np.mean(p_test >= floor)), 4),
    }
    calib = calibrate.calibration_sample(q_val, y_val)
    section = {
        "pair_scorer": scorer_id, "weights": list(weights), "bias": bias,
        "floor": round(floor, 6), "threshold": threshold, "target_precision": target,
        "curve": [[round(t, 6), round(p, 6), round(r, 6)] for t, p, r in
                  calibrate.curve_summary(calibrate.precision_recall_curve(q_val, y_val))],
        "calibration": calib.to_json(),
        "metrics": metrics}
    data = base.to_json()
    data["stack"] = section
    return verifier.from_json(data), metrics


def stack_inputs(p: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The stack's inputs (the verifier's logit, the scorer's), clipped as
    :meth:`verifier.Stack.probabilities` clips them."""
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    out: np.ndarray = np.c_[np.log(q / (1 - q)), np.asarray(scores, np.float64)]
    return out


def report(metrics: dict[str, Any], target: float, scorer_id: str, out: str) -> None:
    held, alone = metrics["heldout"], metrics["verifier_alone_heldout"]
    print(f"pair scorer {scorer_id}; target precision {target:.2f}")
    print(f"{'held-out':<22}{'precision':>10}{'recall':>8}{'f1':>8}{'hit rate':>10}")
    for name, m in (("verifier + scorer", held), ("verifier alone", alone)):
        print(f"{name:<22}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}")
    print(f"candidates sent to the scorer: {metrics['sent_to_scorer_heldout']:.1%} of the "
          f"held-out pairs; wrote {out}")
