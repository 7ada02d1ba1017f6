"""Agent settings: one pydantic root of small per-concern sections.

Parsed once in ``main()`` (see :mod:`synapse_common.settings` for the file and
``SYNAPSE_*`` rules) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Literal

import pydantic
from pydantic import Field

from synapse_common import bearer_token, capped_log, engines
from synapse_common import settings as common
from synapse_common.settings import LoggingSettings, Secret, Section, TaskList, tasks_field
from synapse_common.tracing import TracingSettings


def _vllm_command() -> list[str]:
    """vLLM's OpenAI server (the entry point of vLLM's own images): the engine tier's venv
    when ``make engines`` installed it, else the agent's own interpreter (GPU images install
    vLLM beside the agent). Model and flags follow."""
    tier = engines.find()
    if tier.vllm_python is not None:
        return tier.vllm_command()
    return [sys.executable, "-m", engines.VLLM_SERVER_MODULE]


def _synapse_script() -> str:
    """Our own ``synapse`` script beside this interpreter (a venv need not be on PATH)."""
    beside = pathlib.Path(sys.executable).parent / "synapse"
    return str(beside) if beside.exists() else "synapse"


class ControlPlaneLink(Section):
    addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1:50051"],
                                 description="host:port of each control-plane replica")
    dns_name: str | None = Field(None, description="headless Service host:port; every A record is dialled")
    report_interval_s: float = Field(2.0, gt=0, description="report period (and on every change)")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(15.0, gt=0, description="reconnect delay cap")
    keepalive_s: float = Field(20.0, gt=0, description="gRPC keepalive ping period")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="keepalive ack deadline")
    dns_refresh_s: float = Field(30.0, gt=0, description="re-resolve dns_name this often")
    connect_timeout_s: float = Field(5.0, gt=0, description="deadline to open a channel")
    tls_ca_file: str | None = Field(None, description="CA bundle to verify the control plane")
    token: Secret | None = Field(None, description="token sent to the control plane")
    token_file: str | None = Field(
        None, description="file holding the token sent to the control plane, read again "
        "before every connection (a Kubernetes projected service-account token, which "
        "rotates); instead of token")

    @pydantic.model_validator(mode="after")
    def _one_token(self) -> ControlPlaneLink:
        if self.token is not None and self.token_file is not None:
            raise ValueError("token, token_file: set one of them, not both")
        return self

    @property
    def authenticates(self) -> bool:
        """Whether the agent presents a token of its own to the control plane."""
        return self.token is not None or self.token_file is not None

    def token_value(self) -> str | None:
        """The token to present now (token_file read again:
        :class:`synapse_common.bearer_token.TokenFileError` when it cannot be)."""
        if self.token_file is not None:
            return bearer_token.read(self.token_file, "control_plane.token_file")
        return self.token.get_secret_value() if self.token is not None else None


class GrpcSettings(Section):
    host: str = Field("0.0.0.0", description="Node gRPC service address")
    port: int = Field(50052, ge=0, le=65535, description="Node gRPC port (0 = pick)")
    advertise_address: str | None = Field(
        None, description="host:port the control plane dials for Node.Embed (default: node IP)")
    allow_unauthenticated: bool = Field(
        False, description="serve Node calls that carry no token (only when "
        "control_plane.token is unset); their tenant cannot be trusted, so they bypass the "
        "embedding cache. Off: without a token every Node call is UNAUTHENTICATED")
    tls_cert_file: str | None = Field(
        None, description="PEM certificate of the Node service; with tls_key_file the port "
        "serves TLS only (the control plane's grpc.node_ca_file must have signed it, and it "
        "must carry the control plane's grpc.node_server_name). Kubelet's gRPC probes do "
        "not speak TLS: probe /healthz on the metrics port instead")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file")
    tls_self_signed: bool = Field(
        False, description="serve the Node port with TLS from a key and a self-signed "
        "certificate (name synapse-agent) made at every start and held in memory only, and "
        "send the certificate in Register: the control plane then trusts that certificate "
        "alone for this node (no CA, no certificate shared between nodes). Exclusive with "
        "tls_cert_file / tls_key_file")

    @pydantic.model_validator(mode="after")
    def _tls_pair(self) -> GrpcSettings:
        common.tls_both_or_neither(self.tls_cert_file, self.tls_key_file)
        if self.tls_self_signed and (self.tls_cert_file or self.tls_key_file):
            raise ValueError("tls_self_signed: exclusive with tls_cert_file / tls_key_file "
                             "(the Node port serves one certificate: the one the agent makes "
                             "at start, or the files')")
        return self


class MetricsSettings(Section):
    host: str = Field("0.0.0.0", description="/metrics address")
    port: int = Field(9102, ge=0, le=65535, description="/metrics port (0 = pick)")
    bearer_token_file: str | None = Field(
        None, description="file holding a token /metrics then requires as 'Authorization: "
        "Bearer <token>' (a Prometheus PodMonitor's authorization); read at start. Without "
        "it /metrics, whose gauges name the models and their running and waiting requests, "
        "is open to whoever reaches the port. /healthz needs no token")


class FakeGpu(Section):
    name: str = Field("Simulated GPU 80GB", description="reported device name")
    memory_total_gb: float = Field(80.0, gt=0, description="device memory")
    memory_used_gb: float | None = Field(None, ge=0, description="memory in use besides the "
                                         "agent's engines (none: a slow wave, 30-90%)")


class TelemetrySettings(Section):
    source: Literal["nvml", "fake"] = Field("nvml", description="GPU source; fake only on request")
    fake_gpus: list[FakeGpu] = Field(default_factory=lambda: [FakeGpu()],
                                     description="GPUs the fake source reports")
    interval_s: float = Field(2.0, gt=0, description="sampling period")


class BackendSettings(Section):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$", description="unique on this node")
    engine: Literal["vllm", "tei", "simulator", "external"] = Field(..., description="engine kind")
    model: str = Field(..., min_length=1, description="model id / path")
    served_model_names: list[str] = Field(default_factory=list, description="names clients use")
    port: int | None = Field(None, ge=1, le=65535, description="engine port (default: allocated)")
    url: str | None = Field(None, description="external: base URL to probe")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: fraction of VRAM")
    max_model_len: int | None = Field(None, ge=16, description="vllm: --max-model-len")
    extra_args: list[str] = Field(default_factory=list, description="appended to the command")
    gpu_indices: list[int] = Field(default_factory=list, description="CUDA_VISIBLE_DEVICES")
    memory_required_gb: float | None = Field(None, gt=0, description="declared VRAM need")
    task: Literal["generate", "embed"] = Field("generate", description="what the engine serves")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")
    tasks: TaskList = tasks_field(
        "what the engine's /openapi.json lists, else task. E.g. a vLLM reranker: [rerank, "
        "score, tokenize]; a Whisper server: [transcription]; a speech server: [speech]")
    own_port: bool = Field(True, description=(
        "the engine process the agent starts listens on port itself; false for a wrapper "
        "such as docker run, whose engine listens elsewhere: then any answer on the port "
        "counts, as before"))

    @pydantic.model_validator(mode="after")
    def _external_needs_url(self) -> BackendSettings:
        if self.engine == "external" and not self.url:
            raise ValueError("url is required when engine is external")
        return self


CRASHLOOP_RETRY_S = 300.0     # a crash loop's default retry period, in seconds


class SupervisorSettings(Section):
    log_dir: str = Field("./.synapse/agent-logs", description="engine stdout/stderr files")
    log_max_bytes: int = Field(capped_log.MAX_BYTES, ge=4096, description="size cap of each log file")
    log_tail_lines: int = Field(50, ge=0, description="last lines kept in memory")
    startup_deadline_s: float = Field(600.0, gt=0, description="time allowed to become ready")
    warmup_timeout_s: float = Field(
        180.0, ge=0, description="vLLM that generates: bound on the one warm-up request "
        "asking for logprobs sent before it is reported ready (vLLM compiles a kernel on "
        "the first such request and stalls every request meanwhile); past it, or when the "
        "engine refuses the request, the backend is ready anyway; 0: none sent")
    probe_interval_s: float = Field(2.0, gt=0, description="liveness probe period")
    probe_timeout_s: float = Field(2.0, gt=0, description="liveness probe timeout")
    unhealthy_after: int = Field(3, ge=1, description="failed probes before unhealthy")
    backoff_initial_s: float = Field(1.0, gt=0, description="first restart delay")
    backoff_max_s: float = Field(60.0, gt=0, description="restart delay cap")
    crashloop_restarts: int = Field(5, ge=1, description="restarts in the window → crashloop")
    crashloop_window_s: float = Field(600.0, gt=0, description="crash-loop window")
    crashloop_retry_s: float | None = Field(
        None, gt=0, description="retry period of a crash-looping engine (each retry loads "
        "its model again); at least backoff_max_s; none: the larger of 300 and backoff_max_s")
    drain_grace_s: float = Field(120.0, ge=0, description="wait for in-flight work on SIGTERM")
    stop_grace_s: float = Field(15.0, ge=0, description="SIGTERM → SIGKILL delay for engines")
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    simulator_command: list[str] = Field(default_factory=lambda: [_synapse_script(), "simulator"],
                                         description="how to start the engine simulator")
    vllm_command: list[str] = Field(default_factory=_vllm_command,
                                    description="how to start vLLM's OpenAI server (--model "
                                    "and flags follow; default: the engine tier's venv, else "
                                    "this interpreter's vllm.entrypoints.openai.api_server)")
    vllm_device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where vLLM runs: auto = the CPU when NVML finds no GPU")
    vllm_cpu_kvcache_gib: float = Field(1.0, gt=0, description="vLLM on the CPU: GiB of RAM "
                                        "for the KV cache (VLLM_CPU_KVCACHE_SPACE)")
    vllm_cpu_threads_bind: str = Field("auto", min_length=1, description="vLLM on the CPU: "
                                       "cores its threads are pinned to "
                                       "(VLLM_CPU_OMP_THREADS_BIND, e.g. 0 or 0-3; a "
                                       "backend's env may set its own)")
    compile_cache_dir: str = Field(
        "~/.cache/synapse/engine-compile", description="vLLM: each backend's private "
        "Inductor cache (TORCHINDUCTOR_CACHE_DIR) is <this>/<backend>, mode 0700, kept "
        "across restarts so a restarted engine reuses the kernels it compiled; a backend's "
        "env may set its own; one that cannot be made private, or below a folder another "
        "user could rename or replace: a private temporary directory, reused across the "
        "backend's restarts and removed when it stops; empty: torch's default "
        "(/tmp/torchinductor_<user>, which anyone on the host can create first)")
    compile_cache_check_parents: bool = Field(
        True, description="check the folders above compile_cache_dir (each this user's or "
        "root's, none writable by group or others unless sticky). Off only where no other "
        "user can reach them: a container whose writable volumes are all open to every "
        "user (Kubernetes makes an emptyDir mode 0777) and that runs as one user, as the "
        "Helm chart's agent does")
    tei_command: list[str] = Field(default_factory=lambda: ["text-embeddings-router"],
                                   description="how to start TEI")
    engine_host: str = Field("127.0.0.1", description="address engines listen on "
                             "(0.0.0.0 when the control plane runs on another host)")
    advertise_host: str | None = Field(
        None, description="host in backend URLs sent to the control plane "
        "(default: engine_host, or the node IP when engine_host is a wildcard)")
    unhealthy_restart_s: float = Field(60.0, gt=0, description="restart an engine that "
                                       "stayed unhealthy this long")

    # -- placement (helper "fleet"): ports the control plane may give deployed engines --
    engine_port_range: tuple[int, int] | None = Field(
        None, description="[first, last] ports (inclusive) for engines the control plane "
        "deploys: it picks one per engine and the agent refuses others (the NetworkPolicy "
        "must open them); none = any port")

    @pydantic.field_validator("engine_port_range")
    @classmethod
    def _port_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1] <= 65535:
            raise ValueError("must be [first, last] with 1 <= first <= last <= 65535")
        return value

    @property
    def crashloop_retry(self) -> float:
        """``crashloop_retry_s``, or its default (:data:`CRASHLOOP_RETRY_S`, at least
        ``backoff_max_s``)."""
        if self.crashloop_retry_s is None:
            return max(CRASHLOOP_RETRY_S, self.backoff_max_s)
        return self.crashloop_retry_s

    @pydantic.model_validator(mode="after")
    def _retry_after_backoff(self) -> SupervisorSettings:
        if self.crashloop_retry_s is not None and self.crashloop_retry_s < self.backoff_max_s:
            raise ValueError(f"crashloop_retry_s ({self.crashloop_retry_s:g}) must be at least "
                             f"backoff_max_s ({self.backoff_max_s:g})")
        return self


class EmbedderSettings(Section):
    kind: Literal["none", "minilm", "tei"] = Field("none", description="embedding engine")
    model: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="model name served")
    tei_url: str | None = Field(None, description="TEI base URL (kind tei)")
    cache_max_entries: int = Field(100_000, ge=1, description="embedding cache bound (entries)")
    cache_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="embedding cache bound (bytes)")
    max_batch: int = Field(64, ge=1, description="micro-batch size")
    batch_wait_ms: float = Field(0.0, ge=0, description="extra micro-batch gathering window, "
                                 "only after a batch that served several callers (0: a batch "
                                 "runs as soon as the model is free)")
    max_texts: int = Field(2048, ge=1, description="texts per Embed call (more: INVALID_ARGUMENT)")
    max_text_chars: int = Field(32_768, ge=1, description="characters per text "
                                "(longer: INVALID_ARGUMENT)")
    max_call_chars: int = Field(1_048_576, ge=1, description="characters per Embed call, all "
                                "texts together (more: INVALID_ARGUMENT)")
    queue_max_texts: int = Field(4096, ge=1, description="texts waiting for the model at most, "
                                 "per tenant and in all: a call that would take its tenant's "
                                 "queue over, or its tenant past an equal share of the whole, "
                                 "is refused with RESOURCE_EXHAUSTED (a call into its tenant's "
                                 "empty queue is taken unless the whole queue would pass "
                                 "twice this bound; one into an empty queue always is)")
    request_timeout_s: float = Field(30.0, gt=0, description="TEI HTTP call timeout")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="kind minilm: auto runs the transformer (and the pair scorer's "
        "network) in onnxruntime when it is installed and its vectors (logits) match torch's "
        "at start (else torch, with one log line); torch forces torch; onnx requires "
        "onnxruntime (else the embedder or scorer is unavailable, with the reason)")
    tuning: str = Field("none", min_length=1, description="kind minilm: the fine-tuning "
                        "applied (agent.embedding.tuned): a file written by synapsectl cache "
                        "tune-embedder (make embedder writes build/embedder/embedder_tuned.npz),"
                        " shipped (synapse_common/embedder_tuned.npz, in a release that ships "
                        "one: none does yet), or none (plain all-MiniLM-L6-v2); it changes the "
                        "embedder id")
    pair_scorer: str = Field("shipped", min_length=1, description="kind minilm: the "
                             "cross-encoder behind Node.ScorePairs (agent.embedding."
                             "pair_scorer), all-MiniLM-L6-v2 with a head that scores whether "
                             "two texts mean the same, for control planes with "
                             "cache.pair_scorer on (their default): shipped (the default, "
                             "synapse_common/pair_scorer.npz), a file synapsectl cache "
                             "tune-pair-scorer wrote, or none (no second model in memory, "
                             "for agents whose control planes do not use it). Without a "
                             "scorer ScorePairs answers FAILED_PRECONDITION")
    pair_scorer_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="kind minilm: the precision of the pair scorer's matrix "
        "products. auto (the default) and bfloat16 run them in bfloat16 in torch on "
        "oneDNN when the CPU has AMX-BF16 (agent.embedding.pair_scorer_bf16): a pass "
        "costs a fraction of float32's there, the logits move slightly and a few "
        "decisions near the operating point can change; checked against float32 at "
        "start, and without AMX or when the check fails, float32 with one log line. "
        "float32 runs them as embedder.runtime says. The scorer id is the same either way")
    onnx_cache_dir: str = Field("~/.cache/synapse/onnx", description="kind minilm: where the "
                                "ONNX exports of the transformer and the pair scorer are kept "
                                "(one file per weights and torch version; unwritable: "
                                "exported per start)")


class AgentSettings(Section):
    node_name: str = Field("", description="node name (default: hostname)")
    control_plane: ControlPlaneLink = Field(default_factory=ControlPlaneLink)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    backends: list[BackendSettings] = Field(default_factory=list, description="engines to run")
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @pydantic.model_validator(mode="after")
    def _unique_backends(self) -> AgentSettings:
        names = [b.name for b in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backends: duplicate name {sorted(dup)[0]!r}")
        # two engines on one port: the second never binds, and its health probe, answered
        # by the first, reported it ready for a model nobody serves there
        ports = [b.port for b in self.backends if b.port is not None]
        taken = {p for p in ports if ports.count(p) > 1}
        if taken:
            port = min(taken)
            raise ValueError(f"backends: port {port} is given to "
                             f"{[b.name for b in self.backends if b.port == port]}")
        return self
