"""Benchmark: the pair scorer on torch and on onnxruntime, on the pairs a lookup sends it.

``bench.semantic_cache --verifier stacked`` measures the stack with the scorer on torch,
in batches; agents serve it on onnxruntime (``embedder.runtime: auto``), one lookup's
pairs per call, each pair's two orders in two lanes (``agent.embedding.pair_scorer_onnx``).
This runs both on the same pairs: the held-out split of ``calibrate`` (``--heldout``) or
all ``--pairs``, the shipped verifier with its shipped stack, the pairs at or above the
stack's floor (the only ones a lookup scores). It prints the largest logit difference,
how many stack decisions at the operating point differ, precision and recall at that
point for each runtime, and the time per pair of each as served (one pair per call;
``--threads`` torch threads, default 1 as the benchmarks' agent runs; ONNX lanes as the
agent picks them). Last line: ``{"bench": "pair_scorer_runtimes", "pairs_scored": …,
"max_abs_logit_diff": …, "decisions_changed": …, "torch": {…}, "onnx": {…}}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from agent.embedding import pair_scorer  # noqa: E402
from bench import semantic_cache  # noqa: E402
from controlplane import calibrate  # noqa: E402
from controlplane.core import verifier  # noqa: E402
from synapse_common import pair_scorer as scorer_file  # noqa: E402


def at_point(accepted: np.ndarray, labels: np.ndarray, positives: int) -> dict[str, float]:
    hits = int(accepted.sum())
    good = int((accepted & (labels == 1)).sum())
    return {"accepted": hits, "precision": round(good / hits, 4) if hits else float("nan"),
            "recall": round(good / positives, 4) if positives else float("nan")}


def per_pair_ms(loaded: pair_scorer.Loaded, a: list[str], b: list[str], n: int) -> float:
    times = []
    for i in range(min(n, len(a))):
        start = time.perf_counter()
        pair_scorer.score_blocking(loaded, a[i], [b[i]])
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pair_scorer_runtimes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(pathlib.Path(__file__).resolve().parents[2]
                                               / "shared" / "data" / "qqp_pairs_dev.jsonl.gz"))
    parser.add_argument("--heldout", action="store_true",
                        help="only the question-disjoint held-out split of calibration")
    parser.add_argument("--limit", type=int, default=0, help="at most this many pairs")
    parser.add_argument("--embed-cache", default=None, help="the embedder's vectors (.npz)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--timed", type=int, default=200, help="pairs timed per runtime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = verifier.with_stack(verifier.load(), verifier.STACK_PATH)
    stack = model.stack
    assert stack is not None
    everything = calibrate.read_pairs(args.pairs)
    seed = int(model.meta.get("fit", {}).get("seed", 7))
    keep = (calibrate.split(everything, seed)["test"] if args.heldout
            else np.arange(len(everything)))
    if args.limit:
        keep = keep[:args.limit]
    pairs = everything.take(keep)
    va, vb, _ = semantic_cache.pair_vectors(pairs, "none", args.embed_cache)
    p = model.probabilities(model.features(pairs.text_a, pairs.text_b, va, vb))
    sent = np.flatnonzero(p >= stack.floor)
    a = [pairs.text_a[i] for i in sent]
    b = [pairs.text_b[i] for i in sent]
    labels = np.asarray(pairs.label)
    with tempfile.TemporaryDirectory() as cache:
        onnx = pair_scorer.load(scorer_file.SHIPPED, "onnx", cache)
        reference = pair_scorer.Loaded(onnx.file, onnx.model, onnx.tokenizer)
        # torch as bench.semantic_cache scores (batched); ONNX as an agent serves (a call
        # per lookup: here one pair each)
        torch_logits = semantic_cache.PairScorer("shipped")(a, b)
        onnx_logits = np.concatenate([pair_scorer.score_blocking(onnx, x, [y])
                                      for x, y in zip(a, b, strict=True)])
        timing = {"torch": per_pair_ms(reference, a, b, args.timed),
                  "onnx": per_pair_ms(onnx, a, b, args.timed)}
        if onnx.onnx is not None:
            onnx.onnx.close()
    cut = stack.threshold
    positives = int((labels == 1).sum())
    out: dict[str, dict[str, float]] = {}
    accepted = {}
    for name, logits in (("torch", torch_logits), ("onnx", onnx_logits)):
        chosen = np.zeros(len(labels), dtype=bool)
        chosen[sent] = stack.probabilities(p[sent], logits) >= cut
        accepted[name] = chosen
        out[name] = {**at_point(chosen, labels, positives), "ms_per_pair": timing[name]}
    diff = float(np.abs(torch_logits - onnx_logits).max()) if len(sent) else 0.0
    changed = int((accepted["torch"] != accepted["onnx"]).sum())
    print(f"{len(pairs)} pairs, {len(sent)} at or above the stack's floor {stack.floor:.4f} "
          f"(scored); operating point {cut:.4f}")
    print(f"largest |torch logit - onnx logit|: {diff:.2e}; decisions changed: {changed}")
    print(f"{'runtime':<8}{'accepted':>10}{'precision':>11}{'recall':>9}{'ms/pair':>9}")
    for name, row in out.items():
        print(f"{name:<8}{row['accepted']:>10}{row['precision']:>11}{row['recall']:>9}"
              f"{row['ms_per_pair']:>9}")
    print(json.dumps({"bench": "pair_scorer_runtimes", "pairs": len(pairs),
                      "pairs_scored": len(sent), "max_abs_logit_diff": diff,
                      "decisions_changed": changed, "torch_threads": args.threads, **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
