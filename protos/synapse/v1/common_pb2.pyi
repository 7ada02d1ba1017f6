from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackendPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_PHASE_UNSPECIFIED: _ClassVar[BackendPhase]
    BACKEND_PHASE_STARTING: _ClassVar[BackendPhase]
    BACKEND_PHASE_READY: _ClassVar[BackendPhase]
    BACKEND_PHASE_UNHEALTHY: _ClassVar[BackendPhase]
    BACKEND_PHASE_DRAINING: _ClassVar[BackendPhase]
    BACKEND_PHASE_STOPPED: _ClassVar[BackendPhase]
    BACKEND_PHASE_CRASHLOOP: _ClassVar[BackendPhase]
    BACKEND_PHASE_FAILED: _ClassVar[BackendPhase]

class EngineKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENGINE_KIND_UNSPECIFIED: _ClassVar[EngineKind]
    ENGINE_KIND_VLLM: _ClassVar[EngineKind]
    ENGINE_KIND_TEI: _ClassVar[EngineKind]
    ENGINE_KIND_SIMULATOR: _ClassVar[EngineKind]
    ENGINE_KIND_EXTERNAL: _ClassVar[EngineKind]

class BackendTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_TASK_UNSPECIFIED: _ClassVar[BackendTask]
    BACKEND_TASK_GENERATE: _ClassVar[BackendTask]
    BACKEND_TASK_EMBED: _ClassVar[BackendTask]
BACKEND_PHASE_UNSPECIFIED: BackendPhase
BACKEND_PHASE_STARTING: BackendPhase
BACKEND_PHASE_READY: BackendPhase
BACKEND_PHASE_UNHEALTHY: BackendPhase
BACKEND_PHASE_DRAINING: BackendPhase
BACKEND_PHASE_STOPPED: BackendPhase
BACKEND_PHASE_CRASHLOOP: BackendPhase
BACKEND_PHASE_FAILED: BackendPhase
ENGINE_KIND_UNSPECIFIED: EngineKind
ENGINE_KIND_VLLM: EngineKind
ENGINE_KIND_TEI: EngineKind
ENGINE_KIND_SIMULATOR: EngineKind
ENGINE_KIND_EXTERNAL: EngineKind
BACKEND_TASK_UNSPECIFIED: BackendTask
BACKEND_TASK_GENERATE: BackendTask
BACKEND_TASK_EMBED: BackendTask

class GpuSample(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "utilization_percent", "memory_utilization_percent", "temperature_celsius", "power_watts", "power_limit_watts", "processes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: float
    memory_utilization_percent: float
    temperature_celsius: float
    power_watts: float
    power_limit_watts: float
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., memory_utilization_percent: _Optional[float] = ..., temperature_celsius: _Optional[float] = ..., power_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "used_memory_bytes", "backend_name")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_memory_bytes: int
    backend_name: str
    def __init__(self, pid: _Optional[int] = ..., used_memory_bytes: _Optional[int] = ..., backend_name: _Optional[str] = ...) -> None: ...

class TelemetryStatus(_message.Message):
    __slots__ = ("source", "ok", "error")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    source: str
    ok: bool
    error: str
    def __init__(self, source: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class BackendState(_message.Message):
    __slots__ = ("name", "url", "models", "engine", "task", "phase", "phase_reason", "num_requests_waiting", "num_requests_running", "kv_cache_usage", "kv_capacity_tokens", "kv_block_size", "prefix_cache_hit_rate", "restarts", "last_restart_unix_ms", "started_unix_ms", "pid", "last_log_lines", "memory_reserved_bytes", "metrics_ok", "tasks", "max_num_seqs", "max_model_len")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_RESTART_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_LINES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_OK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    models: _containers.RepeatedScalarFieldContainer[str]
    engine: EngineKind
    task: BackendTask
    phase: BackendPhase
    phase_reason: str
    num_requests_waiting: int
    num_requests_running: int
    kv_cache_usage: float
    kv_capacity_tokens: int
    kv_block_size: int
    prefix_cache_hit_rate: float
    restarts: int
    last_restart_unix_ms: int
    started_unix_ms: int
    pid: int
    last_log_lines: _containers.RepeatedScalarFieldContainer[str]
    memory_reserved_bytes: int
    metrics_ok: bool
    tasks: _containers.RepeatedScalarFieldContainer[str]
    max_num_seqs: int
    max_model_len: int
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., engine: _Optional[_Union[EngineKind, str]] = ..., task: _Optional[_Union[BackendTask, str]] = ..., phase: _Optional[_Union[BackendPhase, str]] = ..., phase_reason: _Optional[str] = ..., num_requests_waiting: _Optional[int] = ..., num_requests_running: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., restarts: _Optional[int] = ..., last_restart_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., pid: _Optional[int] = ..., last_log_lines: _Optional[_Iterable[str]] = ..., memory_reserved_bytes: _Optional[int] = ..., metrics_ok: _Optional[bool] = ..., tasks: _Optional[_Iterable[str]] = ..., max_num_seqs: _Optional[int] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class EmbeddingCacheStats(_message.Message):
    __slots__ = ("entries", "bytes", "max_entries", "max_bytes", "hits", "misses", "evictions")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ..., max_entries: _Optional[int] = ..., max_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class BackendSpec(_message.Message):
    __slots__ = ("name", "engine", "model", "served_model_names", "port", "url", "gpu_memory_utilization", "max_model_len", "extra_args", "gpu_indices", "memory_required_bytes", "task", "tasks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ARGS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REQUIRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: EngineKind
    model: str
    served_model_names: _containers.RepeatedScalarFieldContainer[str]
    port: int
    url: str
    gpu_memory_utilization: float
    max_model_len: int
    extra_args: _containers.RepeatedScalarFieldContainer[str]
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    memory_required_bytes: int
    task: BackendTask
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[_Union[EngineKind, str]] = ..., model: _Optional[str] = ..., served_model_names: _Optional[_Iterable[str]] = ..., port: _Optional[int] = ..., url: _Optional[str] = ..., gpu_memory_utilization: _Optional[float] = ..., max_model_len: _Optional[int] = ..., extra_args: _Optional[_Iterable[str]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., memory_required_bytes: _Optional[int] = ..., task: _Optional[_Union[BackendTask, str]] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...
