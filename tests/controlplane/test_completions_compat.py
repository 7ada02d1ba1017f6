"""Legacy completions bodies that vLLM serves and Synapse must pass through: a batch of
token-id prompts (lm-eval-harness's generation requests), prompt scoring with ``echo``
and ``max_tokens: 0`` (its loglikelihood requests), and an empty ``stream_options``
without ``stream``."""

from __future__ import annotations

import json

import jsonschema
import pytest

from controlplane import errors
from controlplane.api import openapi
from controlplane.core import validation
from tests.controlplane import cp_testing as t


async def test_a_batch_of_token_id_prompts_reaches_the_engine_and_holds_a_seat_each() -> None:
    async with t.backends(("one", "slow")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            assert await t.seats_mid_stream(
                cp, "one", model="llama", prompt=[[504, 3575, 282], [4649, 314]],
                max_tokens=8, temperature=0) == (1, 2)
            assert json.loads(b.bodies[0])["prompt"] == [[504, 3575, 282], [4649, 314]]


async def test_prompt_scoring_and_empty_stream_options_pass_through_unchanged() -> None:
    bodies = [
        {"model": "llama", "prompt": "The capital of France is", "echo": True,
         "max_tokens": 0, "logprobs": 1},
        {"model": "llama", "prompt": "hi", "max_tokens": 4, "stream_options": {}},
    ]
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            client = cp.client()
            for body in bodies:
                answer = await client.completions.create(**body)
                assert answer.choices, answer
            sent = [json.loads(raw) for raw in b.bodies]
            # as sent, but for the model's canonical name
            assert len(sent) == len(bodies)
            for got, body in zip(sent, bodies, strict=True):
                assert {k: got[k] for k in body if k != "model"} == {
                    k: v for k, v in body.items() if k != "model"}


def test_the_openapi_description_takes_what_validation_takes() -> None:
    """GET /openapi.json describes the completions bodies the edge now serves, and still
    the stream_options it refuses."""
    schema = openapi.SCHEMAS["CompletionRequest"]
    validator = jsonschema.Draft202012Validator(schema)
    good = [{"model": "m", "prompt": [[504, 3575, 282], [4649, 314]]},
            {"model": "m", "prompt": "x", "echo": True, "max_tokens": 0},
            {"model": "m", "prompt": "x", "stream_options": {}}]
    for body in good:
        assert not list(validator.iter_errors(body)), body
        validation.completions(body)
    bad = {"model": "m", "prompt": "x", "stream_options": {"include_usage": False}}
    assert list(validator.iter_errors(bad))
    with pytest.raises(errors.BadRequest):
        validation.completions(bad)
