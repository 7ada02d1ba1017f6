"""Typed value objects of the control plane core.

Protos stop at the gRPC servicer: it converts ``Register`` / ``BackendState`` messages to
these frozen dataclasses and nothing deeper sees a protobuf. A backend is identified by
its ``key`` (``node/name`` for agent backends, ``static/name`` for configured upstreams),
which is also what the ``x-synapse-backend`` header and the metrics show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

Task = Literal["generate", "embed"]
Source = Literal["agent", "static"]
# The engine lifecycle as the agent reports it (BackendPhase without the prefix).
Phase = Literal["unspecified", "starting", "ready", "unhealthy", "draining", "stopped",
                "crashloop", "failed"]
NodeStatus = Literal["ready", "cordoned", "draining", "down"]


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
    api_key: str | None = dataclasses.field(default=None, repr=False)  # static upstreams

    @property
    def free_kv_tokens(self) -> int | None:
        if self.kv_capacity_tokens <= 0:
            return None
        return int(self.kv_capacity_tokens * max(0.0, 1.0 - self.kv_usage))


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node's agent said in Register, plus the registry's view of it."""

    name: str
    address: str = ""               # host:port of the agent's Node gRPC service
    agent_version: str = ""
    embed_models: tuple[str, ...] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gpu_count: int = 0


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


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A command for one agent (sent on its Connect stream, acknowledged by it)."""

    kind: Literal["drain", "undrain", "desired_backends", "evict_embeddings"]
    grace_seconds: float = 0.0
    backends: tuple[Mapping[str, Any], ...] = ()   # BackendSpec fields, for desired_backends
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


@dataclasses.dataclass(frozen=True, slots=True)
class RouteDecision:
    model: str
    candidates: tuple[Verdict, ...]   # ordered, best first
    reason: str                        # short reason for x-synapse-route
    policy: str
    prompt: PromptInfo
