"""The agent process: builds every part from the settings and runs them until SIGTERM.

Start order: Node gRPC server and ``/metrics`` (ports known, logged), first GPU sample,
supervisor (config backends), embedder and pair-scorer loads in the background (the
models take seconds; Embed answers UNAVAILABLE and ScorePairs FAILED_PRECONDITION until
then), reporter.

Shutdown (SIGTERM/SIGINT): report ``draining`` at once; wait until every live generation
engine scrapes running+waiting = 0 or ``drain_grace_s`` passes; stop the engines (SIGTERM,
SIGKILL after ``stop_grace_s``); send a last report (``stopped``); close the streams,
the gRPC server and ``/metrics``; exit 0. A second signal skips the drain wait.

Commands from the control plane are serialised by one lock: two replicas sending the
same DesiredBackends must not interleave their start/stop steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import psutil
from prometheus_client import CollectorRegistry

from agent import (
    convert,
    engine_auth,
    http_metrics,
    node_certificate,
    node_keys,
    node_service,
    node_tracing,
    placement,
    reporter,
    supervisor,
    telemetry,
)
from agent import metrics as agent_metrics
from agent import runner as runners
from agent.config import AgentSettings, EmbedderSettings
from agent.core import lru, types
from agent.embedding import pair_scorer, protocol, service, tei, tuned
from protos.synapse.v1 import controlplane_pb2
from synapse_common import clock as clocks
from synapse_common import tracing

log = logging.getLogger(__name__)


def agent_version() -> str:
    try:
        return metadata.version("synapse-fabric")
    except metadata.PackageNotFoundError:
        return "unknown"


def node_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


class Agent:
    def __init__(self, cfg: AgentSettings, registry: CollectorRegistry | None = None, *,
                 secret_env: frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        # first, so an unreadable token file (TokenFileError, naming the field) stops the
        # start before anything is built
        metrics_token = http_metrics.read_token(cfg.metrics.bearer_token_file)
        cfg.control_plane.token_value()     # control_plane.token_file readable, or stop here
        # this node's own engine and Node-service keys (none when the agent presents no
        # token: then nothing authenticates the control plane's side either)
        self.keys = node_keys.choose() if cfg.control_plane.authenticates else None
        # the Node service's own certificate, made now and held in memory only; sent in
        # Register, where the control plane pins it for this node's address
        self.certificate = (node_certificate.generate() if cfg.grpc.tls_self_signed
                            else None)
        self.node = cfg.node_name or socket.gethostname()
        self.metrics = agent_metrics.Metrics(registry or CollectorRegistry())
        # nvmlInit runs here, once, before anything is served (it fails fast without a
        # driver); every later NVML call runs in a worker thread.
        self.source = telemetry.build(
            cfg.telemetry, on_error=self.metrics.nvml_errors.labels(self.node).inc,
            holding=lambda: placement.holding(self.supervisor))
        sup = cfg.supervisor
        advertise = sup.advertise_host or (node_ip() if _wildcard(sup.engine_host)
                                           else sup.engine_host)
        self.supervisor = supervisor.Supervisor(
            sup, runners.Hooks(self.metrics, self.node, self._changed), advertise,
            engine_key=self.keys.engine if self.keys else None, secret_env=secret_env)
        self.embeddings = self._build_embeddings()
        # Node.ScorePairs' cross-encoder (kind minilm; else it says why there is none)
        self.scorer = pair_scorer.build(cfg.embedder)
        # Node.Embed spans (issue 19); TracingUnavailable names tracing.enabled
        self.tracing = tracing.setup(cfg.tracing, "synapse-agent", self.node,
                                     trusted_callers=True)
        self.node_server = node_service.NodeServer(
            self.embeddings, cfg.grpc.host, cfg.grpc.port, self._observe_embed,
            token=self.keys.node if self.keys else None,
            shared=token.get_secret_value() if (token := cfg.control_plane.token) else None,
            allow_unauthenticated=cfg.grpc.allow_unauthenticated,
            interceptors=[node_tracing.TracingInterceptor(self.tracing)] if self.tracing else [],
            scorer=self.scorer, observe_scores=self._observe_scores,
            tls_cert_file=cfg.grpc.tls_cert_file, tls_key_file=cfg.grpc.tls_key_file,
            tls_pair=self.certificate.server_pair() if self.certificate else None)
        self.metrics_server = http_metrics.MetricsServer(
            self.metrics.registry, self.refresh_metrics, cfg.metrics.host, cfg.metrics.port,
            token_sha256=metrics_token)
        self.reporter = reporter.Reporter(cfg.control_plane, self.register_message,
                                          self.report_message, self.on_command,
                                          self.metrics, self.node)
        self.gpus: list[types.GpuSample] = []
        self._sequence = 0
        self._command_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._known_backends: set[str] = set()

    def _build_embeddings(self) -> service.EmbeddingService | None:
        embedder = build_embedder(self.cfg.embedder, engine_auth.embedder_headers(
            self.cfg, self.keys.engine if self.keys else None))
        if embedder is None:
            return None
        e = self.cfg.embedder
        hits = self.metrics.embed_cache_hits.labels(self.node)
        misses = self.metrics.embed_cache_misses.labels(self.node)

        def count(h: int, m: int) -> None:
            hits.inc(h)
            misses.inc(m)

        return service.EmbeddingService(
            e, embedder, lru.EmbeddingLru(e.cache_max_entries, e.cache_max_bytes), count)

    def _observe_embed(self, code: str, seconds: float) -> None:
        self.metrics.embed_requests.labels(self.node, code).inc()
        self.metrics.embed_latency.labels(self.node).observe(seconds)

    def _observe_scores(self, code: str, seconds: float) -> None:
        self.metrics.score_pairs_requests.labels(self.node, code).inc()
        self.metrics.score_pairs_latency.labels(self.node).observe(seconds)

    def _changed(self) -> None:
        self.reporter.notify()

    @property
    def advertised_address(self) -> str:
        if self.cfg.grpc.advertise_address:
            return self.cfg.grpc.advertise_address
        host = node_ip() if _wildcard(self.cfg.grpc.host) else self.cfg.grpc.host
        return f"{host}:{self.node_server.port}"

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        await self.node_server.start(embedder_ready=False)
        log.info("agent node gRPC listening on %s:%d%s", self.cfg.grpc.host,
                 self.node_server.port, "" if not self.node_server.tls
                 else " (TLS)" if self.certificate is None
                 else f" (TLS, certificate made at start, sha256 {self.certificate.fingerprint})")
        if self.certificate is not None and not self.cfg.control_plane.tls_ca_file:
            log.warning("grpc.tls_self_signed without control_plane.tls_ca_file: the "
                        "certificate the control plane pins travels in plain text, where "
                        "whoever sits on the path can swap it for one of their own")
        if self.keys is None:
            log.warning("no control_plane.token(_file): the Node gRPC service %s",
                        "serves calls without a credential (grpc.allow_unauthenticated)"
                        if self.cfg.grpc.allow_unauthenticated else "refuses every call")
            log.warning("no control_plane.token(_file): engines this agent starts accept "
                        "every caller (no engine key)")
        await self.metrics_server.start()
        log.info("agent metrics listening on http://%s:%d", self.cfg.metrics.host,
                 self.metrics_server.port)
        status = self.source.status()
        if not status.ok:
            log.error("GPU telemetry (%s) is not working: %s", status.source, status.error)
        await self._sample_gpus()
        await self.supervisor.start([convert.spec_from_config(b) for b in self.cfg.backends])
        self._tasks.append(asyncio.create_task(self._start_models()))   # loads off the loop
        self._tasks.append(asyncio.create_task(self._telemetry_loop()))
        await self.reporter.start()
        log.info("agent %s started: %d backends, control plane %s", self.node,
                 len(self.cfg.backends), self.reporter.targets or self.cfg.control_plane.dns_name)

    async def _start_models(self) -> None:
        """The embedder's model, then the pair scorer's, one after the other: both import
        and build transformers models in worker threads, transformers does not promise
        that its lazy imports are safe from two threads at once, and a load that fails
        leaves its model unavailable until a restart; side by side they would only split
        the same cores anyway. Then the embedder's health is watched."""
        if self.embeddings is not None:
            try:
                await self.embeddings.embedder.start()
            except Exception:   # it reports itself unavailable; the scorer still loads
                log.exception("the embedder failed to start")
        await self.scorer.start()
        if self.embeddings is not None:
            await self._watch_embedder()

    async def _watch_embedder(self) -> None:
        assert self.embeddings is not None
        embedder = self.embeddings.embedder
        # Health follows the embedder (TEI may come and go): checked at every telemetry tick.
        while True:
            await self.node_server.set_embedder_ready(await embedder.probe())
            await clocks.sleep(self.cfg.telemetry.interval_s)

    async def shutdown(self, skip_drain: asyncio.Event | None = None) -> None:
        log.info("draining: waiting up to %.0fs for in-flight requests",
                 self.cfg.supervisor.drain_grace_s)
        self.supervisor.set_draining(True)
        idle = asyncio.create_task(self.supervisor.wait_idle(self.cfg.supervisor.drain_grace_s))
        waiters: list[asyncio.Task[Any]] = [idle]
        if skip_drain is not None:
            waiters.append(asyncio.create_task(skip_drain.wait()))
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        drained = idle in done and idle.result()
        for waiter in waiters:
            waiter.cancel()
        log.info("drain %s; stopping engines", "complete" if drained else "cut short")
        await self.supervisor.stop_all()
        await self.reporter.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.node_server.stop(1.0)
        await self.metrics_server.stop()
        if self.embeddings is not None:
            await self.embeddings.embedder.close()
        await self.scorer.close()
        await asyncio.to_thread(self.source.close)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        log.info("agent stopped")

    # -- telemetry ---------------------------------------------------------------------
    async def _telemetry_loop(self) -> None:
        while True:
            await clocks.sleep(self.cfg.telemetry.interval_s)
            await self._sample_gpus()

    async def _sample_gpus(self) -> None:
        owners = {r.pid: name for name, r in self.supervisor.runners.items() if r.pid}
        try:
            self.gpus = await asyncio.to_thread(_sample_with_owners, self.source, owners)
        except Exception:  # a broken source must not take the agent down
            log.exception("GPU sampling failed")
            self.gpus = []

    # -- messages ----------------------------------------------------------------------
    def register_message(self) -> controlplane_pb2.Register:
        return controlplane_pb2.Register(
            node_name=self.node, agent_version=agent_version(),
            gpus=[convert.gpu(g) for g in self.gpus], node_address=self.advertised_address,
            telemetry=convert.telemetry(self.source.status()),
            embed_models=[self.embeddings.model] if self.embeddings else [],
            engine_port_range=placement.port_range(self.cfg.supervisor),
            engine_key=self.keys.engine if self.keys else "",
            node_key=self.keys.node if self.keys else "",
            node_certificate=self.certificate.certificate if self.certificate else b"")

    def report_message(self) -> controlplane_pb2.Report:
        self._sequence += 1
        stats = self.embeddings.cache.stats() if self.embeddings else None
        return controlplane_pb2.Report(
            sequence=self._sequence, timestamp_unix_ms=int(time.time() * 1000),
            gpus=[convert.gpu(g) for g in self.gpus],
            backends=[convert.backend(s) for s in self.supervisor.statuses()],
            embedding_cache=convert.cache_stats(stats),
            telemetry=convert.telemetry(self.source.status()),
            draining=self.supervisor.draining)

    async def on_command(self, msg: controlplane_pb2.ControlMessage) -> tuple[bool, str]:
        ok, error = await self._command(msg)
        self.metrics.commands.labels(self.node, msg.WhichOneof("body") or "none",
                                     "true" if ok else "false").inc()
        return ok, error

    async def _command(self, msg: controlplane_pb2.ControlMessage) -> tuple[bool, str]:
        async with self._command_lock:
            kind = msg.WhichOneof("body")
            if kind == "drain":
                self.supervisor.set_draining(True)
            elif kind == "undrain":
                self.supervisor.set_draining(False)
            elif kind == "desired_backends":
                return await self._desired(msg.desired_backends)
            elif kind == "evict_embeddings":
                if self.embeddings is None:
                    return False, "no embedder on this agent"
                count = self.embeddings.evict(msg.evict_embeddings.model or None)
                log.info("evicted %d cached embeddings", count)
            else:
                return False, f"unknown command {kind!r}"
            return True, ""

    async def _desired(self, msg: controlplane_pb2.DesiredBackends) -> tuple[bool, str]:
        specs, errors = placement.accept(msg, self.supervisor, self.gpus)
        errors += await self.supervisor.apply_desired(specs, retry=frozenset(msg.retry))
        return not errors, "; ".join(errors)

    # -- /metrics ----------------------------------------------------------------------
    def refresh_metrics(self) -> None:
        m, node = self.metrics, self.node
        status = self.source.status()
        m.telemetry_ok.labels(node, status.source).set(1 if status.ok else 0)
        for g in self.gpus:
            labels = (node, str(g.index), g.uuid)
            for gauge, value in ((m.gpu_utilization, g.utilization_percent),
                                 (m.gpu_memory_used, g.memory_used_bytes),
                                 (m.gpu_memory_total, g.memory_total_bytes),
                                 (m.gpu_temperature, g.temperature_celsius),
                                 (m.gpu_power, g.power_watts)):
                if value is not None:
                    gauge.labels(*labels).set(value)
        self._refresh_backends()
        if self.embeddings is not None:
            stats = self.embeddings.cache.stats()
            m.embed_cache_entries.labels(node).set(stats.entries)
            m.embed_cache_bytes.labels(node).set(stats.bytes)
            m.embed_queue_texts.labels(node).set(self.embeddings.embedder.queued)

    def _refresh_backends(self) -> None:
        m, node = self.metrics, self.node
        current = {s.name: s for s in self.supervisor.statuses()}
        for gone in self._known_backends - set(current):
            for phase in types.Phase:
                with contextlib.suppress(KeyError):
                    m.backend_state.remove(node, gone, phase.value)
        self._known_backends = set(current)
        for s in current.values():
            for phase in types.Phase:
                m.backend_state.labels(node, s.name, phase.value).set(
                    1 if s.phase == phase else 0)
            if s.task == "generate" and s.metrics_ok:
                labels = (node, s.name, s.models[0])
                m.engine_waiting.labels(*labels).set(s.waiting)
                m.engine_running.labels(*labels).set(s.running)
                m.engine_kv_usage.labels(*labels).set(s.kv_usage)
                m.engine_prefix_hit_rate.labels(*labels).set(s.prefix_hit_rate)


def build_embedder(cfg: EmbedderSettings, tei_headers: Mapping[str, str] | None = None,
                   ) -> protocol.Embedder | None:
    """The embedder ``embedder.kind`` names (None for ``none``); ``tei_headers``: the
    engine key's when the TEI is one of the agent's own engines (agent.engine_auth)."""
    if cfg.kind == "minilm":
        return tuned.build(cfg)
    if cfg.kind == "tei":
        return tei.TeiEmbedder(cfg, tei_headers)
    return None


def _sample_with_owners(source: telemetry.GpuSource,
                        owners: dict[int, str]) -> list[types.GpuSample]:
    """Sample the GPUs and name the backend owning each GPU process (blocking)."""
    samples = source.sample()
    if not owners or not any(s.processes for s in samples):
        return samples
    pid_owner = dict(owners)
    for pid, name in owners.items():
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                pid_owner[child.pid] = name  # vLLM's engine-core and worker processes
    return [_owned(s, pid_owner) for s in samples]


def _owned(sample: types.GpuSample, owners: dict[int, str]) -> types.GpuSample:
    import dataclasses

    procs = tuple(dataclasses.replace(p, backend_name=owners.get(p.pid, ""))
                  for p in sample.processes)
    return dataclasses.replace(sample, processes=procs)


async def run(cfg: AgentSettings, secret_env: frozenset[str] = frozenset()) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP; returns the exit code. ``secret_env``: the variables
    the settings' secrets were read from, kept from the engines."""
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()  # second signal: skip the drain wait
        stop.set()

    # SIGHUP (the operator's terminal or ssh session closed) stops as SIGTERM does,
    # unless started under ``nohup`` (ignored: it is to outlive the terminal).
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    for sig in (signal.SIGTERM, signal.SIGINT, *hangup):
        loop.add_signal_handler(sig, on_signal)
    try:
        agent = Agent(cfg, secret_env=secret_env)
    except OSError as exc:
        log.error("agent cannot start: %s", exc)
        return 1
    except (tracing.TracingUnavailable, http_metrics.TokenFileError) as exc:
        log.error("config error: %s", exc)
        return 2
    try:
        await agent.start()
    except OSError as exc:  # e.g. the /metrics port is taken
        log.error("agent cannot start: %s", exc)
        await agent.supervisor.stop_all()
        await agent.node_server.stop(0)
        return 1
    await stop.wait()
    await agent.shutdown(skip_drain=hurry)
    return 0
