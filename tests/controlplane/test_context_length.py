"""A prompt certainly longer than the context of every backend that could serve it is
refused before any engine tokenizes it (400 ``context_length_exceeded`` naming the prompt
field), judged by the fewest tokens it can be to any tokenizer (``core.context_length``),
never by the router's estimate; a backend that does not report its context may still
take it. The floors, the plan over reported backends, and the HTTP paths with the
official client, a real gRPC server (the test plays the agent) and a fake engine."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from controlplane import errors
from controlplane.core import context_length, router, types
from protos.synapse.v1 import common_pb2, controlplane_pb2
from tests.controlplane import cp_testing as t
from tests.controlplane.test_dispatch import MODEL, serve, stack
from tests.controlplane.test_grpc_server import Agent
from tests.controlplane.test_models_context_length import report

PER = context_length.MAX_CHARS_PER_TOKEN


# -- the floor ----------------------------------------------------------------------------


def test_the_floor_counts_what_every_template_renders_and_token_ids_exactly() -> None:
    user = [{"role": "user", "content": "x" * (3 * PER + 1)}]
    assert context_length.of_messages(user) == 4
    parts = [{"role": "user", "content": [{"type": "text", "text": "x" * PER},
                                          {"type": "image_url", "image_url": {"url": "u"}}]}]
    assert context_length.of_messages(parts) == 1
    # templates may drop an earlier turn's reasoning, or roles they have no branch for
    dropped = [{"role": r, "content": "x" * 10 * PER} for r in ("system", "assistant", "tool")]
    assert context_length.of_messages(dropped) == 0
    assert context_length.of_prompt("x" * PER) == 1
    assert context_length.of_prompt(["x" * PER, "x" * 2 * PER]) == 2   # the longest prompt
    assert context_length.of_prompt([7] * 33) == 33
    assert context_length.of_prompt([[7] * 5, [7] * 9]) == 9


def test_a_request_that_lets_the_engine_truncate_has_no_floor() -> None:
    long = [{"role": "user", "content": "x" * 10 * PER}]
    assert context_length.of_chat_body({"truncate_prompt_tokens": 100}, long) == 0
    assert context_length.of_chat_body({"truncation": "auto"}, long) == 0
    assert context_length.of_chat_body({"truncation": "disabled"}, long) == 10
    assert context_length.of_completion_body({"prompt": [1] * 50,
                                              "truncate_prompt_tokens": 10}) == 0


# -- the plan -----------------------------------------------------------------------------


def _prompt(least: int) -> router.Prompt:
    prompt = router.Prompt.from_text("hello there")
    prompt.least_tokens = least
    return prompt


def test_a_prompt_longer_than_every_reported_context_is_refused() -> None:
    d, _, _ = stack(("a",))
    serve(d, {"a": MODEL, "b": MODEL}, {MODEL: ()}, max_model_len=4096)
    with pytest.raises(errors.BadRequest) as info:
        d.plan(MODEL, _prompt(4097), ("messages", "max_tokens"))
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    assert "4096" in info.value.message and "4097" in info.value.message
    assert "n1/" not in info.value.message      # no backend named
    # near the bound but not over it: sent on, the engine is the judge
    assert d.plan(MODEL, _prompt(4096)).route.candidates


def _backends(d: Any, backends: dict[str, tuple[str, int]],
              chains: dict[str, tuple[str, ...]]) -> None:
    """Backends by name -> (model, reported context) on node n1, and the models' chains."""
    serve(d, {}, chains)
    d.registry.report("n1", [types.BackendState(
        key=f"n1/{name}", node="n1", name=name, url=f"http://{name}.internal:8000",
        models=(model,), max_model_len=length) for name, (model, length) in backends.items()])


def test_a_backend_that_does_not_report_its_context_may_take_the_prompt() -> None:
    d, _, _ = stack(("a",))
    _backends(d, {"a": (MODEL, 0)}, {MODEL: ()})
    assert d.plan(MODEL, _prompt(10**6)).route.candidates
    _backends(d, {"a": (MODEL, 0), "short": (MODEL, 2048)}, {MODEL: ()})
    plan = d.plan(MODEL, _prompt(4096))
    # the backend whose context is known too short is left out; the unknown one takes it
    assert [v.backend.name for v in plan.route.candidates] == ["a"]


def test_the_backends_and_models_whose_context_holds_the_prompt_take_it() -> None:
    d, _, _ = stack(("a",))
    _backends(d, {"short": (MODEL, 2048), "long": (MODEL, 32768)}, {MODEL: ()})
    assert [v.backend.name for v in d.plan(MODEL, _prompt(4096)).route.candidates] == [
        "long"]
    # a fallback model with the longer context serves what the model itself cannot
    d, _, _ = stack(("a",))     # (a dispatcher walks a model's chain once)
    _backends(d, {"short": (MODEL, 2048), "fb": ("f", 32768)}, {MODEL: ("f",), "f": ()})
    plan = d.plan(MODEL, _prompt(4096))
    assert (plan.fallback, plan.route.candidates[0].backend.name) == ("f", "fb")
    # neither holds it: refused, quoting the largest context it could have had
    with pytest.raises(errors.BadRequest, match="context length is 32768 tokens"):
        d.plan(MODEL, _prompt(40_000))


# -- over HTTP ----------------------------------------------------------------------------

ADDRESS = "127.0.0.1:50052"
CONTEXT = 16        # the fake engine's reported context, in tokens


def _backend(url: str, max_model_len: int) -> common_pb2.BackendState:
    return common_pb2.BackendState(
        name="a", url=url, models=[t.MODEL], phase=common_pb2.BACKEND_PHASE_READY,
        engine=common_pb2.ENGINE_KIND_VLLM, task=common_pb2.BACKEND_TASK_GENERATE,
        max_model_len=max_model_len)


async def _reported(agent: Agent, seq: int, url: str, max_model_len: int) -> None:
    await agent.send(report(seq, _backend(url, max_model_len)))
    while (await agent.receive()).ack.sequence != seq:
        pass


async def _anthropic(cp: t.RunningCP, text: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{cp.url}/v1/messages", headers={"x-api-key": t.KEY_A},
            json={"model": t.MODEL, "max_tokens": 4,
                  "messages": [{"role": "user", "content": text}]}) as resp:
        return resp.status, await resp.json()


async def test_over_http_a_prompt_over_the_reported_context_is_a_400_before_the_engine(
        ) -> None:
    async with t.backends(("a", "ok")) as (engine,), \
            t.running(t.settings(), with_grpc=True) as cp:
        agent = Agent(cp.grpc_port)
        try:
            await agent.send(controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
                node_name="gpu-1", agent_version="test", node_address=ADDRESS)))
            await _reported(agent, 1, engine.url, CONTEXT)
            client = cp.client()
            too_long = "x" * (CONTEXT * PER + 1)
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model=t.MODEL, messages=[{"role": "user", "content": too_long}])
            assert info.value.code == "context_length_exceeded"
            assert info.value.param == "messages"
            assert f"context length is {CONTEXT} tokens" in info.value.message
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model=t.MODEL, prompt=[1] * (CONTEXT + 1))
            assert (info.value.code, info.value.param) == ("context_length_exceeded",
                                                           "prompt")
            status, body = await _anthropic(cp, too_long)
            assert status == 400 and "context length" in body["error"]["message"]
            assert engine.bodies == []          # no engine saw any of them
            # at the bound: the engine gets it, and so does a prompt the engine may cut
            await client.completions.create(model=t.MODEL, prompt=[1] * CONTEXT)
            await client.chat.completions.create(
                model=t.MODEL, messages=[{"role": "user", "content": too_long}],
                extra_body={"truncate_prompt_tokens": CONTEXT})
            assert len(engine.bodies) == 2
            # a routable backend that does not report its context: the engine judges
            await _reported(agent, 2, engine.url, 0)
            await client.chat.completions.create(
                model=t.MODEL, messages=[{"role": "user", "content": too_long}])
            assert len(engine.bodies) == 3
        finally:
            await agent.close()
