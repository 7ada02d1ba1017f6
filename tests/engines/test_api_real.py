"""The paths beyond chat that the real vLLM 0.32 serves, through the real control plane
and agent of the session stack (``real_stack``): Responses (openai client, whole and
streamed), Anthropic Messages served natively by vLLM (anthropic client, whole and
streamed, a system prompt and a tool definition), tokenize / detokenize by HTTP.

vLLM without ``--enable-auto-tool-choice`` refuses tool calls (400) and SmolLM2 cannot
make well-formed ones anyway: the tool definition rides with ``tool_choice: none`` here,
and the refusal of ``auto`` is checked for its Anthropic shape; tool_use blocks are shown
against the simulator (tests/controlplane/test_api_surface.py). Text is compared only
with this engine's own answer to the same request, never across engines.

This module sorts before test_real_vllm.py, whose last test stops the shared agent.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests import fleet, harness
from tests.engines.stack import RealStack

pytestmark = pytest.mark.timeout(900)

TOOLS = [{"name": "get_weather", "description": "The weather in a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def _anthropic(base: str, bearer: str | None = None) -> anthropic.Anthropic:
    """A client of ``base`` with a tenant key (``x-api-key``); ``bearer``: also
    ``Authorization: Bearer`` (vLLM's key is checked only there)."""
    return anthropic.Anthropic(base_url=base, api_key=fleet.TENANT_KEY, max_retries=0,
                               timeout=120, default_headers={"Authorization": f"Bearer {bearer}"}
                               if bearer else None)


def _post(url: str, body: dict[str, Any], key: str | None = fleet.TENANT_KEY,
          ) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = harness.http(url, json.dumps(body).encode(), key, timeout=120)
    return status, headers, json.loads(raw)


def test_responses_whole_and_streamed(real_stack: RealStack) -> None:
    with real_stack.client() as c:
        raw = c.responses.with_raw_response.create(
            model="smollm2", input="What is the capital of France?", temperature=0,
            instructions="Answer in one sentence.", max_output_tokens=24)
        reply = raw.parse()
        assert raw.headers["x-synapse-backend"] == real_stack.backend_key
        assert reply.model == real_stack.model and "Paris" in reply.output_text
        assert reply.usage is not None and reply.usage.input_tokens > 0
        with c.responses.stream(model="smollm2", input="What is the capital of France?",
                                temperature=0, instructions="Answer in one sentence.",
                                max_output_tokens=24) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == reply.output_text


def test_a_continuation_the_engine_did_not_store_is_its_404(real_stack: RealStack) -> None:
    # vLLM keeps no answers unless VLLM_ENABLE_RESPONSES_API_STORE is set: the
    # continuation goes to the engine that made the answer, which says it is gone.
    with real_stack.client() as c:
        first = c.responses.create(model="smollm2", input="Hi", max_output_tokens=4)
        with pytest.raises(openai.NotFoundError) as gone:
            c.responses.create(model="smollm2", input="And?", previous_response_id=first.id,
                               max_output_tokens=4)
    assert first.id in str(gone.value)


def test_messages_native_with_a_system_prompt_and_a_tool(real_stack: RealStack) -> None:
    ask: dict[str, Any] = {"model": "smollm2", "max_tokens": 24, "system": "Answer briefly.",
                           "messages": CAPITAL, "tools": TOOLS,
                           "tool_choice": {"type": "none"}, "extra_body": {"temperature": 0}}
    with _anthropic(real_stack.base) as c:
        raw = c.messages.with_raw_response.create(**ask)
        message = raw.parse()
        with c.messages.stream(**ask) as stream:
            streamed = stream.get_final_message()
    assert raw.headers["x-synapse-backend"] == real_stack.backend_key
    # vLLM answered /v1/messages itself (the agent learnt the task from its
    # /openapi.json): its ids are its chat ids; a translated answer's would be msg_…
    assert message.id.startswith("chatcmpl-")
    assert message.stop_reason in ("end_turn", "max_tokens")
    text = message.content[0].text  # type: ignore[union-attr]
    assert text.strip() and streamed.content[0].text == text  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    # the engine's own answer to the same request, around Synapse
    with _anthropic(real_stack.engine_url, real_stack.engine_key) as direct:
        own = direct.messages.create(**{**ask, "model": real_stack.model})
    assert own.content[0].text == text  # type: ignore[union-attr]


def test_a_refused_tool_call_is_an_anthropic_error(real_stack: RealStack) -> None:
    with _anthropic(real_stack.base) as c, pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model="smollm2", max_tokens=8, messages=CAPITAL, tools=TOOLS)
    body = bad.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"


def test_tokenize_and_detokenize_by_http(real_stack: RealStack) -> None:
    status, headers, tokens = _post(real_stack.base + "/tokenize",
                                    {"model": "smollm2", "prompt": "Hello world"})
    assert status == 200 and headers["x-synapse-backend"] == real_stack.backend_key
    assert tokens["count"] == len(tokens["tokens"]) > 0
    _, _, own = _post(real_stack.engine_url + "/tokenize",   # vLLM itself, with its key
                      {"model": real_stack.model, "prompt": "Hello world"},
                      key=real_stack.engine_key)
    assert tokens["tokens"] == own["tokens"]
    status, _, text = _post(real_stack.base + "/detokenize",
                            {"model": "smollm2", "tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == "Hello world"
