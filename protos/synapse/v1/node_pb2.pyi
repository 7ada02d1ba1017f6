from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("model", "texts", "normalize")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    normalize: bool
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "dim", "vectors", "cached", "embedder_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    dim: int
    vectors: bytes
    cached: _containers.RepeatedScalarFieldContainer[bool]
    embedder_id: str
    def __init__(self, model: _Optional[str] = ..., dim: _Optional[int] = ..., vectors: _Optional[bytes] = ..., cached: _Optional[_Iterable[bool]] = ..., embedder_id: _Optional[str] = ...) -> None: ...

class ScorePairsRequest(_message.Message):
    __slots__ = ("query", "candidates")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class ScorePairsResponse(_message.Message):
    __slots__ = ("scores", "scorer_id")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SCORER_ID_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    scorer_id: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., scorer_id: _Optional[str] = ...) -> None: ...
