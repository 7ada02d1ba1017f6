"""Interpreting an engine's Prometheus ``/metrics`` text (vLLM V1 names, V0 fallbacks).

Names, newest first (vLLM ``v1/metrics/loggers.py``; V0 ``engine/metrics.py``):

* running / waiting: ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` (same
  in V0 and V1);
* KV usage 0..1: ``vllm:kv_cache_usage_perc`` (V1 ≥ 0.10), else ``vllm:gpu_cache_usage_perc``
  (V0 and early V1);
* prefix cache counters (tokens): ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``
  (V1 ≥ 0.10), else ``vllm:gpu_prefix_cache_queries`` / ``vllm:gpu_prefix_cache_hits``
  (early V1; deprecated in 0.10, which exports both). Each name is resolved on its own, so
  an exposition that mixes new and old names (vLLM 0.10.0) still yields both counters;
* V0's ``vllm:gpu_prefix_cache_hit_rate`` gauge is used only when no counters exist;
* KV capacity: ``vllm:cache_config_info`` labels ``num_gpu_blocks`` * ``block_size``
  (also on vLLM's CPU backend, whose block is 128 tokens, not 16: always read, never
  assumed; ``num_cpu_blocks`` is swap space on a GPU, never capacity).

Data-parallel engines expose one series per ``engine`` label: counts and counters are
summed, usage is averaged. ``*_created`` series are ignored. The parser is
prometheus_client's; a malformed exposition raises :class:`MetricsParseError`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from agent.core import types

RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
PREFIX_HIT_RATE_V0 = ("vllm:gpu_prefix_cache_hit_rate",)
CACHE_CONFIG = "vllm:cache_config_info"


class MetricsParseError(ValueError):
    """The text is not a Prometheus exposition."""


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name].append((dict(sample.labels), float(sample.value)))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsParseError(f"cannot parse metrics text: {exc}") from None
    return out


def _values(samples: dict[str, list[tuple[dict[str, str], float]]], names: Iterable[str],
            counter: bool = False) -> list[float] | None:
    for name in names:
        candidates = (name + "_total", name) if counter else (name,)
        for candidate in candidates:
            found = samples.get(candidate)
            if found:
                return [value for _, value in found]
    return None


def _sum(values: list[float] | None) -> float | None:
    return None if values is None else sum(values)


def _mean(values: list[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


def _cache_config(samples: dict[str, list[tuple[dict[str, str], float]]]
                  ) -> tuple[int | None, int | None]:
    """(block_size, total num_gpu_blocks) summed over data-parallel engines."""
    block_size: int | None = None
    blocks: int | None = None
    for labels, _ in samples.get(CACHE_CONFIG, []):
        try:
            size = int(float(labels["block_size"]))
            count = int(float(labels["num_gpu_blocks"]))
        except (KeyError, ValueError):
            continue  # "None" before the engine profiled its memory
        block_size = size
        blocks = count + (blocks or 0)
    return block_size, blocks


def parse(text: str) -> types.EngineSnapshot:
    samples = _samples(text)
    block_size, blocks = _cache_config(samples)
    return types.EngineSnapshot(
        running=_sum(_values(samples, RUNNING)),
        waiting=_sum(_values(samples, WAITING)),
        kv_usage=_mean(_values(samples, KV_USAGE)),
        block_size=block_size,
        num_gpu_blocks=blocks,
        prefix_queries=_sum(_values(samples, PREFIX_QUERIES, counter=True)),
        prefix_hits=_sum(_values(samples, PREFIX_HITS, counter=True)),
        prefix_hit_rate_gauge=_mean(_values(samples, PREFIX_HIT_RATE_V0)),
    )


def prefix_hit_rate(previous: types.EngineSnapshot | None,
                    current: types.EngineSnapshot) -> float | None:
    """Hits / queries between two scrapes; ``None`` when there is nothing to say.

    Without a previous scrape, or after a counter reset (the engine restarted), the
    counters themselves are the delta since the engine started from zero. No new
    queries give ``None`` (the caller keeps its last rate); V0's ratio gauge is the
    fallback when the counters are missing.
    """
    if current.prefix_queries is None or current.prefix_hits is None:
        return current.prefix_hit_rate_gauge
    queries, hits = current.prefix_queries, current.prefix_hits
    if previous is not None and previous.prefix_queries is not None \
            and previous.prefix_hits is not None and previous.prefix_queries <= queries:
        queries -= previous.prefix_queries
        hits -= previous.prefix_hits
    if queries <= 0 or hits < 0:
        return None
    return min(1.0, max(0.0, hits / queries))
