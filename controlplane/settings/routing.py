"""Router and registry settings: the routing policy and its cost estimates, node
liveness, upstream probes and readiness."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
from pydantic import Field

from controlplane.core import engine_hosts, node_models
from synapse_common.settings import Section


def _node_key(value: str) -> str:
    problem = node_models.node_key_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _model_name(value: str) -> str:
    problem = node_models.model_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# checked one by one, so that a config error names the entry (registry.node_models.gpu-1.0)
_NodeKey = Annotated[str, pydantic.AfterValidator(_node_key)]
_ModelName = Annotated[str, pydantic.AfterValidator(_model_name)]


class RouterSettings(Section):
    policy: Literal["predicted_ttft", "round_robin", "least_loaded"] = Field(
        "predicted_ttft", description="routing policy")
    max_attempts: int = Field(3, ge=1, le=10, description="backends tried before the first byte")
    block_size: int = Field(16, ge=1, description="tokens per prefix block (match the engines)")
    prefill_seconds_per_token: float = Field(
        0.00012, gt=0, description="prefill cost used when a backend reports none")
    decode_seconds_per_step: float = Field(0.02, gt=0, description="decode step cost estimate")
    prefix_index_max_blocks: int = Field(200_000, ge=1000,
                                         description="blocks remembered per backend at most")
    session_affinity: bool = Field(True, description="x-session-id / user break ties")
    learn_costs: bool = Field(True, description="learn each backend's prefill, decode and "
                              "first-token costs from its answers (else the constants above)")


class RegistrySettings(Section):
    node_down_after_s: float = Field(15.0, gt=0, description="a node silent this long is down")
    max_nodes: int = Field(
        1024, ge=1, description="nodes the registry holds at most: past it a new node name "
        "is refused (RESOURCE_EXHAUSTED), after the nodes down longer than forget_down_after_s "
        "are forgotten, else one node whose stream closed and that never served (reported "
        "backends for node_down_after_s) nor was cordoned or drained, the one closed longest "
        "ago; names that register are never forgotten otherwise")
    max_nodes_per_address: int | None = Field(
        64, ge=1, description="nodes registered from one peer address that the registry "
        "holds at most (connected, or served and not yet forgotten): past it a new node "
        "name from there is refused (RESOURCE_EXHAUSTED, naming this setting), so a holder "
        "of the agent token cannot fill max_nodes from one machine. IPv6 peers count by "
        "their /64; loopback and unix-socket peers (this host) are not counted. Raise it "
        "for more agents behind one NAT or proxy; none = no cap")
    forget_down_after_s: float = Field(
        3600.0, gt=0, description="a node down this long is forgotten when a new node needs "
        "its place (its cordon and drain intent with it); one that never served nor was "
        "cordoned or drained may go sooner (max_nodes)")
    engine_hosts: list[str] = Field(
        default_factory=list, description="hosts an agent's reported backends may be at "
        "besides the node's own address as the control plane sees it (its stream's peer "
        "address; any loopback address for an agent on this host): IP addresses, CIDR "
        "networks (10.0.0.0/8) and host names (compared as written, not resolved). For an "
        "engine: external backend on another machine, or agents behind a NAT or a proxy. "
        "A backend elsewhere is not routed to, probed or scraped (one warning). "
        "Link-local addresses (169.254.0.0/16, the cloud metadata service; fe80::/10) "
        "pass only when an entry lies inside that range (controlplane/core/engine_hosts.py)")
    node_models: dict[_NodeKey, list[_ModelName]] | None = Field(
        None, description="models each node may serve, an opt-in check of what agents "
        "report (none = any model). Node name -> model names as its agent reports them "
        "(served_model_names, else the model; compared exactly, aliases play no part); "
        "'*' lists them for every node without an entry of its own (an entry replaces "
        "it). A node may also serve what DeployModel placed on it. A backend claiming "
        "any other model is not routed to, probed or scraped (one warning), and such a "
        "Register embed_models entry is dropped (controlplane/core/node_models.py)")
    upstream_probe_interval_s: float = Field(5.0, gt=0, description="static upstream health probe")
    ready_requires_backend: bool = Field(
        False, description="the old /ready: 503 whenever no backend is routable. Off, /ready "
        "answers whether this replica can serve (config loaded, registry synced, HTTP up) and "
        "reports 'no routable backend' in its body and metrics only, so a fleet-wide outage "
        "still gives clients a 503 envelope instead of a refused connection")
    sync_grace_s: float = Field(
        10.0, ge=0, description="the registry counts as synced once the static upstreams were "
        "probed and an agent reported or this many seconds passed since start (agents "
        "reconnecting to a new replica)")

    @pydantic.field_validator("engine_hosts")
    @classmethod
    def _hosts_parse(cls, value: list[str]) -> list[str]:
        engine_hosts.Allowed.parse(value)
        return value
