"""``synapsectl cache tune-embedder``: refusals with reasons, the progress bar, a real run.

The real run fine-tunes on a slice of the QQP dev pairs (the smallest file it accepts) and
checks what a user relies on: the two files load, the verifier names the new embedder id,
and the agent's tuned embedder gives the vectors the verifier was fitted on.
"""

from __future__ import annotations

import asyncio
import io
import json
import pathlib
from typing import Any

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.embedding import tuned
from controlplane import calibrate, ctl, embedder_fit, progress, tune_embedder
from controlplane.core import verifier
from synapse_common import embedder_tuning
from tests import dev_pairs
from tests.controlplane import test_cache_support as support


def write_pairs(path: pathlib.Path, rows: list[tuple[str, str, int]]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"text_a": a, "text_b": b, "label": y}) + "\n"
                            for a, b, y in rows))
    return path


def tune(capsys, tmp_path, pairs: pathlib.Path, *extra: str) -> tuple[int, str, str]:
    code = ctl.main(["cache", "tune-embedder", "--pairs", str(pairs), "--tuning-out",
                     str(tmp_path / "t.npz"), "--verifier-out", str(tmp_path / "v.json"),
                     *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_too_few_pairs_are_refused_with_the_reason(tmp_path, capsys):
    rows = [(f"question {i}?", f"query {i}?", i % 2) for i in range(300)]
    code, _, err = tune(capsys, tmp_path, write_pairs(tmp_path / "p.jsonl", rows))
    assert code == 2 and "refused: too few pairs: 300 (at least 2000)" in err
    assert not (tmp_path / "t.npz").exists() and not (tmp_path / "v.json").exists()


def test_one_sided_pairs_are_refused(tmp_path, capsys):
    rows = [(f"question {i}?", f"query {i}?", int(i % 50 == 0)) for i in range(3000)]
    code, _, err = tune(capsys, tmp_path, write_pairs(tmp_path / "p.jsonl", rows))
    assert code == 2 and "too one-sided: 60 duplicates and 2940 non-duplicates" in err


def test_pairs_that_all_share_one_question_are_refused(tmp_path, capsys):
    # Balanced labels, but every pair links to one hub question: the question-disjoint
    # split cannot give each part both labels.
    rows = [("the hub question?", f"query {i}?", i % 2) for i in range(3000)]
    code, _, err = tune(capsys, tmp_path, write_pairs(tmp_path / "p.jsonl", rows))
    assert code == 2 and "question-disjoint split leaves" in err


def test_an_embedder_on_all_of_train_needs_the_verifier_on_all_of_train(tmp_path, capsys):
    code, _, err = tune(capsys, tmp_path, tmp_path / "unread.jsonl", "--embedder-train", "all")
    assert code == 2 and "add --verifier-train all" in err
    assert not (tmp_path / "t.npz").exists()


def test_the_embedder_never_learns_on_validation_or_test(dev_slice):
    pairs = calibrate.read_pairs(dev_slice)
    parts = tune_embedder.plan(pairs, 7)
    held = np.concatenate([parts["validation"], parts["test"]])
    part = tune_embedder.embedder_rows(parts, "part")
    every = tune_embedder.embedder_rows(parts, "all")
    assert not np.intersect1d(part, parts["train (verifier)"]).size
    assert set(every) == set(part) | set(parts["train (verifier)"])
    assert not np.intersect1d(every, held).size


def test_progress_shows_an_eta():
    now = [0.0]
    out = io.StringIO()
    bar = progress.Progress(10, "training", stream=out, clock=lambda: now[0], log_every_s=0)
    now[0] = 4.0
    bar.update(2, "loss 0.5")
    line = out.getvalue().splitlines()[-1]
    assert "20% 2/10" in line and "ETA 00:16" in line and "loss 0.5" in line


@pytest.fixture(scope="module")
def dev_slice(tmp_path_factory) -> pathlib.Path:
    return dev_pairs.first(tmp_path_factory, "slice.jsonl.gz", 2400)


@pytest.mark.timeout(1800)      # minutes on a busy 2-core machine
def test_a_real_tuning_gives_an_embedder_and_its_verifier(dev_slice, tmp_path, capsys):
    code, out, err = tune(capsys, tmp_path, dev_slice, "--layers", "1")
    assert code == 0, err
    assert "training [" in err and "ETA" in err
    tuning = embedder_tuning.load(tmp_path / "t.npz")
    judge = verifier.load(tmp_path / "v.json")
    assert judge.embedder_id == tuning.embedder_id and tuning.embedder_id in out
    assert tuning.embedder_id.startswith("minilm-l6-v2@") and "+tuned-" in tuning.embedder_id
    assert {name.split(".")[2] for name in tuning.layers} == {"5"}
    assert judge.meta["metrics"]["pairs"]["test"] > 0 and "held-out" in out

    # The agent's tuned embedder (the serving path) gives the vectors the verifier saw.
    pairs = calibrate.read_pairs(dev_slice)
    texts = [pairs.text_a[0], pairs.text_b[0], pairs.text_a[1]]
    emb = tuned.build(EmbedderSettings(kind="minilm", tuning=str(tmp_path / "t.npz"),
                                       onnx_cache_dir=str(tmp_path / "onnx")))
    served = serve(emb, texts)
    assert emb.embedder_id == tuning.embedder_id
    untuned = calibrate.embed_texts(texts)
    assert float(np.abs(served - untuned).max()) > 1e-3       # it is another embedder
    again = calibrate.embed_texts(texts, tuning=tuning)
    assert float(np.abs(served - again).max()) < 2e-3


def test_a_full_fine_tune_starts_from_the_embedding_layer():
    # --layers 6 tunes every transformer layer: what is frozen is the embedding layer
    # alone, whose exported graph has no attention-mask input.
    import torch

    model = support.minilm_model()
    texts = ["How do I learn Python fast?", "Why?"]
    states = embedder_fit.lower_states(model, texts, 0, lambda n: None)
    features = model.tokenize(texts)
    with torch.inference_mode():
        expected = model[0].auto_model.embeddings(
            input_ids=features["input_ids"], token_type_ids=features["token_type_ids"]).numpy()
    for i in range(len(texts)):
        n = int(features["attention_mask"][i].sum())
        got = states.flat[states.offsets[i]:states.offsets[i + 1]].astype(np.float32)
        np.testing.assert_allclose(got, expected[i, :n], atol=1e-2)


def serve(emb: Any, texts: list[str]) -> np.ndarray:
    """The vectors a started embedder serves for ``texts`` (then closed)."""
    async def embed() -> np.ndarray:
        await emb.start()
        try:
            return await emb.embed(texts)
        finally:
            await emb.close()
    return asyncio.run(embed())


@pytest.mark.timeout(1800)
def test_an_adapter_alone_is_served_as_it_was_fitted(dev_slice, tmp_path, capsys):
    # --layers 0: every transformer layer frozen, a linear adapter after pooling.
    cache = tmp_path / "frozen.npz"
    code, _, err = tune(capsys, tmp_path, dev_slice, "--layers", "0", "--adapter-epochs",
                        "2", "--vectors-cache", str(cache))
    assert code == 0, err
    assert "adapter [" in err and cache.exists()
    tuning = embedder_tuning.load(tmp_path / "t.npz")
    assert not tuning.layers and tuning.adapter is not None
    assert tuning.adapter.shape == (384, 384)
    assert verifier.load(tmp_path / "v.json").embedder_id == tuning.embedder_id
    # A second run reuses the frozen vectors (no pass over the texts) and gives the same
    # weights (the same embedder id: a digest of every array).
    code, _, err = tune(capsys, tmp_path, dev_slice, "--layers", "0", "--adapter-epochs",
                        "2", "--vectors-cache", str(cache))
    assert code == 0 and "frozen layers [" not in err
    assert embedder_tuning.load(tmp_path / "t.npz").embedder_id == tuning.embedder_id

    pairs = calibrate.read_pairs(dev_slice)
    texts = [pairs.text_a[0], pairs.text_b[0]]
    emb = tuned.build(EmbedderSettings(kind="minilm", tuning=str(tmp_path / "t.npz"),
                                       runtime="torch"))
    served = serve(emb, texts)
    assert emb.embedder_id == tuning.embedder_id
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert float(np.abs(served - calibrate.embed_texts(texts)).max()) > 1e-3
    assert float(np.abs(served - calibrate.embed_texts(texts, tuning=tuning)).max()) < 2e-3
