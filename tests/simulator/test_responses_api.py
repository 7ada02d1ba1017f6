"""/v1/responses through a real simulator and the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests import harness
from tests.simulator.conftest import MODEL, Sim, start

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "days": {"type": "integer"}},
                          "required": ["city"]}}


@pytest.fixture(scope="module")
def sim(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", "--seed", "3", name="sim-responses")


@pytest.fixture(scope="module")
def stored(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", "--responses-store", name="sim-store")


def _client(sim: Sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def client(sim: Sim) -> Iterator[openai.OpenAI]:
    with _client(sim) as c:
        yield c


def test_a_response_with_text_usage_and_status(client: openai.OpenAI) -> None:
    long = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=500)
    assert long.object == "response" and long.id.startswith("resp_")
    assert long.status == "completed" and long.incomplete_details is None
    assert long.output_text and long.output[0].type == "message"
    assert long.usage is not None
    assert long.usage.total_tokens == long.usage.input_tokens + long.usage.output_tokens
    cut = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 3
    assert long.output_text.startswith(cut.output_text)  # same prompt, same seed


def test_instructions_and_input_items_count_as_input(client: openai.OpenAI) -> None:
    bare = client.responses.create(model=MODEL, input="Hello", max_output_tokens=2)
    framed = client.responses.create(
        model=MODEL, instructions="You answer in one word, always.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
        max_output_tokens=2)
    assert bare.usage is not None and framed.usage is not None
    assert framed.usage.input_tokens > bare.usage.input_tokens
    assert framed.instructions == "You answer in one word, always."


def test_a_stream_has_vllm_events_in_order_and_adds_up(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Stream it", stream=True,
                                          max_output_tokens=6))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") == 6
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage.output_tokens == 6
    whole = client.responses.create(model=MODEL, input="Stream it", max_output_tokens=6)
    assert whole.output_text == text


def test_the_sdk_stream_helper_accumulates_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Helper", max_output_tokens=5) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and len(deltas) == 5


def test_a_named_tool_is_called_with_arguments_from_its_schema(client: openai.OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                   tool_choice={"type": "function", "name": "get_weather"})
    call = resp.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("chatcmpl-tool-")
    assert set(json.loads(call.arguments)) == {"city"}
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", stream=True,
                                          tools=[WEATHER], tool_choice="required"))
    deltas = "".join(e.delta for e in events  # type: ignore[union-attr]
                     if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments and json.loads(deltas)["city"]  # type: ignore[union-attr]


def test_auto_calls_a_tool_only_when_the_user_names_it(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=MODEL, input="Hi there", tools=[WEATHER])
    assert plain.output[0].type == "message"
    named = client.responses.create(model=MODEL, input="use get_weather for Oslo",
                                    tools=[WEATHER])
    assert named.output[0].type == "function_call"


def test_previous_response_id_is_404_without_the_store_as_in_vllm(
        client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="Remember this", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="And?", previous_response_id=first.id)
    assert err.value.body["message"] == f"Response with id '{first.id}' not found."  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_with_the_store_a_conversation_continues_on_the_same_engine(stored: Sim) -> None:
    with _client(stored) as client:
        first = client.responses.create(model=MODEL, input="Remember this please",
                                        max_output_tokens=4)
        again = client.responses.create(model=MODEL, input="And?", max_output_tokens=2,
                                        previous_response_id=first.id)
        alone = client.responses.create(model=MODEL, input="And?", max_output_tokens=2)
        assert again.previous_response_id == first.id
        assert again.usage is not None and alone.usage is not None
        assert again.usage.input_tokens > alone.usage.input_tokens  # history came along
        assert client.responses.retrieve(first.id).output_text == first.output_text
        unstored = client.responses.create(model=MODEL, input="x", store=False,
                                           max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)


def test_unknown_model_and_bad_input_are_vllm_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="x")
    assert err.value.body["type"] == "NotFoundError"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=MODEL, input=[])
    assert bad.value.body["param"] == "input"  # type: ignore[index]
