"""Value objects of the agent core: engine specs, phases, GPU samples, engine snapshots.

Protos appear only at the edges (servicer, reporter); everything below them works on
these frozen dataclasses, so the core stays free of grpc and aiohttp and is checked by
mypy in strict mode.
"""

from __future__ import annotations

import dataclasses
import enum


class Phase(enum.StrEnum):
    """Lifecycle of one supervised backend, as the issue and the wire contract name it."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHLOOP = "crashloop"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One engine the agent should run (from its config or the control plane)."""

    name: str
    engine: str  # vllm | tei | simulator | external
    model: str
    served_model_names: tuple[str, ...] = ()
    port: int | None = None
    url: str | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    extra_args: tuple[str, ...] = ()
    gpu_indices: tuple[int, ...] = ()
    memory_required_bytes: int = 0
    task: str = "generate"  # generate | embed
    env: tuple[tuple[str, str], ...] = ()
    tasks: tuple[str, ...] = ()  # every API it serves (synapse_common.tasks); () = learn
    own_port: bool = True  # the process started listens itself (not docker run): checked

    @property
    def models(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)


@dataclasses.dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int
    backend_name: str = ""


@dataclasses.dataclass(frozen=True)
class GpuSample:
    """One GPU; ``None`` marks a field the source could not read (NotSupported)."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    processes: tuple[GpuProcess, ...] = ()


@dataclasses.dataclass(frozen=True)
class TelemetryStatus:
    source: str
    ok: bool
    error: str = ""


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """What one scrape of an engine's ``/metrics`` said; ``None`` = metric absent."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    prefix_hit_rate_gauge: float | None = None  # V0 engines exported the ratio directly

    @property
    def kv_capacity_tokens(self) -> int | None:
        if self.block_size is None or self.num_gpu_blocks is None:
            return None
        return self.block_size * self.num_gpu_blocks


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """A backend as the report shows it (phase already includes the drain overlay)."""

    name: str
    url: str
    models: tuple[str, ...]
    engine: str
    task: str
    phase: Phase
    phase_reason: str = ""
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    kv_block_size: int = 0
    prefix_hit_rate: float = 0.0
    restarts: int = 0
    last_restart_unix_ms: int = 0
    started_unix_ms: int = 0
    pid: int = 0
    last_log_lines: tuple[str, ...] = ()
    memory_reserved_bytes: int = 0
    metrics_ok: bool = False
    managed: bool = False  # True when the control plane asked for it
    tasks: tuple[str, ...] = ()  # what it serves (agent.engine_tasks)
    max_num_seqs: int = 0  # sequences it runs at once, from its command line; 0 = unknown
    max_model_len: int = 0  # the engine's context length (agent.engine_context); 0 = unknown
