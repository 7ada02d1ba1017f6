"""A static upstream's ``/metrics`` read with its kind's names (:mod:`upstream_kinds`).

What the router uses of an engine it has no agent for: requests waiting and running,
KV usage, and for vLLM the KV capacity and block size (``vllm:cache_config_info``, as
the agent reads it). Series of one name are summed (counts) or averaged (usage) over
their labels — data-parallel engines and SGLang's ``tp_rank`` label give several. A
name the exposition lacks counts as 0; text that is no exposition gives a load with
``ok`` False, which the registry shows as ``metrics_ok`` (routing goes on).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controlplane.core import types, upstream_kinds

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(text: str) -> Samples | None:
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError):
        return None
    return out


def _first(samples: Samples, names: tuple[str, ...]) -> list[float]:
    for name in names:
        found = samples.get(name)
        if found:
            return [v for _, v in found]
    return []


def _capacity(samples: Samples, name: str) -> tuple[int, int]:
    """(KV capacity in tokens, block size) from vLLM's cache_config_info; (0, 0) unknown."""
    tokens = size = 0
    for labels, _ in samples.get(name, []) if name else []:
        try:
            block, blocks = int(float(labels["block_size"])), int(float(labels["num_gpu_blocks"]))
        except (KeyError, ValueError):
            continue                    # "None" before the engine profiled its memory
        size, tokens = block, tokens + block * blocks
    return tokens, size


def parse(text: str, names: upstream_kinds.MetricNames) -> types.EngineLoad:
    samples = _samples(text)
    if samples is None:
        return types.EngineLoad(ok=False)
    usage = _first(samples, names.kv_usage)
    tokens, block = _capacity(samples, names.cache_config)
    return types.EngineLoad(
        waiting=int(sum(_first(samples, names.waiting))),
        running=int(sum(_first(samples, names.running))),
        kv_usage=min(1.0, max(0.0, sum(usage) / len(usage))) if usage else 0.0,
        kv_capacity_tokens=tokens, block_size=block)
