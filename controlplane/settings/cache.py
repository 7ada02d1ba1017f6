"""Response-cache settings (L1, L2 semantic cache, verifier, feedback) and Redis."""

from __future__ import annotations

from pydantic import Field

from synapse_common.settings import Secret, Section

# The schemes the Redis client takes (redis-py's parse_url); any other is refused at start
# (controlplane.config.redis_url_problem).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class RedisSettings(Section):
    url: Secret | None = Field(None, description="redis://, rediss:// or unix:// URL; none = "
                               "in-process state")
    timeout_s: float = Field(0.05, gt=0, description="per-call budget")


class CacheSettings(Section):
    enabled: bool = Field(True, description="response cache on/off")
    ttl_s: float = Field(3600.0, gt=0, description="absolute lifetime of an entry")
    temperature_ceiling: float = Field(0.7, ge=0, description="above this, no caching")
    default_temperature: float = Field(
        1.0, ge=0, description="temperature assumed when a request sets none (the backends' "
        "default, 1.0 for OpenAI and vLLM); compared with temperature_ceiling")
    l1_max_entries: int = Field(100_000, ge=1, description="in-process L1 bound (entries), "
                                "split equally between the configured tenants")
    l1_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="in-process L1 bound "
                              "(bytes), split equally between the configured tenants")
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
    pair_scorer: bool = Field(
        True, description="judge semantic candidates with the shipped verifier stacked on "
        "the agents' pair scorer (controlplane/core/verifier_default_stack.json; agents "
        "serve it with embedder.pair_scorer: shipped, their default): more paraphrases "
        "served at the same precision, one cross-encoder pass per lookup with a candidate "
        "worth scoring (two when the best is refused); without a scorer answering, the "
        "verifier decides alone. With verifier_path the file decides (a file with a stack "
        "uses it). false: the verifier alone, no ScorePairs calls")
    embedder_id: str | None = Field(
        None, description="the embedder id the agents serve (Node.Embed), which the verifier "
        "must have been fitted for; none = the untuned all-MiniLM-L6-v2's (the agents' "
        "default embedder.tuning: none)")
    feedback_path: str | None = Field(
        None, description="where judged semantic hits (POST /v1/cache/feedback) are kept "
        "for calibrate --from-feedback (give it this path): one JSON-lines file per tenant "
        "in the folder <feedback_path>.tenants; none = data_dir/cache_feedback.jsonl")
    feedback_remember: int = Field(
        10_000, ge=1, description="request ids answered from the cache remembered per tenant "
        "for feedback (the oldest are forgotten first)")
    target_precision: float = Field(0.90, gt=0, lt=1, description="default operating point")
