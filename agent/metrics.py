"""Every metric the agent exports on ``/metrics``, defined here and nowhere else.

``Metrics(registry)`` registers them on a registry of the caller's choosing. Dashboards
and alert rules use these names only; a test collects them from a fresh registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

GPU_LABELS = ["node", "gpu", "uuid"]
BACKEND_LABELS = ["node", "backend", "model"]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.gpu_utilization = Gauge(
            "synapse_agent_gpu_utilization_percent", "GPU utilisation (NVML).", GPU_LABELS,
            registry=r)
        self.gpu_memory_used = Gauge(
            "synapse_agent_gpu_memory_used_bytes", "GPU memory used.", GPU_LABELS, registry=r)
        self.gpu_memory_total = Gauge(
            "synapse_agent_gpu_memory_total_bytes", "GPU memory total.", GPU_LABELS, registry=r)
        self.gpu_temperature = Gauge(
            "synapse_agent_gpu_temperature_celsius", "GPU temperature.", GPU_LABELS, registry=r)
        self.gpu_power = Gauge(
            "synapse_agent_gpu_power_watts", "GPU power draw.", GPU_LABELS, registry=r)
        self.telemetry_ok = Gauge(
            "synapse_agent_telemetry_ok", "1 when the GPU source works, 0 when it failed.",
            ["node", "source"], registry=r)
        self.nvml_errors = Counter(
            "synapse_agent_nvml_errors_total", "NVML calls that failed (NotSupported excluded).",
            ["node"], registry=r)
        self.backend_state = Gauge(
            "synapse_agent_backend_state", "1 for the backend's current state, else 0.",
            ["node", "backend", "state"], registry=r)
        self.backend_restarts = Counter(
            "synapse_agent_backend_restarts_total", "Engine restarts by the supervisor.",
            ["node", "backend"], registry=r)
        self.engine_waiting = Gauge(
            "synapse_agent_engine_requests_waiting", "Engine queue (scraped).", BACKEND_LABELS,
            registry=r)
        self.engine_running = Gauge(
            "synapse_agent_engine_requests_running", "Engine running requests (scraped).",
            BACKEND_LABELS, registry=r)
        self.engine_kv_usage = Gauge(
            "synapse_agent_engine_kv_cache_usage_ratio", "Engine KV-cache usage 0..1.",
            BACKEND_LABELS, registry=r)
        self.engine_prefix_hit_rate = Gauge(
            "synapse_agent_engine_prefix_cache_hit_ratio", "Prefix-cache hits / queries "
            "between the last two scrapes.", BACKEND_LABELS, registry=r)
        self.engine_scrape_errors = Counter(
            "synapse_agent_engine_scrape_errors_total", "Failed engine /metrics scrapes.",
            ["node", "backend"], registry=r)
        self.embed_cache_hits = Counter(
            "synapse_agent_embedding_cache_hits_total", "Embedding cache hits.", ["node"],
            registry=r)
        self.embed_cache_misses = Counter(
            "synapse_agent_embedding_cache_misses_total", "Embedding cache misses.", ["node"],
            registry=r)
        self.embed_cache_entries = Gauge(
            "synapse_agent_embedding_cache_entries", "Embedding cache entries.", ["node"],
            registry=r)
        self.embed_cache_bytes = Gauge(
            "synapse_agent_embedding_cache_bytes", "Embedding cache size in bytes.", ["node"],
            registry=r)
        self.embed_queue_texts = Gauge(
            "synapse_agent_embed_queue_texts", "Texts waiting for the embedding model "
            "(bounded by embedder.queue_max_texts per tenant and in all; beyond it calls are "
            "RESOURCE_EXHAUSTED).",
            ["node"], registry=r)
        self.control_plane_connected = Gauge(
            "synapse_agent_control_plane_connected", "1 while the report stream to that "
            "control-plane address is up.", ["node", "address"], registry=r)
        self.embed_requests = Counter(
            "synapse_agent_embed_requests_total", "Node.Embed calls by gRPC status code.",
            ["node", "code"], registry=r)
        self.embed_latency = Histogram(
            "synapse_agent_embed_duration_seconds", "Node.Embed latency (server side).",
            ["node"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                               0.5, 1.0, 2.5, 5.0), registry=r)
        self.score_pairs_requests = Counter(
            "synapse_agent_score_pairs_requests_total",
            "Node.ScorePairs calls by gRPC status code.", ["node", "code"], registry=r)
        self.score_pairs_latency = Histogram(
            "synapse_agent_score_pairs_duration_seconds",
            "Node.ScorePairs latency (server side, queueing for the scorer included).",
            ["node"], buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                               5.0), registry=r)
        self.commands = Counter(
            "synapse_agent_commands_total", "Control-plane commands executed, by kind and "
            "outcome.", ["node", "kind", "ok"], registry=r)
