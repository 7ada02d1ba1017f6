"""Kinds of static upstream: what each server needs from Synapse, one table.

A static upstream (``upstreams[]`` in the config) may name its ``kind``; the kind decides

* **the health probe**: the path, which statuses count as healthy, whether the key goes
  with it, and how often at most it is asked. Ollama has no ``/health`` (its
  ``/api/version`` answers once the server is up); a hosted OpenAI-compatible API has none
  either and is asked ``GET /v1/models`` with its key — which proves the key too — no
  more often than ``probe_interval_s`` (a minute by default: probes of a paid API are
  requests). A hosted API's 429 is healthy: the API and the key work, the probe was
  merely rate-limited.
* **the metrics**: which ``/metrics`` names carry the queue, the running requests and the
  KV usage (vLLM, SGLang, TGI, llama.cpp); Ollama and hosted APIs export none, so the
  router knows only its own ledger of them.
* **the key**: every kind takes it as ``Authorization: Bearer <key>`` on its OpenAI paths
  (vLLM, SGLang, TGI and llama-server ``--api-key``; OpenAI-compatible APIs). Ollama
  ignores it, but a proxy in front of an Ollama usually wants exactly that. The probe
  carries it only where the probed path needs it (engines' health paths are public); the
  metrics request always does (llama-server ``--api-key`` guards ``/metrics``).

A kind-less upstream keeps the behaviour it always had: its ``health_path`` (``/health``)
with the key, no metrics.

Base URLs: ``http://host:8000`` and ``http://host:8000/v1`` name the same server
(:func:`base_url`, used for agent backends as well): the OpenAI paths are appended as
``/v1/...`` to the base.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

KindName = Literal["vllm", "sglang", "tgi", "llamacpp", "ollama", "openai"]
HOSTED_PROBE_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class MetricNames:
    """Prometheus names (first present wins) for what the router reads of an engine."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()           # 0..1
    cache_config: str = ""                   # vLLM's info metric: block_size, num_gpu_blocks


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    name: str
    health_path: str
    probe_with_key: bool = False
    healthy_statuses: frozenset[int] = frozenset()     # besides 2xx
    metrics: MetricNames | None = None
    min_probe_interval_s: float = 0.0                  # probes at most this often


VLLM_METRICS = MetricNames(
    running=("vllm:num_requests_running",), waiting=("vllm:num_requests_waiting",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    cache_config="vllm:cache_config_info")

KINDS: dict[str, Kind] = {
    "vllm": Kind("vllm", "/health", metrics=VLLM_METRICS),
    "sglang": Kind("sglang", "/health", metrics=MetricNames(
        running=("sglang:num_running_reqs",), waiting=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",))),
    "tgi": Kind("tgi", "/health", metrics=MetricNames(
        running=("tgi_batch_current_size",), waiting=("tgi_queue_size",))),
    "llamacpp": Kind("llamacpp", "/health", metrics=MetricNames(
        running=("llamacpp:requests_processing",), waiting=("llamacpp:requests_deferred",),
        kv_usage=("llamacpp:kv_cache_usage_ratio",))),
    "ollama": Kind("ollama", "/api/version"),
    "openai": Kind("openai", "/v1/models", probe_with_key=True,
                   healthy_statuses=frozenset({429}),
                   min_probe_interval_s=HOSTED_PROBE_INTERVAL_S),
}


def get(name: str | None) -> Kind | None:
    """The kind called ``name``; None for a kind-less upstream."""
    return KINDS[name] if name else None


def base_url(url: str) -> str:
    """The server's base URL: no trailing slash and no trailing ``/v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    """How a key travels to an upstream (the same for every kind, see the docstring)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def healthy(kind: Kind | None, status: int) -> bool:
    return 200 <= status < 300 or (kind is not None and status in kind.healthy_statuses)
