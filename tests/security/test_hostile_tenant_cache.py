"""Issue 14, findings 4 and 5, against real processes: the response cache survives a
restart of the control plane, and its answers are whole and shaped like live ones.

The fleet: an engine simulator (vLLM mode, answers at once) as a static upstream, a
TEI-mode simulator embedding (hashed bag of words: a text and its case-changed copy get
the same vector, so a paraphrase is one ``.upper()`` away), one agent serving
``Node.Embed`` with it, and one control plane in embedded-mode cache: in-process L1 and
a Milvus Lite file, both in its ``data_dir``. With the engine tier installed
(``make engines``) the shape is also checked against the real vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from synapse_common import engines
from tests import fleet, harness
from tests.engines import stack
from tests.stream_shape import shape

SYSTEM = "Answer briefly."


@dataclasses.dataclass
class CacheFleet:
    base: str
    sim: str
    cp_config: pathlib.Path
    pool: harness.ProcessPool
    node: str
    cp: harness.ManagedProcess | None = None

    def start_cp(self) -> None:
        self.cp = self.pool.start("controlplane", ["synapse", "controlplane", "--config",
                                                   str(self.cp_config)],
                                  ready_url=f"{self.base}/health", timeout=60)
        harness.wait_until(lambda: metric(self.base, "synapse_agent_streams") >= 1, 60,
                           "the agent streaming to the control plane", interval=0.2)

    def restart_cp(self) -> None:
        assert self.cp is not None
        self.cp.stop()          # SIGTERM: a clean stop, as Ctrl-C on `synapse up`
        self.start_cp()


def metric(base: str, name: str, **labels: str) -> float:
    req = urllib.request.Request(f"{base}/metrics",
                                 headers={"Authorization": f"Bearer {fleet.ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (rf"^{re.escape(name)}\{{{re.escape(want)}\}} ([0-9.e+-]+)$" if want
               else rf"^{re.escape(name)} ([0-9.e+-]+)$")
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def cache_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheFleet]:
    tmp = tmp_path_factory.mktemp("cache-fleet")
    pool = harness.ProcessPool(tmp)
    sim, tei, http, grpc = (harness.free_port() for _ in range(4))
    cp = fleet.controlplane_config(
        "cache", http, grpc, tmp / "data",
        upstreams=[{"name": "sim", "url": f"http://127.0.0.1:{sim}", "models": [fleet.MODEL]}],
        cache={"semantic_enabled": True, "embed_model": fleet.EMBED, "l1_budget_ms": 1000,
               "semantic_budget_ms": 5000},
        logging={"level": "warning"})
    agent = fleet.agent_config("embed-node", [f"127.0.0.1:{grpc}"], {}, tmp / "engines",
                               tei_url=f"http://127.0.0.1:{tei}")
    node = agent["grpc"]["advertise_address"]
    fl = CacheFleet(f"http://127.0.0.1:{http}", f"http://127.0.0.1:{sim}",
                    fleet.write_yaml(tmp / "cp.yaml", cp), pool, node)
    try:
        pool.start("simulator", fleet.simulator_argv(sim, time_scale=0),
                   ready_url=f"{fl.sim}/health")
        pool.start("tei", fleet.tei_argv(tei), ready_url=f"http://127.0.0.1:{tei}/health")
        pool.start("agent", ["synapse", "agent", "--config",
                             str(fleet.write_yaml(tmp / "agent.yaml", agent))])
        fl.start_cp()
        harness.wait_until(lambda: fleet.node_embeds(node), 60, "the agent's embedder",
                           interval=0.2)
        yield fl
    finally:
        pool.stop_all()


def chat(base: str, question: str, *, stream: bool = False, usage: bool = False,
         model: str = "llama", key: str = fleet.TENANT_KEY, timeout: float = 60,
         **extra: Any) -> fleet.Reply:
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": 8,
                            "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": question}], **extra}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    reply = fleet.request(base, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                          key=key, timeout=timeout)
    assert reply.status == 200, (reply.status, reply.body[:300])
    return reply


def events(reply: fleet.Reply) -> list[dict[str, Any]]:
    data = [line[6:] for line in reply.body.decode().splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def text(chunks: list[dict[str, Any]]) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for chunk in chunks
                   for c in chunk.get("choices") or ())


def without_nulls(value: Any) -> Any:
    """``value`` without its null-valued keys, at every depth."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


def until_status(ask: Any, status: str, what: str, timeout: float = 30,
                 interval: float = 0.2) -> fleet.Reply:
    """Stores land off the hot path: ask until the answer has ``status``."""
    found: list[fleet.Reply] = []

    def answered() -> bool:
        found[:] = [ask()]
        return found[0].headers.get("x-synapse-cache") == status
    harness.wait_until(answered, timeout, what, interval=interval)
    return found[0]


# -- finding 4: the semantic cache survives a restart ------------------------------------

def test_a_restart_on_the_same_data_keeps_semantic_entries_servable(
        cache_fleet: CacheFleet) -> None:
    fl = cache_fleet
    question = "How do I reset my password on the new portal?"
    first = chat(fl.base, question)
    assert first.headers["x-synapse-cache"] == "miss"
    harness.wait_until(lambda: metric(fl.base, "synapse_cache_stores_total",
                                      layer="semantic") >= 1, 30, "the semantic entry")
    para = until_status(lambda: chat(fl.base, question.upper()), "hit-semantic",
                        "a semantic hit before the restart")
    assert para.json()["choices"] == first.json()["choices"]
    assert para.json()["id"] != first.json()["id"]      # a hit is a new answer

    fl.restart_cp()
    # Every miss stores its own answer: ask a paraphrase never asked before each time, and
    # accept only the entry written before the restart (its answer: the simulator draws
    # its text from the prompt, so a variant's own differs; ids are new on every hit).
    variants = iter([question[:i].upper() + question[i:] for i in range(2, len(question))]
                    + [question[:i].lower() + question[i:] for i in range(1, len(question))])
    found: list[fleet.Reply] = []

    def the_first_entry() -> bool:
        found[:] = [chat(fl.base, next(variants))]
        return (found[0].headers.get("x-synapse-cache") == "hit-semantic"
                and found[0].json()["choices"] == first.json()["choices"])
    harness.wait_until(the_first_entry, 40, "a semantic hit on the first entry after the "
                       "restart", interval=0.5)


# -- finding 5: whole answers, live-shaped streams ---------------------------------------

def test_cached_streams_have_the_live_shape_and_usage_only_when_asked(
        cache_fleet: CacheFleet) -> None:
    fl = cache_fleet
    question = "Describe the colour of the sea at dawn."
    live = {usage: events(chat(fl.sim, question, stream=True, usage=usage,
                               model=fleet.MODEL, key=""))
            for usage in (False, True)}
    assert shape(live[False]) != shape(live[True])     # the usage chunk, only when asked
    first = chat(fl.base, question, stream=True)
    assert first.headers["x-synapse-cache"] == "miss"
    assert shape(events(first)) == shape(live[False])
    replay = until_status(lambda: chat(fl.base, question, stream=True), "hit-exact",
                          "the streamed answer to be replayed")
    assert shape(events(replay)) == shape(live[False]), "no usage chunk that was not asked"
    assert text(events(replay)) == text(events(first))
    # The control plane asks the engine for usage even when the client did not (token
    # accounting) and keeps it with the stream: the stored stream answers a whole request,
    # with its usage and the same text.
    whole = chat(fl.base, question)
    assert whole.headers["x-synapse-cache"] == "hit-exact" and whole.json()["usage"]
    assert whole.json()["choices"][0]["message"]["content"] == text(events(first))
    counted = until_status(lambda: chat(fl.base, question, stream=True, usage=True),
                           "hit-exact", "the non-streamed answer to be replayed")
    assert shape(events(counted)) == shape(live[True])
    assert events(counted)[-1]["usage"] == whole.json()["usage"]
    again = chat(fl.base, question)
    assert again.headers["x-synapse-cache"] == "hit-exact"
    fresh = ("id", "created")           # every answer's own, a hit's too
    assert {k: v for k, v in again.json().items() if k not in fresh} == \
        {k: v for k, v in whole.json().items() if k not in fresh}
    assert again.json()["id"] != whole.json()["id"]


# -- finding 5 against the real vLLM (the engine tier) -----------------------------------

@pytest.fixture(scope="module")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(control plane URL, vLLM URL, model): vLLM supervised by an agent, cache on."""
    tier, command, model_dir = stack.require_vllm("this test compares with a real vLLM")
    tmp = tmp_path_factory.mktemp("cache-vllm")
    pool = harness.ProcessPool(tmp)
    http, grpc, port = (harness.free_port() for _ in range(3))
    cp = fleet.controlplane_config(
        "cache-vllm", http, grpc, tmp / "data",
        http={"upstream_first_byte_timeout_s": 120.0, "upstream_idle_timeout_s": 60.0},
        models=[{"name": tier.model_name, "aliases": ["smollm2"]}],
        cache={"semantic_enabled": False}, logging={"level": "warning"})
    agent = fleet.agent_config("vllm-node", [f"127.0.0.1:{grpc}"], {}, tmp / "engines")
    agent["supervisor"].update({"vllm_command": command, "vllm_device": "cpu",
                                "vllm_cpu_kvcache_gib": 1, "startup_deadline_s": 300.0,
                                "stop_grace_s": 15.0, "probe_timeout_s": 5.0,
                                "unhealthy_after": 3})
    agent["backends"] = [{"name": "vllm", "engine": "vllm", "model": str(model_dir),
                          "served_model_names": [tier.model_name], "port": port,
                          "max_model_len": 4096,
                          "extra_args": ["--dtype", engines.cpu_dtype(), "--enforce-eager"]}]
    base = f"http://127.0.0.1:{http}"
    try:
        pool.start("controlplane", ["synapse", "controlplane", "--config",
                                    str(fleet.write_yaml(tmp / "cp.yaml", cp))],
                   ready_url=f"{base}/health")
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(tmp / "agent.yaml", agent))])
        harness.wait_until(lambda: fleet.backends_ready(base) == 1, 300,
                           "the real vLLM behind the control plane", interval=0.5, proc=proc)
        yield base, f"http://127.0.0.1:{port}", tier.model_name
    finally:
        pool.stop_all()


def test_answers_cached_from_vllm_keep_every_field_and_vllms_stream_shape(
        vllm_fleet: tuple[str, str, str]) -> None:
    base, vllm, model = vllm_fleet
    question = "Name a colour."
    fields = {"logprobs": True, "top_logprobs": 2, "model": model}
    key = harness.engine_key_at(vllm)
    live = events(chat(vllm, question, stream=True, usage=True, key=key, **fields))
    first = chat(base, question, stream=True, usage=True, **fields)
    assert first.headers["x-synapse-cache"] == "miss"
    replay = until_status(lambda: chat(base, question, stream=True, usage=True, **fields),
                          "hit-exact", "vLLM's stream replayed")
    assert shape(events(replay)) == shape(live)
    assert text(events(replay)) == text(events(first))
    tokens = [t["token"] for chunk in events(first) for c in chunk["choices"]
              for t in (c.get("logprobs") or {}).get("content") or ()]
    assert tokens and "".join(tokens).startswith(text(events(first)))   # + a stop token
    whole = chat(base, question, **fields)                   # from the stored stream
    assert whole.headers["x-synapse-cache"] == "hit-exact"
    choice = whole.json()["choices"][0]
    assert [t["token"] for t in choice["logprobs"]["content"]] == tokens
    assert choice["message"]["content"] == text(events(first))
    # vLLM's whole usage carries the null fields its usage chunk leaves out.
    assert without_nulls(whole.json()["usage"]) == events(first)[-1]["usage"]
    assert choice["finish_reason"] == next(c["finish_reason"] for chunk in events(first)
                                           for c in chunk["choices"] if c["finish_reason"])
    # An answer stored from a non-streaming request replays in the form vLLM streams in
    # (the cache saw one of its streams above).
    other = "Name a fruit."
    live_other = events(chat(vllm, other, stream=True, key=key, **fields))
    stored = chat(base, other, **fields)
    assert stored.headers["x-synapse-cache"] == "miss"
    replayed = until_status(lambda: chat(base, other, stream=True, **fields), "hit-exact",
                            "vLLM's non-streamed answer replayed")
    assert shape(events(replayed)) == shape(live_other)
    assert text(events(replayed)) == stored.json()["choices"][0]["message"]["content"]
