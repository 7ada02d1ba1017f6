"""``synapsectl cache calibrate --from-feedback``: operating points move the right way.

A constructed validation set (calibrated scores: a pair scoring s is a duplicate with
probability s) sits in a real verifier file; judged hits are written the way the control
plane writes them (``feedback_log.JsonlPairs``) and the real command refits.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from controlplane import ctl
from controlplane.adapters import feedback_log
from controlplane.core import cache_feedback, verifier


@pytest.fixture
def judge(tmp_path):
    rng = np.random.default_rng(7)
    scores = rng.uniform(verifier.CALIBRATION_FLOOR, 1.0, 4000)
    labels = (rng.uniform(0, 1, 4000) < scores).astype(np.int8)
    model = verifier.load()
    model.calibration = verifier.Calibration(scores, labels, positives_below=100)
    path = tmp_path / "verifier.json"
    model.save(path)
    return verifier.load(path), path


def write_judged(path, model: verifier.Verifier, hits: list[tuple[str, float, int]],
                 digest: str | None = None, tenants: tuple[str, ...] = ("acme",)) -> None:
    """Append ``hits`` as judged by ``tenants`` in turn (hit i by tenant i mod len)."""
    sink = feedback_log.JsonlPairs(path)
    for i, (name, score, label) in enumerate(hits):
        asyncio.run(sink.record(cache_feedback.Pair(
            tenants[i % len(tenants)], name, f"q{i}", f"e{i}", label, score, 0.9,
            model.digest if digest is None else digest, "emb", f"r{i}", 0.0)))


def calibrate(capsys, *args: str) -> tuple[int, str, str]:
    code = ctl.main(["cache", "calibrate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_wrong_hits_raise_the_threshold_and_right_hits_lower_it(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    rng = np.random.default_rng(3)
    just_above = rng.uniform(base, min(1.0, base + 0.05), 150)
    hits = [("strict", float(s), 0 if i % 3 == 0 else 1) for i, s in enumerate(just_above)]
    hits += [("lenient", float(s), 1) for s in just_above]
    hits += [("other", 0.99, 0)] * 5        # scored by another verifier: skipped
    write_judged(tmp_path / "fb.jsonl", model, hits[:-5], tenants=("acme", "globex"))
    write_judged(tmp_path / "fb.jsonl", model, hits[-5:], digest="0123456789abcdef")

    code, out, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                               "--verifier", str(path), "--out", str(tmp_path / "new.json"))
    assert code == 0, err
    refitted = verifier.load(tmp_path / "new.json")
    assert refitted.digest == model.digest          # same scoring, new operating points
    strict, lenient = refitted.model_points["strict"], refitted.model_points["lenient"]
    assert strict.threshold > base > lenient.threshold
    assert refitted.threshold_for(0.90, "strict") == strict.threshold
    assert refitted.threshold_for(0.90, "unjudged") == base
    assert strict.expected_precision >= 0.90 and strict.feedback_pairs == 150
    assert "other" not in refitted.model_points and "skipped: 5" in out
    assert "strict" in out and "lenient" in out and "expected" in out


def test_feedback_from_another_verifier_only_is_refused(judge, tmp_path, capsys):
    model, path = judge
    write_judged(tmp_path / "fb.jsonl", model, [("m", 0.99, 0)], digest="ffffffffffffffff")
    code, _, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                             "--verifier", str(path), "--out", str(tmp_path / "new.json"))
    assert code == 2 and "no judged hits scored by this verifier" in err
    assert not (tmp_path / "new.json").exists()


def test_a_broken_feedback_line_is_named(judge, tmp_path, capsys):
    _, path = judge
    (tmp_path / "fb.jsonl").write_text('{"model": "m", "label": 3, "score": 0.5}\n')
    code, _, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                             "--verifier", str(path), "--out", str(tmp_path / "new.json"))
    assert code == 2 and "fb.jsonl:1" in err


def test_model_points_survive_the_file(judge, tmp_path):
    model, _ = judge
    model.model_points["m"] = verifier.ModelPoint(0.95, 0.97, 0.951, 40)
    model.save(tmp_path / "v.json")
    again = verifier.load(tmp_path / "v.json")
    assert again.model_points == model.model_points
    assert again.threshold_for(0.95, "m") == 0.97
    assert again.threshold_for(0.90, "m") == again.threshold    # another target: the curve
    assert json.loads((tmp_path / "v.json").read_text())["calibration"]["positives_below"] == 100
