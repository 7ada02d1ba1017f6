"""Typed value objects of the control plane core.

Protos stop at the gRPC servicer: it converts ``Register`` / ``BackendState`` messages to
these frozen dataclasses and nothing deeper sees a protobuf. A backend is identified by
its ``key`` (``node/name`` for agent backends, ``static/name`` for configured upstreams),
which is also what the ``x-synapse-backend`` header and the metrics show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Generic, Literal, NamedTuple, TypeVar, overload

# What a backend serves (synapse_common.tasks names; the table of paths per task is there).
Task = Literal["generate", "embed", "responses", "messages", "tokenize", "rerank", "score",
               "transcription", "speech"]
Source = Literal["agent", "static"]
# The engine lifecycle as the agent reports it (BackendPhase without the prefix).
Phase = Literal["unspecified", "starting", "ready", "unhealthy", "draining", "stopped",
                "crashloop", "failed"]
NodeStatus = Literal["ready", "cordoned", "draining", "down"]
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class BackendState:
    key: str
    node: str
    name: str
    url: str                        # base URL, no trailing slash, no /v1
    models: tuple[str, ...]
    task: Task = "generate"
    phase: Phase = "ready"
    source: Source = "agent"
    waiting: int = 0                # scraped num_requests_waiting
    running: int = 0                # scraped num_requests_running
    kv_usage: float = 0.0           # 0..1
    kv_capacity_tokens: int = 0     # 0 = unknown
    block_size: int = 0             # 0 = unknown (router default applies)
    prefix_hit_rate: float = 0.0
    restarts: int = 0
    metrics_ok: bool = True
    # a static upstream's own key, or the engine key for an agent's engine (engine_key)
    api_key: str | None = dataclasses.field(default=None, repr=False)
    upstream_models: tuple[tuple[str, str], ...] = ()   # static: (model, its own name)
    tasks: frozenset[str] = frozenset()     # what it serves; empty = ``task`` alone
    engine: str = ""                # agent backends: vllm, tei, simulator, external;
                                    # static upstreams: their kind (upstream_kinds), or ""
    max_num_seqs: int = 0           # sequences it runs at once, when configured (static) or
                                    # set on its command line (agent); 0 = unknown
    max_model_len: int = 0          # its context length, as its agent reports it (the
                                    # engine's /v1/models) or as configured; 0 = unknown
    # A backend whose own /openapi.json shows cache_salt (core.cache_salt.learns: a
    # kind-less static upstream, an agent's external one): salted like the engines of
    # core.cache_salt.ENGINES (which need no flag).
    takes_salt: bool = False
    # Not salted, generates, and more than one tenant may use it (core.cache_salt.sharing):
    # its answers reach clients with their cached-token counts zeroed.
    shares_cache: bool = False

    def serves(self, task: str) -> bool:
        """Whether it answers requests of ``task`` (the one rule of task filtering)."""
        return task in self.tasks if self.tasks else task == self.task

    def wire_model(self, model: str) -> str:
        """The name this backend knows ``model`` by (a static upstream's model_names)."""
        for ours, theirs in self.upstream_models:
            if ours == model:
                return theirs
        return model

    @property
    def free_kv_tokens(self) -> int | None:
        if self.kv_capacity_tokens <= 0:
            return None
        return int(self.kv_capacity_tokens * max(0.0, 1.0 - self.kv_usage))


class EngineLoad(NamedTuple):
    """A static upstream's engine metrics, as scraped (0 where its kind exports none)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    block_size: int = 0
    ok: bool = True                 # False: /metrics could not be read or parsed


@dataclasses.dataclass(frozen=True, slots=True)
class NodePin:
    """The certificate a node's agent made at its start and registered (PEM, one X.509
    certificate, read and re-encoded on the way in) and the DNS name it carries: Node
    calls to that node trust this certificate alone and check this name."""

    certificate: bytes = dataclasses.field(repr=False)
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node's agent said in Register, plus the registry's view of it."""

    name: str
    address: str = ""               # host:port of the agent's Node gRPC service
    agent_version: str = ""
    embed_models: tuple[str, ...] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gpu_count: int = 0
    engine_ports: tuple[int, int] | None = None   # the agent's engine port range (first, last)
    # the keys this node's agent chose (agent.node_keys): presented to its engines and on
    # Node calls to it, and to nothing else; None from an agent that sent none
    engine_key: str | None = dataclasses.field(default=None, repr=False)
    node_key: str | None = dataclasses.field(default=None, repr=False)
    # the Node service's own certificate, pinned for this node's address (None: the
    # control plane's grpc.node_ca_file decides, CA-signed TLS or plain text)
    node_pin: NodePin | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    info: NodeInfo
    status: NodeStatus
    cordoned: bool
    draining: bool
    connected: bool
    last_report_age_s: float
    backends: tuple[BackendState, ...]
    report: Any = None              # the latest raw report details (GPU samples), opaque


@dataclasses.dataclass(frozen=True, slots=True)
class EmbedNode:
    """A ready node whose agent serves ``Node.Embed`` for ``embed_models``."""

    name: str
    address: str
    embed_models: tuple[str, ...]
    key: str | None = dataclasses.field(default=None, repr=False)   # NodeInfo.node_key


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A command for one agent (sent on its Connect stream, acknowledged by it)."""

    kind: Literal["drain", "undrain", "desired_backends", "evict_embeddings"]
    grace_seconds: float = 0.0
    backends: tuple[Mapping[str, Any], ...] = ()   # BackendSpec fields, for desired_backends
    retry: tuple[str, ...] = ()     # desired_backends: the backends named again (retried)
    model: str = ""                                 # for evict_embeddings


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class PromptInfo:
    """The prompt as the router sees it: its token count and chained block hashes."""

    tokens: int
    hashes_by_block_size: Mapping[int, tuple[int, ...]]
    max_tokens: int = 0
    session: str = ""
    tokenizer: str = "approximate"   # what the ids were counted with (tokenization.py)
    sequences: int = 1              # seats it takes: n x a batch's prompts (the fair queue)


class Basis(NamedTuple):
    """What a verdict's prediction was made with (explain shows it; the cost model learns
    from it). A tuple: one is built per backend per request."""

    tokenizer: str                  # what the prompt was counted and hashed with
    block_size: int
    queued_tokens: float            # prefill tokens predicted ahead of the request
    decode_wait_s: float            # the decode-step part of queue_wait_s
    prefill_s_per_token: float
    decode_s_per_step: float
    overhead_s: float               # part of queue_wait_s: fixed time to a first token
    cost_samples: int               # prefill samples behind prefill_s_per_token (0 = constant)
    ttft_error_s: float             # the backend's typical |observed - predicted TTFT|


class _OfBasis(Generic[_T]):
    """A read-only attribute of a :class:`Verdict`: the same-named part of its basis, or
    ``default`` without one."""

    def __init__(self, default: _T) -> None:
        self._default = default
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _OfBasis[_T]: ...
    @overload
    def __get__(self, obj: Verdict, owner: type) -> _T: ...

    def __get__(self, obj: Verdict | None, owner: type) -> _OfBasis[_T] | _T:
        if obj is None:
            return self
        basis = obj.basis
        return getattr(basis, self._name) if basis else self._default


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One backend's routing verdict: filter result and the predicted TTFT with its parts."""

    backend: BackendState
    eligible: bool
    filter_reason: str
    predicted_ttft_s: float
    queue_wait_s: float
    prefill_s: float
    prompt_tokens: int
    cached_tokens: int
    session_affinity: bool = False
    rank: int = 0
    basis: Basis | None = None      # what the prediction was made with

    # The basis' parts (0 / "approximate" without one).
    tokenizer = _OfBasis("approximate")
    block_size = _OfBasis(0)
    queued_tokens = _OfBasis(0.0)
    decode_wait_s = _OfBasis(0.0)
    prefill_s_per_token = _OfBasis(0.0)
    decode_s_per_step = _OfBasis(0.0)
    overhead_s = _OfBasis(0.0)
    cost_samples = _OfBasis(0)


class RouteObservation(NamedTuple):
    """A routed request once it settled: what the router predicted beside what happened.

    ``observed_ttft_s`` is ``None`` unless the answer was streamed (a whole answer's first
    byte comes after its last token); the reported token counts are ``None`` when the
    engine sent no usage (or no ``prompt_tokens_details``). A tuple: one per request.
    """

    backend: str
    tokenizer: str
    predicted_ttft_s: float
    observed_ttft_s: float | None
    predicted_cached_tokens: int
    reported_cached_tokens: int | None
    predicted_prompt_tokens: int
    reported_prompt_tokens: int | None
    prefill_s_per_token: float      # the backend's costs after learning from this request
    decode_s_per_step: float
    overhead_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class RouteDecision:
    model: str
    candidates: tuple[Verdict, ...]   # ordered, best first
    reason: str                        # short reason for x-synapse-route
    policy: str
    prompt: PromptInfo
