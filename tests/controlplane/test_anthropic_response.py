"""Chat completion → Anthropic Message: real vLLM answers in, the anthropic client's
strict parser and vLLM's own /v1/messages answers as the reference."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from controlplane import errors
from controlplane.core import anthropic_response
from tests.controlplane import anthropic_sdk as sdk


def chat(message: dict[str, Any], finish: str = "stop", stop_reason: Any = None,
         usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 3,
                               "total_tokens": 15}}


def test_a_real_vllm_answer_matches_vllms_own_messages_answer() -> None:
    ours = anthropic_response.from_chat(orjson.loads(sdk.data("chat_full.json")))
    theirs = orjson.loads(sdk.data("messages_full.json"))
    parsed = sdk.parsed_message(ours)
    assert parsed.id == "msg_91c8380cc2bcaff9"
    assert ours["content"] == theirs["content"] and ours["stop_reason"] == "max_tokens"
    assert ours["usage"] == theirs["usage"]
    assert parsed.usage.input_tokens == 20 and parsed.usage.output_tokens == 8


def test_a_real_stop_string_is_the_stop_sequence() -> None:
    ours = anthropic_response.from_chat(orjson.loads(sdk.data("chat_stop_full.json")))
    assert (ours["stop_reason"], ours["stop_sequence"]) == ("stop_sequence", "o")
    assert sdk.parsed_message(ours).stop_sequence == "o"


def test_tool_calls_become_tool_use_blocks() -> None:
    answer = chat({"content": "Checking.", "tool_calls": [
        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "chatcmpl-tool-2", "type": "function",
         "function": {"name": "get_time", "arguments": ""}}]}, finish="tool_calls")
    parsed = sdk.parsed_message(anthropic_response.from_chat(answer, model="llama"))
    assert parsed.stop_reason == "tool_use" and parsed.model == "llama"
    text, first, second = parsed.content
    assert text.type == "text" and text.text == "Checking."
    assert first.type == "tool_use" and first.input == {"city": "Paris"}
    assert first.id == "chatcmpl-tool-1" and first.name == "get_weather"
    assert second.type == "tool_use" and second.input == {}
    # vLLM ends a forced (named) call with "stop": it is still a tool use
    forced = dict(answer, choices=[{**answer["choices"][0], "finish_reason": "stop"}])
    assert anthropic_response.from_chat(forced)["stop_reason"] == "tool_use"


def test_tool_arguments_that_are_not_an_object_are_the_backends_fault() -> None:
    answer = chat({"content": None, "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": '"gabenwel'}}]})
    with pytest.raises(errors.UpstreamError) as err:
        anthropic_response.from_chat(answer)
    assert err.value.http_status == 502 and err.value.code == "bad_tool_arguments"


@pytest.mark.parametrize(("finish", "matched", "expected"), [
    ("stop", None, ("end_turn", None)),
    ("stop", 128001, ("end_turn", None)),  # vLLM: an EOS token id is no stop sequence
    ("stop", "\n\n", ("stop_sequence", "\n\n")),
    ("length", "x", ("max_tokens", None)),
    ("content_filter", None, ("refusal", None)),
    ("tool_calls", None, ("tool_use", None)),
])
def test_stop_reasons(finish: str, matched: Any, expected: tuple[str, str | None]) -> None:
    out = anthropic_response.from_chat(chat({"content": "x"}, finish, matched))
    assert (out["stop_reason"], out["stop_sequence"]) == expected
    assert sdk.parsed_message(out).stop_reason == expected[0]


def test_reasoning_cached_tokens_and_empty_answers() -> None:
    out = anthropic_response.from_chat(chat(
        {"content": "", "reasoning_content": "Let me think."},
        usage={"prompt_tokens": 100, "completion_tokens": 5,
               "prompt_tokens_details": {"cached_tokens": 64}}))
    parsed = sdk.parsed_message(out)
    assert [b.type for b in parsed.content] == ["thinking"]
    assert parsed.content[0].thinking == "Let me think."  # type: ignore[union-attr]
    assert parsed.usage.input_tokens == 36 and parsed.usage.cache_read_input_tokens == 64
    empty = sdk.parsed_message(anthropic_response.from_chat(chat({"content": None})))
    assert [(b.type, b.text) for b in empty.content] == [("text", "")]  # type: ignore[union-attr]


def test_an_answer_without_choices_is_an_upstream_error() -> None:
    with pytest.raises(errors.UpstreamError):
        anthropic_response.from_chat({"id": "x", "choices": []})
