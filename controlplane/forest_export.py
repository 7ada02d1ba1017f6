"""sklearn's HistGradientBoosting (binary) as the verifier's plain arrays, and the check
that the numpy evaluator (``verifier.Forest.margin``) reproduces sklearn exactly."""

from __future__ import annotations

from typing import Any

import numpy as np

from controlplane.core import verifier

EMPTY = verifier.Forest(feature=np.zeros((1, 1), np.int64), threshold=np.zeros((1, 1)),
                         left=np.zeros((1, 1), np.int64), right=np.zeros((1, 1), np.int64),
                         value=np.zeros((1, 1)), depth=0, baseline=0.0)


def export_forest(gb: Any) -> verifier.Forest:
    """sklearn HistGradientBoosting (binary) → padded numpy arrays, leaves self-looping."""
    trees = [pred[0].nodes for pred in gb._predictors]
    width = max(len(t) for t in trees)
    shape = (len(trees), width)
    feature = np.zeros(shape, np.int64)
    threshold = np.zeros(shape, np.float64)
    left = np.tile(np.arange(width, dtype=np.int64), (len(trees), 1))
    right = left.copy()
    value = np.zeros(shape, np.float64)
    depth = 0
    for i, nodes in enumerate(trees):
        if np.any(nodes["is_categorical"]):
            raise ValueError("categorical splits are not supported by the exporter")
        inner = nodes["is_leaf"] == 0
        n = len(nodes)
        feature[i, :n] = np.where(inner, nodes["feature_idx"], 0)
        threshold[i, :n] = np.where(inner, nodes["num_threshold"], 0.0)
        left[i, :n] = np.where(inner, nodes["left"], np.arange(n))
        right[i, :n] = np.where(inner, nodes["right"], np.arange(n))
        value[i, :n] = np.where(inner, 0.0, nodes["value"])
        depth = max(depth, int(nodes["depth"].max()))
    return verifier.Forest(feature=feature, threshold=threshold, left=left, right=right,
                           value=value, depth=depth, baseline=float(gb._baseline_prediction[0][0]))


def check(gb: Any, model: verifier.Verifier, raw: np.ndarray) -> None:
    # The numpy evaluator must reproduce sklearn exactly, or the file would lie.
    inputs = model.model_inputs(raw)
    ours = model.forest.margin(inputs)
    theirs = gb.decision_function(inputs)
    if not np.allclose(ours, theirs, atol=1e-6):
        raise RuntimeError(f"exported trees disagree with sklearn (max gap "
                           f"{float(np.max(np.abs(ours - theirs))):.3g})")
