"""Benchmark: the shipped cache verifier against a bare cosine threshold, on labelled pairs.

``--mode pairs`` (default) scores every pair ``(text_a, text_b)`` with the shipped
verifier at its default operating point and reports precision, recall, F1 and hit rate
(share of pairs accepted). The baseline is a bare cosine threshold — what GPTCache-style
caches do — tuned *on the same pairs* to the precision the verifier reached (generous to
the baseline), so the two recalls compare at one precision.

``--mode cache`` runs the cache-level test: every ``text_a`` is stored as an entry of one
scope in Milvus Lite (through the cache's own L2 adapter), every ``text_b`` is a query;
the L2 search returns the top-k of the scope and the verifier picks the best candidate
above the operating point, exactly as a lookup does. A hit is right only if it returns
the query's own labelled duplicate. Precision = right hits / hits, recall = right hits /
queries that have a duplicate, hit rate = hits / queries. The baseline serves the top-1
candidate when its cosine clears a threshold tuned to the verifier's precision.

Strictly, a hit on *another* entry is wrong even when the labels say it is a duplicate
too (QQP's duplicates form groups: a = b and b = c); the JSON's ``duplicate_closure``
repeats the cache-mode figures counting a hit on any labelled duplicate of the query
(closed transitively over the whole file) as right — including the query's own text,
when a ``text_b`` is also some pair's ``text_a`` (in a running cache that is an exact hit).

``--heldout`` keeps only the question-disjoint held-out part of the file, split exactly
as ``synapsectl cache calibrate`` split it for the shipped verifier (same seed): the
figures for questions the verifier never saw. Embeddings come from the in-process
all-MiniLM-L6-v2 (``--embed-cache FILE.npz`` reuses them between runs).

Run: ``python -m bench.semantic_cache --pairs ../shared/data/qqp_pairs_dev.jsonl.gz
--heldout [--mode cache]``. The last line is one JSON object:
``{"bench": "semantic_cache", "mode": …, "precision": …, "recall": …, "f1": …,
"hit_rate": …, "baseline": {"precision": …, "recall": …}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np

from controlplane import cache_wiring, calibrate
from controlplane.core import verifier, verifier_features
from controlplane.core.l2 import index as l2_index
from controlplane.core.l2 import rows as l2_rows


def _f1(p: float, r: float) -> float:
    return round(2 * p * r / (p + r), 4) if p + r else 0.0


def _tuned_cosine(scores: np.ndarray, right: np.ndarray, positives: int,
                  precision: float) -> dict[str, float]:
    """Best recall of ``accept if cos >= t`` whose precision reaches ``precision``."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(right[order])
    k = np.arange(1, len(order) + 1)
    ok = np.flatnonzero(tp / k >= precision - 1e-12)
    if not len(ok):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "hit_rate": 0.0, "threshold": 1.0}
    i = int(ok[-1])
    p, r = float(tp[i] / k[i]), float(tp[i] / max(positives, 1))
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": _f1(p, r),
            "hit_rate": round((i + 1) / len(scores), 4),
            "threshold": round(float(scores[order][i]), 4)}


def run_pairs(pairs: calibrate.Pairs, va: np.ndarray, vb: np.ndarray,
              model: verifier.Verifier) -> tuple[dict[str, float], dict[str, float]]:
    raw = verifier_features.batch_features(pairs.text_a, pairs.text_b, va, vb)
    scores = model.probabilities(raw)
    ours = calibrate.evaluate(scores, pairs.label, model.threshold)
    cos = np.sum(va * vb, axis=1)
    base = _tuned_cosine(cos, pairs.label.astype(np.float64), int(pairs.label.sum()),
                         ours["precision"])
    return ours, base


async def _fill(store: l2_index.L2Index, texts: list[str], vectors: np.ndarray) -> None:
    rows = [l2_rows.Row(scope="bench", tenant="bench", model="bench", vector=vector,
                        ref=text[:120], text=text)
            for text, vector in zip(texts, vectors, strict=True)]
    for start in range(0, len(rows), 500):
        await store.insert(rows[start:start + 500])
    await store.flush()


def duplicate_groups(pairs: calibrate.Pairs) -> dict[str, str]:
    """Text → representative of its group under the labelled-duplicate relation, closed
    transitively (a = b and b = c, both labelled 1, make a = c)."""
    find = calibrate.connected(
        (a, b) for a, b, label in zip(pairs.text_a, pairs.text_b, pairs.label, strict=True)
        if label == 1)
    return {t: find(t) for t in set(pairs.text_a) | set(pairs.text_b)}


@dataclasses.dataclass
class _Tally:
    hits: list[bool] = dataclasses.field(default_factory=list)
    right: list[bool] = dataclasses.field(default_factory=list)          # own duplicate
    right_group: list[bool] = dataclasses.field(default_factory=list)    # any labelled dup
    top_cos: list[float] = dataclasses.field(default_factory=list)
    top_right: list[bool] = dataclasses.field(default_factory=list)
    top_right_group: list[bool] = dataclasses.field(default_factory=list)


async def run_cache(pairs: calibrate.Pairs, va: np.ndarray, vb: np.ndarray,
                    model: verifier.Verifier, top_k: int, groups: dict[str, str]
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    entries = dict(zip(pairs.text_a, va, strict=True))       # unique text_a → vector
    t = _Tally()
    with tempfile.TemporaryDirectory() as tmp:
        store = cache_wiring.milvus_l2(f"{tmp}/bench.db", "bench_cache", flush_interval_s=5.0)
        t0 = time.monotonic()
        await _fill(store, list(entries), np.stack(list(entries.values())))
        print(f"stored {len(entries)} entries in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        for ta, tb, vec, label in zip(pairs.text_a, pairs.text_b, vb, pairs.label, strict=True):
            found = await store.search("bench", vec, top_k, 0.0)
            verdict = model.judge(tb, vec, [c.text for c in found],
                                  [np.asarray(c.vector) for c in found])
            hit = verdict is not None and verdict.accepted
            chosen = found[verdict.index].text if hit and verdict is not None else None
            t.hits.append(hit)
            t.right.append(hit and label == 1 and chosen == ta)
            t.right_group.append(hit and groups.get(chosen) == groups[tb])
            t.top_cos.append(found[0].similarity if found else -1.0)
            t.top_right.append(bool(found) and label == 1 and found[0].text == ta)
            t.top_right_group.append(bool(found) and groups.get(found[0].text) == groups[tb])
        await store.close()
    positives = int(pairs.label.sum())
    ours, base = _score(t.hits, t.right, t.top_cos, t.top_right, positives, model.threshold)
    # Queries with at least one labelled duplicate (or their own text) among the entries.
    per_group = collections.Counter(groups[e] for e in entries)
    has_dup = sum(1 for tb in pairs.text_b if per_group[groups[tb]] > 0)
    g_ours, g_base = _score(t.hits, t.right_group, t.top_cos, t.top_right_group, has_dup,
                            model.threshold)
    return ours, base, {"precision": g_ours["precision"], "recall": g_ours["recall"],
                        "baseline": {"precision": g_base["precision"],
                                     "recall": g_base["recall"]}}


def _score(hits: list[bool], right: list[bool], top_cos: list[float], top_right: list[bool],
           positives: int, threshold: float) -> tuple[dict[str, float], dict[str, float]]:
    n_hits, n_right = int(np.sum(hits)), int(np.sum(right))
    p, r = n_right / max(n_hits, 1), n_right / max(positives, 1)
    ours = {"precision": round(p, 4), "recall": round(r, 4), "f1": _f1(p, r),
            "hit_rate": round(n_hits / max(len(hits), 1), 4), "threshold": round(threshold, 4)}
    base = _tuned_cosine(np.asarray(top_cos), np.asarray(top_right, dtype=np.float64),
                         positives, p)
    return ours, base


def _table(mode: str, n: int, ours: dict[str, float], base: dict[str, float]) -> None:
    print(f"semantic cache, mode {mode}, {n} pairs")
    print(f"{'':<26}{'precision':>10}{'recall':>8}{'f1':>8}{'hit rate':>10}{'threshold':>11}")
    for name, m in (("verifier (default point)", ours), ("bare cosine, same prec.", base)):
        print(f"{name:<26}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}{m['threshold']:>11.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="JSONL(.gz) of text_a, text_b, label")
    parser.add_argument("--mode", choices=("pairs", "cache"), default="pairs")
    parser.add_argument("--verifier", default=None, help="verifier JSON (default: shipped)")
    parser.add_argument("--heldout", action="store_true",
                        help="only the question-disjoint held-out split of calibration")
    parser.add_argument("--limit", type=int, default=0, help="at most this many pairs")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per lookup (cache)")
    parser.add_argument("--embed-cache", default=None, help="reuse embeddings (.npz)")
    args = parser.parse_args(argv)
    model = verifier.load(args.verifier)
    pairs = everything = calibrate.read_pairs(args.pairs)
    # Embed the whole file (so one --embed-cache serves every subset), then select.
    va, vb = calibrate.pair_vectors(pairs, args.embed_cache)
    keep = np.arange(len(pairs))
    if args.heldout:
        seed = int(model.meta.get("fit", {}).get("seed", 7))
        keep = calibrate.split(pairs, seed)["test"]
    if args.limit:
        keep = keep[:args.limit]
    pairs, va, vb = pairs.take(keep), va[keep], vb[keep]
    extra: dict[str, Any] = {}
    if args.mode == "pairs":
        ours, base = run_pairs(pairs, va, vb, model)
    else:
        groups = duplicate_groups(everything)
        ours, base, closure = asyncio.run(run_cache(pairs, va, vb, model, args.top_k, groups))
        extra["duplicate_closure"] = closure
    _table(args.mode, len(pairs), ours, base)
    if extra:
        c = extra["duplicate_closure"]
        print(f"counting a hit on any labelled duplicate (closed transitively) as right: "
              f"verifier precision {c['precision']:.4f} recall {c['recall']:.4f}; bare cosine "
              f"at that precision: recall {c['baseline']['recall']:.4f}")
    print(json.dumps({"bench": "semantic_cache", "mode": args.mode,
                      "precision": ours["precision"], "recall": ours["recall"],
                      "f1": ours["f1"], "hit_rate": ours["hit_rate"],
                      "baseline": {"precision": base["precision"], "recall": base["recall"],
                                   "f1": base["f1"], "hit_rate": base["hit_rate"]}, **extra}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
