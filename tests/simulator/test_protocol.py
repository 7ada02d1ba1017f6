"""Request checks: vLLM-style 400s naming the field; what a valid body turns into."""

from __future__ import annotations

import pytest

from simulator import errors, protocol
from synapse_common import tokens


def test_chat_body_renders_the_shared_chat_template() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    gen = protocol.parse({"model": "m", "messages": messages, "max_completion_tokens": 3,
                          "stop": "x", "stream": True,
                          "stream_options": {"include_usage": True}}, chat=True)
    assert gen.prompts == [tokens.render_chat(messages)]
    assert gen.max_tokens == 3 and gen.stop == ["x"] and gen.include_usage


def test_completion_prompts_may_be_a_batch_or_token_ids() -> None:
    assert protocol.parse({"prompt": ["a", "b"]}, chat=False).prompts == ["a", "b"]
    assert protocol.parse({"prompt": [1, 2, 3]}, chat=False).prompts == ["1 2 3"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user"}], "n": True}, "n"),
    ({"messages": [{"role": "user"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user"}], "stop": [1]}, "stop"),
    ({"messages": [{"role": "user"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"messages": [{"role": "user"}], "seed": 1.5}, "seed"),
])
def test_invalid_fields_are_bad_requests_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(errors.BadRequest) as err:
        protocol.parse(body, chat=True)
    assert err.value.param == param and err.value.status == 400


def test_body_must_be_a_json_object() -> None:
    with pytest.raises(errors.BadRequest, match="not valid JSON"):
        protocol.parse_body(b"{")
    with pytest.raises(errors.BadRequest, match="JSON object"):
        protocol.parse_body(b"[1]")


def test_context_length_errors_read_like_vllm() -> None:
    assert protocol.context_error(100, 10, 50, chat=True) is None
    too_long = protocol.context_error(100, 60, 50, chat=True)
    assert too_long is not None and "(60 in the messages, 50 in the completion)" in str(too_long)
    prompt_only = protocol.context_error(100, 120, None, chat=False)
    assert prompt_only is not None and "120 input tokens" in str(prompt_only)
