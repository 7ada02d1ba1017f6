"""Every array of turns a path accepts is bounded by ``http.max_messages`` (probe 95, F4):
a Responses ``input`` of 2,049 items was served while chat's ``messages`` of as many
was a 400."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from controlplane import errors
from controlplane.core import validation
from tests.controlplane import cp_testing as t

TURN = {"role": "user", "content": "x"}


def test_responses_input_items_are_bounded_like_messages() -> None:
    def body(n: int) -> bytes:
        return json.dumps({"model": "m", "input": [TURN] * n}).encode()
    turns = validation.RESPONSES_TURNS
    four = validation.BodyLimits(max_messages=4)
    assert len(validation.parse_json(body(4), four, turns=turns)["input"]) == 4
    with pytest.raises(errors.BadRequest,
                       match=r"^input: array too long: 5 input items; at most 4 "
                             r"\(http\.max_messages\)") as info:
        validation.parse_json(body(5), four, turns=turns)
    assert info.value.param == "input" and info.value.code == "array_above_max_length"
    with pytest.raises(errors.BadRequest, match=r"^input: array too long: 2049"):
        validation.parse_json(body(2049), turns=turns)     # OpenAI's limit by default


def test_an_embeddings_input_is_not_a_list_of_turns() -> None:
    # one prompt of token ids (or a batch, bounded by http.max_pooling_inputs)
    body = json.dumps({"model": "m", "input": list(range(3000))}).encode()
    assert len(validation.parse_json(body, validation.BodyLimits(max_messages=4))["input"]) == 3000


@pytest.mark.parametrize("path, field", [
    ("/v1/responses", "input"),
    ("/v1/responses", "messages"),
    ("/v1/chat/completions", "messages"),
    ("/v1/messages", "messages"),
    ("/v1/messages/count_tokens", "messages"),
    ("/tokenize", "messages"),
])
async def test_every_path_refuses_more_turns_than_the_setting_naming_the_field(
        path: str, field: str) -> None:
    def body(n: int) -> dict[str, Any]:
        return {"model": "llama", "max_tokens": 4, "max_output_tokens": 4, "store": False,
                "input": "hi", "messages": [TURN], field: [TURN] * n}
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)])
        s = s.model_copy(update={"http": s.http.model_copy(update={"max_messages": 4})})
        async with t.running(s) as cp:
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                async with session.post(f"{cp.url}{path}", json=body(5)) as resp:
                    err = (await resp.json())["error"]
                    assert resp.status == 400, err
                    assert err["message"].startswith(f"{field}: array too long: 5 "), err
                    assert "at most 4 (http.max_messages)" in err["message"], err
                assert b.bodies == []
                async with session.post(f"{cp.url}{path}", json=body(4)) as resp:
                    assert "array too long" not in await resp.text()
