"""TEI mode through a real process: /embed, /v1/embeddings, /info, /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from tests import harness
from tests.simulator.conftest import MODEL, Sim, samples, start


@pytest.fixture(scope="module")
def tei(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--engine", "tei", "--time-scale", "0",
                 "--max-client-batch-size", "4", "--max-input-length", "64", name="sim-tei")


def call(url: str, body: object | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    status, _, raw = harness.http(url, data, timeout=60)
    if status >= 400:
        return status, json.loads(raw)
    return status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw


def test_embed_single_and_batch_give_normalised_deterministic_vectors(tei: Sim) -> None:
    status, one = call(tei.url + "/embed", {"inputs": "the cat sat on the mat"})
    assert status == 200 and isinstance(one, list) and len(one) == 1 and len(one[0]) == 384
    status, many = call(tei.url + "/embed", {"inputs": ["the cat sat on the mat",
                                                        "a cat sat on a mat",
                                                        "quarterly revenue grew"]})
    assert status == 200 and isinstance(many, list)
    vectors = np.array(many)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], one[0])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_batch_above_the_limit_is_422_with_teis_message(tei: Sim) -> None:
    status, body = call(tei.url + "/embed", {"inputs": ["x"] * 5})
    assert status == 422
    assert body == {"error": "batch size 5 > maximum allowed batch size 4",
                    "error_type": "Validation"}


def test_too_long_input_is_413_unless_truncated(tei: Sim) -> None:
    long_text = "word " * 100
    status, body = call(tei.url + "/embed", {"inputs": long_text})
    assert status == 413 and "must have less than 64 tokens" in body["error"]
    status, _ = call(tei.url + "/embed", {"inputs": long_text, "truncate": True})
    assert status == 200
    status, body = call(tei.url + "/embed", {"inputs": []})
    assert status == 422 and body["error_type"] == "Validation"


def test_openai_embeddings_endpoint(tei: Sim) -> None:
    with openai.OpenAI(base_url=tei.url + "/v1", api_key="x", max_retries=0) as client:
        resp = client.embeddings.create(model=MODEL, input=["alpha", "beta"],
                                        encoding_format="float")
        assert [d.index for d in resp.data] == [0, 1] and len(resp.data[0].embedding) == 384
        assert resp.usage.prompt_tokens > 0
        default = client.embeddings.create(model=MODEL, input=["alpha", "beta"])  # base64
        assert np.allclose(default.data[1].embedding, resp.data[1].embedding, atol=1e-6)
        # TEI serves one model whatever the request names.
        other = client.embeddings.create(model="other", input="alpha", encoding_format="float")
        assert np.allclose(other.data[0].embedding, resp.data[0].embedding)
        with pytest.raises(openai.UnprocessableEntityError):
            client.embeddings.create(model=MODEL, input=["x"] * 5)


def test_info_is_shaped_like_tei_and_labelled_simulated(tei: Sim,
                                                         reference_dir: object) -> None:
    import pathlib

    assert isinstance(reference_dir, pathlib.Path)
    reference = json.loads((reference_dir / "tei_info_sample.json").read_text())
    status, info = call(tei.url + "/info")
    assert status == 200 and isinstance(info, dict)
    assert set(reference) <= set(info)
    assert info["max_client_batch_size"] == 4 and info["simulated"] is True
    assert info["embedder"] == "hash"
    assert call(tei.url + "/health")[0] == 200


def test_metrics_carry_te_names(tei: Sim) -> None:
    call(tei.url + "/embed", {"inputs": "count me"})
    call(tei.url + "/embed", {"inputs": []})  # a validation failure
    with urllib.request.urlopen(tei.url + "/metrics", timeout=10) as resp:
        parsed = samples(resp.read().decode())
    # TEI writes counters without a _total suffix; prometheus_client's parser adds it.
    assert parsed["te_request_count_total"]
    assert any(v >= 1 for labels, v in parsed["te_request_success_total"]
               if labels["method"] == "single")
    assert any(labels["err"] == "validation"
               for labels, _ in parsed["te_request_failure_total"])
    assert parsed["te_embed_count_total"][0][1] >= 1
    assert parsed["te_request_duration_count"][0][1] >= 1


def test_minilm_embedder_loads_offline_and_ranks_paraphrases_closer(
        processes: harness.ProcessPool) -> None:
    sim = start(processes, "--engine", "tei", "--embedder", "minilm", "--time-scale", "0",
                name="sim-minilm", timeout=180)
    status, info = call(sim.url + "/info")
    assert status == 200 and isinstance(info, dict) and info["embedder"] == "minilm"
    status, body = call(sim.url + "/embed", {"inputs": [
        "How do I reset my password?", "What is the way to change my password?",
        "The weather is sunny in Lisbon today."]})
    assert status == 200
    v = np.array(body)
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
