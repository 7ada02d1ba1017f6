"""Benchmark: the tuned embedder + its verifier against the old embedder + its verifier
and a bare cosine threshold, on labelled pairs, in one run.

Vectors are computed by the agent's own embedder (``bench.embed_served``): the tuned one
(``--tuning``, default what ``make embedder`` writes: ``build/embedder/embedder_tuned.npz``;
no release ships a tuning yet) and plain all-MiniLM-L6-v2 (the old one).

``--mode pairs`` (default) scores every pair ``(text_a, text_b)``: the tuned embedder's
verifier (``--verifier``, default ``make embedder``'s ``build/embedder/verifier.json``) at
its default operating point gives
precision, recall, F1 and hit rate (share of pairs accepted). Every other method is
tuned *on the same pairs* to the precision that one reached (generous to them) and its
recall reported: the old embedder's verifier (``--baseline-verifier``; by default fitted
here on the old embedder's vectors of the calibration split, seed of the verifier, as the
shipped verifier was before the tuned embedder; given, only the texts of the pairs
measured are embedded), a bare cosine threshold on the old
embedder (``baseline``: what GPTCache-style caches do) and one on the tuned embedder.

``--mode cache`` runs the cache-level test: every ``text_a`` is stored as an entry of one
scope through the cache's own L2 index (Milvus Lite), every ``text_b`` is a query; the
search returns the top-k of the scope and the verifier picks the best candidate above the
operating point, exactly as a lookup does; once with the tuned embedder and its verifier,
once with the old pair. A hit is right only if it returns the query's own labelled
duplicate. Precision = right hits / hits, recall = right hits / queries that have a
duplicate, hit rate = hits / queries. Baselines as in pairs mode: the old verifier's best
candidate score, and the top-1 cosine, each thresholded to the tuned run's precision.
``duplicate_closure`` repeats the tuned figures counting a hit on any labelled duplicate
of the query (closed transitively over the whole file) as right.

Both modes also report every method at one precision (``--fixed-precision``, default
0.90), each thresholded on the measured pairs themselves: an oracle point, the same for
all, so the rankings are compared apart from how well each operating point, chosen on
validation, carries over.

``--heldout`` keeps only the question-disjoint held-out split of calibration (same seed):
questions neither embedder tuning nor verifier saw.

A ``--verifier`` with a ``stack`` (``synapsectl cache tune-pair-scorer``; the shipped one
has it) is measured as lookups use it: the verifier's probability, and for the pairs at or
above the stack's floor the stacked probability with the pair scorer's logit
(``--pair-scorer``, default the shipped scorer, run in process with the agents' network),
at the stack's operating point. ``--baseline-verifier unstacked`` makes the old side that
same verifier without its stack, on the same vectors: the shipped pair before and after
the scorer, in one run (``python -m bench.semantic_cache --pairs … --heldout --tuning none
--verifier stacked --baseline-verifier unstacked``).

Run: ``python -m bench.semantic_cache --pairs ../shared/data/qqp_pairs_dev.jsonl.gz
--heldout [--mode cache]``. The last line is one JSON object: ``{"bench":
"semantic_cache", "mode", "precision", "recall", "f1", "hit_rate", "baseline":
{"precision", "recall", "f1", "hit_rate"}, "old_verifier": {…}, "old_verifier_default":
{…}, "tuned_cosine": {…}, "at_fixed_precision": {"precision", "ours": {…}, "old_verifier":
{…}, "baseline": {…}, "tuned_cosine": {…}}, "embedder_id", "old_embedder_id", …}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import embed_served  # noqa: E402
from controlplane import cache_wiring, calibrate  # noqa: E402
from controlplane.core import verifier  # noqa: E402
from controlplane.core.l2 import index as l2_index  # noqa: E402
from controlplane.core.l2 import rows as l2_rows  # noqa: E402

MADE = REPO / "build" / "embedder"     # where make embedder writes the tuning and verifier

FIELDS = ("precision", "recall", "f1", "hit_rate")


def _f1(p: float, r: float) -> float:
    return round(2 * p * r / (p + r), 4) if p + r else 0.0


def at_precision(scores: np.ndarray, right: np.ndarray, positives: int,
                 precision: float) -> dict[str, float]:
    """Best recall of ``accept if score >= t`` whose precision reaches ``precision``."""
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


@dataclasses.dataclass(frozen=True)
class Side:
    """One embedder with its verifier: the vectors of every pair's two texts."""

    name: str
    va: np.ndarray
    vb: np.ndarray
    model: verifier.Verifier
    scorer: PairScorer | None = None    # when the verifier has a stack

    def take(self, keep: np.ndarray) -> Side:
        return Side(self.name, self.va[keep], self.vb[keep], self.model, self.scorer)

    @property
    def threshold(self) -> float:
        """The operating point its lookups use (the stack's, when it has one)."""
        stack = self.model.stack
        return stack.threshold if stack is not None and self.scorer else self.model.threshold

    def scores(self, texts_a: list[str], texts_b: list[str], va: np.ndarray,
               vb: np.ndarray) -> np.ndarray:
        """Each pair's score as a lookup computes it: the verifier's probability, stacked
        with the pair scorer's logit when the verifier has a stack (a pair under the
        stack's floor is never sent to the scorer, and never accepted)."""
        p = self.model.probabilities(self.model.features(texts_a, texts_b, va, vb))
        stack = self.model.stack
        if stack is None or self.scorer is None:
            return p
        sent = np.flatnonzero(p >= stack.floor)
        out = np.zeros_like(p)
        if len(sent):
            logits = self.scorer([texts_a[i] for i in sent], [texts_b[i] for i in sent])
            out[sent] = stack.probabilities(p[sent], logits)
        return out


class PairScorer:
    """The pair scorer a stacked verifier names, loaded in process as the agents load it
    (:func:`agent.embedding.pair_scorer.load`)."""

    def __init__(self, path: str) -> None:
        from agent.embedding import pair_scorer as agent_scorer
        from synapse_common import pair_scorer
        self._loaded = agent_scorer.load(pair_scorer.resolve(path) or pathlib.Path(path))
        self.file = self._loaded.file

    def __call__(self, texts_a: list[str], texts_b: list[str]) -> np.ndarray:
        from synapse_common import pair_scorer_model
        return pair_scorer_model.logits(self._loaded.model, self._loaded.tokenizer, texts_a,
                                        texts_b, self.file.max_len)


def run_pairs(pairs: calibrate.Pairs, new: Side, old: Side, fixed: float
              ) -> dict[str, Any]:
    def scores(side: Side) -> np.ndarray:
        return side.scores(pairs.text_a, pairs.text_b, side.va, side.vb)

    ours_scores, old_scores = scores(new), scores(old)
    ours = calibrate.evaluate(ours_scores, pairs.label, new.threshold)
    y, positives = pairs.label.astype(np.float64), int(pairs.label.sum())
    methods = {"ours": ours_scores, "old_verifier": old_scores,
               "baseline": np.sum(old.va * old.vb, 1),
               "tuned_cosine": np.sum(new.va * new.vb, 1)}
    out: dict[str, Any] = {k: at_precision(v, y, positives, ours["precision"])
                           for k, v in methods.items()}
    out["ours"] = ours
    out["old_verifier_default"] = calibrate.evaluate(old_scores, pairs.label, old.threshold)
    out["fixed"] = _fixed(methods, dict.fromkeys(methods, y), positives, fixed)
    return out


def _fixed(methods: dict[str, Any], rights: dict[str, Any], positives: int,
           precision: float) -> dict[str, Any]:
    """Every method at one precision, each thresholded on the measured pairs themselves
    (an oracle point, the same for all: it compares the rankings, not the operating
    points chosen on validation). ``rights``: per method, whether each score is right."""
    return {"precision": precision, **{
        k: at_precision(np.asarray(v), np.asarray(rights[k], dtype=np.float64), positives,
                        precision) for k, v in methods.items()}}


@dataclasses.dataclass
class Tally:
    """Per query: the best candidate's verifier score and whether it is right, the top-1
    cosine and whether it is right (own duplicate; any labelled duplicate)."""

    score: list[float] = dataclasses.field(default_factory=list)
    right: list[bool] = dataclasses.field(default_factory=list)
    right_group: list[bool] = dataclasses.field(default_factory=list)
    top_cos: list[float] = dataclasses.field(default_factory=list)
    top_right: list[bool] = dataclasses.field(default_factory=list)


async def lookups(pairs: calibrate.Pairs, side: Side, top_k: int,
                  groups: dict[str, str]) -> Tally:
    entries = dict(zip(pairs.text_a, side.va, strict=True))       # unique text_a → vector
    t = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        store = cache_wiring.milvus_l2(f"{tmp}/bench.db", "bench_cache", flush_interval_s=5.0)
        t0 = time.monotonic()
        await _fill(store, list(entries), np.stack(list(entries.values())))
        print(f"{side.name}: stored {len(entries)} entries in {time.monotonic() - t0:.0f}s",
              file=sys.stderr)
        for ta, tb, vec, label in zip(pairs.text_a, pairs.text_b, side.vb, pairs.label,
                                      strict=True):
            found = await store.search("bench", vec, top_k, 0.0)
            best, score = -1, -1.0
            if found:
                scores = side.scores([tb] * len(found), [c.text for c in found],
                                     np.tile(vec, (len(found), 1)),
                                     np.stack([np.asarray(c.vector) for c in found]))
                best = int(np.argmax(scores))
                score = float(scores[best])
            chosen = found[best].text if best >= 0 else None
            t.score.append(score)
            t.right.append(label == 1 and chosen == ta)
            t.right_group.append(chosen is not None and groups.get(chosen) == groups[tb])
            t.top_cos.append(found[0].similarity if found else -1.0)
            t.top_right.append(bool(found) and label == 1 and found[0].text == ta)
        await store.close()
    return t


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


def _served(score: list[float], right: list[bool], threshold: float,
            positives: int) -> dict[str, float]:
    hits = np.asarray(score) >= threshold
    n_right = int(np.sum(hits & np.asarray(right)))
    p, r = n_right / max(int(hits.sum()), 1), n_right / max(positives, 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": _f1(p, r),
            "hit_rate": round(float(hits.mean()), 4), "threshold": round(threshold, 4)}


def run_cache(pairs: calibrate.Pairs, everything: calibrate.Pairs, new: Side, old: Side,
              top_k: int, fixed: float) -> dict[str, Any]:
    groups = duplicate_groups(everything)
    ours_t = asyncio.run(lookups(pairs, new, top_k, groups))
    old_t = asyncio.run(lookups(pairs, old, top_k, groups))
    positives = int(pairs.label.sum())
    ours = _served(ours_t.score, ours_t.right, new.threshold, positives)
    p = ours["precision"]

    def at(scores: list[float], right: list[bool], n: int = positives) -> dict[str, float]:
        return at_precision(np.asarray(scores), np.asarray(right, dtype=np.float64), n, p)

    per_group = collections.Counter(groups[e] for e in set(pairs.text_a))
    has_dup = sum(1 for tb in pairs.text_b if per_group[groups[tb]] > 0)
    closure = _served(ours_t.score, ours_t.right_group, new.threshold, has_dup)
    methods = {"ours": ours_t.score, "old_verifier": old_t.score, "baseline": old_t.top_cos,
               "tuned_cosine": ours_t.top_cos}
    rights = {"ours": ours_t.right, "old_verifier": old_t.right, "baseline": old_t.top_right,
              "tuned_cosine": ours_t.top_right}
    return {"ours": ours, "old_verifier": at(old_t.score, old_t.right),
            "fixed": _fixed(methods, rights, positives, fixed),
            "old_verifier_default": _served(old_t.score, old_t.right, old.threshold,
                                            positives),
            "baseline": at(old_t.top_cos, old_t.top_right),
            "tuned_cosine": at(ours_t.top_cos, ours_t.top_right),
            "duplicate_closure": {"precision": closure["precision"],
                                  "recall": closure["recall"]}}


def _table(mode: str, n: int, out: dict[str, Any]) -> None:
    print(f"semantic cache, mode {mode}, {n} pairs")
    print(f"{'':<40}{'precision':>10}{'recall':>8}{'f1':>8}{'hit rate':>10}{'threshold':>11}")
    for key, name in (("ours", "new: embedder + verifier (its own point)"),
                      ("old_verifier", "old: embedder + verifier, same prec."),
                      ("old_verifier_default", "old: embedder + verifier (its own point)"),
                      ("baseline", "old embedder, bare cosine, same prec."),
                      ("tuned_cosine", "tuned embedder, bare cosine, same prec.")):
        m = out[key]
        print(f"{name:<40}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}{m['threshold']:>11.4f}")
    fixed = out["fixed"]
    print(f"each at precision >= {fixed['precision']} on these pairs (own threshold here)")
    for key, name in (("ours", "new: embedder + verifier"), ("old_verifier",
                      "old: embedder + verifier"), ("baseline", "old embedder, bare cosine"),
                      ("tuned_cosine", "tuned embedder, bare cosine")):
        m = fixed[key]
        print(f"{name:<40}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}{m['threshold']:>11.4f}")


def old_verifier(everything: calibrate.Pairs, va: np.ndarray, vb: np.ndarray, seed: int,
                 embedder_id: str) -> verifier.Verifier:
    print("fitting the old embedder's verifier on the calibration split…", file=sys.stderr)
    model, _ = calibrate.fit(everything, va, vb, 0.90, seed, embedder_id=embedder_id,
                             log=lambda *_: None)
    return model


def pair_vectors(pairs: calibrate.Pairs, tuning: str, cache: str | None
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """The vectors of every pair's two texts as ``embedder.tuning: <tuning>`` serves them."""
    texts = sorted(set(pairs.text_a) | set(pairs.text_b))
    index = {t: i for i, t in enumerate(texts)}
    vectors, embedder_id = embed_served.vectors(texts, tuning, cache)
    return (vectors[[index[t] for t in pairs.text_a]],
            vectors[[index[t] for t in pairs.text_b]], embedder_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="JSONL(.gz) of text_a, text_b, label")
    parser.add_argument("--mode", choices=("pairs", "cache"), default="pairs")
    parser.add_argument("--tuning", default=str(MADE / "embedder_tuned.npz"),
                        help="embedder.tuning of the new side (default: make embedder's)")
    parser.add_argument("--verifier", default=str(MADE / "verifier.json"),
                        help="its verifier (default: make embedder's); 'stacked': the "
                        "shipped verifier with its shipped stack (cache.pair_scorer)")
    parser.add_argument("--baseline-verifier", default=None,
                        help="the old embedder's verifier (default: fitted here); "
                        "'unstacked': --verifier without its stack")
    parser.add_argument("--pair-scorer", default="shipped",
                        help="the pair scorer a stacked --verifier names: shipped "
                        "(synapse_common/pair_scorer.npz) or a tune-pair-scorer file")
    parser.add_argument("--heldout", action="store_true",
                        help="only the question-disjoint held-out split of calibration")
    parser.add_argument("--limit", type=int, default=0, help="at most this many pairs")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per lookup (cache)")
    parser.add_argument("--fixed-precision", type=float, default=0.90,
                        help="also every method at this precision, thresholded on the pairs "
                        "measured (the same oracle point for all)")
    parser.add_argument("--embed-cache", default=None, help="old embedder's vectors (.npz)")
    parser.add_argument("--tuned-cache", default=None, help="tuned embedder's vectors (.npz)")
    args = parser.parse_args(argv)
    for flag, path in (("--tuning", args.tuning), ("--verifier", args.verifier)):
        if path not in ("none", "shipped", "stacked") and not pathlib.Path(path).expanduser().exists():
            parser.error(f"{flag}: no file {path}; run `make embedder` (or synapsectl cache "
                         f"tune-embedder) first, or name a file")
    model = (verifier.with_stack(verifier.load(), verifier.STACK_PATH)
             if args.verifier == "stacked" else verifier.load(args.verifier))
    seed = int(model.meta.get("fit", {}).get("seed", 7))
    everything = calibrate.read_pairs(args.pairs)
    keep = (calibrate.split(everything, seed)["test"] if args.heldout
            else np.arange(len(everything)))
    if args.limit:
        keep = keep[:args.limit]
    pairs = everything.take(keep)
    # Only the texts measured are embedded, except that fitting the old verifier here
    # needs the old embedder's vectors of every pair.
    new_va, new_vb, new_id = pair_vectors(pairs, args.tuning, args.tuned_cache)
    scorer = None
    if model.stack is not None:
        scorer = PairScorer(args.pair_scorer)
        if scorer.file.scorer_id != model.stack.pair_scorer:
            raise SystemExit(f"--verifier's stack is fitted for {model.stack.pair_scorer}, "
                             f"--pair-scorer is {scorer.file.scorer_id}")
    if args.baseline_verifier == "unstacked":
        old_va, old_vb, old_id = new_va, new_vb, new_id
        old_model = verifier.from_json({k: v for k, v in model.to_json().items()
                                        if k != "stack"})
    elif args.baseline_verifier:
        old_va, old_vb, old_id = pair_vectors(pairs, "none", args.embed_cache)
        old_model = verifier.load(args.baseline_verifier)
    else:
        all_va, all_vb, old_id = pair_vectors(everything, "none", args.embed_cache)
        old_model = old_verifier(everything, all_va, all_vb, seed, old_id)
        old_va, old_vb = all_va[keep], all_vb[keep]
    if model.embedder_id and model.embedder_id != new_id:
        raise SystemExit(f"--verifier was fitted for {model.embedder_id}, not {new_id}")
    new = Side("tuned", new_va, new_vb, model, scorer)
    old = Side("old", old_va, old_vb, old_model)
    out = (run_pairs(pairs, new, old, args.fixed_precision) if args.mode == "pairs"
           else run_cache(pairs, everything, new, old, args.top_k, args.fixed_precision))
    _table(args.mode, len(pairs), out)
    ours, fixed = out.pop("ours"), out.pop("fixed")
    print(json.dumps({"bench": "semantic_cache", "mode": args.mode,
                      **{k: ours[k] for k in FIELDS},
                      **{k: {f: v[f] for f in FIELDS if f in v} for k, v in out.items()},
                      "at_fixed_precision": {k: v if k == "precision" else
                                             {f: v[f] for f in (*FIELDS, "threshold")}
                                             for k, v in fixed.items()},
                      "embedder_id": new_id, "old_embedder_id": old_id}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
