"""Control-plane settings: one pydantic root of small per-concern sections.

Parsed once in ``main()`` (see :mod:`synapse_common.settings` for the file and
``SYNAPSE_*`` rules) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import pydantic
from pydantic import Field

from controlplane.core import upstream_kinds
from synapse_common import tasks as task_names
from synapse_common.settings import LoggingSettings, Secret, Section
from synapse_common.tracing import TracingSettings


class HttpSettings(Section):
    host: str = Field("0.0.0.0", description="address the OpenAI-compatible API listens on")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 = pick a free port)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="largest request body accepted (413 above)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="largest header line")
    upstream_connect_timeout_s: float = Field(2.0, gt=0, description="connect timeout to a backend")
    upstream_first_byte_timeout_s: float = Field(
        120.0, gt=0, description="time allowed for a backend's first response byte (504 after)")
    upstream_idle_timeout_s: float = Field(
        120.0, gt=0, description="longest gap between streamed chunks before the stream is cut")
    upstream_deadline_s: float | None = Field(
        None, gt=0, description="time allowed for a request's first response byte over all "
        "its attempts, fallback models included (each attempt still has "
        "upstream_first_byte_timeout_s at most); none = router.max_attempts x "
        "upstream_first_byte_timeout_s")
    tls_cert_file: str | None = Field(None, description="PEM certificate; enables HTTPS with key")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request head (request line and headers) must arrive "
        "within this many seconds of its first byte, else the connection is closed")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this many seconds of "
        "its head (408 and the connection closed otherwise)")
    keepalive_timeout_s: float = Field(
        75.0, gt=0, description="an idle connection (kept alive, or that never sent a "
        "byte) is closed after this many seconds")
    max_json_depth: int = Field(64, ge=4, le=250,
                                description="deepest nesting of arrays and objects in a "
                                "request body (400 above)")
    max_audio_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="largest audio upload (the multipart body of "
        "/v1/audio/transcriptions and /translations, streamed to the backend, never held in "
        "memory); 413 above, at once when Content-Length says so")


class MetricsSettings(Section):
    port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port (same host as "
        "http.host) instead of the API port; none = on the API port")
    bearer_token_file: str | None = Field(
        None, description="file holding a token /metrics then requires as 'Authorization: "
        "Bearer <token>' (a Prometheus ServiceMonitor's bearerTokenSecret)")


class GrpcSettings(Section):
    host: str = Field("0.0.0.0", description="address the gRPC server (agents, Admin) listens on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free port)")
    tls_cert_file: str | None = Field(None, description="PEM certificate; enables TLS with key")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest gRPC message")


# -- fairness (issue 18): token limits, budgets, usage, priority queue, coalescing ------


class BudgetSettings(Section):
    period: Literal["day", "month"] = Field("day", description="the budget resets at the "
                                            "start of each UTC day or month")
    tokens: int | None = Field(None, ge=1, description="prompt + completion tokens per period")
    cost: float | None = Field(None, gt=0, description="spend per period, in the currency of "
                               "fairness.prices")

    @pydantic.model_validator(mode="after")
    def _one_unit(self) -> BudgetSettings:
        if (self.tokens is None) == (self.cost is None):
            raise ValueError("a budget sets exactly one of tokens or cost")
        return self


class TokenLimitSettings(Section):
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + completion tokens per minute (completion counted "
        "from max_tokens at admission, settled from usage); none = unlimited")
    budget: BudgetSettings | None = Field(None, description="tokens or cost per day / month")


class TenantSettings(Section):
    name: str = Field(..., min_length=1, description="tenant id (cache scope, rate limits)")
    key_sha256: list[str] = Field(default_factory=list,
                                  description="sha256 hex digests of this tenant's API keys")
    keys: list[Secret] = Field(default_factory=list,
                               description="API keys as secrets ({env: X} / {file: P} / literal)")
    allowed_models: list[str] = Field(default_factory=list,
                                      description="canonical models or aliases; empty = all")
    requests_per_second: float | None = Field(None, gt=0, description="rate limit; none = unlimited")
    burst: int | None = Field(None, ge=1, description="bucket size (default: 2 x rate)")
    max_concurrent: int | None = Field(None, ge=1, description="concurrent requests limit")
    # fairness (issue 18)
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + completion tokens per minute over all models "
        "(completion counted from max_tokens at admission, settled from usage)")
    budget: BudgetSettings | None = Field(None, description="tokens or cost per day / month "
                                          "over all models")
    models: dict[str, TokenLimitSettings] = Field(
        default_factory=dict, description="limits for one model (name or alias), on top of "
        "the tenant's own")
    priority: str = Field("interactive", min_length=1,
                          description="priority class (one of fairness.queue.classes)")
    weight: float = Field(1.0, gt=0, le=1000, description="share of its class when queued "
                          "(weighted fair queuing by tokens)")
    priority_header: bool = Field(
        False, description="let requests choose their class with the fairness.queue.header "
        "header (any configured class)")


class AuthSettings(Section):
    enabled: bool = Field(True, description="require a Bearer key on /v1 and admin routes")
    admin_key: Secret | None = Field(None, description="key for admin HTTP routes and Admin gRPC")
    tenants: list[TenantSettings] = Field(default_factory=list, description="API tenants")
    key_file: str | None = Field(
        None, description="YAML/JSON file with a list of tenants (same fields), merged in")
    admin_tenant: str | None = Field(
        None, description="the tenant (by name) the admin key acts as on /v1, with its "
        "allow-list and limits; none = the admin key is refused on /v1")
    agent_token: Secret | None = Field(
        None, description="token shared with the agents (their control_plane.token): they "
        "present it on ControlPlane.Connect, the control plane on every Node call")
    allow_unauthenticated_agents: bool = Field(
        False, description="without agent_token, let any client reaching the gRPC port "
        "register as an agent (and receive tenants' prompts). Without agent_token, a "
        "grpc.host other than loopback does not start unless this is true")

    @property
    def agent_token_value(self) -> str | None:
        return self.agent_token.get_secret_value() if self.agent_token else None


class ModelSettings(Section):
    name: str = Field(..., min_length=1, description="canonical model name")
    aliases: list[str] = Field(default_factory=list, description="other names clients may use")
    fallbacks: list[str] = Field(default_factory=list,
                                 description="models to use, in order, when none of this one can serve")
    cache_target_precision: float | None = Field(
        None, gt=0, lt=1, description="verifier operating point for this model (default: cache's)")
    memory_required_gb: float | None = Field(None, gt=0,
                                             description="VRAM an engine of it needs (placement)")
    tokenizer: str | None = Field(
        None, min_length=1, description="the model's tokenizer for prefix routing: its HF "
        "directory (tokenizer.json, tokenizer_config.json, chat template) or tokenizer.json; "
        "none = the shared approximation")


class UpstreamSettings(Section):
    name: str = Field(..., min_length=1, description="backend name in headers and metrics")
    url: str = Field(..., pattern=r"^https?://", description="OpenAI-compatible base URL, "
                     "with or without the trailing /v1 (http://h:8000 and http://h:8000/v1 "
                     "are the same server)")
    models: list[str] = Field(..., min_length=1, description="models it serves (canonical "
                              "names or aliases)")
    kind: upstream_kinds.KindName | None = Field(
        None, description="the server: vllm, sglang, tgi, llamacpp, ollama, or openai (a "
        "hosted OpenAI-compatible API with a key). It decides the health probe (Ollama: "
        "/api/version; openai: GET /v1/models with the key) and the metrics read (none for "
        "ollama and openai); none = probe health_path, read no metrics")
    model_names: dict[str, str] = Field(
        default_factory=dict, description="the upstream's own name for a model it serves "
        "(model or alias -> its name, e.g. {llama: 'llama3.1:8b'}): requests carry the "
        "upstream's name, answers the name the client asked for")
    api_key: Secret | None = Field(None, description="key sent to the upstream as "
                                   "'Authorization: Bearer <key>' (never logged)")
    health_path: str = Field("/health", description="probed for health (2xx = healthy) when "
                             "no kind is set")
    probe_interval_s: float | None = Field(
        None, gt=0, description="how often its health is probed; none = "
        "registry.upstream_probe_interval_s, and for kind openai at most once a minute")
    task: Literal["generate", "embed"] = Field("generate", description="what it serves")
    tasks: list[str] = Field(
        default_factory=list, description="every API it serves (generate, responses, "
        "messages, tokenize, rerank, score, transcription, embed, speech; the paths of each "
        "are in synapse_common.tasks); empty = task alone. A vLLM serves generate, responses, "
        "messages and tokenize; Synapse translates /v1/messages to chat for one that does not")

    @pydantic.field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        return list(task_names.check(value))

    @pydantic.model_validator(mode="after")
    def _mapped_models_are_served(self) -> UpstreamSettings:
        for name in self.model_names:
            if name not in self.models:
                raise ValueError(f"model_names: {name!r} is not one of this upstream's models "
                                 f"{self.models}")
        return self


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


class RedisSettings(Section):
    url: Secret | None = Field(None, description="redis:// URL; none = in-process state")
    timeout_s: float = Field(0.05, gt=0, description="per-call budget")


class CacheSettings(Section):
    enabled: bool = Field(True, description="response cache on/off")
    ttl_s: float = Field(3600.0, gt=0, description="absolute lifetime of an entry")
    temperature_ceiling: float = Field(0.7, ge=0, description="above this, no caching")
    default_temperature: float = Field(
        1.0, ge=0, description="temperature assumed when a request sets none (the backends' "
        "default, 1.0 for OpenAI and vLLM); compared with temperature_ceiling")
    l1_max_entries: int = Field(100_000, ge=1, description="in-process L1 bound (entries)")
    l1_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="in-process L1 bound (bytes)")
    l1_budget_ms: float = Field(20.0, gt=0, description="time budget of an L1 call")
    l1_persist: bool = Field(
        True, description="keep the in-process L1 in data_dir/l1.sqlite (written behind, read "
        "back at start), so a restart keeps its entries and L2's semantic entries servable")
    semantic_enabled: bool = Field(True, description="L2 semantic cache on/off")
    semantic_budget_ms: float = Field(100.0, gt=0, description="time budget of embed + L2 search")
    milvus_uri: Secret | None = Field(None,
                                      description="Milvus URI or Milvus Lite file; none = data_dir/l2.db")
    milvus_token: Secret | None = Field(None, description="Milvus token")
    collection: str = Field("synapse_cache", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                            description="Milvus collection the control plane owns")
    l2_mirror_max_rows: int = Field(
        100_000, ge=0, description="rows of searched L2 scopes kept in memory and searched "
        "with numpy instead of a Milvus call (0 = always ask Milvus)")
    l2_mirror_refresh_s: float = Field(
        5.0, gt=0, description="how often a mirrored scope picks up other replicas' writes")
    l2_expiry_interval_s: float = Field(
        60.0, gt=0, description="how often L2 rows older than ttl_s are deleted from Milvus "
        "(searches skip them at once)")
    top_k: int = Field(5, ge=1, le=50, description="candidates the verifier scores")
    embed_model: str = Field("sentence-transformers/all-MiniLM-L6-v2",
                             description="model asked of Node.Embed")
    verifier_path: str | None = Field(None, description="verifier JSON; none = the shipped one")
    embedder_id: str | None = Field(
        None, description="the embedder id the agents serve (Node.Embed), which the verifier "
        "must have been fitted for; none = the shipped tuned embedder's (the agents' default "
        "embedder.tuning)")
    feedback_path: str | None = Field(
        None, description="JSON-lines file where judged semantic hits (POST /v1/cache/"
        "feedback) are kept for calibrate --from-feedback; none = data_dir/cache_feedback.jsonl")
    feedback_remember: int = Field(
        10_000, ge=1, description="request ids answered from the cache remembered per tenant "
        "for feedback (the oldest are forgotten first)")
    target_precision: float = Field(0.90, gt=0, lt=1, description="default operating point")


class PriceSettings(Section):
    prompt_per_million: float = Field(0.0, ge=0, description="price of a million prompt tokens")
    completion_per_million: float = Field(0.0, ge=0,
                                          description="price of a million completion tokens")
    cached_prompt_per_million: float | None = Field(
        None, ge=0, description="price of a million prompt tokens the engine had cached "
        "(none = the prompt price)")


class UsageSettings(Section):
    enabled: bool = Field(True, description="account usage per tenant x model x day")
    flush_interval_s: float = Field(1.0, gt=0, description="how often this replica adds its "
                                    "counts to Redis (reads may lag by this much)")
    retention_days: int = Field(62, ge=1, le=3660, description="days of usage kept")


class QueueSettings(Section):
    enabled: bool = Field(False, description="hold requests in a fair queue when the chosen "
                          "backends are saturated, instead of sending them on")
    max_queue_wait_s: float = Field(
        0.1, ge=0, description="queue when the best backend's predicted queue wait (the "
        "prefill the router predicts queued ahead of the request there) is above this many "
        "seconds")
    deadline_s: float = Field(30.0, gt=0, description="longest a request waits in the queue "
                              "(then 503 with Retry-After)")
    max_waiting: int = Field(10_000, ge=1, description="requests waiting per model at most "
                             "(503 above)")
    max_waiting_per_tenant: int = Field(1000, ge=1, description="requests one tenant may have "
                                        "waiting per model (429 above)")
    classes: list[str] = Field(["interactive", "batch"], min_length=1,
                               description="priority classes, highest first (strict priority)")
    header: str = Field("x-synapse-priority", min_length=1, description="request header "
                        "naming a class, honoured for tenants with priority_header")
    poll_interval_s: float = Field(0.05, gt=0, description="how often a non-empty queue "
                                   "re-reads the predictions when nothing finished")


class FairnessSettings(Section):
    prices: dict[str, PriceSettings] = Field(
        default_factory=dict, description="per model (name or alias): prices for cost "
        "budgets and usage")
    default_completion_tokens: int = Field(
        256, ge=1, description="completion tokens charged at admission when a request sets "
        "no max_tokens (settled from usage)")
    usage: UsageSettings = Field(default_factory=UsageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    coalesce: bool = Field(True, description="identical cacheable requests in flight at once "
                           "wait for the first one and are answered from it")


# -- operations (issue 19): access log, fleet-wide stats; tracing is synapse_common's ----


class AccessLogSettings(Section):
    enabled: bool = Field(True, description="one line per API request at info level "
                          "(logger synapse.access; JSON fields under --log-format json)")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of requests logged "
                                "(chosen by a hash of the request id)")
    sample_errors: bool = Field(False, description="sample errors (5xx, a cut stream) like "
                                "the rest; false = always log them")


class StatsSettings(Section):
    fleet_timeout_s: float = Field(
        1.0, gt=0, le=30, description="how long /api/v1/stats and synapsectl stats wait "
        "for the other replicas' figures (through redis.url; without it, this replica's)")


class AdminSettings(Section):
    enabled: bool = Field(True, description="serve the Admin gRPC service")


class ControlPlaneSettings(Section):
    replica_id: str = Field("", description="replica name in logs/headers (default: hostname)")
    data_dir: str = Field("./.synapse", description="where embedded state (Milvus Lite) lives")
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
    machines: no ``auth.agent_token``, no explicit ``auth.allow_unauthenticated_agents``,
    and a ``grpc.host`` other than loopback. A registered agent receives tenants' prompts.
    (Checked at start-up, not when loading: the defaults load, they just do not start.)"""
    auth = settings.auth
    if auth.agent_token is not None or auth.allow_unauthenticated_agents \
            or _loopback(settings.grpc.host):
        return None
    return (f"auth.agent_token: required when grpc.host is {settings.grpc.host!r} (reachable "
            "from other machines): without it anything that reaches the gRPC port can "
            "register as an agent and receive tenants' prompts. Set it (the agents' "
            "control_plane.token), or auth.allow_unauthenticated_agents: true")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or a wildcard ("" / "0.0.0.0" parse; names do not)
        return False
