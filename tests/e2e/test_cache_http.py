"""End to end through the HTTP API: the response cache with real Redis, Milvus Lite, a real
agent embedding with MiniLM over ``Node.Embed`` and the engine simulator as the backend.

Two control planes share the agent (agents stream to every replica): ``main`` has Redis
and a working Milvus Lite file; ``broken`` has a Milvus "file" that cannot exist. The
destructive tests (embedder down, Redis killed) run last, in that order.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
import yaml

from tests import fleet, harness, node_auth

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
KEY, ADMIN = "sk-cache-e2e-0123456789", "sk-admin-e2e-0123456789"
QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


class Stack:
    def __init__(self, urls: dict[str, str], agent: harness.ManagedProcess,
                 redis: harness.RedisServer, admin: str) -> None:
        self.admin = admin          # host:port of the main control plane's Admin gRPC
        self.urls = urls
        self.agent = agent
        self.redis = redis

    def client(self, which: str = "main") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.urls[which]}/v1", api_key=KEY, max_retries=0,
                             timeout=30)

    def metric(self, name: str, which: str = "main", **labels: str) -> float:
        req = urllib.request.Request(f"{self.urls[which]}/metrics",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+-]+)$" if want \
            else rf"^{re.escape(name)} ([0-9.e+-]+)$"
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def _configs(tmp: pathlib.Path, redis_url: str) -> tuple[dict[str, pathlib.Path],
                                                          dict[str, str], pathlib.Path]:
    sim_port = harness.free_port()
    grpc = {"main": harness.free_port(), "broken": harness.free_port()}
    http = {"main": harness.free_port(), "broken": harness.free_port()}
    blocker = tmp / "not-a-folder"
    blocker.write_text("Milvus Lite cannot create a database under a file")
    l2 = {"main": str(tmp / "l2.db"), "broken": str(blocker / "l2.db")}
    paths = {}
    for name in ("main", "broken"):
        cp = {"replica_id": name, "data_dir": str(tmp / name),
              "http": {"host": "127.0.0.1", "port": http[name]},
              "grpc": {"host": "127.0.0.1", "port": grpc[name]},
              "auth": {"admin_key": ADMIN, "agent_token": node_auth.TOKEN,
                       "tenants": [{"name": "team", "keys": [KEY]}]},
              "models": [{"name": MODEL, "aliases": ["llama"]}],
              "upstreams": [{"name": "sim", "url": f"http://127.0.0.1:{sim_port}",
                             "models": [MODEL]}],
              "registry": {"node_down_after_s": 3, "upstream_probe_interval_s": 0.5},
              # Generous budgets: the machine is shared; behaviour, not speed, is tested.
              "cache": {"milvus_uri": l2[name], "l1_budget_ms": 500,
                        "semantic_budget_ms": 3000},
              "logging": {"level": "warning"}}
        if name == "main":
            cp["redis"] = {"url": redis_url, "timeout_s": 0.5}
        paths[name] = tmp / f"cp-{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cp))
    node_port = harness.free_port()
    agent = {"node_name": "embed-node",
             "control_plane": {"addresses": [f"127.0.0.1:{grpc['main']}",
                                             f"127.0.0.1:{grpc['broken']}"],
                               "report_interval_s": 0.5, "reconnect_min_s": 0.2,
                               "reconnect_max_s": 1, "token": node_auth.TOKEN},
             "grpc": {"host": "127.0.0.1", "port": node_port,
                      "advertise_address": f"127.0.0.1:{node_port}"},
             "metrics": {"host": "127.0.0.1", "port": 0},
             "telemetry": {"source": "fake", "interval_s": 1},
             "embedder": {"kind": "minilm"},
             "supervisor": {"log_dir": str(tmp / "engines")}}
    (tmp / "agent.yaml").write_text(yaml.safe_dump(agent))
    urls = {name: f"http://127.0.0.1:{port}" for name, port in http.items()}
    urls["simulator"] = f"http://127.0.0.1:{sim_port}"
    urls["admin"] = f"127.0.0.1:{grpc['main']}"
    urls["node"] = f"127.0.0.1:{node_port}"
    return paths, urls, tmp / "agent.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cache-e2e")
    redis = harness.RedisServer(tmp)
    cps, urls, agent_cfg = _configs(tmp, redis.url)
    pool = harness.ProcessPool(tmp)
    try:
        port = urls["simulator"].rsplit(":", 1)[1]
        pool.start("simulator", ["synapse", "simulator", "--port", port, "--model", MODEL,
                                 "--time-scale", "1"], ready_url=f"{urls['simulator']}/health")
        for name, cfg in cps.items():
            pool.start(name, ["synapse", "controlplane", "--config", str(cfg)],
                       ready_url=f"{urls[name]}/health", timeout=60)
        agent = pool.start("agent", ["synapse", "agent", "--config", str(agent_cfg)])
        s = Stack(urls, agent, redis, urls["admin"])
        for name in cps:
            harness.wait_until(lambda n=name: s.metric("synapse_agent_streams", n) >= 1, 90,
                               f"the agent streaming to control plane {name}", proc=agent,
                               interval=0.2)
        harness.wait_until(lambda: fleet.node_embeds(urls["node"]), 90, "the agent's MiniLM to load",
                           proc=agent, interval=0.3)
        yield s
    finally:
        pool.stop_all()
        redis.stop()


def ask(client: openai.OpenAI, question: str, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="llama", temperature=0, max_tokens=kw.pop("max_tokens", 12),
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": question}], **kw)
    return raw.headers, raw.parse()


def until_cached(client: openai.OpenAI, question: str, status: str = "hit-exact"):
    """Stores land off the hot path: ask until the answer comes from the cache."""
    result: list = []

    def cached() -> bool:
        result[:] = ask(client, question)
        return result[0]["x-synapse-cache"] == status
    harness.wait_until(cached, 20, f"{question!r} to be served as {status}", interval=0.2)
    return result[0], result[1]


def stored(client: openai.OpenAI, question: str) -> None:
    """Ask ``question`` once, then until its answer comes from the cache."""
    ask(client, question)
    until_cached(client, question)


def test_repeat_is_exact_and_paraphrase_is_semantic(stack: Stack) -> None:
    client = stack.client()
    headers, first = ask(client, QUESTION)
    assert headers["x-synapse-cache"] == "miss" and headers["x-synapse-backend"]
    headers, again = until_cached(client, QUESTION)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert "x-synapse-backend" not in headers
    # L1 is written before L2 (and the first L2 write creates the collection): ask the
    # paraphrase once the semantic entry exists, or it would miss and be stored itself.
    harness.wait_until(lambda: stack.metric("synapse_cache_stores_total", layer="semantic") >= 1,
                       20, "the semantic entry to be written", interval=0.1)
    headers, para = until_cached(client, PARAPHRASE, "hit-semantic")
    assert para.choices[0].message.content == first.choices[0].message.content
    assert float(headers["x-synapse-cache-similarity"]) > 0.9
    assert 0.5 < float(headers["x-synapse-cache-score"]) <= 1.0
    assert stack.metric("synapse_cache_hits_total", layer="semantic") >= 1
    assert stack.metric("synapse_cache_errors_total", layer="semantic") == 0
    client.close()


def _raw_stream(url: str, question: str, max_tokens: int,
                read_all: bool = True) -> tuple[dict[str, str], str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "llama", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    text = resp.read().decode() if read_all else resp.read1(64).decode()
    conn.close()          # without read_all: the client walks away mid-stream
    return headers, text


def _content(sse: str) -> str:
    events = [json.loads(line[6:]) for line in sse.splitlines()
              if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))


def test_streamed_miss_is_stored_and_replayed_as_a_stream(stack: Stack) -> None:
    url = stack.urls["main"]
    headers, first = _raw_stream(url, "Tell me about streaming caches.", 16)
    assert headers["x-synapse-cache"] == "miss"
    replay: list = []

    def replayed() -> bool:
        replay[:] = _raw_stream(url, "Tell me about streaming caches.", 16)
        return replay[0]["x-synapse-cache"] == "hit-exact"
    harness.wait_until(replayed, 20, "the streamed answer to be replayed from the cache")
    headers, text = replay
    assert headers["content-type"].startswith("text/event-stream")
    assert _content(text) == _content(first) and _content(text)
    assert text.rstrip().endswith("data: [DONE]")
    usage = [json.loads(line[6:]) for line in text.splitlines() if '"usage"' in line]
    assert usage and usage[-1]["usage"]["completion_tokens"] > 0


def test_an_aborted_stream_is_not_stored(stack: Stack) -> None:
    question = "Write a long essay about cache invalidation."
    headers, _ = _raw_stream(stack.urls["main"], question, 200, read_all=False)
    assert headers["x-synapse-cache"] == "miss"
    # The whole stream would take ~2.4 s at the simulator's pace; wait past its end.
    time.sleep(4)
    headers, _ = ask(stack.client(), question, max_tokens=200)
    assert headers["x-synapse-cache"] == "miss"


def test_cache_control_and_temperature_bypass(stack: Stack) -> None:
    client = stack.client()
    q = "What colour is the sky on Mars?"
    headers, _ = ask(client, q, extra_headers={"Cache-Control": "no-store"})
    assert headers["x-synapse-cache"] == "miss"
    time.sleep(0.5)
    headers, _ = ask(client, q, extra_headers={"Cache-Control": "no-store"})
    assert headers["x-synapse-cache"] == "miss"                 # nothing was stored
    headers, _ = ask(client, q, extra_headers={"Cache-Control": "no-cache"})
    assert headers["x-synapse-cache"] == "bypass"
    until_cached(client, q)                                     # ... but it was stored
    raw = client.chat.completions.with_raw_response.create(
        model="llama", temperature=1.0, max_tokens=4,
        messages=[{"role": "user", "content": q}])
    assert raw.headers["x-synapse-cache"] == "bypass"
    client.close()


def test_milvus_unavailable_still_serves_and_counts(stack: Stack) -> None:
    client = stack.client("broken")
    q = "Which planet is the largest?"
    headers, reply = ask(client, q)
    assert headers["x-synapse-cache"] == "miss" and reply.choices[0].message.content
    until_cached(client, q)                                     # L1 keeps working
    headers, _ = ask(client, "Which planet is largest?")
    assert headers["x-synapse-cache"] == "miss"
    assert stack.metric("synapse_cache_errors_total", "broken", layer="semantic") >= 1
    client.close()


def test_admin_invalidate_empties_both_layers(stack: Stack) -> None:
    client = stack.client()
    q = "What is the boiling point of water?"
    # One miss, stored in both layers, and no other in flight: a store still on its way
    # when the cache is emptied would land after it (asking until a hit makes several).
    before = {layer: stack.metric("synapse_cache_stores_total", layer=layer)
              for layer in ("exact", "semantic")}
    assert ask(client, q)[0]["x-synapse-cache"] == "miss"
    harness.wait_until(lambda: all(
        stack.metric("synapse_cache_stores_total", layer=layer) > count
        for layer, count in before.items()), 30, "the answer stored in both layers")
    assert ask(client, q)[0]["x-synapse-cache"] == "hit-exact"
    done = subprocess.run(
        [harness.console_script("synapsectl"), "--server", stack.admin, "-o", "json", "cache",
         "invalidate", "--tenant", "team"], env={"SYNAPSE_ADMIN_TOKEN": ADMIN},
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert stack.metric("synapse_cache_stores_total", layer="semantic") >= 1
    headers, _ = ask(client, q)
    assert headers["x-synapse-cache"] == "miss"
    client.close()


def test_embedder_down_still_serves_and_counts(stack: Stack) -> None:
    client = stack.client()
    q = "How do I change my email address?"
    stored(client, q)
    before = stack.metric("synapse_cache_errors_total", layer="embedder")
    stack.agent.stop()
    headers, reply = ask(client, "How can I change my email address?")
    assert headers["x-synapse-cache"] == "miss" and reply.choices[0].message.content
    assert stack.metric("synapse_cache_errors_total", layer="embedder") > before
    headers, _ = ask(client, q)
    assert headers["x-synapse-cache"] == "hit-exact"            # L1 does not need it
    client.close()


def test_redis_killed_still_serves_and_counts(stack: Stack) -> None:
    client = stack.client()
    before = stack.metric("synapse_cache_errors_total", layer="exact")
    stack.redis.kill()
    for i in range(3):
        headers, reply = ask(client, f"Redis is gone, question {i}")
        assert headers["x-synapse-cache"] == "miss" and reply.choices[0].message.content
    assert stack.metric("synapse_cache_errors_total", layer="exact") > before
    client.close()
