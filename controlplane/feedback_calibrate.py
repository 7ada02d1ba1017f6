"""``synapsectl cache calibrate --from-feedback FILE...``: refit each model's operating point.

Reads the judged semantic hits that ``POST /v1/cache/feedback`` kept (one JSON object per
line: model, label 1 right / 0 wrong, the verifier's score at serving time, the verifier's
digest), and for every model refits the threshold of the verifier at the target precision
on those pairs *plus* the shipped validation pairs the verifier file carries
(``Verifier.calibration``). The trees are untouched; the result is the same verifier with
a ``model_points`` entry per model, written to ``--out`` (point ``cache.verifier_path`` at
it).

Design decisions:

- **Scores, not texts**: each judged hit carries the score the verifier gave it, so no
  embedding or model is needed here. Pairs scored by another verifier (another digest)
  are skipped and counted: their scores mean something else.
- **How much feedback counts**: the judged hits of a model weigh, together, as much as
  the validation pairs above the current threshold once there are ``FULL_TRUST`` of them,
  proportionally less before; the validation pairs keep the shape of the curve below the
  region users ever see (hits are only ever above the threshold).
- **Direction**: more wrong hits than the validation pairs predict lower the precision
  above the current threshold, so the threshold rises until the mix reaches the target;
  hits judged right raise it, so the threshold may fall.
- **Report**: per model the verdicts, the old and new threshold, the precision expected
  at the new one (on the weighted mix) and the judged hits' own precision above it with
  its 95 % Wilson interval.
- **Stacked verifiers** (a file with ``stack``): hits the stack decided carry the full
  digest and the stacked score, so they refit the *stack's* per-model points on the
  stack's own validation pairs (``stack.calibration``); hits the verifier decided alone
  (no scorer, another scorer, a time-out) carry ``base_digest`` and the verifier's score,
  so they refit the verifier's own points, as for a file without a stack. Both are
  written to the one output file; the report has one table per part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from controlplane.core import cache_feedback, verifier

FULL_TRUST = 100        # judged hits at which feedback weighs as much as validation


class FeedbackError(ValueError):
    """The feedback files cannot be used (message names the file and line)."""


@dataclasses.dataclass
class Judged:
    scores: list[float] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)


class Scored(Protocol):
    """What owns an operating point: the verifier, or its stack."""

    @property
    def calibration(self) -> verifier.Calibration | None: ...

    def threshold_for(self, target_precision: float, model: str | None = None) -> float: ...


@dataclasses.dataclass(frozen=True)
class Part:
    """The refits of one operating-point owner: the verifier alone or its stack."""

    title: str
    target: float
    fits: list[Refit]
    stack: bool


@dataclasses.dataclass(frozen=True)
class Refit:
    model: str
    right: int
    wrong: int
    old_threshold: float
    point: verifier.ModelPoint
    judged_above: tuple[float, float, float, int]   # estimate, lower, upper, n


def read_feedback(paths: Iterable[str], digest: str) -> tuple[dict[str, Judged], int]:
    """Judged hits per model scored by the verifier ``digest``; and how many were not."""
    by_digest, skipped = read_feedback_of(paths, (digest,))
    return by_digest[digest], skipped


def read_feedback_of(paths: Iterable[str], digests: Iterable[str]
                     ) -> tuple[dict[str, dict[str, Judged]], int]:
    """Judged hits per digest (of ``digests``) and model; and how many were of none."""
    found: dict[str, dict[str, Judged]] = {d: {} for d in digests}
    skipped = 0
    for name in paths:
        file = pathlib.Path(name)
        rotated = file.with_name(file.name + ".1")
        for path in ([rotated] if rotated.exists() else []) + [file]:
            for model, score, label, scored_by in _rows(path):
                if scored_by not in found:
                    skipped += 1
                    continue
                judged = found[scored_by].setdefault(model, Judged())
                judged.scores.append(score)
                judged.labels.append(label)
    return found, skipped


def _rows(path: pathlib.Path) -> Iterable[tuple[str, float, int, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FeedbackError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            model, score, label = row["model"], row["score"], row["label"]
            if not isinstance(model, str) or label not in (0, 1) or score is None:
                raise ValueError("model, score and label (0 or 1) are required")
            yield model, float(score), int(label), str(row.get("verifier", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedbackError(f"{path}:{lineno}: not a judged hit: {exc}") from None


def refit(model: Scored, name: str, judged: Judged, target: float) -> Refit:
    """The operating point of ``name`` on the validation pairs plus its judged hits."""
    cal = model.calibration
    if cal is None and isinstance(model, verifier.Stack):
        raise FeedbackError("the verifier's stack carries no validation pairs "
                            "(stack.calibration): refit the stack with them")
    if cal is None:
        raise FeedbackError("the verifier file carries no validation pairs (refit it with "
                            "this version of synapsectl cache calibrate or tune-embedder)")
    old = model.threshold_for(target, name)
    fb_scores = np.asarray(judged.scores, dtype=np.float64)
    fb_labels = np.asarray(judged.labels, dtype=np.int8)
    above_old = max(int(np.sum(cal.scores >= old)), 1)
    weight = above_old * min(1.0, len(fb_scores) / FULL_TRUST) / max(len(fb_scores), 1)
    scores = np.concatenate([cal.scores, fb_scores])
    labels = np.concatenate([cal.labels, fb_labels])
    weights = np.concatenate([np.ones(len(cal.scores)), np.full(len(fb_scores), weight)])
    threshold, expected = _lowest_threshold(scores, labels, weights, target)
    accepted = fb_scores >= threshold
    right_above = int(np.sum(fb_labels[accepted]))
    n_above = int(np.sum(accepted))
    point = verifier.ModelPoint(target, threshold, round(expected, 4), len(fb_scores))
    return Refit(name, int(fb_labels.sum()), int(len(fb_labels) - fb_labels.sum()), old, point,
                 (*cache_feedback.wilson(right_above, n_above), n_above))


def _lowest_threshold(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                      target: float) -> tuple[float, float]:
    """Lowest cut whose weighted precision reaches ``target`` (never accept if none)."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(np.float64), weights[order]
    tp, accepted = np.cumsum(w * y), np.cumsum(w)
    precision = tp / np.maximum(accepted, 1e-12)
    cuts = np.flatnonzero(np.r_[s[1:] != s[:-1], True] & (precision >= target))
    if not len(cuts):
        return float(s[0]) + 1e-6, 0.0
    best = int(cuts[-1])
    return float(s[best]), float(precision[best])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-feedback", nargs="+", metavar="FILE", default=None,
                        help="judged hits (cache.feedback_path of each replica): refit each "
                             "model's operating point on them plus the shipped pairs")
    parser.add_argument("--verifier", default=None,
                        help="with --from-feedback: the verifier to refit (default: shipped)")


def run(args: argparse.Namespace) -> int:
    try:
        model = verifier.load(args.verifier)
        found, skipped = read_feedback_of(args.from_feedback,
                                          {model.digest, model.base_digest})
        if not any(found.values()):
            raise FeedbackError(f"no judged hits scored by this verifier ({model.digest}) in "
                                f"{', '.join(args.from_feedback)} ({skipped} by others)")
        parts = _refit_parts(model, found, args.target_precision)
    except (FeedbackError, verifier.VerifierError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    for part in parts:
        for fit in part.fits:
            if part.stack and model.stack is not None:
                model.stack = dataclasses.replace(
                    model.stack, model_points={**model.stack.model_points, fit.model: fit.point})
            else:
                model.model_points[fit.model] = fit.point
    model.meta["feedback"] = {"files": [pathlib.Path(f).name for f in args.from_feedback],
                              "skipped_other_verifier": skipped}
    try:
        model.save(args.out)
    except OSError as exc:
        print(f"calibrate: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    for part in parts:
        if model.stack is not None:
            print(part.title)
        _report(part.fits, skipped, part.target)
    print(f"wrote {args.out}: set cache.verifier_path to it on every control-plane replica")
    return 0


def _refit_parts(model: verifier.Verifier, found: dict[str, dict[str, Judged]],
                 target: float | None) -> list[Part]:
    """The refits of the verifier alone and, with a stack, of the stack."""
    parts: list[Part] = []
    alone = found[model.base_digest] if model.stack is not None else found[model.digest]
    if alone:
        goal = target or model.target_precision
        parts.append(Part("verifier alone (hits decided without the pair scorer):", goal,
                          [refit(model, name, alone[name], goal) for name in sorted(alone)],
                          stack=False))
    stack = model.stack
    if stack is not None and found[model.digest]:
        goal = target or stack.target_precision
        stacked = found[model.digest]
        parts.append(Part(f"stack (verifier + pair scorer {stack.pair_scorer}):", goal,
                          [refit(stack, name, stacked[name], goal) for name in sorted(stacked)],
                          stack=True))
    return parts


def _report(fits: list[Refit], skipped: int, target: float) -> None:
    print(f"target precision {target:.2f}; judged hits from another verifier skipped: "
          f"{skipped}")
    print(f"{'model':<28}{'right':>6}{'wrong':>6}{'old':>9}{'new':>9}{'expected':>10}"
          f"{'judged above new (95% CI)':>30}")
    for f in fits:
        est, low, high, n = f.judged_above
        judged = f"{est:.3f} [{low:.3f}, {high:.3f}] n={n}" if n else "none above"
        print(f"{f.model:<28}{f.right:>6}{f.wrong:>6}{f.old_threshold:>9.4f}"
              f"{f.point.threshold:>9.4f}{f.point.expected_precision:>10.4f}{judged:>30}")
