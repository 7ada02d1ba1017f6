"""/v1/messages (Anthropic Messages, served natively as vLLM 0.32 does) through a real
simulator and the official anthropic client."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests import harness
from tests.simulator.conftest import MODEL, Sim, start

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "days": {"type": "integer"}},
                            "required": ["city", "days"]}}


@pytest.fixture(scope="module")
def sim(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", name="sim-messages")


@pytest.fixture
def client(sim: Sim) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=sim.url, api_key="unused", max_retries=0,
                             timeout=30) as c:
        yield c


def test_a_message_with_a_system_prompt(client: anthropic.Anthropic) -> None:
    bare = client.messages.create(model=MODEL, max_tokens=400,
                                  messages=[{"role": "user", "content": "Hello"}])
    framed = client.messages.create(model=MODEL, max_tokens=400, system="Be brief.",
                                    messages=[{"role": "user", "content": "Hello"}])
    assert framed.type == "message" and framed.role == "assistant"
    assert framed.content[0].type == "text" and framed.content[0].text
    assert framed.stop_reason == "end_turn"
    assert framed.usage.input_tokens > bare.usage.input_tokens
    cut = client.messages.create(model=MODEL, max_tokens=2, system="Be brief.",
                                 messages=[{"role": "user", "content": "Hello"}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_a_stop_sequence_ends_the_text_and_is_reported(client: anthropic.Anthropic) -> None:
    text = client.messages.create(model=MODEL, max_tokens=50,
                                  messages=[{"role": "user", "content": "Go"}]).content[0]
    assert text.type == "text"
    word = text.text.split()[2]
    stopped = client.messages.create(model=MODEL, max_tokens=50, stop_sequences=[word],
                                     messages=[{"role": "user", "content": "Go"}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text  # type: ignore[union-attr]


def test_a_stream_parsed_by_the_sdk_adds_up_to_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=7, system="Be brief.",
                                messages=[{"role": "user", "content": "Stream"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) == 7 and final.content[0].text == "".join(pieces)  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 7
    whole = client.messages.create(model=MODEL, max_tokens=7, system="Be brief.",
                                   messages=[{"role": "user", "content": "Stream"}])
    assert whole.content[0].text == final.content[0].text  # type: ignore[union-attr]


def test_a_tool_named_by_tool_choice_is_used_streaming_or_not(
        client: anthropic.Anthropic) -> None:
    ask = {"model": MODEL, "max_tokens": 100, "tools": [WEATHER],
           "tool_choice": {"type": "tool", "name": "get_weather"},
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    message = client.messages.create(**ask)  # type: ignore[call-overload]
    block = message.content[0]
    assert message.stop_reason == "tool_use" and block.type == "tool_use"
    assert block.name == "get_weather" and set(block.input) == {"city", "days"}
    assert isinstance(block.input["days"], int)
    with client.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == block.input  # type: ignore[union-attr]


def test_tool_history_is_accepted(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=5, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "days": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]}])
    assert message.content[0].type == "text"


def test_count_tokens_matches_the_usage(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Count me"}]
    counted = client.messages.count_tokens(model=MODEL, system="S", messages=messages)  # type: ignore[arg-type]
    made = client.messages.create(model=MODEL, max_tokens=1, system="S", messages=messages)  # type: ignore[arg-type]
    assert counted.input_tokens == made.usage.input_tokens


def test_errors_have_the_anthropic_shape(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "NotFoundError", "message": "The model `nope` does not exist."}}
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=5, messages=[])
    assert bad.value.body["type"] == "error"  # type: ignore[index]
