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
- **Tenants are adversaries of each other**, and a model's point is shared by all of its
  tenants, so no one tenant's verdicts may set it for the others. Two rules, both per
  model and per refit:

  - *A cap on each tenant's weight*: no tenant counts for more than ``max_tenant_share``
    of the verdicts counted (``--max-tenant-share``), or for more than an equal share
    when fewer tenants than ``1 / max_tenant_share`` judged. A capped tenant's verdicts
    all stay in, each down-weighted, so its own mix of right and wrong is kept; the
    report names it and how many of its verdicts were counted and dropped.
  - *Asymmetric safety*: verdicts that hits were wrong may always raise the threshold,
    but a tenant's "right" verdicts may never make it looser than the refit *without
    that tenant* would (the point is the strictest of the pooled refit and every
    leave-one-tenant-out refit), and loosening it below the current point needs verdicts
    from at least ``min_tenants`` tenants (``--min-tenants``, default 2). A flood of
    "right" verdicts from one tenant thus neither loosens the point nor dilutes other
    tenants' "wrong" ones. ``--min-tenants 1`` pools all verdicts with no leave-one-out,
    for a fleet whose tenants trust each other (a single-tenant fleet, say).
- **Report**: per model the verdicts, the old and new threshold, the precision expected
  at the new one (on the weighted mix) and the judged hits' own precision above it with
  its 95 % Wilson interval; then per model and tenant the verdicts counted and dropped,
  and, when a tenant's leave-out or too few tenants held the point, by whom and where
  the pooled refit would have put it. Tenant names are printed: the operator runs this.
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
import math
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from controlplane.core import cache_feedback, verifier

FULL_TRUST = 100        # judged hits at which feedback weighs as much as validation
MAX_TENANT_SHARE = 0.25  # of a model's counted verdicts, at most, from any one tenant
MIN_TENANTS = 2          # tenants whose verdicts it takes to loosen a model's point
NO_TENANT = "(no tenant)"  # rows written before the tenant was recorded


class FeedbackError(ValueError):
    """The feedback files cannot be used (message names the file and line)."""


@dataclasses.dataclass
class Judged:
    scores: list[float] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    tenants: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Influence:
    """How far one tenant's verdicts may move a model's point (module docstring)."""

    max_tenant_share: float = MAX_TENANT_SHARE
    min_tenants: int = MIN_TENANTS


@dataclasses.dataclass(frozen=True)
class TenantCount:
    """One tenant's verdicts on one model, and how many of them the refit counted."""

    tenant: str
    right: int
    wrong: int
    counted: int        # the verdicts weigh as this many (all of them unless capped)

    @property
    def capped(self) -> bool:
        return self.counted < self.right + self.wrong


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
    tenants: tuple[TenantCount, ...] = ()
    pooled: float = 0.0     # where the pooled refit (every tenant, capped) put the point
    held: str = ""          # why the point is stricter than ``pooled``; "" when it is not


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
            for model, score, label, scored_by, tenant in _rows(path):
                if scored_by not in found:
                    skipped += 1
                    continue
                judged = found[scored_by].setdefault(model, Judged())
                judged.scores.append(score)
                judged.labels.append(label)
                judged.tenants.append(tenant)
    return found, skipped


def _rows(path: pathlib.Path) -> Iterable[tuple[str, float, int, str, str]]:
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
            yield (model, float(score), int(label), str(row.get("verifier", "")),
                   str(row.get("tenant") or NO_TENANT))
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedbackError(f"{path}:{lineno}: not a judged hit: {exc}") from None


def refit(model: Scored, name: str, judged: Judged, target: float,
          influence: Influence = Influence()) -> Refit:
    """The operating point of ``name`` on the validation pairs plus its judged hits,
    no tenant weighing more than ``influence`` allows (see the module docstring)."""
    cal = model.calibration
    if cal is None and isinstance(model, verifier.Stack):
        raise FeedbackError("the verifier's stack carries no validation pairs "
                            "(stack.calibration): refit the stack with them")
    if cal is None:
        raise FeedbackError("the verifier file carries no validation pairs (refit it with "
                            "this version of synapsectl cache calibrate or tune-embedder)")
    old = model.threshold_for(target, name)
    above_old = max(int(np.sum(cal.scores >= old)), 1)
    fb_scores = np.asarray(judged.scores, dtype=np.float64)
    fb_labels = np.asarray(judged.labels, dtype=np.int8)
    names, of = np.unique(np.asarray(judged.tenants, dtype=str), return_inverse=True)
    counts = np.bincount(of, minlength=len(names))

    def fit(tenants: set[str]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        per_tenant = _verdict_weights(counts * np.isin(names, sorted(tenants)), above_old,
                                      influence.max_tenant_share)
        weights = per_tenant[of]
        used = weights > 0     # a weightless pair could still become a cut: leave it out
        scores = np.concatenate([cal.scores, fb_scores[used]])
        labels = np.concatenate([cal.labels, fb_labels[used]])
        weights = np.concatenate([np.ones(len(cal.scores)), weights[used]])
        return _lowest_threshold(scores, labels, weights, target)[0], scores, labels, weights

    everyone = set(names.tolist())
    pooled, scores, labels, weights = fit(everyone)
    threshold, held = _held(pooled, old, everyone, influence, lambda ts: fit(ts)[0])
    expected = _precision_above(scores, labels, weights, threshold)
    accepted = fb_scores >= threshold
    right_above = int(np.sum(fb_labels[accepted]))
    n_above = int(np.sum(accepted))
    point = verifier.ModelPoint(target, threshold, round(expected, 4), len(fb_scores))
    rights = np.bincount(of, weights=fb_labels, minlength=len(names)).astype(np.int64)
    return Refit(name, int(fb_labels.sum()), int(len(fb_labels) - fb_labels.sum()), old, point,
                 (*cache_feedback.wilson(right_above, n_above), n_above),
                 _tenant_counts(names, counts, rights, influence.max_tenant_share),
                 pooled, held)


def _held(pooled: float, old: float, tenants: set[str], influence: Influence,
          fit: Callable[[set[str]], float]) -> tuple[float, str]:
    """The point no one tenant loosened, and why it is stricter than ``pooled`` ("" if not).

    The strictest of the pooled refit and every refit leaving one tenant out: a tenant's
    "right" verdicts cannot take the point below where the others' verdicts put it, while
    anyone's "wrong" verdicts raise it. With fewer than ``min_tenants`` tenants (a lone
    tenant's leave-out is no feedback at all) the point does not fall below ``old``."""
    if influence.min_tenants <= 1:
        return pooled, ""
    threshold, held = pooled, ""
    if len(tenants) < influence.min_tenants and old > threshold:
        threshold = old
        held = (f"verdicts from {len(tenants)} tenant(s); loosening the point needs "
                f"{influence.min_tenants} (--min-tenants)")
    if len(tenants) >= 2:
        for tenant in sorted(tenants):
            without = fit(tenants - {tenant})
            if without > threshold:
                threshold = without
                held = f"the refit without tenant {tenant!r} goes no lower"
    return threshold, held


def _verdict_weights(counts: np.ndarray, above_old: int, share: float) -> np.ndarray:
    """Per tenant (``counts`` its verdicts, 0 for one left out), the weight of each of its
    verdicts: the counted verdicts weigh, together, as much as the validation pairs above
    the current threshold once there are ``FULL_TRUST`` of them; a capped tenant's are
    each down-weighted, so that all of them count as ``cap``."""
    present = counts > 0
    cap = tenant_cap([int(n) for n in counts[present]], share)
    counted = counts if cap is None else np.minimum(counts, cap)
    total = int(counted.sum())
    per_verdict = above_old * min(1.0, total / FULL_TRUST) / max(total, 1)
    return np.where(present, per_verdict * counted / np.maximum(counts, 1), 0.0)


def tenant_cap(counts: list[int], share: float) -> int | None:
    """The most verdicts any one tenant may count for, None when no tenant is over.

    The largest cap ``c`` at which no tenant's ``min(n, c)`` exceeds ``share`` of all the
    counted verdicts, with ``share`` raised to an equal split (``1 / tenants``) when there
    are too few tenants for it; always at least the smallest tenant's count, so every
    tenant counts for something. The excess of a cap over the share it allows shrinks as
    ``c`` grows (fewer tenants stay above it), so the caps that fit form one range."""
    if not counts:
        return None
    share = max(share, 1.0 / len(counts))

    def fits(c: int) -> bool:
        return c <= share * sum(min(n, c) for n in counts) + 1e-9 * c

    low, high = min(counts), max(counts)
    if fits(high):
        return None
    while high - low > 1:        # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _tenant_counts(names: np.ndarray, counts: np.ndarray, rights: np.ndarray, share: float
                   ) -> tuple[TenantCount, ...]:
    """Per tenant (most verdicts first): right, wrong and counted in the pooled refit."""
    cap = tenant_cap([int(n) for n in counts], share)
    rows = [TenantCount(str(t), int(r), int(n - r), int(n) if cap is None else min(int(n), cap))
            for t, n, r in zip(names, counts, rights, strict=True)]
    return tuple(sorted(rows, key=lambda row: (-(row.right + row.wrong), row.tenant)))


def _precision_above(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     threshold: float) -> float:
    """Weighted precision of the pairs at or above ``threshold`` (0 when there are none)."""
    accepted = scores >= threshold
    mass = float(np.sum(weights[accepted]))
    return float(np.sum(weights[accepted] * labels[accepted])) / mass if mass > 0 else 0.0


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
    parser.add_argument("--max-tenant-share", type=_share, default=MAX_TENANT_SHARE,
                        metavar="FRACTION",
                        help="with --from-feedback: the most any one tenant's verdicts may "
                             "count for among a model's (an equal share when fewer tenants "
                             f"judged it; default {MAX_TENANT_SHARE})")
    parser.add_argument("--min-tenants", type=_at_least_one, default=MIN_TENANTS, metavar="N",
                        help="with --from-feedback: tenants whose verdicts it takes to loosen "
                             "a model's point, no one tenant taking it below the others' "
                             f"refit (default {MIN_TENANTS}; 1 pools every tenant's verdicts "
                             "as equals, for tenants that trust each other)")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"not a share in (0, 1]: {text!r}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of tenants, 1 or more: {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    influence = Influence(args.max_tenant_share, args.min_tenants)
    try:
        model = verifier.load(args.verifier)
        found, skipped = read_feedback_of(args.from_feedback,
                                          {model.digest, model.base_digest})
        if not any(found.values()):
            raise FeedbackError(f"no judged hits scored by this verifier ({model.digest}) in "
                                f"{', '.join(args.from_feedback)} ({skipped} by others)")
        parts = _refit_parts(model, found, args.target_precision, influence)
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
                              "skipped_other_verifier": skipped,
                              "max_tenant_share": influence.max_tenant_share,
                              "min_tenants": influence.min_tenants}
    try:
        model.save(args.out)
    except OSError as exc:
        print(f"calibrate: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    for part in parts:
        if model.stack is not None:
            print(part.title)
        _report(part.fits, skipped, part.target)
        _report_tenants(part.fits, influence)
    print(f"wrote {args.out}: set cache.verifier_path to it on every control-plane replica")
    return 0


def _refit_parts(model: verifier.Verifier, found: dict[str, dict[str, Judged]],
                 target: float | None, influence: Influence) -> list[Part]:
    """The refits of the verifier alone and, with a stack, of the stack."""
    parts: list[Part] = []
    alone = found[model.base_digest] if model.stack is not None else found[model.digest]
    if alone:
        goal = target or model.target_precision
        parts.append(Part("verifier alone (hits decided without the pair scorer):", goal,
                          [refit(model, name, alone[name], goal, influence)
                           for name in sorted(alone)], stack=False))
    stack = model.stack
    if stack is not None and found[model.digest]:
        goal = target or stack.target_precision
        stacked = found[model.digest]
        parts.append(Part(f"stack (verifier + pair scorer {stack.pair_scorer}):", goal,
                          [refit(stack, name, stacked[name], goal, influence)
                           for name in sorted(stacked)], stack=True))
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


def _report_tenants(fits: list[Refit], influence: Influence) -> None:
    """Per model and tenant: verdicts, counted and dropped; who was capped, what held."""
    share = influence.max_tenant_share
    equal = math.ceil(1 / share - 1e-9)      # fewer tenants than this share equally
    print(f"verdicts per tenant: no tenant counts for over {share:.0%} of a model's verdicts"
          + (f" (an equal share among fewer than {equal} tenants)" if equal > 1 else "")
          + "; a capped tenant's verdicts all stay in, down-weighted to count as 'used'")
    if influence.min_tenants > 1:
        print(f"loosening a model's point needs verdicts from {influence.min_tenants} "
              "tenants, and no one tenant takes it below the refit without that tenant")
    else:
        print("every tenant's verdicts pooled as equals (--min-tenants 1)")
    print(f"{'model':<28}{'tenant':<24}{'right':>6}{'wrong':>6}{'used':>7}{'dropped':>8}")
    for f in fits:
        counted = sum(t.counted for t in f.tenants)
        for t in f.tenants:
            dropped = t.right + t.wrong - t.counted
            note = (f"  capped at {t.counted} ({t.counted / counted:.0%} of "
                    f"{counted} counted)" if t.capped else "")
            print(f"{f.model:<28}{t.tenant:<24}{t.right:>6}{t.wrong:>6}{t.counted:>7}"
                  f"{dropped:>8}{note}")
    for f in fits:
        if f.held:
            print(f"{f.model}: kept at {f.point.threshold:.4f}, not the pooled refit's "
                  f"{f.pooled:.4f}: {f.held}")
