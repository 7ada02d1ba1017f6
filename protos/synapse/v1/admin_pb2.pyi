from protos.synapse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATUS_UNSPECIFIED: _ClassVar[NodeStatus]
    NODE_STATUS_READY: _ClassVar[NodeStatus]
    NODE_STATUS_CORDONED: _ClassVar[NodeStatus]
    NODE_STATUS_DRAINING: _ClassVar[NodeStatus]
    NODE_STATUS_DOWN: _ClassVar[NodeStatus]
NODE_STATUS_UNSPECIFIED: NodeStatus
NODE_STATUS_READY: NodeStatus
NODE_STATUS_CORDONED: NodeStatus
NODE_STATUS_DRAINING: NodeStatus
NODE_STATUS_DOWN: NodeStatus

class NodeSummary(_message.Message):
    __slots__ = ("name", "status", "cordoned", "draining", "gpu_count", "backends_ready", "backends_total", "last_report_age_seconds", "agent_version", "address", "telemetry", "in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_READY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: NodeStatus
    cordoned: bool
    draining: bool
    gpu_count: int
    backends_ready: int
    backends_total: int
    last_report_age_seconds: float
    agent_version: str
    address: str
    telemetry: _common_pb2.TelemetryStatus
    in_flight: int
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[NodeStatus, str]] = ..., cordoned: _Optional[bool] = ..., draining: _Optional[bool] = ..., gpu_count: _Optional[int] = ..., backends_ready: _Optional[int] = ..., backends_total: _Optional[int] = ..., last_report_age_seconds: _Optional[float] = ..., agent_version: _Optional[str] = ..., address: _Optional[str] = ..., telemetry: _Optional[_Union[_common_pb2.TelemetryStatus, _Mapping]] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeSummary]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeSummary, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class NodeDetail(_message.Message):
    __slots__ = ("summary", "gpus", "backends", "embedding_cache", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    summary: NodeSummary
    gpus: _containers.RepeatedCompositeFieldContainer[_common_pb2.GpuSample]
    backends: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendState]
    embedding_cache: _common_pb2.EmbeddingCacheStats
    labels: _containers.ScalarMap[str, str]
    def __init__(self, summary: _Optional[_Union[NodeSummary, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[_common_pb2.GpuSample, _Mapping]]] = ..., backends: _Optional[_Iterable[_Union[_common_pb2.BackendState, _Mapping]]] = ..., embedding_cache: _Optional[_Union[_common_pb2.EmbeddingCacheStats, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UncordonNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("name", "wait", "timeout_seconds", "grace_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    wait: bool
    timeout_seconds: float
    grace_seconds: float
    def __init__(self, name: _Optional[str] = ..., wait: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node", "drained", "in_flight")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    node: NodeDetail
    drained: bool
    in_flight: int
    def __init__(self, node: _Optional[_Union[NodeDetail, _Mapping]] = ..., drained: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ModelBackend(_message.Message):
    __slots__ = ("node", "backend", "url", "phase", "num_requests_waiting", "num_requests_running", "kv_cache_usage", "routable", "source")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    node: str
    backend: str
    url: str
    phase: _common_pb2.BackendPhase
    num_requests_waiting: int
    num_requests_running: int
    kv_cache_usage: float
    routable: bool
    source: str
    def __init__(self, node: _Optional[str] = ..., backend: _Optional[str] = ..., url: _Optional[str] = ..., phase: _Optional[_Union[_common_pb2.BackendPhase, str]] = ..., num_requests_waiting: _Optional[int] = ..., num_requests_running: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., routable: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "aliases", "backends", "state", "task", "fallbacks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedCompositeFieldContainer[ModelBackend]
    state: str
    task: _common_pb2.BackendTask
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[_Union[ModelBackend, _Mapping]]] = ..., state: _Optional[str] = ..., task: _Optional[_Union[_common_pb2.BackendTask, str]] = ..., fallbacks: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DeployModelRequest(_message.Message):
    __slots__ = ("model", "engine", "nodes", "replicas", "memory_required_bytes", "served_model_names", "max_model_len", "gpu_memory_utilization", "extra_args", "task")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REQUIRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ARGS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine: _common_pb2.EngineKind
    nodes: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    memory_required_bytes: int
    served_model_names: _containers.RepeatedScalarFieldContainer[str]
    max_model_len: int
    gpu_memory_utilization: float
    extra_args: _containers.RepeatedScalarFieldContainer[str]
    task: _common_pb2.BackendTask
    def __init__(self, model: _Optional[str] = ..., engine: _Optional[_Union[_common_pb2.EngineKind, str]] = ..., nodes: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ..., memory_required_bytes: _Optional[int] = ..., served_model_names: _Optional[_Iterable[str]] = ..., max_model_len: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., extra_args: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[_common_pb2.BackendTask, str]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("node", "backend", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    backend: str
    reason: str
    def __init__(self, node: _Optional[str] = ..., backend: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeployModelResponse(_message.Message):
    __slots__ = ("placements",)
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    def __init__(self, placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ...) -> None: ...

class UndeployModelRequest(_message.Message):
    __slots__ = ("model", "nodes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    model: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class UndeployModelResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedCompositeFieldContainer[Placement]
    def __init__(self, removed: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ...) -> None: ...

class InvalidateCacheRequest(_message.Message):
    __slots__ = ("tenant", "model", "all")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    all: bool
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class InvalidateCacheResponse(_message.Message):
    __slots__ = ("exact_entries_removed", "semantic_entries_removed")
    EXACT_ENTRIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_ENTRIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    exact_entries_removed: int
    semantic_entries_removed: int
    def __init__(self, exact_entries_removed: _Optional[int] = ..., semantic_entries_removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("requests", "errors", "p50_ms", "p95_ms", "p99_ms")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("requests_total", "cache_hit_rate", "cache_hits_exact", "cache_hits_semantic", "cache_misses", "cache_errors", "per_model", "per_backend", "nodes_ready", "backends_ready", "uptime_seconds", "replica", "replicas_asked", "replicas_answered", "replicas", "fleet_error")
    class PerModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LatencySummary
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...
    class PerBackendEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LatencySummary
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_EXACT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    PER_MODEL_FIELD_NUMBER: _ClassVar[int]
    PER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    NODES_READY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_READY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_ASKED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FLEET_ERROR_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    cache_hit_rate: float
    cache_hits_exact: int
    cache_hits_semantic: int
    cache_misses: int
    cache_errors: int
    per_model: _containers.MessageMap[str, LatencySummary]
    per_backend: _containers.MessageMap[str, LatencySummary]
    nodes_ready: int
    backends_ready: int
    uptime_seconds: float
    replica: str
    replicas_asked: int
    replicas_answered: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    fleet_error: str
    def __init__(self, requests_total: _Optional[int] = ..., cache_hit_rate: _Optional[float] = ..., cache_hits_exact: _Optional[int] = ..., cache_hits_semantic: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cache_errors: _Optional[int] = ..., per_model: _Optional[_Mapping[str, LatencySummary]] = ..., per_backend: _Optional[_Mapping[str, LatencySummary]] = ..., nodes_ready: _Optional[int] = ..., backends_ready: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., replica: _Optional[str] = ..., replicas_asked: _Optional[int] = ..., replicas_answered: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., fleet_error: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since_seconds")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since_seconds: float
    def __init__(self, tenant: _Optional[str] = ..., since_seconds: _Optional[float] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("day", "tenant", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_hit_tokens", "errors", "cost", "estimated")
    DAY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    day: str
    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_hit_tokens: int
    errors: int
    cost: float
    estimated: int
    def __init__(self, day: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., cache_hit_tokens: _Optional[int] = ..., errors: _Optional[int] = ..., cost: _Optional[float] = ..., estimated: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ...) -> None: ...

class ExplainRouteRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages_json", "session_id", "max_tokens", "tenant", "cache_salt")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages_json: str
    session_id: str
    max_tokens: int
    tenant: str
    cache_salt: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages_json: _Optional[str] = ..., session_id: _Optional[str] = ..., max_tokens: _Optional[int] = ..., tenant: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class BackendVerdict(_message.Message):
    __slots__ = ("node", "backend", "url", "eligible", "filter_reason", "predicted_ttft_seconds", "queue_wait_seconds", "prefill_seconds", "prompt_tokens", "cached_tokens", "rank", "session_affinity", "block_size", "prefill_seconds_per_token", "decode_seconds_per_step", "overhead_seconds", "cost_samples")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    FILTER_REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_AFFINITY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    node: str
    backend: str
    url: str
    eligible: bool
    filter_reason: str
    predicted_ttft_seconds: float
    queue_wait_seconds: float
    prefill_seconds: float
    prompt_tokens: int
    cached_tokens: int
    rank: int
    session_affinity: bool
    block_size: int
    prefill_seconds_per_token: float
    decode_seconds_per_step: float
    overhead_seconds: float
    cost_samples: int
    def __init__(self, node: _Optional[str] = ..., backend: _Optional[str] = ..., url: _Optional[str] = ..., eligible: _Optional[bool] = ..., filter_reason: _Optional[str] = ..., predicted_ttft_seconds: _Optional[float] = ..., queue_wait_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., rank: _Optional[int] = ..., session_affinity: _Optional[bool] = ..., block_size: _Optional[int] = ..., prefill_seconds_per_token: _Optional[float] = ..., decode_seconds_per_step: _Optional[float] = ..., overhead_seconds: _Optional[float] = ..., cost_samples: _Optional[int] = ...) -> None: ...

class ExplainRouteResponse(_message.Message):
    __slots__ = ("model", "policy", "chosen_backend", "backends", "prompt_tokens", "reason", "tokenizer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    chosen_backend: str
    backends: _containers.RepeatedCompositeFieldContainer[BackendVerdict]
    prompt_tokens: int
    reason: str
    tokenizer: str
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., chosen_backend: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[BackendVerdict, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., reason: _Optional[str] = ..., tokenizer: _Optional[str] = ...) -> None: ...
