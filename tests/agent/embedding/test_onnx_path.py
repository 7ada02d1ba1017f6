"""The in-process embedder's ONNX path: the same vectors as sentence-transformers, the
cached export reused, and torch whenever ONNX is not wanted, not possible or not equal."""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.embedding import errors, model, onnx_path, torch_path
from agent.embedding import minilm as minilm_mod

TEXTS = ["hi", "How do I reset my password?", "été, naïve café — unicode text",
         " ".join(["kubernetes schedules pods onto nodes"] * 80),  # truncated at 256
         "The cat sat on the mat. " * 6, "short one"]


@pytest.fixture(scope="module")
def minilm() -> Any:
    return model.load_minilm()


@pytest.fixture(scope="module")
def onnx_dir(minilm: Any, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A cache directory holding the export (made once for the module)."""
    path = tmp_path_factory.mktemp("onnx")
    onnx_path.load(minilm, str(path), lambda t, n: torch_path.encode(minilm, t, n))
    return path


def _embedder(minilm: Any, cache_dir: pathlib.Path, **cfg: Any) -> minilm_mod.MiniLmEmbedder:
    settings = EmbedderSettings(kind="minilm", onnx_cache_dir=str(cache_dir), **cfg)
    return minilm_mod.MiniLmEmbedder(settings, minilm)


async def test_onnx_vectors_equal_sentence_transformers(minilm, onnx_dir, monkeypatch):
    calls: list[pathlib.Path] = []
    real_export = onnx_path.export
    monkeypatch.setattr(onnx_path, "export", lambda m, p: calls.append(p) or real_export(m, p))
    files = list(onnx_dir.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    embedder = _embedder(minilm, onnx_dir, max_batch=2)
    await embedder.start()
    assert embedder.runtime == "onnx" and embedder.ready
    assert calls == [] and [f.stat().st_mtime_ns for f in files] == mtimes  # file reused
    exported = [f for f in files if f.suffix == ".onnx"]
    assert len(exported) == 1 and "0.1" in exported[0].name and "torch" in exported[0].name
    # and its SHA-256 beside it, which the reuse above checked
    assert sorted(f.name for f in files) == [exported[0].name, exported[0].name + ".sha256"]

    one_call = await embedder.embed(TEXTS)  # chunks of 2, longest first, put back in order
    singles = [await embedder.embed([t]) for t in TEXTS]
    await embedder.close()
    expected = minilm.encode(TEXTS, convert_to_numpy=True)
    assert one_call.dtype == np.float32 and one_call.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(one_call, expected, atol=1e-5, rtol=0)
    for text, row in zip(TEXTS, singles, strict=True):
        np.testing.assert_allclose(row[0], minilm.encode([text])[0], atol=1e-5, rtol=0)
    batch = onnx_path.OnnxMiniLm(minilm, embedder._onnx._session).encode(TEXTS, 64)
    np.testing.assert_allclose(batch, expected, atol=1e-5, rtol=0)  # one padded batch


async def test_runtime_torch_forces_torch(minilm, onnx_dir, monkeypatch):
    def no_onnx(*args: Any) -> None:
        raise AssertionError("runtime torch must not touch ONNX")

    monkeypatch.setattr(onnx_path, "load", no_onnx)
    embedder = _embedder(minilm, onnx_dir, runtime="torch")
    await embedder.start()
    assert embedder.runtime == "torch"
    np.testing.assert_allclose(await embedder.embed(["hi"]), minilm.encode(["hi"]), atol=1e-6)
    await embedder.close()


async def test_a_failed_export_falls_back_to_torch(minilm, tmp_path, monkeypatch, caplog):
    def broken(model: Any, path: pathlib.Path) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_path, "export", broken)
    embedder = _embedder(minilm, tmp_path / "empty")
    with caplog.at_level(logging.WARNING, logger="agent.embedding"):
        await embedder.start()
    assert embedder.runtime == "torch" and embedder.ready
    assert "exporter exploded" in caplog.text
    np.testing.assert_allclose(await embedder.embed(TEXTS), minilm.encode(TEXTS), atol=1e-6)
    await embedder.close()


async def test_vectors_that_differ_from_torch_fall_back_to_torch(minilm, onnx_dir, monkeypatch,
                                                                  caplog):
    real_pool = onnx_path.pool
    monkeypatch.setattr(onnx_path, "pool", lambda h, m: real_pool(h, m) + 1e-4)
    embedder = _embedder(minilm, onnx_dir)
    with caplog.at_level(logging.WARNING, logger="agent.embedding"):
        await embedder.start()
    assert embedder.runtime == "torch"
    assert "differ from torch" in caplog.text
    await embedder.close()


async def test_forced_onnx_without_onnxruntime_is_unavailable_with_the_reason(
        minilm, onnx_dir, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    embedder = _embedder(minilm, onnx_dir, runtime="onnx")
    await embedder.start()
    assert not embedder.ready and not await embedder.probe()
    with pytest.raises(errors.EmbedderUnavailable, match=r"runtime is onnx.*onnxruntime"):
        await embedder.embed(["hi"])
    await embedder.close()

    caplog.clear()
    embedder = _embedder(minilm, onnx_dir)  # auto: torch, one info line, no warning
    with caplog.at_level(logging.INFO, logger="agent.embedding"):
        await embedder.start()
    assert embedder.runtime == "torch" and embedder.ready
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await embedder.close()


def test_only_mean_pooling_then_normalize_is_taken_to_onnx(minilm):
    onnx_path.check_modules(minilm)  # all-MiniLM-L6-v2: Transformer, Pooling(mean), Normalize

    class Pooling:
        def get_config_dict(self) -> dict[str, Any]:
            return {"pooling_mode": "cls"}

    with pytest.raises(onnx_path.OnnxUnavailable, match="not mean pooling"):
        onnx_path.check_modules([minilm[0], Pooling(), minilm[2]])
    with pytest.raises(onnx_path.OnnxUnavailable, match="modules"):
        onnx_path.check_modules([minilm[0], minilm[1]])  # no Normalize
