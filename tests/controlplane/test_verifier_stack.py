"""The verifier's optional stack: a pair scorer's logit stacked on the verifier's own.

Parsed and validated on load (errors name the field), its math, its operating points, and
its place in the digest: a file without a stack keeps the digest it always had.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from controlplane.core import verifier

SHIPPED_DIGEST = "5ff0e75aca3ab9b8"     # the shipped file's digest before stacks existed


def stack_section(**fields: object) -> dict:
    return {"pair_scorer": "minilm-l6-ce@1", "weights": [0.8, 0.5], "bias": -0.3,
            "floor": 0.05, "threshold": 0.7, "target_precision": 0.9,
            "curve": [[0.6, 0.85, 0.5], [0.7, 0.9, 0.42], [0.8, 0.95, 0.3]],
            "calibration": {"scores": [0.3, 0.7, 0.9], "labels": [0, 1, 1],
                            "positives_below": 4},
            "metrics": {"heldout": {"recall": 0.42}}, **fields}


def stacked_file(tmp_path: pathlib.Path, **fields: object) -> pathlib.Path:
    data = json.loads(verifier.DEFAULT_PATH.read_text())
    data["stack"] = stack_section(**fields)
    path = tmp_path / f"stacked-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(data))
    return path


def test_a_file_without_a_stack_keeps_its_digest():
    shipped = verifier.load()
    assert shipped.stack is None
    assert shipped.digest == shipped.base_digest == SHIPPED_DIGEST


def test_the_stack_is_parsed_and_round_trips(tmp_path):
    model = verifier.load(stacked_file(tmp_path))
    stack = model.stack
    assert stack is not None and stack.pair_scorer == "minilm-l6-ce@1"
    assert stack.weights == (0.8, 0.5) and stack.bias == -0.3 and stack.floor == 0.05
    assert stack.calibration is not None and stack.calibration.positives_below == 4
    again = tmp_path / "again.json"
    model.save(again)
    reread = verifier.load(again)
    assert reread.to_json()["stack"] == model.to_json()["stack"]
    assert reread.digest == model.digest and reread.base_digest == model.base_digest


def test_the_digest_covers_the_stack_and_base_digest_is_the_verifier_alone(tmp_path):
    one = verifier.load(stacked_file(tmp_path))
    other = verifier.load(stacked_file(tmp_path, weights=[0.8, 0.6]))
    assert one.digest != other.digest != SHIPPED_DIGEST and one.digest != SHIPPED_DIGEST
    assert one.base_digest == other.base_digest == SHIPPED_DIGEST
    # Operating points are not part of the scoring function.
    moved = verifier.load(stacked_file(tmp_path, threshold=0.8))
    assert moved.digest == one.digest
    # Integers in the file hash as the same numbers as floats.
    ints = verifier.load(stacked_file(tmp_path, weights=[1, 2], bias=0))
    floats = verifier.load(stacked_file(tmp_path, weights=[1.0, 2.0], bias=0.0))
    assert ints.digest == floats.digest


@pytest.mark.parametrize("fields,named", [
    ({"pair_scorer": ""}, "stack.pair_scorer"),
    ({"weights": [1.0]}, "stack.weights"),
    ({"weights": [1.0, "x"]}, "stack.weights"),
    ({"weights": [1.0, float("nan")]}, "stack.weights"),
    ({"bias": None}, "stack.bias"),
    ({"floor": 1.5}, "stack.floor"),
    ({"threshold": "high"}, "stack.threshold"),
    ({"target_precision": -0.1}, "stack.target_precision"),
    ({"curve": [[0.5, 0.9]]}, "stack.curve"),
    ({"calibration": {"scores": [0.5], "labels": [1, 0], "positives_below": 0}},
     "stack.calibration"),
    ({"calibration": {"scores": [0.5]}}, "stack.calibration"),
    ({"metrics": [1]}, "stack.metrics"),
    ({"model_points": {"llama": {"threshold": 0.5}}}, "stack.model_points"),
])
def test_a_malformed_stack_is_refused_naming_the_field(tmp_path, fields, named):
    with pytest.raises(verifier.VerifierError, match=named.replace(".", r"\.")):
        verifier.load(stacked_file(tmp_path, **fields))
    data = json.loads(verifier.DEFAULT_PATH.read_text())
    data["stack"] = "yes"
    with pytest.raises(verifier.VerifierError, match="stack: must be an object"):
        verifier.from_json(data)


def test_stacked_probability_is_the_logistic_of_both_logits(tmp_path):
    model = verifier.load(stacked_file(tmp_path))
    p, pair = np.array([0.5, 0.9, 0.0, 1.0]), np.array([2.0, -1.0, 3.0, -3.0])
    got = model.stacked(p, pair)
    q = np.clip(p, 1e-6, 1 - 1e-6)
    want = 1 / (1 + np.exp(-(0.8 * np.log(q / (1 - q)) + 0.5 * pair - 0.3)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert math.isclose(got[0], 1 / (1 + math.exp(-(0.5 * 2.0 - 0.3))))
    assert 0.0 < got[2] < 1e-3 and got[3] > 0.999      # clipped, never inf or nan
    with pytest.raises(verifier.VerifierError, match="no stack"):
        verifier.load().stacked(p, pair)


def test_the_stack_threshold_follows_its_own_curve_and_model_points(tmp_path):
    point = {"target_precision": 0.95, "threshold": 0.77, "expected_precision": 0.95,
             "feedback_pairs": 40}
    model = verifier.load(stacked_file(tmp_path, model_points={"llama": point}))
    assert model.stack_threshold_for(0.9) == 0.7                  # the fitted point
    assert model.stack_threshold_for(0.85) == 0.6                 # from the curve
    assert model.stack_threshold_for(0.95) == 0.8
    assert model.stack_threshold_for(0.95, "llama") == 0.77       # the model's own point
    assert model.stack_threshold_for(0.99) > 1.0                  # unreachable: never
    # The verifier's own operating point is untouched by the stack.
    assert model.threshold_for(0.9) == verifier.load().threshold_for(0.9)


def test_assess_scores_every_candidate_as_judge_does():
    model = verifier.load()
    rng = np.random.default_rng(0)
    vs = rng.normal(size=(3, model.dim)).astype(np.float32)
    vs /= np.linalg.norm(vs, axis=1, keepdims=True)
    texts = ["How do I reset it?", "How can I reset it?", "Why is the sky blue?"]
    seen = model.assess("How do I reset it?", vs[0], texts, list(vs))
    verdict = model.judge("How do I reset it?", vs[0], texts, list(vs))
    assert seen.probabilities.shape == seen.similarities.shape == (3,)
    assert verdict.index == int(np.argmax(seen.probabilities))
    assert verdict.score == seen.probabilities[verdict.index]
    assert math.isclose(seen.similarities[0], 1.0, abs_tol=1e-5)
