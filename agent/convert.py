"""Protos at the edge: value objects ↔ ``synapse.v1`` messages, in one place."""

from __future__ import annotations

from agent.core import lru, types
from protos import enums
from protos.synapse.v1 import common_pb2
from synapse_common import tasks as task_names


class SpecError(ValueError):
    """A BackendSpec from the control plane that cannot be run."""


def gpu(sample: types.GpuSample) -> common_pb2.GpuSample:
    msg = common_pb2.GpuSample(index=sample.index, uuid=sample.uuid, name=sample.name)
    for field in ("memory_total_bytes", "memory_used_bytes", "memory_free_bytes",
                  "utilization_percent", "memory_utilization_percent",
                  "temperature_celsius", "power_watts", "power_limit_watts"):
        value = getattr(sample, field)
        if value is not None:  # unset = NVML could not read it
            setattr(msg, field, value)
    for proc in sample.processes:
        msg.processes.add(pid=proc.pid, used_memory_bytes=proc.used_memory_bytes,
                          backend_name=proc.backend_name)
    return msg


def telemetry(status: types.TelemetryStatus) -> common_pb2.TelemetryStatus:
    return common_pb2.TelemetryStatus(source=status.source, ok=status.ok, error=status.error)


def backend(status: types.BackendStatus) -> common_pb2.BackendState:
    return common_pb2.BackendState(
        name=status.name, url=status.url, models=list(status.models),
        engine=enums.ENGINE_KIND.value(status.engine),
        task=enums.BACKEND_TASK.value(status.task),
        phase=enums.BACKEND_PHASE.value(status.phase), phase_reason=status.phase_reason,
        num_requests_waiting=status.waiting, num_requests_running=status.running,
        kv_cache_usage=status.kv_usage, kv_capacity_tokens=status.kv_capacity_tokens,
        kv_block_size=status.kv_block_size, prefix_cache_hit_rate=status.prefix_hit_rate,
        restarts=status.restarts, last_restart_unix_ms=status.last_restart_unix_ms,
        started_unix_ms=status.started_unix_ms, pid=status.pid,
        last_log_lines=list(status.last_log_lines),
        memory_reserved_bytes=status.memory_reserved_bytes, metrics_ok=status.metrics_ok,
        tasks=list(status.tasks), max_num_seqs=status.max_num_seqs,
        max_model_len=status.max_model_len)


def cache_stats(stats: lru.CacheStats | None) -> common_pb2.EmbeddingCacheStats:
    if stats is None:
        return common_pb2.EmbeddingCacheStats()
    return common_pb2.EmbeddingCacheStats(
        entries=stats.entries, bytes=stats.bytes, max_entries=stats.max_entries,
        max_bytes=stats.max_bytes, hits=stats.hits, misses=stats.misses,
        evictions=stats.evictions)


def spec_from_proto(msg: common_pb2.BackendSpec) -> types.EngineSpec:
    """Validate a control-plane spec the way the config validates its own backends."""
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", msg.name):
        raise SpecError(f"backend name {msg.name!r} is invalid")
    engine = enums.ENGINE_KIND.name(msg.engine)
    if engine == "unspecified":
        raise SpecError(f"{msg.name}: engine kind is unspecified")
    if not msg.model:
        raise SpecError(f"{msg.name}: model is empty")
    if engine == "external" and not msg.url:
        raise SpecError(f"{msg.name}: url is required for an external backend")
    if msg.port > 65535 or not 0 <= msg.gpu_memory_utilization <= 1:
        raise SpecError(f"{msg.name}: port or gpu_memory_utilization out of range")
    return types.EngineSpec(
        name=msg.name, engine=engine, model=msg.model,
        served_model_names=tuple(msg.served_model_names), port=msg.port or None,
        url=msg.url or None, gpu_memory_utilization=msg.gpu_memory_utilization or 0.9,
        max_model_len=msg.max_model_len or None, extra_args=tuple(msg.extra_args),
        gpu_indices=tuple(msg.gpu_indices), memory_required_bytes=msg.memory_required_bytes,
        task="embed" if msg.task == common_pb2.BACKEND_TASK_EMBED else "generate",
        tasks=tuple(t for t in msg.tasks if t in task_names.ALL))


def spec_from_config(cfg: object) -> types.EngineSpec:
    from agent.config import BackendSettings

    assert isinstance(cfg, BackendSettings)
    return types.EngineSpec(
        name=cfg.name, engine=cfg.engine, model=cfg.model,
        served_model_names=tuple(cfg.served_model_names), port=cfg.port, url=cfg.url,
        gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
        extra_args=tuple(cfg.extra_args), gpu_indices=tuple(cfg.gpu_indices),
        memory_required_bytes=int((cfg.memory_required_gb or 0) * 1024**3), task=cfg.task,
        env=tuple(sorted(cfg.env.items())), tasks=tuple(cfg.tasks), own_port=cfg.own_port)
