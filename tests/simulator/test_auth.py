"""The simulator started with a key refuses callers without it, as the agent's engines do
once it passes them the engine key (behind the agent's guard): only GET/HEAD /health
stays open, the simulator's own fault hooks included."""

from __future__ import annotations

import pathlib

import aiohttp
import openai
import pytest

from synapse_common import clock as clocks
from tests import harness
from tests.simulator.conftest import ENGINE_KEY, MODEL, in_process, keyed_settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _status(url: str, method: str = "GET", body: object = None,
                  key: str | None = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.request(
            method, url, json=body, headers=headers) as resp:
        json_body = resp.content_type == "application/json" and resp.content_length
        return resp.status, await resp.json() if json_body else None


async def test_vllm_mode_refuses_a_call_without_the_key_or_with_another() -> None:
    async with in_process(keyed_settings(), clocks.Time()) as url:
        for key in (None, "wrong-key", ENGINE_KEY + "x"):
            status, body = await _status(url + "/v1/chat/completions", "POST", CHAT, key)
            assert status == 401
            assert isinstance(body, dict) and body["error"]["type"] == "AuthenticationError"
            assert ENGINE_KEY not in str(body)
        status, _ = await _status(url + "/v1/models")
        assert status == 401
        status, _ = await _status(url + "/v1/chat/completions", "POST", CHAT, ENGINE_KEY)
        assert status == 200


async def test_only_health_is_open_and_fault_injection_needs_the_key() -> None:
    """``/sim/faults`` (``hang``, ``crash_after``, ``error_rate``), ``/sim/state``,
    ``/metrics``, ``/tokenize`` and ``/detokenize`` answered anyone: in embedded mode the
    simulator is the live engine, so any local process could take every tenant's traffic
    down. The agent's guard in front of vLLM opens only ``GET``/``HEAD /health``."""
    hang = {"hang": True}
    calls = [("GET", "/sim/faults", None), ("POST", "/sim/faults", hang),
             ("POST", "/sim/faults", {"crash_after": 1}),
             ("POST", "/sim/faults", {"error_rate": 1.0}), ("GET", "/sim/state", None),
             ("GET", "/metrics", None), ("GET", "/openapi.json", None),
             ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
             ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
             ("POST", "/invocations", CHAT), ("POST", "/health", None)]
    async with in_process(keyed_settings(), clocks.Time()) as url:
        for method, path, body in calls:
            for key in (None, "wrong-key"):
                status, _ = await _status(url + path, method, body, key)
                assert status == 401, (method, path, key)
        for method in ("GET", "HEAD"):
            status, _ = await _status(url + "/health", method)
            assert status == 200, method
        status, _ = await _status(url + "/v1/chat/completions", "POST", CHAT, ENGINE_KEY)
        assert status == 200, "no fault was set without the key"
        for method, path, body in [c for c in calls if c[1] in ("/metrics", "/sim/state")]:
            status, _ = await _status(url + path, method, body, ENGINE_KEY)
            assert status == 200, path
        status, _ = await _status(url + "/sim/faults", "POST", hang, ENGINE_KEY)
        assert status == 200


async def test_tei_mode_guards_everything_but_health() -> None:
    async with in_process(keyed_settings("tei"), clocks.Time()) as url:
        status, body = await _status(url + "/embed", "POST", {"inputs": "hello"})
        assert status == 401 and isinstance(body, dict) and body["error_type"] == "Unauthorized"
        status, _ = await _status(url + "/v1/embeddings", "POST",
                                  {"model": MODEL, "input": "hello"})
        assert status == 401
        status, _ = await _status(url + "/info")
        assert status == 401
        status, _ = await _status(url + "/embed", "POST", {"inputs": "hello"}, ENGINE_KEY)
        assert status == 200
        for path in ("/metrics", "/openapi.json", "/sim/faults"):
            status, _ = await _status(url + path)
            assert status == 401, path
            status, _ = await _status(url + path, key=ENGINE_KEY)
            assert status == 200, path
        status, _ = await _status(url + "/health")
        assert status == 200


async def test_without_a_key_every_caller_is_served() -> None:
    async with in_process(keyed_settings(key=None), clocks.Time()) as url:
        for method, path, body in (("POST", "/v1/chat/completions", CHAT),
                                   ("GET", "/metrics", None), ("GET", "/sim/state", None)):
            status, _ = await _status(url + path, method, body)
            assert status == 200, path


def test_the_process_takes_its_key_from_the_environment_and_never_prints_it(
        tmp_path: pathlib.Path) -> None:
    pool = harness.ProcessPool(tmp_path)
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        proc = pool.start("sim", ["synapse", "simulator", "--port", str(port), "--time-scale",
                                  "0", "--served-model-name", MODEL, "--log-level", "debug"],
                          env={"SYNAPSE_API_KEY": ENGINE_KEY}, ready_url=url + "/health")
        with openai.OpenAI(base_url=url + "/v1", api_key="not-the-key",
                           max_retries=0) as client, pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "hi"}])
        with openai.OpenAI(base_url=url + "/v1", api_key=ENGINE_KEY, max_retries=0) as client:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].message.content
        assert ENGINE_KEY not in proc.output()
    finally:
        pool.stop_all()
