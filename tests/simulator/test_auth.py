"""The simulator started with a key refuses callers without it, as the agent's engines do
once it passes them the engine key; health, metrics and the route list stay open."""

from __future__ import annotations

import pathlib

import aiohttp
import openai
import pytest

from simulator import config
from synapse_common import clock as clocks
from tests import harness
from tests.simulator.conftest import MODEL, in_process

KEY = "0123456789abcdef-engine-key"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _settings(engine: str = "vllm", key: str | None = KEY) -> config.SimulatorSettings:
    return config.SimulatorSettings.model_validate({
        "engine": engine, "served_model_names": [MODEL], "time_scale": 0,
        **({"api_key": key} if key else {})})


async def _status(url: str, method: str = "GET", body: object = None,
                  key: str | None = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.request(
            method, url, json=body, headers=headers) as resp:
        json_body = resp.content_type == "application/json" and resp.content_length
        return resp.status, await resp.json() if json_body else None


async def test_vllm_mode_refuses_a_call_without_the_key_or_with_another() -> None:
    async with in_process(_settings(), clocks.Time()) as url:
        for key in (None, "wrong-key", KEY + "x"):
            status, body = await _status(url + "/v1/chat/completions", "POST", CHAT, key)
            assert status == 401
            assert isinstance(body, dict) and body["error"]["type"] == "AuthenticationError"
            assert KEY not in str(body)
        status, _ = await _status(url + "/v1/models")
        assert status == 401
        status, _ = await _status(url + "/v1/chat/completions", "POST", CHAT, KEY)
        assert status == 200


async def test_vllm_mode_leaves_health_metrics_and_route_list_open() -> None:
    async with in_process(_settings(), clocks.Time()) as url:
        for path in ("/health", "/metrics", "/openapi.json", "/sim/faults"):
            status, _ = await _status(url + path)
            assert status == 200, path


async def test_tei_mode_guards_everything_but_health_and_metrics() -> None:
    async with in_process(_settings("tei"), clocks.Time()) as url:
        status, body = await _status(url + "/embed", "POST", {"inputs": "hello"})
        assert status == 401 and isinstance(body, dict) and body["error_type"] == "Unauthorized"
        status, _ = await _status(url + "/v1/embeddings", "POST",
                                  {"model": MODEL, "input": "hello"})
        assert status == 401
        status, _ = await _status(url + "/info")
        assert status == 401
        status, _ = await _status(url + "/embed", "POST", {"inputs": "hello"}, KEY)
        assert status == 200
        for path in ("/health", "/metrics", "/openapi.json"):
            status, _ = await _status(url + path)
            assert status == 200, path


async def test_without_a_key_every_caller_is_served() -> None:
    async with in_process(_settings(key=None), clocks.Time()) as url:
        status, _ = await _status(url + "/v1/chat/completions", "POST", CHAT)
        assert status == 200


def test_the_process_takes_its_key_from_the_environment_and_never_prints_it(
        tmp_path: pathlib.Path) -> None:
    pool = harness.ProcessPool(tmp_path)
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        proc = pool.start("sim", ["synapse", "simulator", "--port", str(port), "--time-scale",
                                  "0", "--served-model-name", MODEL, "--log-level", "debug"],
                          env={"SYNAPSE_API_KEY": KEY}, ready_url=url + "/health")
        with openai.OpenAI(base_url=url + "/v1", api_key="not-the-key",
                           max_retries=0) as client, pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "hi"}])
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].message.content
        assert KEY not in proc.output()
    finally:
        pool.stop_all()
