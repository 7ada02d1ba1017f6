"""Turning Admin responses into aligned tables (default) and plain data (-o json|yaml)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from protos import enums
from protos.synapse.v1 import admin_pb2

# C0 and C1 controls and DEL, as escapes: text from engines must not drive a terminal
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


@dataclasses.dataclass(frozen=True)
class Rendered:
    table: str
    data: Any


def _data(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if value is None or value == "":
        return "-"
    return str(value)


_node_status = enums.NODE_STATUS.name
_phase = enums.BACKEND_PHASE.name


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def nodes(resp: admin_pb2.ListNodesResponse) -> Rendered:
    rows = [[n.name, _node_status(n.status), n.gpu_count, f"{n.backends_ready}/{n.backends_total}",
             n.in_flight, "ok" if n.telemetry.ok else f"error: {n.telemetry.error}"[:40],
             _age(n.last_report_age_seconds), n.agent_version] for n in resp.nodes]
    headers = ["NAME", "STATUS", "GPUS", "BACKENDS", "IN-FLIGHT", "TELEMETRY", "LAST-REPORT",
               "VERSION"]
    return Rendered(table(headers, rows), [_data(n) for n in resp.nodes])


def _gib(value: int) -> str:
    return f"{value / 1024**3:.1f}Gi"


def node_detail(detail: admin_pb2.NodeDetail, registered: bool | None = None) -> Rendered:
    """``registered`` False: the answer holds only the intent recorded for a name no node
    has registered under (its zero report age means "never", not "just now")."""
    s = detail.summary
    if registered is False:
        lines = [f"Name:         {s.name}",
                 f"Status:       {_node_status(s.status)} (not registered yet; intent "
                 "recorded)", "Last report:  never"]
        return Rendered("\n".join(lines), {**_data(detail), "registered": False})
    lines = [f"Name:         {s.name}", f"Status:       {_node_status(s.status)}",
             f"Address:      {s.address or '-'}", f"Agent:        {s.agent_version or '-'}",
             f"Last report:  {_age(s.last_report_age_seconds)} ago",
             f"In flight:    {s.in_flight}",
             f"Telemetry:    {s.telemetry.source or '-'} "
             f"{'ok' if s.telemetry.ok else 'error: ' + s.telemetry.error}", "", "GPUs:"]
    gpu_rows = [[g.index, g.name, _gib(g.memory_used_bytes) if g.HasField("memory_used_bytes") else None,
                 _gib(g.memory_total_bytes) if g.HasField("memory_total_bytes") else None,
                 g.utilization_percent if g.HasField("utilization_percent") else None,
                 g.temperature_celsius if g.HasField("temperature_celsius") else None,
                 g.power_watts if g.HasField("power_watts") else None] for g in detail.gpus]
    lines.append(_indent(table(["INDEX", "NAME", "MEM-USED", "MEM-TOTAL", "UTIL%", "TEMP-C",
                                "POWER-W"], gpu_rows)))
    lines += ["", "Backends:"]
    rows = [[b.name, ",".join(b.models), _phase(b.phase), b.num_requests_waiting,
             b.num_requests_running, f"{b.kv_cache_usage * 100:.0f}%", b.restarts, b.url]
            for b in detail.backends]
    lines.append(_indent(table(["NAME", "MODELS", "STATE", "WAITING", "RUNNING", "KV", "RESTARTS",
                                "URL"], rows)))
    for b in detail.backends:
        if b.last_log_lines:
            lines += ["", f"Last log lines of {b.name}:"]
            # an engine's (or an agent's) text: nothing in it may drive the terminal
            lines += [f"  {line.translate(_CONTROLS)}" for line in b.last_log_lines[-10:]]
    data = _data(detail) if registered is None else {**_data(detail), "registered": True}
    return Rendered("\n".join(lines), data)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def drain(resp: admin_pb2.DrainNodeResponse) -> Rendered:
    head = node_detail(resp.node).table.splitlines()[:2]
    state = "drained" if resp.drained else f"draining ({resp.in_flight} in flight)"
    return Rendered("\n".join([*head, f"Drain:        {state}"]), _data(resp))


def models(resp: admin_pb2.ListModelsResponse) -> Rendered:
    rows = [[m.name, m.state, ",".join(m.aliases),
             f"{sum(1 for b in m.backends if b.routable)}/{len(m.backends)}",
             ",".join(m.fallbacks)] for m in resp.models]
    return Rendered(table(["MODEL", "STATE", "ALIASES", "ROUTABLE", "FALLBACKS"], rows),
                    [_data(m) for m in resp.models])


def backends(resp: admin_pb2.ListModelsResponse) -> Rendered:
    rows, data = [], []
    for m in resp.models:
        for b in m.backends:
            rows.append([b.node or "-", b.backend, m.name, _phase(b.phase), b.routable,
                         b.num_requests_waiting, b.num_requests_running,
                         f"{b.kv_cache_usage * 100:.0f}%", b.source, b.url])
            data.append({"model": m.name, **_data(b)})
    headers = ["NODE", "BACKEND", "MODEL", "STATE", "ROUTABLE", "WAITING", "RUNNING", "KV",
               "SOURCE", "URL"]
    return Rendered(table(headers, rows), data)


def placements(resp: Any, verb: str) -> Rendered:
    items = resp.placements if verb == "deployed" else resp.removed
    rows = [[p.node, p.backend, p.reason] for p in items]
    text = table(["NODE", "BACKEND", "REASON"], rows) if rows else f"nothing {verb}"
    return Rendered(text, _data(resp))


def invalidated(resp: admin_pb2.InvalidateCacheResponse) -> Rendered:
    text = (f"removed {resp.exact_entries_removed} exact and "
            f"{resp.semantic_entries_removed} semantic entries")
    return Rendered(text, _data(resp))


def stats(resp: admin_pb2.Stats) -> Rendered:
    asked = max(resp.replicas_asked, resp.replicas_answered)
    fleet = (f"{resp.replicas_answered} of {asked} answered"
             + (f" ({', '.join(resp.replicas)})" if resp.replicas else "")
             + (f"; {resp.fleet_error}" if resp.fleet_error else ""))
    lines = [f"Replicas:         {fleet}", f"Answered by:      {resp.replica or '-'}",
             f"Uptime:           {_age(resp.uptime_seconds)}",
             f"Requests:         {resp.requests_total}",
             f"Cache hit rate:   {resp.cache_hit_rate * 100:.1f}% "
             f"(exact {resp.cache_hits_exact}, semantic {resp.cache_hits_semantic}, "
             f"misses {resp.cache_misses}, errors {resp.cache_errors})",
             f"Nodes ready:      {resp.nodes_ready}", f"Backends ready:   {resp.backends_ready}"]
    for title, per in (("Per model:", resp.per_model), ("Per backend:", resp.per_backend)):
        if per:
            rows = [[k, v.requests, v.errors, v.p50_ms, v.p95_ms, v.p99_ms]
                    for k, v in sorted(per.items())]
            lines += ["", title, _indent(table(["NAME", "REQUESTS", "ERRORS", "P50-MS", "P95-MS",
                                                "P99-MS"], rows))]
    return Rendered("\n".join(lines), _data(resp))


def usage(resp: admin_pb2.GetUsageResponse) -> Rendered:
    """Usage per day, tenant and model (issue 18), with a total line."""
    fields = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens",
              "cache_hit_tokens", "errors", "estimated")
    rows: list[list[object]] = [[r.day, r.tenant, r.model, *(getattr(r, f) for f in fields),
                                 f"{r.cost:.4f}"] for r in resp.rows]
    if len(resp.rows) > 1:
        rows.append(["total", "", "", *(sum(getattr(r, f) for r in resp.rows) for f in fields),
                     f"{sum(r.cost for r in resp.rows):.4f}"])
    headers = ["DAY", "TENANT", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "CACHED",
               "CACHE-HIT", "ERRORS", "ESTIMATED", "COST"]
    text = table(headers, rows) if resp.rows else "no usage recorded in that period"
    # Plain numbers (protobuf's JSON writes 64-bit integers as strings).
    data = [{"day": r.day, "tenant": r.tenant, "model": r.model,
             **{f: getattr(r, f) for f in fields}, "cost": r.cost} for r in resp.rows]
    return Rendered(text, data)


def _costs(b: admin_pb2.BackendVerdict) -> str | None:
    """The costs behind the prediction: µs per prefill token, ms per decode step, ms to a
    first token, and whether they were learned (from how many answers) or configured."""
    if not b.prefill_seconds_per_token:
        return None
    source = f"learned/{b.cost_samples}" if b.cost_samples else "configured"
    return (f"{b.prefill_seconds_per_token * 1e6:.0f}us/tok "
            f"{b.decode_seconds_per_step * 1000:.1f}ms/step "
            f"+{b.overhead_seconds * 1000:.0f}ms ({source})")


def explain(resp: admin_pb2.ExplainRouteResponse) -> Rendered:
    rows = [[b.rank or "-", b.node, b.backend, "yes" if b.eligible else "no",
             b.filter_reason, f"{b.predicted_ttft_seconds * 1000:.1f}" if b.eligible else None,
             f"{b.queue_wait_seconds * 1000:.1f}" if b.eligible else None,
             f"{b.prefill_seconds * 1000:.1f}" if b.eligible else None,
             f"{b.cached_tokens}/{b.prompt_tokens}", b.block_size or None,
             _costs(b)] for b in sorted(resp.backends, key=lambda b: (b.rank == 0, b.rank))]
    head = (f"model {resp.model}  policy {resp.policy}  prompt tokens {resp.prompt_tokens}"
            + (f"  tokenizer {resp.tokenizer}" if resp.tokenizer else "") + "\n"
            f"chosen: {resp.chosen_backend or 'none'}"
            + (f"  ({resp.reason})" if resp.reason else ""))
    body = table(["RANK", "NODE", "BACKEND", "ELIGIBLE", "FILTERED-BECAUSE", "TTFT-MS",
                  "QUEUE-MS", "PREFILL-MS", "CACHED/PROMPT", "BLOCK", "COSTS"], rows)
    return Rendered(f"{head}\n\n{body}", _data(resp))
