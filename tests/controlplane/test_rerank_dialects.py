"""/v1/rerank ⇄ TEI /rerank: a real TEI-mode simulator answers the translated request,
and the translated answer equals what a vLLM-mode reranker answers itself."""

from __future__ import annotations

import json
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane import errors
from controlplane.core import rerank_dialects
from tests import harness
from tests.simulator.conftest import MODEL, Sim, start

DOCS = ["Bananas are yellow.", {"text": "A GPU is a processor for graphics."},
        "What is a GPU?"]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Sim]]:
    pool = harness.ProcessPool(pathlib.Path(tmp_path_factory.mktemp("rerank")))
    try:
        yield (start(pool, "--engine", "tei", "--task", "rerank", "--time-scale", "0",
                     name="tei-reranker"),
               start(pool, "--task", "rerank", "--time-scale", "0", name="vllm-reranker"))
    finally:
        pool.stop_all()


def post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("top", [0, 2])
def test_a_tei_reranker_answers_as_vllm_does(sims: tuple[Sim, Sim], top: int) -> None:
    tei, vllm = sims
    body = {"model": MODEL, "query": "what is a gpu", "documents": DOCS, "top_n": top}
    answer = post(tei.url + "/rerank", rerank_dialects.to_tei(body))
    ours = rerank_dialects.from_tei(answer, body, MODEL, "rerank-1", prompt_tokens=30)
    theirs = post(vllm.url + "/v1/rerank", {**body, "documents": [
        d if isinstance(d, str) else d["text"] for d in DOCS]})
    assert [(r["index"], r["document"]["text"], r["relevance_score"])
            for r in ours["results"]] == [
        (r["index"], r["document"]["text"], r["relevance_score"]) for r in theirs["results"]]
    assert len(ours["results"]) == (top or 3) and ours["usage"]["total_tokens"] == 30


def test_bad_requests_and_bad_answers() -> None:
    with pytest.raises(errors.BadRequest) as err:
        rerank_dialects.to_tei({"query": "q", "documents": []})
    assert err.value.param == "documents"
    with pytest.raises(errors.BadRequest) as err:
        rerank_dialects.to_tei({"query": "", "documents": ["d"]})
    assert err.value.param == "query"
    with pytest.raises(errors.BadRequest):
        rerank_dialects.top_n({"top_n": -1}, 3)
    with pytest.raises(errors.UpstreamError):
        rerank_dialects.from_tei([{"index": 5, "score": 0.1}], {"documents": ["d"]},
                                 "m", "r", 1)
