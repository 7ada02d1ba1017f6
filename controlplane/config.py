"""Control-plane settings: one pydantic root of small per-concern sections.

Parsed once in ``main()`` (see :mod:`synapse_common.settings` for the file and
``SYNAPSE_*`` rules) and passed down; nothing else reads the environment.

Each section lives in one module of :mod:`controlplane.settings` (``server``: HTTP, gRPC,
/metrics, Admin; ``tenants``: auth; ``backends``: models and static upstreams;
``routing``: router and registry; ``cache``: response cache and Redis; ``fairness``:
limits, budgets, prices, usage, queue; ``ops``: access log and stats). This module holds
the root, the checks that span sections, and re-exports every section so that
``config.HttpSettings`` and friends keep working; add a field in the section's module.
"""

from __future__ import annotations

import ipaddress
import pathlib
from collections.abc import Sequence

import pydantic
from pydantic import Field

from controlplane.settings.backends import ModelSettings, UpstreamSettings
from controlplane.settings.cache import REDIS_SCHEMES, CacheSettings, RedisSettings
from controlplane.settings.fairness import (
    BudgetSettings,
    FairnessSettings,
    PriceSettings,
    QueueSettings,
    TokenLimitSettings,
    UsageSettings,
)
from controlplane.settings.ops import AccessLogSettings, StatsSettings
from controlplane.settings.routing import RegistrySettings, RouterSettings
from controlplane.settings.server import AdminSettings, GrpcSettings, HttpSettings, MetricsSettings
from controlplane.settings.tenants import AgentReviewSettings, AuthSettings, TenantSettings
from synapse_common.settings import LoggingSettings, Section
from synapse_common.tracing import TracingSettings

__all__ = [
    "AccessLogSettings", "AdminSettings", "AgentReviewSettings", "AuthSettings",
    "BudgetSettings", "CacheSettings", "ControlPlaneSettings", "FairnessSettings",
    "GrpcSettings", "HttpSettings",
    "MetricsSettings", "ModelSettings", "PriceSettings", "QueueSettings", "RedisSettings",
    "RegistrySettings", "RouterSettings", "StatsSettings", "TenantSettings",
    "TokenLimitSettings", "UpstreamSettings", "UsageSettings", "open_agent_door",
    "redis_url_problem", "start_warnings",
]


class ControlPlaneSettings(Section):
    replica_id: str = Field("", description="replica name in logs/headers (default: hostname)")
    data_dir: str = Field(
        "./.synapse", description="the process's own state: the fleet intent (a copy with "
        "Redis), the in-process L1's journal, usage and budget spends (without Redis), the "
        "cache feedback log, a Milvus Lite file")
    http: HttpSettings = Field(default_factory=HttpSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    models: list[ModelSettings] = Field(default_factory=list, description="canonical models, aliases")
    upstreams: list[UpstreamSettings] = Field(default_factory=list, description="static backends")
    router: RouterSettings = Field(default_factory=RouterSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    fairness: FairnessSettings = Field(default_factory=FairnessSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    stats: StatsSettings = Field(default_factory=StatsSettings)

    @pydantic.field_validator("data_dir")
    @classmethod
    def _data_dir_is_a_directory(cls, value: str) -> str:
        # A file there used to start, with only an error about usage_pending.jsonl later:
        # usage, the L1 journal, the intent copy and Milvus Lite cannot be kept in it.
        if pathlib.Path(value).exists() and not pathlib.Path(value).is_dir():
            raise ValueError("exists and is no directory: usage, the cache's journal and "
                             "Milvus Lite are kept in it")
        return value

    @pydantic.model_validator(mode="after")
    def _unique_names(self) -> ControlPlaneSettings:
        seen: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for name in [model.name, *model.aliases]:
                if name in seen:
                    raise ValueError(f"models[{i}]: name {name!r} is already used by {seen[name]}")
                seen[name] = model.name
        tenants = [t.name for t in self.auth.tenants]
        dup = {t for t in tenants if tenants.count(t) > 1}
        if dup:
            raise ValueError(f"auth.tenants: duplicate tenant {sorted(dup)[0]!r}")
        classes = self.fairness.queue.classes
        for i, t in enumerate(self.auth.tenants):
            if t.priority not in classes:
                raise ValueError(f"auth.tenants[{i}].priority: {t.priority!r} is not one of "
                                 f"fairness.queue.classes {classes}")
        self._check_upstreams()
        self._check_fallbacks(seen)
        admin_as = self.auth.admin_tenant
        if admin_as is not None and admin_as not in tenants and not self.auth.key_file:
            raise ValueError(f"auth.admin_tenant: no tenant is named {admin_as!r}")
        return self


    @pydantic.model_validator(mode="after")
    def _distinct_ports(self) -> ControlPlaneSettings:
        """Two listeners on one port would fail at bind with an error naming neither."""
        wild = {"0.0.0.0", "::", ""}
        listeners = [("http.port", self.http.host, self.http.port),
                     ("grpc.port", self.grpc.host, self.grpc.port),
                     ("metrics.port", self.http.host, self.metrics.port)]
        for i, (field, host, port) in enumerate(listeners):
            for other, other_host, other_port in listeners[i + 1:]:
                if port and port == other_port and (
                        host == other_host or host in wild or other_host in wild):
                    raise ValueError(f"{field} and {other} are both {port}: each listener "
                                     "needs a port of its own")
        return self

    def _check_upstreams(self) -> None:
        names: dict[str, int] = {}
        for i, u in enumerate(self.upstreams):
            if u.name in names:
                raise ValueError(f"upstreams[{i}].name: {u.name!r} is already the name of "
                                 f"upstreams[{names[u.name]}] (names key headers and metrics)")
            names[u.name] = i

    def _check_fallbacks(self, canonical: dict[str, str]) -> None:
        """Fallbacks name known models (configured, or served by a static upstream) and
        never lead back to where they started."""
        served = {m for u in self.upstreams for m in u.models}
        chains: dict[str, list[str]] = {}
        for i, model in enumerate(self.models):
            for name in model.fallbacks:
                if name not in canonical and name not in served:
                    raise ValueError(
                        f"models[{i}].fallbacks: {name!r} is no model (not in models, and "
                        "no upstream serves it); add it to models or fix the name")
            chains[model.name] = [canonical.get(f, f) for f in model.fallbacks]
        for i, model in enumerate(self.models):
            cycle = _cycle(model.name, chains)
            if cycle:
                raise ValueError(f"models[{i}].fallbacks: a cycle: {' -> '.join(cycle)}")


def _cycle(start: str, chains: dict[str, list[str]]) -> list[str]:
    """The first path from ``start`` back to itself through fallbacks, or []."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        model, path = stack.pop()
        for nxt in chains.get(model, []):
            if nxt == start:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return []


def open_agent_door(settings: ControlPlaneSettings) -> str | None:
    """Why these settings must not start, if they leave agent registration open to other
    machines: no ``auth.agent_token`` nor ``auth.agent_review``, no explicit
    ``auth.allow_unauthenticated_agents``, and a ``grpc.host`` other than loopback. A
    registered agent receives tenants' prompts.
    (Checked at start-up, not when loading: the defaults load, they just do not start.)"""
    auth = settings.auth
    if auth.agent_token is not None or auth.agent_review is not None \
            or auth.allow_unauthenticated_agents or _loopback(settings.grpc.host):
        return None
    return (f"auth.agent_token: required when grpc.host is {settings.grpc.host!r} (reachable "
            "from other machines): without it anything that reaches the gRPC port can "
            "register as an agent and receive tenants' prompts. Set it (the agents' "
            "control_plane.token) or auth.agent_review (agents' Kubernetes identity), or "
            "auth.allow_unauthenticated_agents: true")


def redis_url_problem(settings: ControlPlaneSettings) -> str | None:
    """Why ``redis.url`` cannot be used, if its scheme is none the Redis client takes: the
    client's own error, at start, named neither the file nor the setting. Never quotes the
    URL (its password). Checked at start-up, not when loading, like :func:`open_agent_door`:
    manifests are loaded with stand-ins for their Secrets."""
    url = settings.redis.url
    if url is None or url.get_secret_value().lower().startswith(REDIS_SCHEMES):
        return None
    return (f"redis.url: must start with {', '.join(REDIS_SCHEMES)} (the Redis client "
            "takes no other)")


def start_warnings(settings: ControlPlaneSettings,
                   tenants: Sequence[TenantSettings]) -> list[str]:
    """What the control plane says at start about settings that load but may not do what
    the operator meant; ``tenants``: the configured ones, ``auth.key_file``'s included.

    * ``auth.enabled: false`` opens /v1 to anyone who reaches it, and every tenant's keys
      and limits are then ignored: it used to start without a word, so a second ``auth:``
      or a values mistake opened the API unseen. The count is said, never a key.
    * A tenant's ``models`` limit for a model nothing configured serves (not in
      ``models``, their aliases or an upstream's models) never applies if the name is a
      typo. Not refused, since agents add models at run time."""
    said = []
    if not settings.auth.enabled:
        keys = sum(len(t.keys) + len(t.key_sha256) for t in tenants)
        ignored = (f"; the keys and limits of the {len(tenants)} configured tenant"
                   f"{'s' if len(tenants) != 1 else ''} ({keys} key{'s' if keys != 1 else ''})"
                   " are ignored") if tenants else ""
        said.append("auth.enabled is false: /v1 is open to any client that reaches the HTTP "
                    f"port, each served as tenant 'anonymous'{ignored}")
    known = {name for m in settings.models for name in (m.name, *m.aliases)}
    known |= {name for u in settings.upstreams for name in u.models}
    for t in tenants:
        for model in t.models:
            if model not in known:
                said.append(f"auth.tenants[{t.name}].models: {model!r} is no configured "
                            "model (not in models, their aliases or an upstream's models): "
                            "its limits apply only if an agent serves a model of that name")
    return said


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or a wildcard ("" / "0.0.0.0" parse; names do not)
        return False
