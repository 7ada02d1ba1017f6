"""The API surface served by engines an agent supervises by config: a vLLM-mode simulator
whose tasks the agent learns from its /openapi.json, a Whisper-like and a speech server
named by their tasks, and a TEI reranker (``engine: tei``, TEI's own /rerank dialect,
played by the simulator behind TEI's command line: tests/tei_standin.py).

The engines require the engine key the agent chose for its node and sent in Register (the
control plane presents it): a call straight to an engine's port without it is refused,
through the control plane it is served.

Real processes throughout: control plane, agent, engines; the official openai and
anthropic clients.
"""

from __future__ import annotations

import json
import pathlib
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from synapse_common import engine_key
from tests import fleet, harness

pytestmark = pytest.mark.timeout(300)

CHAT, WHISPER, TTS, RANKER = "chat-model", "whisper", "tts", "ranker"
NODE = "api-node"


class Stack:
    def __init__(self, base: str, ports: dict[str, int], agent: harness.ManagedProcess) -> None:
        self.base = base
        self.ports = ports      # backend name -> its engine's port
        self.agent = agent

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=fleet.TENANT_KEY,
                             max_retries=0, timeout=60)


def _backend(name: str, engine: str, model: str, *extra: str,
             tasks: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"name": name, "engine": engine, "model": model, "served_model_names": [model],
            "port": harness.free_port(), "extra_args": ["--time-scale", "0", *extra]
            if engine == "simulator" else list(extra), "tasks": list(tasks)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("api-agent")
    pool = harness.ProcessPool(work)
    http, grpc = harness.free_port(), harness.free_port()
    cp = fleet.controlplane_config("cp", http, grpc, work / "cp-data",
                                   models=[{"name": m} for m in (CHAT, WHISPER, TTS, RANKER)])
    agent = fleet.agent_config(NODE, [f"127.0.0.1:{grpc}"], {}, work / "logs")
    standin = pathlib.Path(__file__).parents[1] / "tei_standin.py"
    agent["supervisor"]["tei_command"] = [sys.executable, str(standin)]
    agent["backends"] = [
        _backend("llm", "simulator", CHAT),                     # tasks from /openapi.json
        _backend("whisper", "simulator", WHISPER, tasks=("transcription",)),
        _backend("tts", "simulator", TTS, tasks=("speech",)),
        _backend("ranker", "tei", RANKER, "--task", "rerank", tasks=("rerank",))]
    ports = {b["name"]: b["port"] for b in agent["backends"]}
    base = f"http://127.0.0.1:{http}"
    try:
        pool.start("cp", ["synapse", "controlplane", "--config",
                          str(fleet.write_yaml(work / "cp.yaml", cp))], ready_url=base + "/health")
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(work / "agent.yaml", agent))])
        harness.wait_until(lambda: fleet.backends_ready(base) == 4, 60,
                           "the agent's four engines to be ready", proc=proc)
        yield Stack(base, ports, proc)
    finally:
        pool.stop_all()


def test_learnt_tasks_route_responses_and_messages(stack: Stack) -> None:
    with stack.openai() as c:
        raw = c.responses.with_raw_response.create(model=CHAT, input="hello",
                                                   max_output_tokens=8)
    assert raw.headers["x-synapse-backend"] == f"{NODE}/llm" and raw.parse().output_text
    with anthropic.Anthropic(base_url=stack.base, api_key=fleet.TENANT_KEY,
                             max_retries=0) as c:
        message = c.messages.create(model=CHAT, max_tokens=8, system="Be brief.",
                                    messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].type == "text"


def test_speech_and_transcription_on_the_agents_engines(stack: Stack) -> None:
    with stack.openai() as c:
        audio = c.audio.speech.with_raw_response.create(model=TTS, voice="alloy",
                                                        input="one two three")
        assert audio.headers["x-synapse-backend"] == f"{NODE}/tts"
        wav = audio.content
        text = c.audio.transcriptions.create(model=WHISPER, file=("speech.wav", wav))
    assert text.text.startswith(f"Simulated transcription of {len(wav)} bytes")


def test_a_tei_reranker_answers_v1_rerank_in_its_own_dialect(stack: Stack) -> None:
    body = {"model": RANKER, "query": "capital of France", "top_n": 2,
            "documents": ["Berlin is in Germany", "Paris is the capital of France",
                          {"text": "France has a capital"}]}
    req = urllib.request.Request(stack.base + "/v1/rerank", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {fleet.TENANT_KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        ranked = json.loads(resp.read())
        assert resp.headers["x-synapse-backend"] == f"{NODE}/ranker"
    assert [r["index"] for r in ranked["results"]] == [1, 2]
    assert ranked["results"][0]["document"] == {"text": "Paris is the capital of France"}
    assert ranked["model"] == RANKER and ranked["usage"]["prompt_tokens"] > 0


def _direct(port: int, path: str, body: dict[str, Any], key: str | None) -> int:
    """POST ``body`` straight to an engine's port, around the control plane."""
    status, _, _ = harness.http(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                key=key, timeout=30)
    return status


def test_an_engine_refuses_a_caller_without_the_engine_key_the_control_plane_presents(
        stack: Stack) -> None:
    key = harness.engine_key_at(f"http://127.0.0.1:{stack.ports['llm']}")
    assert key != engine_key.derive(fleet.AGENT_TOKEN)     # this node's own, not the fleet's
    chat = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for presented in (None, fleet.TENANT_KEY, fleet.AGENT_TOKEN):
        assert _direct(stack.ports["llm"], "/v1/chat/completions", chat, presented) == 401
    rerank = {"query": "q", "texts": ["a", "b"]}
    assert _direct(stack.ports["ranker"], "/rerank", rerank, None) == 401
    # the simulator's fault hook too: open, any local process could hang the engine
    assert _direct(stack.ports["llm"], "/sim/faults", {"hang": True}, None) == 401
    assert _direct(stack.ports["llm"], "/sim/faults", {"hang": False}, key) == 200
    assert _direct(stack.ports["llm"], "/v1/chat/completions", chat, key) == 200
    with stack.openai() as c:   # the control plane presents the key
        raw = c.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert raw.headers["x-synapse-backend"] == f"{NODE}/llm" and raw.parse().choices
    assert key not in stack.agent.output()
