"""Anthropic Messages request → chat completions request, fed with the bodies the
official anthropic client actually sends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from controlplane import errors
from controlplane.core import anthropic_request

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
EMPTY_MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                 "content": [{"type": "text", "text": ""}], "stop_reason": "end_turn",
                 "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}


def sent_by_sdk(call: Callable[[anthropic.Anthropic], Any]) -> dict[str, Any]:
    """The JSON body the anthropic client sends for ``call`` (captured at its transport)."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(orjson.loads(request.content))
        return httpx2.Response(200, json=EMPTY_MESSAGE)

    with anthropic.Anthropic(api_key="k", base_url="http://cp.test", max_retries=0,
                             http_client=httpx2.Client(transport=httpx2.MockTransport(
                                 handler))) as client:
        call(client)
    return seen[0]


def test_a_full_conversation_with_tools_maps_field_by_field() -> None:
    body = sent_by_sdk(lambda c: c.messages.create(
        model="llama", max_tokens=300, stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "user-7"},
        # this SDK release no longer takes sampling settings; older ones and raw HTTP do
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
        system=[{"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}],
        tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather",
                                      "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01",
                 "content": [{"type": "text", "text": "Sunny, 21C"}]},
                {"type": "text", "text": "And tomorrow?"}]}]))
    assert anthropic_request.to_chat(body) == {
        "model": "llama", "max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
        "stop": ["\n\nHuman:"], "user": "user-7",
        "messages": [
            {"role": "system", "content": "You are terse.\nUse tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_01", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "Sunny, 21C"},
            {"role": "user", "content": "And tomorrow?"}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": WEATHER["input_schema"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False}


def test_a_stream_asks_for_usage_and_tool_choice_kinds_map() -> None:
    body = sent_by_sdk(lambda c: c.messages.create(
        model="m", max_tokens=5, stream=True, messages=[{"role": "user", "content": "x"}],
        tools=[WEATHER], tool_choice={"type": "any"}))
    chat = anthropic_request.to_chat(body)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["tool_choice"] == "required"
    for kind, expected in (("auto", "auto"), ("none", "none")):
        assert anthropic_request.to_chat({**body, "tool_choice": {"type": kind}})[
            "tool_choice"] == expected


def test_images_become_image_url_parts_and_errors_are_marked() -> None:
    body = sent_by_sdk(lambda c: c.messages.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}},
            {"type": "text", "text": "What is this?"},
            {"type": "tool_result", "tool_use_id": "t1", "content": "boom",
             "is_error": True}]}]))
    messages = anthropic_request.to_chat(body)["messages"]
    assert messages[0] == {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}
    assert messages[1] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}},
        {"type": "text", "text": "What is this?"}]}


@pytest.mark.parametrize(("change", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"stop_sequences": "stop"}, "stop_sequences"),
    ({"temperature": "hot"}, "temperature"),
])
def test_invalid_requests_name_the_field(change: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            **change}
    with pytest.raises(errors.BadRequest) as err:
        anthropic_request.to_chat(body)
    assert err.value.param == param and err.value.http_status == 400
