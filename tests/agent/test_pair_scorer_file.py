"""The pair scorer's weights file (:mod:`synapse_common.pair_scorer`): what is written is what
is read, the id follows the weights and nothing else, and a bad file is refused by name."""

from __future__ import annotations

import io
import pathlib
import zipfile
from typing import Any

import numpy as np
import pytest

from synapse_common import pair_scorer

BASE = "minilm-l6-v2@0.1.0"
META = {"max_len": 64, "pooling": "mean", "fit": {"epochs": 2}}


def _arrays(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = {"encoder.layer.5.output.dense.weight": rng.normal(size=(384, 1536)) * 0.02,
              "encoder.layer.5.output.dense.bias": rng.normal(size=384) * 0.02}
    return layers, rng.normal(size=(1, 384)), rng.normal(size=1)


def _save(path: pathlib.Path, meta: dict[str, Any] = META, seed: int = 0) -> str:
    layers, weight, bias = _arrays(seed)
    return pair_scorer.save(path, BASE, layers, weight, bias, meta)


def _entries(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _rewrite(path: pathlib.Path, entries: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **entries)
    path.write_bytes(buf.getvalue())


def test_round_trip_keeps_the_arrays_and_the_id(tmp_path):
    path = tmp_path / "scorer.npz"
    scorer_id = _save(path)
    loaded = pair_scorer.load(path)
    layers, weight, bias = _arrays()
    assert loaded.scorer_id == scorer_id == pair_scorer.peek_id(path)
    assert scorer_id == f"{BASE}+pair-{loaded.digest}"
    assert loaded.base == BASE and loaded.max_len == 64 and dict(loaded.meta) == META
    assert set(loaded.layers) == set(layers)
    for name, array in layers.items():   # float16 on disk
        np.testing.assert_array_equal(loaded.layers[name], array.astype(np.float16))
    np.testing.assert_array_equal(loaded.head_weight, weight.astype(np.float32))  # float32
    np.testing.assert_array_equal(loaded.head_bias, bias.astype(np.float32))


def test_the_bytes_depend_on_the_arrays_only(tmp_path):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    _save(first)
    _save(second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_the_id_changes_with_a_weight_and_not_with_meta(tmp_path):
    original = _save(tmp_path / "a.npz")
    other_meta = _save(tmp_path / "b.npz", meta={**META, "metrics": {"recall": 0.42}})
    other_weights = _save(tmp_path / "c.npz", seed=1)
    layers, weight, bias = _arrays()
    bias = bias + 0.5
    other_bias = pair_scorer.save(tmp_path / "d.npz", BASE, layers, weight, bias, META)
    other_base = pair_scorer.save(tmp_path / "e.npz", "minilm-l6-v2@0.2.0", *_arrays(), META)
    assert other_meta == original
    assert len({original, other_weights, other_bias, other_base}) == 4


def test_resolve_names_the_shipped_file_a_path_or_nothing(tmp_path):
    assert pair_scorer.resolve("none") is None
    assert pair_scorer.resolve("shipped") == pair_scorer.SHIPPED
    assert pair_scorer.SHIPPED.parent == pathlib.Path(pair_scorer.__file__).parent
    assert pair_scorer.resolve(str(tmp_path / "x.npz")) == tmp_path / "x.npz"


@pytest.mark.parametrize(("change", "words"), [
    (lambda e: e.update(format=np.asarray("synapse-embedder-tuning/1")), "is not"),
    (lambda e: e.pop("head_bias"), "head_bias"),
    (lambda e: e.pop("format"), "no 'format'"),
    (lambda e: e.update(head_weight=np.ones((2, 384))), "head must be"),
    (lambda e: e.update(head_bias=np.asarray([np.nan])), "not finite"),
    (lambda e: e.update({"layer:encoder.layer.5.output.dense.bias": np.ones(384)}),
     "do not match its digest"),
    (lambda e: e.update(meta=np.asarray('{"pooling": "mean"}')), "max_len"),
    (lambda e: e.update(meta=np.asarray('{"max_len": 64, "pooling": "cls"}')), "pooling"),
])
def test_a_bad_file_is_refused_with_its_name_and_the_reason(tmp_path, change, words):
    path = tmp_path / "scorer.npz"
    _save(path)
    entries = _entries(path)
    change(entries)
    _rewrite(path, entries)
    with pytest.raises(pair_scorer.PairScorerError) as info:
        pair_scorer.load(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_a_pickled_array_is_never_unpickled(tmp_path):
    path = tmp_path / "scorer.npz"
    _save(path)
    entries: dict[str, Any] = _entries(path)
    entries["meta"] = np.asarray([{"max_len": 64}], dtype=object)
    _rewrite(path, entries)   # np.savez pickles object arrays
    with pytest.raises(pair_scorer.PairScorerError, match="pickle"):
        pair_scorer.load(path)


def test_a_missing_or_foreign_file_is_refused(tmp_path):
    with pytest.raises(pair_scorer.PairScorerError, match="cannot read pair scorer"):
        pair_scorer.load(tmp_path / "absent.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(pair_scorer.PairScorerError, match=f"{garbage} is not a"):
        pair_scorer.peek_id(garbage)


def test_save_refuses_meta_the_runtime_could_not_use(tmp_path):
    with pytest.raises(pair_scorer.PairScorerError, match="max_len"):
        _save(tmp_path / "a.npz", meta={"pooling": "mean"})
    assert not (tmp_path / "a.npz").exists()
