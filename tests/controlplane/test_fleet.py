"""End to end: ``synapse controlplane`` in front of a real ``synapse agent`` supervising
real simulators (three generation engines and one TEI-mode embedding engine), driven by
the official openai client, sync and async.

One fleet is started for the module (starting processes is the slow part); the test that
kills an engine runs last, and the agent restarts the engine anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pathlib
import signal
import urllib.request
from collections.abc import Iterator

import openai
import psutil
import pytest
import yaml

from tests import harness, node_auth

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
EMBED = "BAAI/bge-small-en-v1.5"
NODE_EMBED = "sentence-transformers/all-MiniLM-L6-v2"  # served by the agent's Node.Embed
KEY, LIMITED, ADMIN = "sk-fleet-0123456789", "sk-limited-0123456789", "sk-admin-0123456789"
GEN = ["sim-a", "sim-b", "sim-c"]
LONG_CONTEXT = ("Synapse routes each request to the engine that already holds the longest "
                "part of its prompt in the KV cache, so shared context is computed once. ") * 60


class Fleet:
    def __init__(self, url: str, agent: harness.ManagedProcess, ports: dict[str, int]) -> None:
        self.url = url
        self.agent = agent
        self.ports = ports

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                             timeout=30)

    def stats(self) -> dict[str, object]:
        req = urllib.request.Request(f"{self.url}/api/v1/stats",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def engine_pid(self, name: str) -> int:
        port = str(self.ports[name])
        for child in psutil.Process(self.agent.pid).children(recursive=True):
            cmd = child.cmdline()
            if "simulator" in " ".join(cmd) and port in cmd:
                return int(child.pid)
        raise AssertionError(f"no engine process for {name} on port {port}")


def _configs(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str, dict[str, int]]:
    http, grpc = harness.free_port(), harness.free_port()
    ports = {name: harness.free_port() for name in [*GEN, "emb"]}
    # The response cache has its own end-to-end tests; here every answer must come from
    # an engine so that routing is what is observed.
    cp = {"replica_id": "fleet", "data_dir": str(tmp / "cp-data"), "cache": {"enabled": False},
          "http": {"host": "127.0.0.1", "port": http},
          "grpc": {"host": "127.0.0.1", "port": grpc},
          "auth": {"admin_key": ADMIN, "agent_token": node_auth.TOKEN, "tenants": [
              {"name": "team", "keys": [KEY]},
              {"name": "limited", "keys": [LIMITED], "requests_per_second": 0.01, "burst": 1}]},
          "models": [{"name": MODEL, "aliases": ["llama"]}],
          "registry": {"node_down_after_s": 5}, "logging": {"level": "warning"}}
    sim = str(harness.VENV_BIN / "synapse")
    backends = [{"name": n, "engine": "simulator", "model": MODEL, "served_model_names": [MODEL],
                 "port": ports[n], "extra_args": ["--time-scale", "0.02"]} for n in GEN]
    backends.append({"name": "emb", "engine": "simulator", "model": EMBED, "task": "embed",
                     "served_model_names": [EMBED], "port": ports["emb"]})
    agent = {"node_name": "node-1",
             "control_plane": {"addresses": [f"127.0.0.1:{grpc}"], "report_interval_s": 0.5,
                               "reconnect_min_s": 0.2, "reconnect_max_s": 1,
                               "token": node_auth.TOKEN},
             "grpc": {"host": "127.0.0.1", "port": 0}, "metrics": {"host": "127.0.0.1", "port": 0},
             "telemetry": {"source": "fake", "interval_s": 1},
             "supervisor": {"log_dir": str(tmp / "engines"), "scrape_interval_s": 0.5,
                            "probe_interval_s": 0.5, "backoff_initial_s": 0.2,
                            "simulator_command": [sim, "simulator"]},
             "embedder": {"kind": "tei", "model": NODE_EMBED,
                          "tei_url": f"http://127.0.0.1:{ports['emb']}"},
             "backends": backends}
    (tmp / "cp.yaml").write_text(yaml.safe_dump(cp))
    (tmp / "agent.yaml").write_text(yaml.safe_dump(agent))
    return tmp / "cp.yaml", tmp / "agent.yaml", f"http://127.0.0.1:{http}", ports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    cp_cfg, agent_cfg, url, ports = _configs(tmp)
    pool = harness.ProcessPool(tmp)
    try:
        pool.start("controlplane", ["synapse", "controlplane", "--config", str(cp_cfg)],
                   ready_url=f"{url}/health", timeout=60)
        agent = pool.start("agent", ["synapse", "agent", "--config", str(agent_cfg)])
        f = Fleet(url, agent, ports)
        harness.wait_until(lambda: f.stats()["backends_ready"] == 4, 90,
                           "four engines ready behind the control plane", interval=0.2,
                           proc=agent)
        yield f
    finally:
        pool.stop_all()


def test_openai_sync_client_chat_completions_and_streams(fleet: Fleet) -> None:
    client = fleet.client()
    raw = client.chat.completions.with_raw_response.create(
        model="llama", max_tokens=8, messages=[{"role": "user", "content": "Hello!"}])
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage is not None
    assert raw.headers["x-synapse-backend"].removeprefix("node-1/") in GEN
    assert raw.headers["x-synapse-cache"] in ("miss", "bypass")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}])
        if c.choices)
    assert text
    done = client.completions.create(model="llama", prompt="Once upon a time", max_tokens=5)
    assert done.choices[0].text
    client.close()


def test_openai_async_client_and_embeddings(fleet: Fleet) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="llama", max_tokens=4, messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(8)))
        assert all(r.choices[0].message.content for r in replies)
        stream = await client.chat.completions.create(
            model="llama", max_tokens=4, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "stream me"}])
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        emb = await client.embeddings.create(model=EMBED, input=["one text", "another"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) > 10
        # A model no HTTP engine serves but the agent's embedder does: through Node.Embed.
        raw = await client.embeddings.with_raw_response.create(model=NODE_EMBED,
                                                                 input=["via the agent"])
        assert raw.headers["x-synapse-backend"].startswith("node-embed/")
        vec = raw.parse().data[0].embedding
        assert len(vec) == len(emb.data[0].embedding)
        await client.close()

    asyncio.run(run())


def test_long_shared_prefix_goes_back_to_the_backend_that_cached_it(fleet: Fleet) -> None:
    client = fleet.client()
    system = {"role": "system", "content": LONG_CONTEXT}
    first = client.chat.completions.with_raw_response.create(
        model="llama", max_tokens=4, messages=[system, {"role": "user", "content": "Why?"}])
    holder = first.headers["x-synapse-backend"]
    for question in ("How?", "When does it help?", "What does it cost?"):
        again = client.chat.completions.with_raw_response.create(
            model="llama", max_tokens=4, messages=[system, {"role": "user", "content": question}])
        assert again.headers["x-synapse-backend"] == holder
        assert again.headers["x-synapse-route"].startswith("prefix-hit")
        # The engine agrees: most of the prompt came from its prefix cache.
        usage = again.parse().usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > usage.prompt_tokens // 2
    client.close()


def test_a_tenant_over_its_limit_gets_429_and_others_do_not(fleet: Fleet) -> None:
    limited, other = fleet.client(LIMITED), fleet.client()
    msgs = [{"role": "user", "content": "hi"}]
    limited.chat.completions.create(model="llama", max_tokens=2, messages=msgs)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="llama", max_tokens=2, messages=msgs)
    for _ in range(3):
        other.chat.completions.create(model="llama", max_tokens=2, messages=msgs)
    limited.close()
    other.close()


def test_an_engine_killed_mid_run_does_not_fail_requests(fleet: Fleet) -> None:
    client = fleet.client()
    victim = fleet.engine_pid("sim-b")

    def one(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="llama", max_tokens=6, messages=[{"role": "user", "content": f"load {i}"}])
        assert raw.parse().choices[0].message.content
        return str(raw.headers["x-synapse-backend"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(60)]
        futures[10].result()
        os.kill(victim, signal.SIGKILL)
        served = [f.result() for f in futures]  # every request succeeded
    assert {"node-1/sim-a", "node-1/sim-c"} <= set(served)
    after = [one(100 + i) for i in range(10)]
    assert all(b != "node-1/sim-b" or psutil.pid_exists(fleet.engine_pid("sim-b"))
               for b in after)
    client.close()
