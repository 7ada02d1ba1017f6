"""``synapsectl cache calibrate --from-feedback`` on a verifier with a stack: hits the
stack decided refit the stack's per-model points, hits the verifier decided alone (they
carry its base digest) refit the verifier's own; nothing else in the file moves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlplane.core import verifier
from tests.controlplane.test_verifier_feedback import calibrate, write_judged


def synthetic(seed: int) -> verifier.Calibration:
    """Calibrated validation scores: a pair scoring s is a duplicate with probability s."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(verifier.CALIBRATION_FLOOR, 1.0, 4000)
    return verifier.Calibration(scores, (rng.uniform(0, 1, 4000) < scores).astype(np.int8),
                                positives_below=100)


@pytest.fixture
def stacked(tmp_path):
    model = verifier.load()
    model.calibration = synthetic(7)
    data = model.to_json()
    data["stack"] = {"pair_scorer": "minilm-l6-ce@test", "weights": [0.7, 0.6], "bias": 0.1,
                     "floor": 0.05, "threshold": 0.9, "target_precision": 0.9,
                     "calibration": synthetic(8).to_json()}
    path = tmp_path / "stacked.json"
    path.write_text(json.dumps(data))
    return verifier.load(path), path


def just_above(base: float, n: int, seed: int) -> list[float]:
    return [float(s) for s in np.random.default_rng(seed).uniform(base, min(1.0, base + 0.05),
                                                                  n)]


def test_stack_hits_refit_the_stack_and_verifier_hits_the_verifier(stacked, tmp_path,
                                                                   capsys):
    model, path = stacked
    stack_base, alone_base = model.stack_threshold_for(0.9), model.threshold_for(0.9)
    fb = tmp_path / "fb.jsonl"
    # two tenants alike: a lone tenant's verdicts move no point (test_feedback_tenants)
    write_judged(fb, model, [("llama", s, 0 if (i // 2) % 3 == 0 else 1)
                             for i, s in enumerate(just_above(stack_base, 150, 1))],
                 tenants=("acme", "globex"))
    write_judged(fb, model, [("qwen", s, 1) for s in just_above(alone_base, 150, 2)],
                 digest=model.base_digest, tenants=("acme", "globex"))
    write_judged(fb, model, [("other", 0.99, 0)] * 4, digest="0123456789abcdef")

    code, out, err = calibrate(capsys, "--from-feedback", str(fb), "--verifier", str(path),
                               "--out", str(tmp_path / "new.json"))
    assert code == 0, err
    new = verifier.load(tmp_path / "new.json")
    assert (new.digest, new.base_digest) == (model.digest, model.base_digest)
    assert new.stack is not None and set(new.stack.model_points) == {"llama"}
    assert set(new.model_points) == {"qwen"}
    assert new.stack_threshold_for(0.9, "llama") > stack_base
    assert new.threshold_for(0.9, "qwen") < alone_base
    assert new.stack_threshold_for(0.9, "qwen") == stack_base        # untouched
    assert new.stack.weights == model.stack.weights
    assert "stack (verifier + pair scorer minilm-l6-ce@test)" in out
    assert "verifier alone" in out and "skipped: 4" in out


def test_a_stack_without_validation_pairs_is_refused_by_name(stacked, tmp_path, capsys):
    model, path = stacked
    data = json.loads(path.read_text())
    del data["stack"]["calibration"]
    path.write_text(json.dumps(data))
    write_judged(tmp_path / "fb.jsonl", model, [("llama", 0.95, 1)])
    code, _, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                             "--verifier", str(path), "--out", str(tmp_path / "new.json"))
    assert code == 2 and "stack.calibration" in err
    assert not (tmp_path / "new.json").exists()
