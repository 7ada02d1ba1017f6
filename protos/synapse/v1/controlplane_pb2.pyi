from protos.synapse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("register", "report", "command_ack")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    register: Register
    report: Report
    command_ack: CommandAck
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_name", "agent_version", "gpus", "node_address", "telemetry", "embed_models", "labels", "engine_port_range", "engine_key", "node_key", "node_certificate")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    EMBED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PORT_RANGE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    agent_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[_common_pb2.GpuSample]
    node_address: str
    telemetry: _common_pb2.TelemetryStatus
    embed_models: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    engine_port_range: PortRange
    engine_key: str
    node_key: str
    node_certificate: bytes
    def __init__(self, node_name: _Optional[str] = ..., agent_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[_common_pb2.GpuSample, _Mapping]]] = ..., node_address: _Optional[str] = ..., telemetry: _Optional[_Union[_common_pb2.TelemetryStatus, _Mapping]] = ..., embed_models: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., engine_port_range: _Optional[_Union[PortRange, _Mapping]] = ..., engine_key: _Optional[str] = ..., node_key: _Optional[str] = ..., node_certificate: _Optional[bytes] = ...) -> None: ...

class PortRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("sequence", "timestamp_unix_ms", "gpus", "backends", "embedding_cache", "telemetry", "draining")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    timestamp_unix_ms: int
    gpus: _containers.RepeatedCompositeFieldContainer[_common_pb2.GpuSample]
    backends: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendState]
    embedding_cache: _common_pb2.EmbeddingCacheStats
    telemetry: _common_pb2.TelemetryStatus
    draining: bool
    def __init__(self, sequence: _Optional[int] = ..., timestamp_unix_ms: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[_common_pb2.GpuSample, _Mapping]]] = ..., backends: _Optional[_Iterable[_Union[_common_pb2.BackendState, _Mapping]]] = ..., embedding_cache: _Optional[_Union[_common_pb2.EmbeddingCacheStats, _Mapping]] = ..., telemetry: _Optional[_Union[_common_pb2.TelemetryStatus, _Mapping]] = ..., draining: _Optional[bool] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "ok", "error")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    error: str
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("command_id", "ack", "drain", "undrain", "desired_backends", "evict_embeddings")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    DESIRED_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    EVICT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ack: Ack
    drain: Drain
    undrain: Undrain
    desired_backends: DesiredBackends
    evict_embeddings: EvictEmbeddings
    def __init__(self, command_id: _Optional[str] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., undrain: _Optional[_Union[Undrain, _Mapping]] = ..., desired_backends: _Optional[_Union[DesiredBackends, _Mapping]] = ..., evict_embeddings: _Optional[_Union[EvictEmbeddings, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence", "replica")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    replica: str
    def __init__(self, sequence: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("grace_seconds",)
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: float
    def __init__(self, grace_seconds: _Optional[float] = ...) -> None: ...

class Undrain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DesiredBackends(_message.Message):
    __slots__ = ("backends", "retry")
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendSpec]
    retry: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, backends: _Optional[_Iterable[_Union[_common_pb2.BackendSpec, _Mapping]]] = ..., retry: _Optional[_Iterable[str]] = ...) -> None: ...

class EvictEmbeddings(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...
