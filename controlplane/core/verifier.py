"""The semantic-cache verifier: a calibrated pair classifier and its operating point.

A vector search returns the nearest entries of a scope; nearness is not sameness
("bare cosine 0.80 serves a wrong answer on 31 % of its hits" on QQP). The verifier
scores each candidate pair (query text, candidate text) and accepts the best one whose
calibrated probability reaches the operating point.

Design decisions:

- **Features**: cosine, the lexical guards of ``verifier_features`` (numbers, negation,
  question word, overlap, length, names, and overlap weighted by the rarity of words
  in the training texts, ``idf``, kept in the file), and projections of ``|u - v|`` and ``u * v``
  on their first principal components (fitted on the training pairs). Projections, not
  the raw 2 x 384 values: measured on QQP, trees over 16 + 16 projections beat both the
  raw vectors and an MLP/logistic regression over them at the high-precision end, which
  is the only end a cache uses.
- **Model**: gradient-boosted decision trees (fitted with sklearn's
  HistGradientBoosting), exported as plain arrays and evaluated here with numpy, all
  trees at once, one vectorised step per tree level.
- **Calibration**: Platt scaling (``sigmoid(a * margin + b)``) fitted on a question-
  disjoint validation split, so ``score`` is a probability; it is what
  ``x-synapse-cache-score`` reports.
- **Operating point**: the lowest validation threshold whose precision reaches the
  target. The file also carries the validation precision/recall curve, so a model with
  its own ``cache_target_precision`` picks its threshold without a refit
  (:meth:`Verifier.threshold_for`).
- **Per-model operating points** (``model_points``): ``synapsectl cache calibrate
  --from-feedback`` refits the threshold of a model on the pairs its users marked right
  or wrong plus the validation pairs the file carries (``calibration``: the validation
  scores from ``CALIBRATION_FLOOR`` up, with their labels), without touching the trees;
  :meth:`threshold_for` uses a model's own point when its target matches.
- **File**: plain JSON (never pickle), with its feature version (files of version 1
  are still read and scored with the columns they were fitted on), the embedder id it
  was fitted for (``embedder_id``: :class:`Judges` picks the verifier of a lookup's
  embedder, and a control plane pinned to one with ``cache.verifier_path`` or
  ``cache.embedder_id`` refuses to start with a verifier fitted for another) and the
  held-out metrics; ``controlplane.calibrate``
  writes it. ``digest`` names the scoring function (projections, trees, Platt scaling):
  a feedback score is comparable with this verifier's scores when the digests match, and
  refitting operating points does not change it.
- **Stack** (optional ``stack`` section, :class:`Stack`): a logistic regression over the
  verifier's logit and a cross-encoder's logit for the pair (``Node.ScorePairs``, the
  agents' "pair scorer"), ``sigmoid(w_verifier * logit(p) + w_pair * pair_logit + bias)``,
  with its own operating point, curve, validation pairs and per-model points. Only
  candidates whose verifier probability reaches ``floor`` are worth a scorer call. The
  stack is fitted for one scorer (``pair_scorer``, the id the agents answer with); with
  another scorer, or none, the cache judges with the verifier alone. ``digest`` covers
  the stack's scoring part (scorer, weights, bias, floor), so feedback scored by the
  stack is never mixed with another stack's; ``base_digest`` is the digest without it
  (equal to ``digest`` in files without a stack, whose digest is what it always was):
  hits the verifier decided alone carry it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from controlplane.core import verifier_features

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
DEFAULT_PATH = pathlib.Path(__file__).with_name("verifier_default.json")
# Feature version 1, fitted on untuned MiniLM vectors before files recorded their
# embedder: what judges, by default, vectors of an embedder no shipped verifier was fitted
# for (as every embedder's were judged before DEFAULT_PATH recorded its own).
ANY_EMBEDDER_PATH = pathlib.Path(__file__).with_name("verifier_any_embedder.json")
# The stack of DEFAULT_PATH's verifier on the shipped pair scorer (cache.pair_scorer): a
# stack file names the digest of the verifier it was fitted on (STACK_FORMAT).
STACK_PATH = pathlib.Path(__file__).with_name("verifier_default_stack.json")
STACK_FORMAT = "synapse-verifier-stack/1"
FORMAT = "synapse-verifier/2"
CALIBRATION_FLOOR = 0.2     # validation scores below this are never an operating point
# The pair scorer's logits: a cross-encoder's lie well inside this bound (its head is a
# linear map of a pooled hidden state). The Node.ScorePairs client refuses answers beyond
# it, and the stack clamps to it too, whoever gives it a logit.
MAX_PAIR_LOGIT = 50.0


class VerifierError(ValueError):
    """The verifier file is missing, malformed or for another feature version."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    index: int            # which candidate
    similarity: float     # cosine of the two embeddings
    score: float          # calibrated probability that the pair is a duplicate
    accepted: bool


@dataclasses.dataclass(frozen=True)
class Projection:
    """``(x - mean) @ components.T``: the first principal components of a feature block."""

    mean: F64           # (dim,)
    components: F64     # (k, dim)

    def apply(self, x: F64) -> F64:
        return np.asarray((x - self.mean) @ self.components.T, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Forest:
    """Boosted binary trees padded to one node count: arrays of shape (trees, nodes).

    A row goes to ``left`` when ``x[feature] <= threshold``; leaves point to themselves,
    so walking ``depth`` steps from the root lands every row on its leaf.
    """

    feature: I64
    threshold: F64
    left: I64
    right: I64
    value: F64
    depth: int
    baseline: float

    def margin(self, x: F64) -> F64:
        # Flat indices (tree * nodes + node) into the raveled arrays: one-dimensional
        # ``take`` is several times faster than two-dimensional fancy indexing.
        n, (trees, nodes) = x.shape[0], self.feature.shape
        roots = np.arange(trees, dtype=np.int64) * nodes
        at = np.tile(roots, (n, 1))
        row_start = (np.arange(n, dtype=np.int64) * x.shape[1])[:, None]
        xs = np.ascontiguousarray(x, dtype=np.float64).ravel()
        feature, threshold = self.feature.ravel(), self.threshold.ravel()
        left, right = self.left.ravel(), self.right.ravel()
        for _ in range(self.depth):
            go_left = xs.take(row_start + feature.take(at)) <= threshold.take(at)
            at = roots + np.where(go_left, left.take(at), right.take(at))
        return np.asarray(self.baseline + self.value.ravel().take(at).sum(axis=1),
                          dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The validation pairs scoring at least ``CALIBRATION_FLOOR``, kept in the file."""

    scores: F64
    labels: npt.NDArray[np.int8]
    positives_below: int        # positives scoring under the floor (for recall)

    def to_json(self) -> dict[str, Any]:
        return {"scores": _round(self.scores, 6), "labels": self.labels.tolist(),
                "positives_below": self.positives_below}


@dataclasses.dataclass(frozen=True)
class ModelPoint:
    """A model's own operating point, refitted from its users' feedback."""

    target_precision: float
    threshold: float
    expected_precision: float       # on the validation + feedback pairs it was fitted on
    feedback_pairs: int


@dataclasses.dataclass(frozen=True)
class Assessment:
    """Every candidate's cosine and verifier probability, in the candidates' order."""

    similarities: F64
    probabilities: F64


@dataclasses.dataclass(frozen=True, eq=False)
class Stack:
    """The verifier stacked with a pair scorer's logit (see the module docstring)."""

    pair_scorer: str                    # the scorer id (Node.ScorePairs' scorer_id) fitted for
    weights: tuple[float, float]        # (w_verifier, w_pair)
    bias: float
    floor: float                        # verifier probability below which no pair is scored
    threshold: float
    target_precision: float
    curve: tuple[tuple[float, float, float], ...] = ()   # (threshold, precision, recall)
    calibration: Calibration | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_points: dict[str, ModelPoint] = dataclasses.field(default_factory=dict)

    def probabilities(self, p: npt.ArrayLike, pair_logits: npt.ArrayLike) -> F64:
        """Stacked probabilities of pairs with verifier probabilities ``p``."""
        q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0 - 1e-6)
        w_verifier, w_pair = self.weights
        logits = np.clip(np.asarray(pair_logits, dtype=np.float64), -MAX_PAIR_LOGIT,
                         MAX_PAIR_LOGIT)     # a NaN stays one: never at the cut
        z = w_verifier * np.log(q / (1.0 - q)) + w_pair * logits + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0))), dtype=np.float64)

    def threshold_for(self, target_precision: float, model: str | None = None) -> float:
        """The stack's operating point for ``target_precision`` (rule of
        :func:`operating_point`)."""
        return operating_point(self.threshold, self.target_precision, self.curve,
                               self.model_points, target_precision, model)

    def scoring_part(self) -> dict[str, Any]:
        """What turns (p, pair logit) into a stacked score: part of the digest."""
        return {"pair_scorer": self.pair_scorer, "weights": list(self.weights),
                "bias": self.bias, "floor": self.floor}

    def to_json(self) -> dict[str, Any]:
        return {
            **self.scoring_part(), "threshold": self.threshold,
            "target_precision": self.target_precision,
            "curve": [[round(t, 6), round(p, 6), round(r, 6)] for t, p, r in self.curve],
            **({"calibration": self.calibration.to_json()}
               if self.calibration is not None else {}),
            **({"metrics": self.metrics} if self.metrics else {}),
            **({"model_points": {m: dataclasses.asdict(p)
                                 for m, p in sorted(self.model_points.items())}}
               if self.model_points else {}),
        }


class Verifier:
    def __init__(self, *, diff: Projection, prod: Projection, forest: Forest,
                 platt: tuple[float, float], threshold: float, target_precision: float,
                 curve: Sequence[tuple[float, float, float]], meta: dict[str, Any],
                 model_points: dict[str, ModelPoint] | None = None,
                 calibration: Calibration | None = None,
                 idf: verifier_features.Idf = verifier_features.NO_IDF,
                 feature_version: int = verifier_features.FEATURE_VERSION,
                 digest: str = "", stack: Stack | None = None,
                 base_digest: str = "") -> None:
        self.diff = diff
        self.prod = prod
        self.forest = forest
        self.platt = platt
        self.threshold = threshold
        self.target_precision = target_precision
        self.curve = sorted(curve)                 # (threshold, precision, recall)
        self.meta = meta
        self.model_points = dict(model_points or {})
        self.calibration = calibration
        self.idf = idf
        self.feature_version = feature_version
        self.stack = stack
        self._digest = digest
        self._base_digest = base_digest

    @property
    def digest(self) -> str:
        """Names the scoring function, the stack's included (see the module docstring)."""
        if not self._digest:
            self._digest = scoring_digest(self.to_json())
        return self._digest

    @property
    def base_digest(self) -> str:
        """The digest of the verifier alone (``digest`` when there is no stack)."""
        if self.stack is None:
            return self.digest
        if not self._base_digest:
            data = self.to_json()
            del data["stack"]
            self._base_digest = scoring_digest(data)
        return self._base_digest

    @property
    def dim(self) -> int:
        return int(self.diff.mean.shape[0])

    @property
    def embedder_id(self) -> str:
        """The embedder this verifier was fitted for ("" in files older than the field)."""
        return str(self.meta.get("embedder_id", ""))

    # -- scoring -------------------------------------------------------------------------
    def features(self, texts_a: list[str], texts_b: list[str], us: npt.NDArray[Any],
                 vs: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Raw features of the pairs (``texts_a[i]``, ``texts_b[i]``) with their vectors."""
        return verifier_features.batch_features(texts_a, texts_b, us, vs, self.idf,
                                                self.feature_version)

    def model_inputs(self, raw: npt.NDArray[Any]) -> F64:
        """Raw pair features (``verifier_features.batch_features``) → the trees' inputs."""
        x = np.asarray(raw, dtype=np.float64)
        d = self.dim
        return np.concatenate([x[:, 2 * d:], self.diff.apply(x[:, :d]),
                               self.prod.apply(x[:, d:2 * d])], axis=1)

    def margins(self, raw: npt.NDArray[Any]) -> F64:
        return self.forest.margin(self.model_inputs(raw))

    def probabilities(self, raw: npt.NDArray[Any]) -> F64:
        a, b = self.platt
        z = np.clip(a * self.margins(raw) + b, -50.0, 50.0)
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)

    def assess(self, query_text: str, query_vec: npt.NDArray[Any], texts: Sequence[str],
               vectors: Sequence[npt.NDArray[Any]]) -> Assessment:
        """Every candidate's cosine and calibrated probability (``texts`` not empty)."""
        n = len(texts)
        raw = self.features([query_text] * n, list(texts), np.tile(np.asarray(query_vec), (n, 1)),
                            np.stack([np.asarray(v) for v in vectors]))
        return Assessment(np.asarray(raw[:, 2 * self.dim], dtype=np.float64),
                          self.probabilities(raw))

    def judge(self, query_text: str, query_vec: npt.NDArray[Any], texts: Sequence[str],
              vectors: Sequence[npt.NDArray[Any]], threshold: float | None = None
              ) -> Verdict | None:
        """The best-scoring candidate, accepted when its score reaches the threshold."""
        if not texts:
            return None
        seen = self.assess(query_text, query_vec, texts, vectors)
        scores = seen.probabilities
        best = int(np.argmax(scores))
        cut = self.threshold if threshold is None else threshold
        return Verdict(index=best, similarity=float(seen.similarities[best]),
                       score=float(scores[best]), accepted=bool(scores[best] >= cut))

    def stacked(self, p: npt.ArrayLike, pair_logits: npt.ArrayLike) -> F64:
        """Stacked probabilities (:meth:`Stack.probabilities`); VerifierError without one."""
        if self.stack is None:
            raise VerifierError("this verifier has no stack")
        return self.stack.probabilities(p, pair_logits)

    def threshold_for(self, target_precision: float, model: str | None = None) -> float:
        """Lowest validated threshold whose precision reaches ``target_precision``: the
        model's own point when one was refitted for that target."""
        return operating_point(self.threshold, self.target_precision, self.curve,
                               self.model_points, target_precision, model)

    def stack_threshold_for(self, target_precision: float, model: str | None = None) -> float:
        """The stack's operating point (:meth:`Stack.threshold_for`); VerifierError
        without a stack."""
        if self.stack is None:
            raise VerifierError("this verifier has no stack")
        return self.stack.threshold_for(target_precision, model)

    # -- persistence ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        f = self.forest
        return {
            "format": FORMAT, "feature_version": self.feature_version,
            **self.meta,
            "target_precision": self.target_precision, "threshold": self.threshold,
            "platt": list(self.platt),
            **({"idf": self.idf.to_json()} if self.feature_version >= 2 else {}),
            "projections": {name: {"mean": _round(p.mean), "components": _round(p.components)}
                            for name, p in (("diff", self.diff), ("prod", self.prod))},
            "forest": {"baseline": f.baseline, "depth": f.depth,
                       "feature": f.feature.tolist(), "threshold": _round(f.threshold, 9),
                       "left": f.left.tolist(), "right": f.right.tolist(),
                       "value": _round(f.value, 9)},
            "curve": [[round(t, 6), round(p, 6), round(r, 6)] for t, p, r in self.curve],
            **({"calibration": self.calibration.to_json()}
               if self.calibration is not None else {}),
            **({"model_points": {m: dataclasses.asdict(p)
                                 for m, p in sorted(self.model_points.items())}}
               if self.model_points else {}),
            **({"stack": self.stack.to_json()} if self.stack is not None else {}),
        }

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n",
                                      encoding="utf-8")


class Judges:
    """The verifier that judges a lookup, chosen by the embedder id of its vectors.

    ``fitted`` judges vectors of the embedder it was fitted for, and ``others``, when
    given, those of any other embedder. Without ``others`` (one verifier the operator
    chose, or a test's), ``fitted`` judges whatever it is given: the cache refuses vectors
    of another embedder before they get here (``response_cache.Options.embedder_id``).
    """

    def __init__(self, fitted: Verifier, others: Verifier | None = None) -> None:
        self.fitted = fitted
        self.others = others

    @classmethod
    def of(cls, model: Verifier | Judges) -> Judges:
        return model if isinstance(model, Judges) else cls(model)

    def for_embedder(self, embedder_id: str) -> Verifier:
        if self.others is None or embedder_id == self.fitted.embedder_id:
            return self.fitted
        return self.others


def load(path: str | pathlib.Path | None = None) -> Verifier:
    """Read a verifier file (default: the shipped one); raises :class:`VerifierError`."""
    file = pathlib.Path(path) if path else DEFAULT_PATH
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerifierError(f"cannot read verifier file {file}: {exc}") from exc
    try:
        return from_json(data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise VerifierError(f"verifier file {file} is malformed: {exc}") from exc


def stack_file(model: Verifier) -> dict[str, Any]:
    """``model``'s stack alone, naming the verifier it belongs to (:func:`with_stack`)."""
    if model.stack is None:
        raise VerifierError("this verifier has no stack")
    return {"format": STACK_FORMAT, "base_digest": model.base_digest,
            "stack": model.stack.to_json()}


def with_stack(base: Verifier, path: str | pathlib.Path = STACK_PATH) -> Verifier:
    """``base`` with the stack of a stack file fitted on it; :class:`VerifierError` when
    the file is unreadable or belongs to another verifier (a refitted base needs its stack
    refitted too)."""
    file = pathlib.Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerifierError(f"cannot read stack file {file}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != STACK_FORMAT:
        raise VerifierError(f"{file} is not a {STACK_FORMAT} file")
    if data.get("base_digest") != base.base_digest:
        raise VerifierError(f"the stack in {file} was fitted on verifier "
                            f"{data.get('base_digest')!r}, not on {base.base_digest}")
    try:
        return from_json({**{k: v for k, v in base.to_json().items() if k != "stack"},
                          "stack": data["stack"]})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise VerifierError(f"stack file {file} is malformed: {exc}") from exc


def check_embedder(model: Verifier, embedder_id: str) -> None:
    """Refuse a verifier fitted for another embedder than ``embedder_id`` (the one whose
    vectors it will judge): its features and operating point mean nothing there."""
    if model.embedder_id != embedder_id:
        fitted = model.embedder_id or "an unrecorded embedder (a file older than the field)"
        raise VerifierError(f"the verifier was fitted for embedder {fitted}, not "
                            f"{embedder_id}; refit it for this embedder (synapsectl cache "
                            "calibrate / tune-embedder) or use the one fitted with it")


def operating_point(threshold: float, fitted_target: float,
                    curve: Sequence[tuple[float, float, float]],
                    model_points: dict[str, ModelPoint], target_precision: float,
                    model: str | None) -> float:
    """Lowest validated threshold whose precision reaches ``target_precision``: the
    model's own point when one was refitted for that target (verifier and stack alike)."""
    point = model_points.get(model) if model is not None else None
    if point is not None and abs(point.target_precision - target_precision) < 1e-9:
        return point.threshold
    if abs(target_precision - fitted_target) < 1e-9 or not curve:
        return threshold
    ok = [t for t, p, _ in curve if p >= target_precision]
    return min(ok) if ok else 1.0 + 1e-6   # unreachable precision: never accept


def scoring_digest(data: dict[str, Any]) -> str:
    """A short hash of what turns a pair into a score (not of thresholds or metrics).

    A file without ``stack`` hashes exactly as before the stack existed."""
    parts: dict[str, Any] = {k: data[k] for k in ("feature_version", "projections", "forest",
                                                 "platt", "idf")
                             if k in data}       # no idf before feature version 2
    if "stack" in data:
        parts["stack"] = stack_from_json(data["stack"]).scoring_part()   # numbers as floats
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def stack_from_json(data: Any) -> Stack:
    """The ``stack`` section, validated; VerifierError naming the field at fault."""
    if not isinstance(data, dict):
        raise VerifierError("verifier stack: must be an object")
    scorer = data.get("pair_scorer")
    if not isinstance(scorer, str) or not scorer:
        raise VerifierError("verifier stack.pair_scorer: must be the scorer id (a non-empty "
                            f"string), got {scorer!r}")
    weights = data.get("weights")
    if (not isinstance(weights, list) or len(weights) != 2
            or not all(_is_number(w) for w in weights)):
        raise VerifierError("verifier stack.weights: must be two finite numbers "
                            f"[w_verifier, w_pair], got {weights!r}")
    bias = _number(data, "bias")
    floor = _number(data, "floor", (0.0, 1.0))
    threshold = _number(data, "threshold")
    target = _number(data, "target_precision", (0.0, 1.0))
    return Stack(pair_scorer=scorer, weights=(float(weights[0]), float(weights[1])),
                 bias=bias, floor=floor, threshold=threshold, target_precision=target,
                 curve=_curve(data.get("curve", []), "verifier stack.curve"),
                 calibration=_calibration(data.get("calibration"),
                                          "verifier stack.calibration"),
                 metrics=_object(data.get("metrics", {}), "verifier stack.metrics"),
                 model_points=_model_points(data.get("model_points", {}),
                                            "verifier stack.model_points"))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and bool(np.isfinite(x))


def _number(data: dict[str, Any], field: str,
            bounds: tuple[float, float] | None = None) -> float:
    value: Any = data.get(field)
    if not _is_number(value) or (bounds is not None
                                 and not bounds[0] <= value <= bounds[1]):
        within = f" in [{bounds[0]}, {bounds[1]}]" if bounds is not None else ""
        raise VerifierError(f"verifier stack.{field}: must be a finite number{within}, "
                            f"got {value!r}")
    return float(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VerifierError(f"{where}: must be an object, got {type(value).__name__}")
    return value


def _curve(rows: Any, where: str) -> tuple[tuple[float, float, float], ...]:
    try:
        return tuple(sorted((float(t), float(p), float(r)) for t, p, r in rows))
    except (TypeError, ValueError) as exc:
        raise VerifierError(f"{where}: must be [threshold, precision, recall] rows: "
                            f"{exc}") from None


def _calibration(cal: Any, where: str) -> Calibration | None:
    if cal is None:
        return None
    try:
        calibration = Calibration(np.asarray(cal["scores"], dtype=np.float64),
                                  np.asarray(cal["labels"], dtype=np.int8),
                                  int(cal["positives_below"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifierError(f"{where}: needs scores, labels and positives_below: "
                            f"{exc!r}") from None
    if calibration.scores.shape != calibration.labels.shape:
        raise VerifierError(f"{where}: scores and labels differ in length")
    return calibration


def _model_points(points: Any, where: str) -> dict[str, ModelPoint]:
    try:
        return {str(m): ModelPoint(float(p["target_precision"]), float(p["threshold"]),
                                   float(p["expected_precision"]), int(p["feedback_pairs"]))
                for m, p in _object(points, where).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifierError(f"{where}: malformed point: {exc!r}") from None


def from_json(data: dict[str, Any]) -> Verifier:
    if data.get("format") != FORMAT:
        raise VerifierError(f"not a {FORMAT} file (format {data.get('format')!r})")
    version = data.get("feature_version")
    if version not in verifier_features.VERSIONS:
        raise VerifierError(f"verifier feature version {version!r} is not one of "
                            f"{verifier_features.VERSIONS}: refit it")
    proj = {name: Projection(mean=np.asarray(p["mean"], dtype=np.float64),
                             components=np.asarray(p["components"], dtype=np.float64))
            for name, p in data["projections"].items()}
    fj = data["forest"]
    forest = Forest(feature=np.asarray(fj["feature"], dtype=np.int64),
                    threshold=np.asarray(fj["threshold"], dtype=np.float64),
                    left=np.asarray(fj["left"], dtype=np.int64),
                    right=np.asarray(fj["right"], dtype=np.int64),
                    value=np.asarray(fj["value"], dtype=np.float64),
                    depth=int(fj["depth"]), baseline=float(fj["baseline"]))
    _check_shapes(proj["diff"], proj["prod"], forest, version)
    meta: dict[str, Any] = {k: data[k] for k in ("embedder", "embedder_id", "dim", "metrics",
                                                 "fit", "feedback") if k in data}
    curve = [(float(t), float(p), float(r)) for t, p, r in data.get("curve", [])]
    cal = data.get("calibration")
    calibration = None if cal is None else Calibration(
        np.asarray(cal["scores"], dtype=np.float64), np.asarray(cal["labels"], dtype=np.int8),
        int(cal["positives_below"]))
    if calibration is not None and calibration.scores.shape != calibration.labels.shape:
        raise VerifierError("verifier calibration scores and labels differ in length")
    points = {str(m): ModelPoint(float(p["target_precision"]), float(p["threshold"]),
                                 float(p["expected_precision"]), int(p["feedback_pairs"]))
              for m, p in data.get("model_points", {}).items()}
    stack = stack_from_json(data["stack"]) if "stack" in data else None
    return Verifier(diff=proj["diff"], prod=proj["prod"], forest=forest,
                    platt=(float(data["platt"][0]), float(data["platt"][1])),
                    threshold=float(data["threshold"]),
                    target_precision=float(data["target_precision"]), curve=curve, meta=meta,
                    model_points=points, calibration=calibration,
                    idf=(verifier_features.Idf.from_json(data["idf"]) if version >= 2
                         else verifier_features.NO_IDF),
                    feature_version=version,
                    digest=scoring_digest(data), stack=stack,
                    base_digest=scoring_digest({k: v for k, v in data.items() if k != "stack"}))


def _check_shapes(diff: Projection, prod: Projection, forest: Forest, version: int) -> None:
    shapes = {forest.feature.shape, forest.threshold.shape, forest.left.shape,
              forest.right.shape, forest.value.shape}
    if len(shapes) != 1 or forest.feature.ndim != 2:
        raise VerifierError("verifier trees have inconsistent shapes")
    n_inputs = (1 + len(verifier_features.lexical_names(version)) + diff.components.shape[0]
                + prod.components.shape[0])
    if forest.feature.size and (forest.feature.max() >= n_inputs or forest.feature.min() < 0):
        raise VerifierError("verifier trees use features the file does not define")
    nodes = forest.feature.shape[1]
    if forest.left.size and max(int(forest.left.max()), int(forest.right.max())) >= nodes:
        raise VerifierError("verifier trees point outside themselves")
    if diff.components.shape[1] != diff.mean.shape[0] or prod.mean.shape != diff.mean.shape:
        raise VerifierError("verifier projections do not match one embedding dimension")


def _round(array: npt.NDArray[Any], digits: int = 7) -> Any:
    # Limited significant digits keep the file small; scores move by ~1e-7 at most.
    return np.vectorize(lambda x: float(f"{x:.{digits}g}"), otypes=[float])(array).tolist()
