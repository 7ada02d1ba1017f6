"""The pair scorer in onnxruntime (:mod:`agent.embedding.pair_scorer_onnx`): the same
logits as the torch network, on the shipped weights and on a small test file; the export
is cached and reused; ``runtime`` picks it, falls back to torch (``auto``) or refuses
(``onnx``) when it cannot be used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import stat

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.embedding import onnx_path, pair_scorer, pair_scorer_onnx
from synapse_common import pair_scorer as scorer_file

pytest.importorskip("onnxruntime")

CFG = EmbedderSettings(kind="minilm", max_text_chars=2000)
QUERY = "How do I lose 5 kg in a month?"
# Paraphrases, near misses, unrelated, unicode, and pairs truncated at max_len.
CANDIDATES = ["How can I lose five kilos in four weeks?", "How can I lose 15 kg in a month?",
              "What is the capital of France?", "été, naïve café — how do I lose weight?",
              " ".join(["what diet makes me lose weight fast"] * 30), "kg", QUERY]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("onnx"))


def _both(loaded: pair_scorer.Loaded, query: str, candidates: list[str]
          ) -> tuple[np.ndarray, np.ndarray]:
    torch_side = pair_scorer.Loaded(loaded.file, loaded.model, loaded.tokenizer)
    return (pair_scorer.score_blocking(loaded, query, candidates),
            pair_scorer.score_blocking(torch_side, query, candidates))


def test_onnx_logits_equal_torchs_on_the_shipped_weights(cache_dir):
    assert scorer_file.SHIPPED.exists()     # the repository ships it
    loaded = pair_scorer.load(scorer_file.SHIPPED, "onnx", cache_dir)
    assert loaded.runtime == "onnx"
    for candidates in (CANDIDATES, CANDIDATES[:1], CANDIDATES[4:5]):
        onnx, reference = _both(loaded, QUERY, candidates)
        assert onnx.dtype == np.float32 and onnx.shape == (len(candidates),)
        np.testing.assert_allclose(onnx, reference, rtol=0, atol=pair_scorer_onnx.TOLERANCE)
    # each text as the query: the other order of every pair
    for text in CANDIDATES[:3]:
        onnx, reference = _both(loaded, text, [QUERY, *CANDIDATES[3:5]])
        np.testing.assert_allclose(onnx, reference, rtol=0, atol=pair_scorer_onnx.TOLERANCE)


@pytest.mark.parametrize("lanes", [2, 3, 5])
def test_rows_split_across_lanes_give_the_batchs_logits(small_scorer_path, cache_dir, lanes):
    loaded = pair_scorer.load(small_scorer_path, "onnx", cache_dir)
    assert loaded.onnx is not None
    path = pair_scorer_onnx.cache_file(cache_dir, loaded.scorer_id)
    split = pair_scorer_onnx.OnnxNetwork(onnx_path._session(str(path), 1), lanes)
    try:
        for candidates in (CANDIDATES, CANDIDATES[:1], CANDIDATES[:2]):   # 14, 2, 4 rows
            got = pair_scorer.score_blocking(dataclasses.replace(loaded, onnx=split), QUERY,
                                             candidates)
            one = pair_scorer_onnx.OnnxNetwork(onnx_path._session(str(path), 1), 1)
            want = pair_scorer.score_blocking(dataclasses.replace(loaded, onnx=one), QUERY,
                                              candidates)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finally:
        split.close()


def test_the_export_is_cached_per_scorer_and_reused(small_scorer_path, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer_onnx"):
        first = pair_scorer.load(small_scorer_path, "auto", str(tmp_path))
        second = pair_scorer.load(small_scorer_path, "auto", str(tmp_path))
    assert first.runtime == second.runtime == "onnx"
    path = pair_scorer_onnx.cache_file(str(tmp_path), first.scorer_id)
    assert path.exists() and first.file.digest in path.name
    messages = [r.getMessage() for r in caplog.records]
    assert sum("exported the network" in m for m in messages) == 1
    assert sum("reusing" in m for m in messages) == 1
    onnx, reference = _both(second, QUERY, CANDIDATES)
    np.testing.assert_allclose(onnx, reference, rtol=0, atol=pair_scorer_onnx.TOLERANCE)


def test_a_damaged_cached_file_is_exported_again(small_scorer_path, tmp_path):
    first = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    path = pair_scorer_onnx.cache_file(str(tmp_path), first.scorer_id)
    path.write_bytes(b"not an onnx file")
    again = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    assert again.runtime == "onnx" and path.stat().st_size > 1000


def test_torch_runtime_never_exports(small_scorer_path, tmp_path):
    loaded = pair_scorer.load(small_scorer_path, "torch", str(tmp_path))
    assert loaded.runtime == "torch" and loaded.onnx is None
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_falls_back_to_torch_or_refuses(small_scorer_path, tmp_path, monkeypatch,
                                                      caplog):
    monkeypatch.setattr(pair_scorer_onnx, "TOLERANCE", -1.0)    # nothing can match
    with caplog.at_level(logging.WARNING):
        loaded = pair_scorer.load(small_scorer_path, "auto", str(tmp_path))
    assert loaded.runtime == "torch"
    assert any("pair scorer on torch: ONNX logits differ" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"embedder\.runtime is onnx, but ONNX logits"):
        pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))


def test_without_onnxruntime_auto_is_torch_quietly(small_scorer_path, tmp_path, monkeypatch,
                                                   caplog):
    def missing(*args: object) -> None:
        raise onnx_path.NotInstalled("onnxruntime and onnx are needed (test)")
    monkeypatch.setattr(pair_scorer_onnx, "load", missing)
    with caplog.at_level(logging.INFO):
        loaded = pair_scorer.load(small_scorer_path, "auto", str(tmp_path))
    assert loaded.runtime == "torch"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_agents_scorer_runs_the_configured_runtime(small_scorer_path, tmp_path):
    # float32: this test is about the ONNX runtime (auto, the default precision, would run
    # the bfloat16 network on a CPU with AMX instead)
    cfg = CFG.model_copy(update={"pair_scorer": str(small_scorer_path), "runtime": "onnx",
                                 "onnx_cache_dir": str(tmp_path),
                                 "pair_scorer_precision": "float32"})
    scorer = pair_scorer.build(cfg)
    await scorer.start()
    try:
        scores, scorer_id = await scorer.score(QUERY, CANDIDATES)
        torch_side = pair_scorer.load(small_scorer_path)
        assert torch_side.runtime == "torch" and scorer_id == torch_side.scorer_id
        np.testing.assert_allclose(scores, pair_scorer.score_blocking(torch_side, QUERY,
                                                                      CANDIDATES),
                                   rtol=0, atol=pair_scorer_onnx.TOLERANCE)
    finally:
        await scorer.close()


# -- the ONNX cache is trusted only as far as it is private (onnx_path.open_cached) ---------

def _exports(caplog: pytest.LogCaptureFixture) -> int:
    return sum("exported the network" in r.getMessage() for r in caplog.records)


def _recorded(path: pathlib.Path) -> str:
    return path.with_name(path.name + ".sha256").read_text().split()[0]


def _exported_again_over_the_planted_file(small_scorer_path: pathlib.Path, tmp_path: pathlib.Path,
                                          path: pathlib.Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """The next load refuses the planted file by its digest (one warning) and exports
    again over it."""
    import onnx
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer_onnx"):
        again = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    assert again.runtime == "onnx" and _exports(caplog) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SHA-256 does not match" in warnings[0], warnings
    assert not any(p.key == "planted" for p in onnx.load(str(path)).metadata_props)


def test_the_export_records_its_sha256_and_is_private(small_scorer_path, tmp_path):
    cache = tmp_path / "new" / "onnx"
    loaded = pair_scorer.load(small_scorer_path, "onnx", str(cache))
    path = pair_scorer_onnx.cache_file(str(cache), loaded.scorer_id)
    assert _recorded(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.with_name(path.name + ".sha256").read_text().endswith(f"  {path.name}\n")
    assert stat.S_IMODE(cache.stat().st_mode) == stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    for file in cache.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_a_tampered_cached_file_is_exported_again(small_scorer_path, tmp_path, caplog):
    """A file changed after its export is not loaded, even one that still opens and would
    pass the start-up check (here: the same network with one metadata entry added)."""
    import onnx

    first = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    path = pair_scorer_onnx.cache_file(str(tmp_path), first.scorer_id)
    tampered = onnx.load(str(path))
    tampered.metadata_props.add(key="planted", value="by someone else")
    onnx.save(tampered, str(path))
    _exported_again_over_the_planted_file(small_scorer_path, tmp_path, path, caplog)
    assert _recorded(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_cached_file_without_its_sidecar_is_exported_again(small_scorer_path, tmp_path,
                                                             caplog):
    first = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    path = pair_scorer_onnx.cache_file(str(tmp_path), first.scorer_id)
    path.with_name(path.name + ".sha256").unlink()
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer_onnx"):
        again = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    assert again.runtime == "onnx" and _exports(caplog) == 1
    assert not any(": reusing" in r.getMessage() for r in caplog.records)
    assert _recorded(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bytes_hashed_are_the_bytes_loaded(small_scorer_path, tmp_path, monkeypatch,
                                               caplog):
    """A file swapped between the SHA-256 check and the load is not what runs (before: the
    check hashed the file by name and onnxruntime opened it by name again, so a file
    replaced in between ran unchecked); at the next start its digest does not match its
    sidecar and it is exported again."""
    import onnx

    first = pair_scorer.load(small_scorer_path, "onnx", str(tmp_path))
    path = pair_scorer_onnx.cache_file(str(tmp_path), first.scorer_id)
    planted = onnx.load(str(path))
    planted.metadata_props.add(key="planted", value="swapped in after the check")
    real_sha256, swaps = hashlib.sha256, []

    class SwappedOnceHashed:
        """The hash step; the file is replaced the moment its digest is known."""

        def __init__(self, *data: bytes) -> None:
            self._digest = real_sha256(*data)

        def update(self, data: bytes) -> None:
            self._digest.update(data)

        def hexdigest(self) -> str:
            digest = self._digest.hexdigest()
            if not swaps:
                swaps.append(path.name)
                onnx.save(planted, str(path))
            return digest

    monkeypatch.setattr(hashlib, "sha256", SwappedOnceHashed)
    session = onnx_path.open_cached(
        path, lambda to: pytest.fail(f"{to} exported again"),
        lambda model: onnx_path._session(model, 1), logging.getLogger(__name__),
        "test", "the network")
    monkeypatch.undo()
    assert swaps == [path.name]
    assert "planted" not in session.get_modelmeta().custom_metadata_map
    assert any(p.key == "planted" for p in onnx.load(str(path)).metadata_props)
    _exported_again_over_the_planted_file(small_scorer_path, tmp_path, path, caplog)


OTHER_UID = 4242


@pytest.mark.parametrize("unsafe", [
    "other-writable", "group-writable",
    pytest.param("another user's", marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="giving a directory to another user needs root"))])
def test_a_cache_directory_others_can_write_is_not_trusted(small_scorer_path, tmp_path,
                                                           caplog, unsafe):
    """Files in it are neither loaded nor written: the export goes to a private temporary
    directory for this run, with one warning naming the setting."""
    cache = tmp_path / "shared"
    first = pair_scorer.load(small_scorer_path, "onnx", str(cache))   # a verified export
    files = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    if unsafe == "another user's":
        os.chown(cache, OTHER_UID, -1)
    else:
        cache.chmod(0o777 if unsafe == "other-writable" else 0o770)
    with caplog.at_level(logging.INFO, logger="agent.embedding.pair_scorer_onnx"):
        again = pair_scorer.load(small_scorer_path, "onnx", str(cache))
    assert again.runtime == "onnx" and again.scorer_id == first.scorer_id
    messages = [r.getMessage() for r in caplog.records]
    assert not any(": reusing" in m for m in messages)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "embedder.onnx_cache_dir" in warnings[0], warnings
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == files   # nothing written
