"""A small pair-scorer file for tests: the installed MiniLM with its last layer and a head
from a fixed seed (real weights, real format; what it scores means nothing)."""

from __future__ import annotations

import pathlib

from synapse_common import embedder_tuning, pair_scorer, pair_scorer_model


def small_file(folder: pathlib.Path) -> pathlib.Path:
    """Write ``folder/pair_scorer.npz``: layer 5 and a head from seed 3."""
    net = pair_scorer_model.build(seed=3)
    layers, weight, bias = pair_scorer_model.trained_arrays(net)
    top = {name: value for name, value in layers.items() if name.startswith("encoder.layer.5.")}
    path = folder / "pair_scorer.npz"
    pair_scorer.save(path, embedder_tuning.base_id(), top, weight, bias,
                     {"max_len": 64, "pooling": "mean"})
    return path
