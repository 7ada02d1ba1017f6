"""Everything a request handler or servicer needs, built once from the settings.

:func:`build` is the one place the core objects are wired together (no singletons, no
import-time work); the HTTP app and the gRPC server share one :class:`Services`, so the
registry the agents feed is the one the router reads. Resources that need the event loop
(the upstream session, Redis, the probe task) are started by the app's ``cleanup_ctx``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
import pydantic
from prometheus_client import CollectorRegistry

from controlplane import config, metrics
from controlplane.adapters import hf_tokenizer, redis_fanout, upstream
from controlplane.adapters import node_embed as node_embed_mod
from controlplane.api import fleet_wiring, route_accuracy
from controlplane.core import access_log as access_log_mod
from controlplane.core import (
    cache_feedback,
    cache_port,
    cache_salt,
    catalog,
    dispatch,
    ledger,
    prefix_index,
    ratelimit,
    registry,
    request_ids,
    response_cache,
    tenant_lru,
    types,
    upstream_kinds,
    validation,
)
from controlplane.core import fairness as fairness_mod
from controlplane.core import fleet as fleet_mod
from controlplane.core import loop_share as loop_share_mod
from controlplane.core import response_pins as pins_mod
from controlplane.core import router as router_mod
from controlplane.core import stats as stats_mod
from controlplane.core import tenants as tenants_mod
from controlplane.settings import tenants as tenant_settings
from synapse_common import bearer_token
from synapse_common import clock as clocks
from synapse_common import settings as settings_mod
from synapse_common import tracing as tracing_mod

if TYPE_CHECKING:
    from controlplane.api import readiness as readiness_mod

log = logging.getLogger("synapse.controlplane")


@dataclasses.dataclass
class Services:
    settings: config.ControlPlaneSettings
    clock: clocks.Clock
    replica: str
    registry: registry.Registry
    ledger: ledger.Ledger
    router: router_mod.Router
    catalog: catalog.Catalog
    tenants: tenants_mod.TenantTable
    limiter: ratelimit.RateLimiter
    local_limits: ratelimit.LocalStore
    metrics: metrics.Metrics
    stats: stats_mod.Stats
    cache: cache_port.ResponseCache
    upstream: upstream.UpstreamClient
    dispatcher: dispatch.Dispatcher
    fleet: fleet_mod.FleetService   # operator intent and the reconcile loop (Admin service)
    body_limits: validation.BodyLimits  # the http.* bounds of every parsed body: body_limits()
    metrics_token_sha256: bytes | None = None   # /metrics needs this bearer token
    # the engines' prefix-cache salts, keyed (cache_salt.key_for) and memoised per tenant
    salts: cache_salt.Salts = dataclasses.field(default_factory=cache_salt.Salts)
    # False in a pod's serving worker (controlplane.workers): what the pod says once (the
    # warnings of backends whose prefix cache tenants share) its primary says
    primary: bool = True
    # the pod's serving workers' metrics sockets: /metrics then answers the pod's sum
    worker_metrics_sockets: tuple[pathlib.Path, ...] = ()   # (api.worker_metrics)
    # token limits, budgets, usage, the fair queue (built by api.fairness_wiring)
    fairness: fairness_mod.Fairness | None = None
    # Built by the api module that owns each (None until then), typed rather than kept
    # in a dict of anything.
    node_embed: node_embed_mod.NodeEmbedClient | None = None   # app: the Node.Embed client
    tracing: tracing_mod.Tracing | None = None              # ops (None: tracing off)
    access_log: access_log_mod.AccessLog | None = None      # ops
    readiness: readiness_mod.State | None = None            # readiness
    upload_session: aiohttp.ClientSession | None = None     # audio: streamed uploads
    response_pins: pins_mod.Pins | None = None              # passthrough
    stats_fanout: redis_fanout.Fanout | None = None         # fleet_stats, with redis.url
    # each tenant's turns on this process's event loop (api.serving.take_turn); build()
    # gives each configured tenant its share
    loop_share: loop_share_mod.LoopShare = dataclasses.field(
        default_factory=loop_share_mod.LoopShare)
    # Metric children by (metric name, *labels), so the hot path skips labels() lookups.
    label_cache: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict)

    def new_request_id(self) -> str:
        """A fresh random id, unrelated to every other (:mod:`request_ids` says why)."""
        return request_ids.new()

    def sharers(self) -> list[tenants_mod.Tenant]:
        """The tenants whose allow-lists say who shares an unsalted backend's prefix
        cache (:func:`cache_salt.sharing`); none while authentication is off (every
        caller is then one tenant)."""
        return self.tenants.tenants() if self.tenants.enabled else []

    def salt_for(self, tenant: str, client_salt: object = None) -> str:
        """The engines' prefix-cache salt of ``tenant``'s requests (:mod:`cache_salt`)."""
        return self.salts.for_tenant(tenant, client_salt)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: the lookup costs more than the update (a
        counter's or histogram's child as :func:`controlplane.metrics.fast` gives it)."""
        key = (metric._name, *labels)
        child = self.label_cache.get(key)
        if child is None:
            if len(self.label_cache) > 50_000:  # label sets are bounded; guards a leak
                self.label_cache.clear()
            child = self.label_cache[key] = metrics.fast(metric.labels(*labels))
        return child


def _tenant_settings(auth: config.AuthSettings) -> list[config.TenantSettings]:
    tenants = list(auth.tenants)
    if auth.key_file:
        path = pathlib.Path(auth.key_file)
        try:   # the problem and its line, never PyYAML's snippet of the file (its keys)
            data = settings_mod.load_yaml(path, f"auth.key_file: {path}") or []
        except settings_mod.ConfigError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(data, dict):
            data = data.get("tenants", [])
        if not isinstance(data, list):
            raise ValueError(f"auth.key_file: {path} must hold a list of tenants")
        for i, item in enumerate(data):
            try:
                tenants.append(config.TenantSettings.model_validate(item))
            except pydantic.ValidationError as exc:     # one line, no key quoted
                raise ValueError(f"auth.key_file: {path}: tenant {i}: "
                                 f"{settings_mod.describe(exc, config.TenantSettings)}") from None
            except Exception as exc:
                raise ValueError(f"auth.key_file: {path}: tenant {i}: "
                                 f"{type(exc).__name__}") from None
    return tenants


def build_tenants(auth: config.AuthSettings, cat: catalog.Catalog,
                  configured: list[config.TenantSettings]) -> tenants_mod.TenantTable:
    """The tenant table of ``configured`` (:func:`_tenant_settings` of ``auth``)."""
    entries = []
    for t in configured:
        hashes = [*t.key_sha256, *(tenants_mod.sha256_hex(k.get_secret_value())
                                   for k in t.keys)]
        tenant = tenants_mod.Tenant(
            t.name, tenants_mod.resolve_allowed(t.allowed_models, cat.canonical),
            t.requests_per_second, t.burst, t.max_concurrent)
        entries.append((tenant, hashes))
    admin = tenants_mod.sha256_hex(auth.admin_key.get_secret_value()) if auth.admin_key else None
    return tenants_mod.TenantTable(entries, admin, enabled=auth.enabled,
                                   admin_tenant=auth.admin_tenant)


def tiered_cache(cache: cache_port.ResponseCache) -> response_cache.TieredCache | None:
    """The tiered cache behind ``cache`` (itself, or the one feedback wraps); None for
    another cache (off, a test's)."""
    inner = cache.inner if isinstance(cache, cache_feedback.FeedbackCache) else cache
    return inner if isinstance(inner, response_cache.TieredCache) else None


def tenant_count(table: tenants_mod.TenantTable) -> int:
    """How many tenants the per-tenant tables (the in-process L1, the router's sessions,
    the Responses pins, the tokenizers' memos: :mod:`tenant_lru`) split their bounds
    between: the configured tenants, or one when authentication is off (every caller is
    then the same tenant)."""
    return max(1, len(table.tenants())) if table.enabled else 1


def body_limits(http: config.HttpSettings) -> validation.BodyLimits:
    """The bounds every request body is parsed under (``validation.parse_json``): each
    field the ``http`` setting of its name, so a bound cannot be missed or crossed here."""
    return validation.BodyLimits(**{field.name: getattr(http, field.name)
                                    for field in dataclasses.fields(validation.BodyLimits)})


def metrics_token(settings: config.MetricsSettings) -> bytes | None:
    """The sha256 of the token in ``metrics.bearer_token_file`` (a ValueError naming the
    field when it cannot be read or is empty)."""
    return bearer_token.read_digest(settings.bearer_token_file, "metrics.bearer_token_file")


def static_backends(settings: config.ControlPlaneSettings, cat: catalog.Catalog,
                    table: tenants_mod.TenantTable | None = None, *,
                    warn: bool = True) -> list[types.BackendState]:
    """The configured upstreams, each marked when the tenants of ``table`` share its
    prefix cache (:func:`cache_salt.sharing`; warned of here when ``warn``, for a kind
    that takes no salt: once its ``/openapi.json`` was read for a kind-less one)."""
    users = table.tenants() if table is not None and table.enabled else []
    backends = [cache_salt.marked(b, users) for b in _static(settings, cat)]
    for b in backends:
        if warn and b.shares_cache and not cache_salt.learns(b):
            log.warning("%s", cache_salt.warning(b, cache_salt.sharing(b, users)))
    return backends


def _static(settings: config.ControlPlaneSettings,
            cat: catalog.Catalog) -> list[types.BackendState]:
    return [types.BackendState(
        key=f"static/{u.name}", node="static", name=u.name,
        url=upstream_kinds.base_url(u.url),
        models=tuple(cat.canonical(m) for m in u.models), task=u.task,
        tasks=frozenset(u.tasks), source="static",
        api_key=u.api_key.get_secret_value() if u.api_key else None, engine=u.kind or "",
        max_num_seqs=u.max_num_seqs or 0,
        upstream_models=tuple((cat.canonical(m), theirs) for m, theirs in u.model_names.items()))
        for u in settings.upstreams]


def build(settings: config.ControlPlaneSettings, *, clock: clocks.Clock = clocks.monotonic,
          metrics_registry: CollectorRegistry | None = None,
          response_cache: cache_port.ResponseCache | None = None,
          commands_agents: bool = True) -> Services:
    """Wire the core objects; raises ValueError with a field name on a bad key file.

    ``commands_agents`` False: a pod's serving worker, which applies operator intent but
    leaves commanding the agents, and the warnings said once per pod, to the pod's
    primary (:mod:`controlplane.workers`)."""
    replica = settings.replica_id or socket.gethostname()
    cat = catalog.Catalog(catalog.ModelEntry(m.name, tuple(m.aliases), tuple(m.fallbacks))
                          for m in settings.models)
    nodes = settings.registry
    reg = registry.Registry(clock, nodes.node_down_after_s, max_nodes=nodes.max_nodes,
                            forget_down_after_s=nodes.forget_down_after_s,
                            max_nodes_per_origin=nodes.max_nodes_per_address)
    led = ledger.Ledger(clock)
    r = settings.router
    params = router_mod.Params(r.policy, r.block_size, r.prefill_seconds_per_token,
                               r.decode_seconds_per_step, r.session_affinity, r.learn_costs)
    tokenizers = hf_tokenizer.from_settings(settings.models, cat.canonical)
    rtr = router_mod.Router(params, reg, led, prefix_index.PrefixIndex(r.prefix_index_max_blocks),
                            tokenizers)
    m = metrics.Metrics(metrics_registry or CollectorRegistry())
    rtr.add_observer(route_accuracy.recorder(m))
    configured = _tenant_settings(settings.auth)
    tenants = build_tenants(settings.auth, cat, configured)
    reg.set_static(static_backends(settings, cat, tenants, warn=commands_agents))
    if short := tenant_settings.short_secrets(settings.auth, configured):
        log.warning("%s: shorter than %d characters, so it can be guessed by trying every "
                    "key (one request each); use at least %d random characters",
                    ", ".join(short), tenant_settings.MIN_KEY, tenant_settings.MIN_KEY)
    shares = tenant_count(tenants)
    rtr.sessions = tenant_lru.TenantLRU(router_mod.SESSION_MEMORY, shares)
    tokenizers.keep_memos(shares)
    local = ratelimit.LocalStore(clock)
    h = settings.http
    client = upstream.UpstreamClient(h.upstream_connect_timeout_s,
                                     h.upstream_first_byte_timeout_s, h.upstream_idle_timeout_s)
    policy = dispatch.Policy(r.max_attempts, h.upstream_first_byte_timeout_s,
                             h.upstream_idle_timeout_s, h.upstream_deadline_s)
    return Services(
        settings=settings, clock=clock, replica=replica, registry=reg, ledger=led, router=rtr,
        catalog=cat, tenants=tenants, response_pins=pins_mod.Pins(tenants=shares),
        loop_share=loop_share_mod.LoopShare(
            {t.name: t.weight for t in configured} if tenants.enabled else None),
        limiter=ratelimit.RateLimiter(local), local_limits=local, metrics=m,
        stats=stats_mod.Stats(clock, replica),
        cache=response_cache if response_cache is not None else cache_port.NullCache(),
        upstream=client, dispatcher=dispatch.Dispatcher(client, rtr, cat, reg, m, policy,
                                                        clock=clock),
        metrics_token_sha256=metrics_token(settings.metrics),
        salts=cache_salt.Salts(cache_salt.key_for(settings.auth.agent_token_value), shares),
        primary=commands_agents,
        fleet=fleet_wiring.build(settings, reg, led, m, pushes=commands_agents),
        body_limits=body_limits(h))
