"""The official openai client → a real control plane → a real vLLM supervised by a real
agent (the engine tier's SmolLM2-135M on the CPU).

The tests run in file order on one shared stack; the last one stops the agent. Generated
text is only checked against this engine's own greedy answer to a well-known question,
never compared across engines.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import psutil
import pytest

from tests import fleet, harness
from tests.engines.stack import START_S, RealStack

pytestmark = pytest.mark.timeout(900)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def _long_context() -> str:
    """~1,500 tokens of text that no other test sends."""
    facts = [f"Record {i}: warehouse {i % 7} holds {i * 13 % 97} crates of "
             f"{['copper wire', 'oak planks', 'glass panes', 'steel bolts'][i % 4]}."
             for i in range(100)]
    return "You answer questions about this inventory.\n" + "\n".join(facts)


def test_chat_answers_from_the_real_model(real_stack: RealStack) -> None:
    raw = real_stack.client().chat.completions.with_raw_response.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
    reply = raw.parse()
    assert raw.headers["x-synapse-backend"] == real_stack.backend_key
    assert (reply.system_fingerprint or "").startswith("vllm-")  # vLLM itself answered
    assert reply.model == real_stack.model
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0


def test_stream_reports_usage_in_its_last_chunk(real_stack: RealStack) -> None:
    chunks = list(real_stack.client().chat.completions.create(
        model=real_stack.model, messages=CAPITAL, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0


def test_completions(real_stack: RealStack) -> None:
    reply = real_stack.client().completions.create(
        model=real_stack.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_models_list_the_engines_own_context_length(real_stack: RealStack) -> None:
    """GET /v1/models carries max_model_len as the engine itself lists it (the agent
    reads it from the engine's /v1/models when it becomes ready)."""
    status, _, body = harness.http(real_stack.engine_url + "/v1/models", None,
                                   real_stack.engine_key, timeout=60)
    assert status == 200
    (own,) = [m for m in json.loads(body)["data"] if m["id"] == real_stack.model]
    listed = {m.id: m for m in real_stack.client().models.list().data}
    assert own["max_model_len"] == 4096                      # as the stack deployed it
    assert listed[real_stack.model].max_model_len == own["max_model_len"]  # type: ignore[attr-defined]


def test_a_prompt_longer_than_the_engines_context_is_refused_before_it(
        real_stack: RealStack) -> None:
    """The context length the agent read from the engine is what the control plane
    refuses a certainly-too-long prompt by (token ids count one each): a 400
    ``context_length_exceeded`` naming ``prompt``, in Synapse's words, not vLLM's; one
    token under the context is the engine's to answer."""
    url = real_stack.base + "/v1/completions"
    over = json.dumps({"model": real_stack.model, "prompt": [42] * 4097,
                       "max_tokens": 1}).encode()
    status, _, body = harness.http(url, over, fleet.TENANT_KEY, timeout=60)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded", body[:300]
    assert error["param"] == "prompt" and "4096" in error["message"]
    under = json.dumps({"model": real_stack.model, "prompt": [42] * 8,
                        "max_tokens": 1}).encode()
    status, _, body = harness.http(url, under, fleet.TENANT_KEY, timeout=120)
    assert status == 200, body[:300]


def test_vllm_refuses_a_caller_without_the_engine_key(real_stack: RealStack) -> None:
    """The agent started vLLM with the engine key (VLLM_API_KEY): a call straight to its
    port without it, or with a tenant's key, is 401, while the control plane, which
    presents the key, is served (the tests above); not on /v1 alone (vLLM's own check)
    but on every path save /health (the agent's guard middleware). The key shows in
    neither the engine's command line, its log nor the agent's."""
    url = real_stack.engine_url + "/v1/chat/completions"
    body = json.dumps({"model": real_stack.model, "messages": CAPITAL,
                       "max_tokens": 2}).encode()
    for key in (None, fleet.TENANT_KEY, fleet.AGENT_TOKEN):
        status, _, _ = harness.http(url, body, key, timeout=60)
        assert status == 401, key
    status, _, _ = harness.http(url, body, real_stack.engine_key, timeout=120)
    assert status == 200
    assert harness.http(real_stack.engine_url + "/health")[0] == 200   # the agent's probe
    # vLLM's own key guards /v1 only; the agent's guard middleware the rest: /invocations
    # serves the same chat, /tokenize reads the model's tokenizer, /metrics the engine's load.
    for path, data in (("/invocations", body),
                       ("/tokenize", json.dumps({"model": real_stack.model,
                                                 "prompt": "hello"}).encode()),
                       ("/metrics", None)):
        for key in (None, fleet.TENANT_KEY):
            status, _, _ = harness.http(real_stack.engine_url + path, data, key, timeout=60)
            assert status == 401, (path, key)
        status, _, _ = harness.http(real_stack.engine_url + path, data,
                                    real_stack.engine_key, timeout=120)
        assert status == 200, path
    # vLLM mounts Prometheus' ASGI app on /metrics, which answers any method: an OPTIONS
    # that is no CORS preflight wants the key too (the guard let every OPTIONS through).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(real_stack.engine_url + "/metrics",
                                                      method="OPTIONS"), timeout=60)
    assert refused.value.code == 401
    engine = psutil.Process(int(real_stack.engine()["pid"]))
    assert real_stack.engine_key not in " ".join(engine.cmdline())
    assert engine.environ()["VLLM_API_KEY"] == real_stack.engine_key
    log_text = (real_stack.workdir / "engine-logs" / "vllm.log").read_text(errors="replace")
    assert real_stack.engine_key not in log_text
    assert real_stack.engine_key not in real_stack.agent.output()
    assert real_stack.engine_key not in json.dumps(real_stack.engine())


def test_the_engines_own_metrics_reach_describe_node(real_stack: RealStack) -> None:
    def scraped() -> bool:
        b = real_stack.engine()
        return bool(b.get("metrics_ok")) and int(b.get("kv_capacity_tokens", 0)) > 0
    harness.wait_until(scraped, 30, "a scrape of vLLM's /metrics in the node's report",
                       interval=0.5)
    backend = real_stack.engine()
    assert backend["engine"] == "ENGINE_KIND_VLLM"
    assert backend["kv_block_size"] == 128  # vLLM's CPU backend, read from cache_config_info
    assert int(backend["kv_capacity_tokens"]) % 128 == 0
    table = real_stack.ctl("describe", "node", "engine-node")
    assert table.returncode == 0 and "vllm" in table.stdout and "ready" in table.stdout


def test_a_long_shared_prefix_is_cached_by_the_engine_the_header_names(
        real_stack: RealStack) -> None:
    client = real_stack.client()
    context = _long_context()
    served = []
    for question in ("Which warehouse holds record 12?", "How many crates in record 40?"):
        raw = client.chat.completions.with_raw_response.create(
            model=real_stack.model, temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": context},
                      {"role": "user", "content": question}])
        served.append((raw.headers["x-synapse-backend"], raw.parse().usage))
    (first_backend, first), (second_backend, second) = served
    assert first is not None and second is not None and first.prompt_tokens > 1000
    assert first_backend == second_backend == real_stack.backend_key
    details = second.prompt_tokens_details
    assert details is not None and (details.cached_tokens or 0) > 0


def test_another_tenant_finds_nothing_of_a_tenants_prefix_in_the_engines_cache(
        real_stack: RealStack) -> None:
    # vLLM's prefix cache is partitioned by the cache_salt Synapse sets per tenant: the
    # same long prompt from another tenant is prefilled from scratch (its first token
    # tells it nothing of what the first tenant sent), the first tenant's repeat is not.
    context = _long_context().replace("inventory", "ledger of the north site")

    def cached(key: str, question: str) -> int:
        reply = real_stack.client(key).chat.completions.create(
            model=real_stack.model, temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": context},
                      {"role": "user", "content": question}])
        assert reply.usage is not None and reply.usage.prompt_tokens > 1000
        details = reply.usage.prompt_tokens_details
        return (details.cached_tokens or 0) if details is not None else 0

    assert cached(fleet.TENANT_KEY, "Which warehouse holds record 7?") == 0
    assert cached(fleet.OTHER_KEY, "Which warehouse holds record 7?") == 0
    assert cached(fleet.TENANT_KEY, "How many crates in record 9?") > 0


def test_a_killed_vllm_is_restarted_and_requests_recover(real_stack: RealStack) -> None:
    before = real_stack.engine()
    os.kill(int(before["pid"]), signal.SIGKILL)

    def back() -> bool:
        b = real_stack.engine()
        return (int(b.get("restarts", 0)) >= 1 and b["phase"] == "BACKEND_PHASE_READY"
                and int(b.get("pid", 0)) not in (0, int(before["pid"])))
    harness.wait_until(back, START_S, "the agent to restart vLLM", interval=1.0,
                       proc=real_stack.agent)
    reply = real_stack.client().chat.completions.create(
        model=real_stack.model, messages=CAPITAL, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content


def test_sigterm_drains_the_agent_and_stops_vllm(real_stack: RealStack) -> None:
    pid = int(real_stack.engine()["pid"])
    group = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    real_stack.agent.signal(signal.SIGTERM)
    assert real_stack.agent.wait(timeout=60) == 0
    gone = [p for p in group if not psutil.pid_exists(p) or
            psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
    assert gone == group, real_stack.agent.output_tail()
