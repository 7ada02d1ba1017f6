"""The ``vllm`` upstream kind against the real vLLM (issue 17): the session's engine (the
one ``tests/engines/stack.py`` starts under an agent) put behind a second control plane as
a *static* upstream of kind ``vllm``, given by its ``/v1`` URL and known there under
another model name. The probe finds it healthy, its own ``/metrics`` give the router its
KV capacity and block size (vLLM's CPU backend: 128-token blocks), requests carry the
engine's name for the model and answers the name the client asked for.

Runs before ``test_real_vllm.py`` (whose last test stops the session's agent).
"""

from __future__ import annotations

import asyncio

import pytest

from controlplane.core import types
from tests.controlplane import cp_testing as t
from tests.engines.stack import RealStack

pytestmark = pytest.mark.timeout(900)

CANONICAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


async def test_a_static_vllm_upstream_is_probed_scraped_and_renamed(
        real_stack: RealStack) -> None:
    s = t.settings(
        models=[{"name": CANONICAL, "aliases": ["smol"]}],
        http={"upstream_first_byte_timeout_s": 120.0, "upstream_idle_timeout_s": 60.0},
        upstreams=[{"name": "vllm", "url": real_stack.engine_url + "/v1", "kind": "vllm",
                    "models": [CANONICAL], "model_names": {CANONICAL: real_stack.model},
                    "api_key": real_stack.engine_key}])   # the agent keyed this vLLM
    async with t.running(s) as cp:
        backend = await _scraped(cp)
        assert backend.block_size == 128 and backend.kv_capacity_tokens > 0
        assert backend.kv_capacity_tokens % 128 == 0 and backend.metrics_ok
        client = cp.client().with_options(timeout=120)
        raw = await client.chat.completions.with_raw_response.create(
            model="smol", messages=CAPITAL, temperature=0, max_tokens=24)
        reply = raw.parse()
        assert raw.headers["x-synapse-backend"] == "static/vllm"
        assert (reply.system_fingerprint or "").startswith("vllm-")   # vLLM answered
        assert reply.model == "smol", "the name the client asked for, not the engine's"
        assert "Paris" in (reply.choices[0].message.content or "")
        stream = await client.chat.completions.create(
            model=CANONICAL, messages=CAPITAL, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert {c.model for c in chunks} == {CANONICAL}
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
        await client.close()


async def _scraped(cp: t.RunningCP) -> types.BackendState:
    for _ in range(600):
        backend = cp.services.registry.static_backends()[0]
        if backend.kv_capacity_tokens:
            return backend
        await asyncio.sleep(0.1)
    raise AssertionError("vLLM's /metrics were never read")
