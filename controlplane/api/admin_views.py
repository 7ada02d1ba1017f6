"""Core objects → Admin response messages (protos stop at this edge).

Every backend URL leaves through :func:`_url`, with its ``user:password@`` masked as the
log masks it: ``synapsectl get backends`` output is pasted into tickets.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.core import catalog, fleet, ledger, placement, registry, types
from protos import enums
from protos.synapse.v1 import admin_pb2, common_pb2, controlplane_pb2
from synapse_common import logs

_url = logs.mask_url_credentials


def _report(view: types.NodeView) -> controlplane_pb2.Report | None:
    return view.report if isinstance(view.report, controlplane_pb2.Report) else None


def node_summary(view: types.NodeView, led: ledger.Ledger) -> admin_pb2.NodeSummary:
    rep = _report(view)
    summary = admin_pb2.NodeSummary(
        name=view.info.name, status=enums.NODE_STATUS.value(view.status), cordoned=view.cordoned,
        draining=view.draining, gpu_count=len(rep.gpus) if rep else view.info.gpu_count,
        backends_ready=sum(1 for b in view.backends if b.phase == "ready"),
        backends_total=len(view.backends), last_report_age_seconds=view.last_report_age_s,
        agent_version=view.info.agent_version, address=view.info.address,
        in_flight=fleet.node_in_flight(view, led))
    if rep is not None:
        summary.telemetry.CopyFrom(rep.telemetry)
    return summary


def node_detail(view: types.NodeView, led: ledger.Ledger) -> admin_pb2.NodeDetail:
    detail = admin_pb2.NodeDetail(summary=node_summary(view, led), labels=dict(view.info.labels))
    rep = _report(view)
    if rep is not None:
        detail.gpus.extend(rep.gpus)
        detail.backends.extend(rep.backends)
        for b in detail.backends:       # an agent's external engine may carry credentials
            b.url = _url(b.url)
        detail.embedding_cache.CopyFrom(rep.embedding_cache)
    else:
        for b in view.backends:
            detail.backends.add(name=b.name, url=_url(b.url), models=b.models,
                                phase=enums.BACKEND_PHASE.value(b.phase),
                                num_requests_waiting=b.waiting, num_requests_running=b.running,
                                kv_cache_usage=b.kv_usage, restarts=b.restarts)
    return detail


def _gpu_total(g: common_pb2.GpuSample) -> int:
    if g.HasField("memory_total_bytes"):
        return int(g.memory_total_bytes)
    return int(g.memory_free_bytes) + int(g.memory_used_bytes)


def _port(url: str) -> int | None:
    port = urllib.parse.urlsplit(url).port if url else None
    return port


def _spec_gpus(spec: Mapping[str, Any]) -> list[int]:
    return [int(i) for i in spec.get("gpuIndices", ())]


def capacity(view: types.NodeView, desired: Mapping[str, Mapping[str, Any]]
             ) -> placement.NodeCapacity:
    """What placement needs of a node: its GPUs' memory from the last report, minus the
    engines placed there that have not allocated yet, and the ports its engines use."""
    rep = _report(view)
    gpus = [g for g in (rep.gpus if rep else []) if g.HasField("memory_free_bytes")]
    totals = {g.index: _gpu_total(g) for g in gpus}
    reported = {b.name: b for b in rep.backends} if rep else {}
    pending = dict.fromkeys(totals, 0)
    node_wide = 0
    for name, spec in desired.items():   # placed by the control plane: GPUs known
        b = reported.get(name)
        if b is not None and b.phase != common_pb2.BACKEND_PHASE_STARTING:
            continue                     # running: NVML already counts its memory
        indices = [i for i in _spec_gpus(spec) if i in totals]
        fraction = float(spec.get("gpuMemoryUtilization", 0.0))
        declared = int(spec.get("memoryRequiredBytes", 0))
        if not indices:
            node_wide += declared
        for i in indices:
            pending[i] += int(fraction * totals[i]) if fraction else declared // len(indices)
    # Engines from the agent's own config that are starting: their GPUs are not known here.
    node_wide += sum(int(b.memory_reserved_bytes) for n, b in reported.items()
                     if n not in desired and b.phase == common_pb2.BACKEND_PHASE_STARTING)
    ports = {int(s["port"]) for s in desired.values() if s.get("port")}
    ports |= {p for b in reported.values() if (p := _port(b.url)) is not None}
    return placement.NodeCapacity(
        view.info.name, view.status, bool(rep and rep.telemetry.ok),
        tuple(placement.Gpu(g.index, totals[g.index], int(g.memory_free_bytes),
                            pending[g.index]) for g in gpus),
        node_wide, view.info.engine_ports, frozenset(ports))


def backend_spec(request: admin_pb2.DeployModelRequest, model: str, engine: str,
                 name: str) -> dict[str, Any]:
    """BackendSpec fields as plain data (JSON names), as the intent store keeps them."""
    spec: dict[str, Any] = {
        "name": name, "engine": common_pb2.EngineKind.Name(enums.ENGINE_KIND.value(engine)), "model": model,
        "servedModelNames": list(request.served_model_names) or [model],
        "task": common_pb2.BackendTask.Name(
            request.task or (common_pb2.BACKEND_TASK_EMBED if engine == "tei"
                             else common_pb2.BACKEND_TASK_GENERATE)),
    }
    if request.gpu_memory_utilization:
        spec["gpuMemoryUtilization"] = request.gpu_memory_utilization
    if request.max_model_len:
        spec["maxModelLen"] = request.max_model_len
    if request.extra_args:
        spec["extraArgs"] = list(request.extra_args)
    if request.memory_required_bytes:
        spec["memoryRequiredBytes"] = str(request.memory_required_bytes)
    return spec


def models(cat: catalog.Catalog, reg: registry.Registry,
           deploying: set[str]) -> admin_pb2.ListModelsResponse:
    names = [e.name for e in cat.configured()]
    names += sorted(m for m in reg.served_models() | deploying if m not in names)
    out = admin_pb2.ListModelsResponse()
    for name in names:
        info = out.models.add(name=name, aliases=cat.aliases(name), fallbacks=cat.fallbacks(name))
        tasks = set()
        for b, why in reg.backends_for(name):
            tasks.add(b.task)
            info.backends.add(node="" if b.source == "static" else b.node, backend=b.name,
                              url=_url(b.url), phase=enums.BACKEND_PHASE.value(b.phase),
                              num_requests_waiting=b.waiting,
                              num_requests_running=b.running, kv_cache_usage=b.kv_usage,
                              routable=not why, source=b.source)
        for node in reg.ready_embed_nodes():
            if name in node.embed_models:  # served by the agent's in-process embedder
                tasks.add("embed")
                info.backends.add(node=node.name, backend="node-embed", url=node.address,
                                  phase=common_pb2.BACKEND_PHASE_READY, routable=True,
                                  source="agent-embedder")
        if any(b.routable for b in info.backends):
            info.state = "ready"
        elif name in deploying or any(b.phase == common_pb2.BACKEND_PHASE_STARTING
                                      for b in info.backends):
            info.state = "deploying"
        else:
            info.state = "unavailable"
        if len(tasks) == 1:
            info.task = enums.BACKEND_TASK.value(tasks.pop())
    return out


def stats(snapshot: Mapping[str, Any]) -> admin_pb2.Stats:
    """``fleet_stats.snapshot``'s figures (the fleet's, or this replica's alone)."""
    msg = admin_pb2.Stats(
        requests_total=snapshot["requests_total"], cache_hit_rate=snapshot["cache_hit_rate"],
        cache_hits_exact=snapshot["cache_hits_exact"],
        cache_hits_semantic=snapshot["cache_hits_semantic"],
        cache_misses=snapshot["cache_misses"], cache_errors=snapshot["cache_errors"],
        nodes_ready=snapshot["nodes_ready"], backends_ready=snapshot["backends_ready"],
        uptime_seconds=snapshot["uptime_seconds"], replica=snapshot["replica"],
        replicas_asked=snapshot["replicas_asked"],
        replicas_answered=snapshot["replicas_answered"], replicas=snapshot["replicas"],
        fleet_error=snapshot["fleet_error"])
    for field in ("per_model", "per_backend"):
        for key, summary in snapshot[field].items():
            getattr(msg, field)[key].CopyFrom(admin_pb2.LatencySummary(**summary))
    return msg


def explanation(model: str, policy: str, prompt_tokens: int,
                verdicts: Sequence[types.Verdict], reason: str) -> admin_pb2.ExplainRouteResponse:
    out = admin_pb2.ExplainRouteResponse(model=model, policy=policy, prompt_tokens=prompt_tokens,
                                         reason=reason)
    for v in sorted(verdicts, key=lambda v: (v.rank == 0, v.rank, v.backend.key)):
        b = v.backend
        out.backends.add(node="" if b.source == "static" else b.node, backend=b.name,
                         url=_url(b.url),
                         eligible=v.eligible, filter_reason=v.filter_reason,
                         predicted_ttft_seconds=v.predicted_ttft_s,
                         queue_wait_seconds=v.queue_wait_s, prefill_seconds=v.prefill_s,
                         prompt_tokens=v.prompt_tokens, cached_tokens=v.cached_tokens,
                         rank=v.rank, session_affinity=v.session_affinity,
                         block_size=v.block_size, prefill_seconds_per_token=v.prefill_s_per_token,
                         decode_seconds_per_step=v.decode_s_per_step,
                         overhead_seconds=v.overhead_s, cost_samples=v.cost_samples)
        if v.rank == 1:
            out.chosen_backend = b.key
    if verdicts:
        out.tokenizer = verdicts[0].tokenizer
    return out
