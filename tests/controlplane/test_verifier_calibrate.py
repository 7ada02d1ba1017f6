"""``synapsectl cache calibrate`` on a small sample of the dev pairs (never the whole set)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest

from controlplane import calibrate
from controlplane.core import verifier
from tests import dev_pairs, harness


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> pathlib.Path:
    return dev_pairs.first(tmp_path_factory, "sample.jsonl.gz", 400)


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([harness.console_script("synapsectl"), "cache", "calibrate", *args],
                          capture_output=True, text=True, timeout=240,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})


def test_calibrate_fits_reports_and_is_reproducible(sample, tmp_path):
    cache = str(tmp_path / "emb.npz")
    first = run_ctl("--pairs", str(sample), "--target-precision", "0.8",
                    "--out", str(tmp_path / "a.json"), "--seed", "3", "--embed-cache", cache)
    assert first.returncode == 0, first.stderr
    assert "expected precision" in first.stdout and "held-out" in first.stdout
    assert "bare cosine" in first.stdout
    model = verifier.load(tmp_path / "a.json")
    assert model.target_precision == 0.8 and model.meta["fit"]["seed"] == 3
    assert model.meta["metrics"]["pairs"]["test"] > 0

    args = argparse_args(sample, tmp_path / "b.json", cache)
    assert calibrate.run(args) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def argparse_args(pairs, out, cache):
    import argparse
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    return parser.parse_args(["--pairs", str(pairs), "--target-precision", "0.8", "--out",
                              str(out), "--seed", "3", "--embed-cache", cache])


@pytest.mark.parametrize("line,message", [
    ("not json", ":1: not JSON"),
    ('{"text_a": "a", "text_b": 3, "label": 1}', "must be strings"),
    ('{"text_a": "a", "text_b": "b", "label": 2}', "label must be 0 or 1"),
])
def test_bad_pairs_files_exit_2_naming_the_line(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    args = argparse_args(path, tmp_path / "out.json", str(tmp_path / "e.npz"))
    assert calibrate.run(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_splits_are_question_disjoint():
    texts = [f"q{i}" for i in range(300)]
    a = [texts[i] for i in range(300)]
    b = [texts[(i * 7 + 1) % 300] if i % 3 else f"fresh{i}" for i in range(300)]
    pairs = calibrate.Pairs(a, b, np.zeros(300, dtype=np.int8))
    parts = calibrate.split(pairs, seed=1)
    assert sum(len(v) for v in parts.values()) == 300
    seen = {name: {t for i in idx for t in (a[i], b[i])} for name, idx in parts.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["validation"] & seen["test"])
    assert not (seen["train"] & seen["validation"])


def test_operating_point_reaches_the_target_on_its_own_split():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 0, 0])
    t = calibrate.operating_point(scores, labels, 0.75)
    assert t == 0.6                       # 3 of the top 4 are right
    assert calibrate.evaluate(scores, labels, t)["precision"] == 0.75
    assert calibrate.operating_point(scores, 1 - labels, 0.99) > 0.9   # unreachable


def test_pairs_file_round_trip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"text_a": f"a{i}", "text_b": f"b{i}", "label": i % 2})
                              for i in range(4)) + "\n\n")
    pairs = calibrate.read_pairs(path)
    assert len(pairs) == 4 and pairs.label.tolist() == [0, 1, 0, 1]
