"""``synapsectl cache tune-embedder --pairs FILE``: a tuned embedder and its verifier.

Fine-tunes all-MiniLM-L6-v2 on labelled pairs (``{"text_a", "text_b", "label"}``, the
format of ``calibrate``, of the QQP dev pairs and of the judged hits the control plane
keeps) and writes two files: the tuning (``--tuning-out``, npz; agents load it with
``embedder.tuning: PATH``) and a verifier fitted for it (``--verifier-out``; control
planes load it with ``cache.verifier_path`` and ``cache.embedder_id`` set to the id
printed). ``make embedder`` builds the shipped pair from the QQP dev pairs.

Design decisions (the measured comparison lives in ``bench/semantic_cache.py`` and in
this command's report, not here):

- **Splits**: ``calibrate``'s question-disjoint split (same seed). Inside train, whole
  question groups go to part A (2/3: the embedder learns on it) or part B (1/3: the
  verifier's trees learn on it). A verifier fitted on pairs the embedder was trained on
  over-trusts its cosines (measured: worse than the untuned embedder's verifier on
  unseen pairs); on part B it sees the embedder as a new question will. Platt scaling and
  the operating point use validation; the report is on the held-out split.
- **What is tuned**: the top ``--layers`` transformer layers (``embedder_fit``), the
  lower ones frozen; only the tuned layers ship (float16).
- **Refusals** before any work, with the reason: too few pairs, too few of either label,
  a label share outside 5-95 %, or a split part without enough of each label (few
  distinct questions, or one group of linked questions holding most pairs).
- ``--embedder-train all`` lets the embedder learn on all of train (then the verifier's
  trees can only learn on pairs it saw: ``--verifier-train all``), for a measured
  comparison with the default split of train.
- ``--verifier-only TUNING`` refits just the verifier for an existing tuning (``make
  verifier``): same splits, same part B.
- Progress: a bar with an ETA on stderr for the two long steps (the frozen layers over
  every text, the training).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
import time
from typing import Any

import numpy as np

from controlplane import calibrate, embedder_fit, progress
from controlplane.core import verifier
from synapse_common import cli_numbers, embedder_tuning, minilm

MIN_PAIRS = 2000
MIN_EACH = 400          # of either label, in the whole file
MIN_PART_EACH = 50      # of either label, in each split part
MIN_SHARE = 0.05        # of either label


class Refused(ValueError):
    """The pairs cannot be tuned on safely; ``str()`` lists every reason."""


def verifier_part(pairs: calibrate.Pairs, train: np.ndarray, seed: int) -> np.ndarray:
    """The train rows whose question group goes to the verifier (part B, 1/3)."""
    find = calibrate.connected(zip(pairs.text_a, pairs.text_b, strict=True))
    digest = [hashlib.sha256(f"{seed}\x01{find(pairs.text_a[i])}".encode()).digest()
              for i in train]
    chosen: np.ndarray = train[np.asarray([int.from_bytes(d[:8], "big") % 3 == 0
                                           for d in digest], bool)]
    return chosen


def refusals(pairs: calibrate.Pairs, parts: dict[str, np.ndarray]) -> list[str]:
    n, pos = len(pairs), int(pairs.label.sum())
    reasons = []
    if n < MIN_PAIRS:
        reasons.append(f"too few pairs: {n} (at least {MIN_PAIRS})")
    if min(pos, n - pos) < MIN_EACH:
        reasons.append(f"too one-sided: {pos} duplicates and {n - pos} non-duplicates "
                       f"(at least {MIN_EACH} of each)")
    elif not MIN_SHARE <= pos / n <= 1 - MIN_SHARE:
        reasons.append(f"too one-sided: {pos / n:.1%} of the pairs are duplicates (between "
                       f"{MIN_SHARE:.0%} and {1 - MIN_SHARE:.0%} needed)")
    for name, rows in parts.items():
        p = int(pairs.label[rows].sum())
        if min(p, len(rows) - p) < MIN_PART_EACH:
            reasons.append(f"the question-disjoint split leaves {name} with {p} duplicates "
                           f"and {len(rows) - p} non-duplicates (at least {MIN_PART_EACH} of "
                           "each): too few distinct questions, or one group of linked "
                           "questions holds most pairs")
    return reasons


def plan(pairs: calibrate.Pairs, seed: int) -> dict[str, np.ndarray]:
    split = calibrate.split(pairs, seed)
    part_b = verifier_part(pairs, split["train"], seed)
    part_a = np.setdiff1d(split["train"], part_b)
    parts = {"train (embedder)": part_a, "train (verifier)": part_b,
             "validation": split["validation"], "test": split["test"]}
    reasons = refusals(pairs, parts)
    if reasons:
        raise Refused("; ".join(reasons))
    return parts


def embedder_rows(parts: dict[str, np.ndarray], which: str) -> np.ndarray:
    """The pairs the embedder learns on: its part of train, or all of train (``all``);
    never validation or test."""
    rows = parts["train (embedder)"]
    if which == "all":
        rows = np.sort(np.concatenate([rows, parts["train (verifier)"]]))
    return rows


MINILM_LAYERS = 6      # all-MiniLM-L6-v2's transformer layers: the most --layers can tune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rate = cli_numbers.number(0, 1, low_open=True)
    parser.add_argument("--pairs", required=True,
                        help='JSONL(.gz) of {"text_a", "text_b", "label": 0|1}')
    parser.add_argument("--tuning-out", help="tuning (.npz) to write (unless --verifier-only)")
    parser.add_argument("--verifier-out", required=True, help="verifier (JSON) to write")
    parser.add_argument("--verifier-only", metavar="TUNING", default=None,
                        help="keep this tuning; refit only its verifier")
    parser.add_argument("--seed", type=cli_numbers.seed(), default=7,
                        help="split, order and initial values")
    parser.add_argument("--layers", type=cli_numbers.integer(0, MINILM_LAYERS), default=2,
                        help="top transformer layers tuned")
    parser.add_argument("--epochs", type=cli_numbers.count(1), default=1)
    parser.add_argument("--batch", type=cli_numbers.count(1), default=96,
                        help="pairs per training step")
    parser.add_argument("--lr", type=rate, default=3e-5)
    parser.add_argument("--adapter-epochs", type=cli_numbers.count(), default=0,
                        help="passes of a linear adapter after pooling (0 = none)")
    parser.add_argument("--adapter-lr", type=rate, default=1e-3)
    parser.add_argument("--vectors-cache", default=None,
                        help="with --layers 0: the frozen model's vectors kept here (.npz)")
    parser.add_argument("--verifier-train", choices=("unseen", "all"), default="unseen",
                        help="the verifier's trees learn on the train part the embedder never "
                        "saw (unseen) or on all of train (all: for an adapter, whose few "
                        "parameters barely overfit)")
    parser.add_argument("--embedder-train", choices=("part", "all"), default="part",
                        help="the embedder learns on its part of train (part: 2/3, the rest "
                        "left unseen for the verifier) or on all of train (all: use with "
                        "--verifier-train all)")
    parser.add_argument("--target-precision", type=calibrate.PRECISION, default=0.90)


def run(args: argparse.Namespace) -> int:
    if not (args.tuning_out or args.verifier_only):
        print("tune-embedder: --tuning-out FILE is required (or --verifier-only TUNING)",
              file=sys.stderr)
        return 2
    if args.embedder_train == "all" and args.verifier_train != "all":
        print("tune-embedder: --embedder-train all leaves no part of train the embedder did "
              "not see, for --verifier-train unseen; add --verifier-train all", file=sys.stderr)
        return 2
    try:
        pairs = calibrate.read_pairs(args.pairs)
        parts = plan(pairs, args.seed)
    except calibrate.PairsError as exc:
        print(f"tune-embedder: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"tune-embedder: refused: {exc}", file=sys.stderr)
        return 2
    print(f"read {len(pairs)} pairs; split (question-disjoint): "
          + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    try:
        tuning, vectors, index = _tune(pairs, parts, args)
        model, metrics = _verifier(pairs, parts, vectors, index, tuning, args)
    except (minilm.MissingExtra, ImportError) as exc:
        print(f"tune-embedder: needs the embed and dev extras: {exc}", file=sys.stderr)
        return 2
    except embedder_tuning.TuningError as exc:
        print(f"tune-embedder: {exc}", file=sys.stderr)
        return 2
    model.save(args.verifier_out)
    _report(tuning, metrics, args)
    return 0


def _tune(pairs: calibrate.Pairs, parts: dict[str, np.ndarray], args: argparse.Namespace
          ) -> tuple[embedder_tuning.Tuning, np.ndarray, dict[str, int]]:
    texts = sorted(set(pairs.text_a) | set(pairs.text_b))
    index = {t: i for i, t in enumerate(texts)}
    model = minilm.load()
    base = embedder_tuning.base_id()
    old = embedder_tuning.load(args.verifier_only) if args.verifier_only else None
    if old is not None:
        embedder_tuning.check_base(old, base)
        embedder_tuning.apply_layers(model, old)
    lower = embedder_fit.frozen_layers(model) - (
        _tuned_layers(old) if old is not None else args.layers)
    if old is not None:
        states = _states(model, texts, lower)
        top = embedder_fit.top_layers(model, lower)
        return old, old.adapt(embedder_fit.embed_all(top, states)), index
    labelled = embedder_fit.Labelled(np.asarray([index[t] for t in pairs.text_a]),
                                     np.asarray([index[t] for t in pairs.text_b]), pairs.label)
    rows = embedder_rows(parts, args.embedder_train)
    layers: dict[str, np.ndarray] = {}
    if args.layers:
        states = _states(model, texts, lower)
        top = embedder_fit.top_layers(model, lower)
        options = embedder_fit.TrainOptions(args.epochs, args.batch, args.lr, args.seed)
        bar = progress.Progress(embedder_fit.steps(len(rows), options), "training")
        embedder_fit.train(top, states, labelled, rows, options,
                           lambda loss: bar.update(1, f"loss {loss:.3f}"))
        bar.close()
        layers = embedder_fit.rounded_arrays(top, lower)
        vectors = embedder_fit.embed_all(top, states)
    else:
        vectors = _frozen_vectors(model, texts, base, args.vectors_cache)
    adapter = None
    if args.adapter_epochs:
        options = embedder_fit.TrainOptions(args.adapter_epochs, args.batch, args.adapter_lr,
                                            args.seed)
        bar = progress.Progress(embedder_fit.steps(len(rows), options), "adapter")
        adapter = embedder_fit.train_adapter(vectors, labelled, rows, options,
                                             lambda loss: bar.update(1, f"loss {loss:.3f}"))
        bar.close()
    meta = {"pairs_file": pathlib.Path(args.pairs).name, "seed": args.seed,
            "layers": args.layers, "epochs": args.epochs, "batch": args.batch,
            "lr": args.lr, "adapter_epochs": args.adapter_epochs,
            "adapter_lr": args.adapter_lr, "trained_on": len(rows),
            "embedder_train": args.embedder_train}
    tuning = embedder_tuning.save(args.tuning_out, base, layers, adapter, meta)
    return tuning, tuning.adapt(vectors), index


def _states(model: Any, texts: list[str], lower: int) -> embedder_fit.States:
    bar = progress.Progress(len(texts), "frozen layers")
    states = embedder_fit.lower_states(model, texts, lower, bar.update)
    bar.close()
    return states


def _frozen_vectors(model: Any, texts: list[str], base: str, cache: str | None) -> np.ndarray:
    """The untuned model's vectors of ``texts`` (every layer frozen), from ``cache`` when
    it holds them for the same texts and weights."""
    key = hashlib.sha256("\x00".join([base, *texts]).encode("utf-8", "surrogatepass")).hexdigest()
    if cache and pathlib.Path(cache).exists():
        with np.load(cache, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return np.asarray(data["vectors"], dtype=np.float32)
    lower = embedder_fit.frozen_layers(model)
    vectors = embedder_fit.embed_all(embedder_fit.top_layers(model, lower),
                                     _states(model, texts, lower))
    if cache:
        np.savez(cache, key=np.asarray(key), vectors=vectors)
    return vectors


def _tuned_layers(tuning: embedder_tuning.Tuning) -> int:
    return len({name.split(".")[2] for name in tuning.layers})


def _verifier(pairs: calibrate.Pairs, parts: dict[str, np.ndarray], vectors: np.ndarray,
              index: dict[str, int], tuning: embedder_tuning.Tuning,
              args: argparse.Namespace) -> tuple[verifier.Verifier, dict[str, Any]]:
    va = vectors[[index[t] for t in pairs.text_a]]
    vb = vectors[[index[t] for t in pairs.text_b]]
    t0 = time.monotonic()
    model, metrics = calibrate.fit(pairs, va, vb, args.target_precision, args.seed,
                                   embedder_id=tuning.embedder_id,
                                   train_index=(parts["train (verifier)"]
                                                if args.verifier_train == "unseen" else None))
    print(f"verifier fitted in {time.monotonic() - t0:.0f}s")
    model.meta["fit"] = {"pairs_file": pathlib.Path(args.pairs).name, "seed": args.seed,
                         "components": 16, "splits": dict(calibrate.SPLITS),
                         "trees_on": ("train part the embedder never saw"
                                      if args.verifier_train == "unseen" else "all of train")}
    return model, metrics


def _report(tuning: embedder_tuning.Tuning, metrics: dict[str, Any],
            args: argparse.Namespace) -> None:
    held, base = metrics["heldout"], metrics["cosine_baseline_heldout"]
    print(f"{'held-out':<28}{'precision':>10}{'recall':>8}{'f1':>8}{'hit rate':>10}")
    for name, m in (("tuned embedder + verifier", held), ("tuned embedder, bare cosine", base)):
        print(f"{name:<28}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}")
    written = args.verifier_only or args.tuning_out
    print(f"wrote {'' if args.verifier_only else written + ' and '}{args.verifier_out} "
          f"(embedder id {tuning.embedder_id})")
    print(f"use them: agents embedder.tuning: {written}; control planes "
          f"cache.embedder_id: {tuning.embedder_id}, cache.verifier_path: {args.verifier_out}")
