"""Rerank and score by HTTP: vLLM's cross-encoder routes and TEI's /rerank."""

from __future__ import annotations

from typing import Any

import pytest

from tests import harness
from tests.simulator.conftest import MODEL, Sim, json_call, start

DOCS = ["Bananas are yellow.", "A GPU is a processor for graphics.", "What is a GPU?"]


@pytest.fixture(scope="module")
def vllm(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", "--task", "rerank", "--task", "score",
                 "--task", "tokenize", name="sim-rerank")


@pytest.fixture(scope="module")
def tei(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--engine", "tei", "--task", "rerank", "--time-scale", "0",
                 "--max-client-batch-size", "3", name="tei-rerank")


def call(sim: Sim, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    return json_call(sim.url + path, body)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_vllm_rerank_orders_by_relevance(vllm: Sim, path: str) -> None:
    status, body = call(vllm, path, {"model": MODEL, "query": "what is a gpu",
                                     "documents": DOCS})
    assert status == 200 and body["id"].startswith("score-") and body["model"] == MODEL
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    assert body["results"][0] == {"index": 2, "document": {"text": DOCS[2],
                                                           "multi_modal": None},
                                  "relevance_score": 1.0}
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_vllm_rerank_top_n_and_errors(vllm: Sim) -> None:
    _, body = call(vllm, "/v1/rerank", {"query": "gpu processor graphics", "documents": DOCS,
                                       "top_n": 1})
    assert [r["index"] for r in body["results"]] == [1]
    status, err = call(vllm, "/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]})
    assert status == 404 and err["error"]["param"] == "model"
    status, err = call(vllm, "/v1/rerank", {"query": 3, "documents": ["d"]})
    assert status == 400 and err["error"]["param"] == "query"


@pytest.mark.parametrize("fields", [("text_1", "text_2"), ("queries", "documents"),
                                    ("data_1", "data_2")])
def test_vllm_score_pairs_one_to_n_and_n_to_n(vllm: Sim, fields: tuple[str, str]) -> None:
    a, b = fields
    status, body = call(vllm, "/v1/score", {a: "what is a gpu", b: DOCS})
    assert status == 200 and body["object"] == "list"
    scores = [d["score"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and scores[2] == 1.0
    assert scores[0] < scores[1] < scores[2]
    _, pairs = call(vllm, "/score", {a: ["gpu", "banana"], b: ["gpu", "apple"]})
    assert [d["score"] for d in pairs["data"]] == [1.0, 0.0]
    status, err = call(vllm, "/score", {a: ["a", "b"], b: ["a", "b", "c"]})
    assert status == 400 and "1:1, 1:N or N:N" in err["error"]["message"]


def test_vllm_reranker_serves_no_chat_and_says_what_it_serves(vllm: Sim) -> None:
    status, _ = call(vllm, "/v1/chat/completions", {"messages": [{"role": "user",
                                                                  "content": "x"}]})
    assert status == 404
    _, models = call(vllm, "/v1/models")
    assert models["data"][0]["tasks"] == ["rerank", "score", "tokenize"]
    _, spec = call(vllm, "/openapi.json")
    assert {"/rerank", "/v1/rerank", "/score", "/tokenize"} <= set(spec["paths"])
    assert "/v1/chat/completions" not in spec["paths"]


def test_tei_rerank_in_tei_shape(tei: Sim) -> None:
    status, body = call(tei, "/rerank", {"query": "what is a gpu", "texts": DOCS,
                                         "return_text": True})
    assert status == 200 and [r["index"] for r in body] == [2, 1, 0]
    assert body[0] == {"index": 2, "score": 1.0, "text": DOCS[2]}
    _, raw = call(tei, "/rerank", {"query": "what is a gpu", "texts": DOCS,
                                   "raw_scores": True})
    assert raw[2]["score"] < 0 < raw[0]["score"]  # logits: unrelated is negative


def test_tei_rerank_errors_and_info(tei: Sim) -> None:
    status, err = call(tei, "/rerank", {"query": "q", "texts": ["a"] * 4})
    assert status == 422 and err == {
        "error": "batch size 4 > maximum allowed batch size 3", "error_type": "Validation"}
    status, _ = call(tei, "/embed", {"inputs": "x"})
    assert status == 404  # a TEI reranker is not an embedder
    _, info = call(tei, "/info")
    assert "reranker" in info["model_type"] and info["tasks"] == ["rerank"]
