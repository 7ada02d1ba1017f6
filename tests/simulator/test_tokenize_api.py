"""/tokenize and /detokenize in vLLM's shapes, through a real simulator."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from synapse_common import tokens
from tests import harness
from tests.simulator.conftest import MODEL, Sim, json_call, start


@pytest.fixture(scope="module")
def sim(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", "--max-model-len", "4096",
                 name="sim-tokenize")


def post(sim: Sim, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return json_call(sim.url + path, body)


def test_tokenize_counts_what_usage_reports(sim: Sim) -> None:
    status, body = post(sim, "/tokenize", {"model": MODEL, "prompt": "What is a GPU?"})
    assert status == 200 and body["max_model_len"] == 4096 and body["token_strs"] is None
    assert body["count"] == len(body["tokens"]) > 0
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    status, chat = post(sim, "/tokenize", {"model": MODEL, "messages": messages})
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as client:
        done = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                              max_tokens=1)
        text = client.completions.create(model=MODEL, prompt="What is a GPU?", max_tokens=1)
    assert done.usage is not None and chat["count"] == done.usage.prompt_tokens
    assert text.usage is not None and body["count"] == text.usage.prompt_tokens
    _, bare = post(sim, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert bare["count"] < chat["count"]


def test_detokenize_gives_back_the_characters(sim: Sim) -> None:
    _, body = post(sim, "/tokenize", {"prompt": "Hello wide world", "return_token_strs": True})
    assert "".join(body["token_strs"]) == "Hellowideworld"
    status, back = post(sim, "/detokenize", {"tokens": body["tokens"]})
    # the shared tokenizer makes no token of a single space
    assert status == 200 and back == {"prompt": "Hellowideworld"}


def test_generated_words_detokenize_without_being_tokenized_first(sim: Sim) -> None:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as client:
        out = client.completions.create(model=MODEL, prompt="Generate", max_tokens=8)
    words = out.choices[0].text
    # the ids computed here, never sent to /tokenize: the output vocabulary is known
    _, back = post(sim, "/detokenize", {"tokens": tokens.tokenize(words)})
    assert back["prompt"] == words.replace(" ", "")


def test_unknown_ids_decode_to_nothing_and_bad_input_is_400(sim: Sim) -> None:
    assert post(sim, "/detokenize", {"tokens": [2**40]}) == (200, {"prompt": ""})
    status, err = post(sim, "/detokenize", {"tokens": [-1]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = post(sim, "/tokenize", {"model": "nope", "prompt": "x"})
    assert status == 404 and err["error"]["type"] == "NotFoundError"
