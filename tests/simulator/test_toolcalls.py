"""Deterministic tool calls: the rule (pure) and chat completions through a real simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from simulator import errors, toolcalls
from tests import harness
from tests.simulator.conftest import MODEL, Sim, start

SCHEMA = {"type": "object", "required": ["city", "unit", "days", "hourly", "tags", "where"],
          "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
                         "days": {"type": "integer"}, "hourly": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
                         "ignored": {"type": "string"}}}
TOOLS = [toolcalls.Tool("get_weather", SCHEMA), toolcalls.Tool("get_time", {})]
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


def test_arguments_follow_the_schema_and_repeat() -> None:
    call = toolcalls.choose(TOOLS, "get_weather", "Paris?", seed=1)
    assert call is not None and call.name == "get_weather"
    args = call.input
    assert set(args) == {"city", "unit", "days", "hourly", "tags", "where"}
    assert isinstance(args["city"], str) and args["unit"] == "C"
    assert isinstance(args["days"], int) and isinstance(args["hourly"], bool)
    assert len(args["tags"]) == 1 and isinstance(args["where"]["lat"], float)
    again = toolcalls.choose(TOOLS, "get_weather", "Paris?", seed=1)
    assert again is not None and again.arguments == call.arguments and again.id != call.id
    assert "".join(toolcalls.pieces(call.arguments)) == call.arguments


def test_which_tool_is_called() -> None:
    assert toolcalls.choose(TOOLS, "none", "get_weather now", 0) is None
    assert toolcalls.choose([], "auto", "get_weather now", 0) is None
    assert toolcalls.choose(TOOLS, "auto", "hello", 0) is None
    named = toolcalls.choose(TOOLS, "auto", "what does GET_TIME say", 0)
    assert named is not None and named.name == "get_time"
    first = toolcalls.choose(TOOLS, "required", "hello", 0)
    assert first is not None and first.name == "get_weather"
    with pytest.raises(errors.BadRequest):
        toolcalls.choose(TOOLS, "get_nothing", "hello", 0)


def test_the_three_dialects_read_the_same_choice() -> None:
    chat = toolcalls.chat_tools({"tools": [CHAT_TOOL], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    responses = toolcalls.responses_tools({"tools": [{"type": "function", "name": "get_weather",
                                                      "parameters": SCHEMA}],
                                           "tool_choice": {"type": "function",
                                                           "name": "get_weather"}})
    anthropic = toolcalls.anthropic_tools({"tools": [{"name": "get_weather",
                                                      "input_schema": SCHEMA}],
                                           "tool_choice": {"type": "tool",
                                                           "name": "get_weather"}})
    assert chat == responses == anthropic == ([TOOLS[0]], "get_weather")
    assert toolcalls.anthropic_tools({"tools": [{"name": "t"}],
                                      "tool_choice": {"type": "any"}})[1] == "required"
    assert toolcalls.chat_tools({})[1] == "none"


@pytest.fixture(scope="module")
def sim(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", name="sim-tools")


@pytest.fixture
def client(sim: Sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0,
                       timeout=30) as c:
        yield c


def test_chat_tool_call_as_vllm_answers_it(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[CHAT_TOOL],  # type: ignore[list-item]
        tool_choice="required")
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id.startswith("chatcmpl-tool-") and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) >= {"city", "days"}  # type: ignore[union-attr]


def test_chat_tool_call_streamed_adds_up(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "call get_weather"}],
        tools=[CHAT_TOOL], stream=True))  # type: ignore[list-item]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(tc.function.arguments or "" for tc in calls)  # type: ignore[union-attr]
    assert json.loads(arguments)["city"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
