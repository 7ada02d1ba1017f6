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
  tenants, so no one tenant's verdicts may set it for the others, in either direction: a
  flood of "right" verdicts would serve wrong answers to everyone, a flood of "wrong"
  ones would switch the semantic cache off for everyone. Two rules, both per model and
  per refit:

  - *A cap on each tenant's weight*: no tenant counts for more than ``max_tenant_share``
    of the verdicts counted (``--max-tenant-share``), or for more than an equal share
    when fewer tenants than ``1 / max_tenant_share`` judged. A capped tenant's verdicts
    all stay in, each down-weighted, so its own mix of right and wrong is kept; the
    report names it and how many of its verdicts were counted and dropped. The cap alone
    is not enough: among two tenants each weighs half, and half the verdicts wrong at
    the top scores is enough to push the point to "never accept".
  - *Leave one tenant out* (``_held``, the one home of this rule): each refit leaving
    one tenant's verdicts out is where the point would go were that tenant lying. The
    point moves from the current one towards the pooled refit only as far as the pooled
    refit and every leave-one-out refit all move it: up, to the lowest of them; down, to
    the highest of them; and not at all when one of them moves it the other way or
    leaves it where it is. So a move only one tenant's verdicts carry is not applied,
    whichever way it goes, while verdicts that agree across tenants (several tenants
    finding hits wrong, say) still move it. With fewer than ``min_tenants`` tenants
    (``--min-tenants``, default 2; a lone tenant's leave-out is no feedback at all) the
    point stays where it is. The report names the tenant whose leave-out held the point
    (tenant names only). ``--min-tenants 1`` pools all verdicts with no leave-one-out,
    for a fleet whose tenants trust each other (a single-tenant fleet, say).

    The cost: one tenant can veto a move (keep the current point), which is the safe
    side both ways; two tenants can be told apart only by a third, so against one honest
    tenant a liar holds the point rather than moving it. Several tenant identities in
    one adversary's hands (keys it was given) are beyond what leaving one out can see.
- **Report**: per model the verdicts, the old and new threshold, the precision expected
  at the new one (on the weighted mix the point rests on: without the tenant whose
  leave-out held it) and the judged hits' own precision above it with its 95 % Wilson
  interval; then per model and tenant the verdicts counted and dropped, and, when a
  tenant's leave-out or too few tenants held the point, by whom and where the pooled
  refit would have put it. Tenant names are printed: the operator runs this.
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

from controlplane.adapters import feedback_log
from controlplane.core import cache_feedback, verifier
from synapse_common import cli_numbers

FULL_TRUST = 100        # judged hits at which feedback weighs as much as validation
MAX_TENANT_SHARE = 0.25  # of a model's counted verdicts, at most, from any one tenant
MIN_TENANTS = 2          # tenants whose verdicts it takes to move a model's point
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
    held: str = ""          # why the point is not ``pooled``; "" when it is
    decisive: tuple[str, ...] = ()  # the tenant whose leave-out held it (``_held``)


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
        files = feedback_log.files_of(name)
        if not files:
            raise FeedbackError(f"{name}: no judged hits kept there (neither the file nor "
                                f"its tenants' folder {feedback_log.tenant_dir(name).name})")
        for path in files:
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
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise FeedbackError(f"{path}: cannot read: {exc.strerror or exc}") from None
    cut = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            cut += 1        # cut short while written (a crash, a full disk): only itself
            continue
        try:
            model, score, label = row["model"], row["score"], row["label"]
            if not isinstance(model, str) or label not in (0, 1) or score is None:
                raise ValueError("model, score and label (0 or 1) are required")
            yield (model, float(score), int(label), str(row.get("verifier", "")),
                   str(row.get("tenant") or NO_TENANT))
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedbackError(f"{path}:{lineno}: not a judged hit: {exc}") from None
    if cut:
        print(f"calibrate: {path}: {cut} line(s) skipped that are not JSON (cut short "
              "while written)", file=sys.stderr)


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

    def fit(tenants: frozenset[str]) -> Mix:
        if not tenants:     # no verdicts at all: the point stays where it is
            return Mix(old, cal.scores, cal.labels, np.ones(len(cal.scores)))
        per_tenant = _verdict_weights(counts * np.isin(names, sorted(tenants)), above_old,
                                      influence.max_tenant_share)
        weights = per_tenant[of]
        used = weights > 0     # a weightless pair could still become a cut: leave it out
        scores = np.concatenate([cal.scores, fb_scores[used]])
        labels = np.concatenate([cal.labels, fb_labels[used]])
        weights = np.concatenate([np.ones(len(cal.scores)), weights[used]])
        return Mix(_lowest_threshold(scores, labels, weights, target)[0], scores, labels,
                   weights)

    everyone = frozenset(names.tolist())
    pooled = fit(everyone)
    hold = _held(pooled.threshold, old, everyone, influence, lambda ts: fit(ts).threshold)
    basis = pooled if hold.rests_on == everyone else fit(hold.rests_on)
    threshold = hold.threshold
    expected = _precision_above(basis.scores, basis.labels, basis.weights, threshold)
    accepted = fb_scores >= threshold
    right_above = int(np.sum(fb_labels[accepted]))
    n_above = int(np.sum(accepted))
    point = verifier.ModelPoint(target, threshold, round(expected, 4), len(fb_scores))
    rights = np.bincount(of, weights=fb_labels, minlength=len(names)).astype(np.int64)
    return Refit(name, int(fb_labels.sum()), int(len(fb_labels) - fb_labels.sum()), old, point,
                 (*cache_feedback.wilson(right_above, n_above), n_above),
                 _tenant_counts(names, counts, rights, influence.max_tenant_share),
                 pooled.threshold, hold.why, hold.decisive)


@dataclasses.dataclass(frozen=True)
class Mix:
    """One refit: its point and the weighted pairs (validation + verdicts) it was fit on."""

    threshold: float
    scores: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class Hold:
    """Where ``_held`` put the point, why it is not the pooled refit's, by whom, and the
    tenants whose verdicts it rests on (for the precision expected there)."""

    threshold: float
    rests_on: frozenset[str]
    why: str = ""
    decisive: tuple[str, ...] = ()


def _held(pooled: float, old: float, tenants: frozenset[str], influence: Influence,
          fit: Callable[[frozenset[str]], float]) -> Hold:
    """The point no one tenant moved (the rule is in the module docstring).

    From ``old``, the point moves towards ``pooled`` only as far as every refit leaving
    one tenant out moves it the same way: up to the lowest of them, down to the highest;
    it stays at ``old`` when one of them does not move it that way. ``decisive`` names
    the tenant whose leave-out bounds the move (the first by name when several do).
    Fewer than ``min_tenants`` tenants do not move the point at all."""
    if influence.min_tenants <= 1 or pooled == old:
        return Hold(pooled, tenants)
    if len(tenants) < influence.min_tenants:
        return Hold(old, frozenset(), f"verdicts from {len(tenants)} tenant(s); moving the "
                                      f"point needs {influence.min_tenants} (--min-tenants)")
    up = pooled > old
    without = {tenant: fit(tenants - {tenant}) for tenant in sorted(tenants)}
    bound = min(without.values()) if up else max(without.values())
    if (bound >= pooled) if up else (bound <= pooled):
        return Hold(pooled, tenants)
    decisive = [t for t, w in without.items() if w == bound]
    alike = "".join(f", or {t!r}" for t in decisive[1:4]) + (", ..." if len(decisive) > 4
                                                            else "")
    if up:
        where = "goes no higher" if bound > old else "does not raise it"
    else:
        where = "goes no lower" if bound < old else "does not lower it"
    return Hold(max(bound, old) if up else min(bound, old), tenants - {decisive[0]},
                f"the refit without tenant {decisive[0]!r}{alike} {where} ({bound:.4f})",
                (decisive[0],))


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
                        help="judged hits (cache.feedback_path of each replica, its tenants' "
                             "files read with it): refit each "
                             "model's operating point on them plus the shipped pairs")
    parser.add_argument("--verifier", default=None,
                        help="with --from-feedback: the verifier to refit (default: shipped)")
    parser.add_argument("--max-tenant-share", type=cli_numbers.number(0, 1, low_open=True),
                        default=MAX_TENANT_SHARE, metavar="FRACTION",
                        help="with --from-feedback: the most any one tenant's verdicts may "
                             "count for among a model's (an equal share when fewer tenants "
                             f"judged it; default {MAX_TENANT_SHARE})")
    parser.add_argument("--min-tenants", type=cli_numbers.integer(1), default=MIN_TENANTS,
                        metavar="N",
                        help="with --from-feedback: tenants whose verdicts it takes to move "
                             "a model's point either way, no one tenant moving it further "
                             "than the refit without it "
                             f"(default {MIN_TENANTS}; 1 pools every tenant's verdicts "
                             "as equals, for tenants that trust each other)")


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
        print(f"moving a model's point (up or down) needs verdicts from "
              f"{influence.min_tenants} tenants, and no one tenant moves it further than "
              "the refit without that tenant")
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
