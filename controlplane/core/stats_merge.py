"""Fleet-wide request statistics: each replica's figures, and their sum (issue 19).

A replica's :func:`export` is its :class:`controlplane.core.stats.Stats` with the raw
latency windows (the last ``stats.WINDOW`` durations per model and per backend) instead of
their percentiles, plus what it sees of the fleet (nodes and backends ready). :func:`merge`
adds exports up into the shape of ``Stats.snapshot`` — counts summed, the cache hit rate
recomputed from the summed counts, percentiles computed over the union of the windows
(so a fleet p99 is a p99 of recent requests fleet-wide, not an average of p99s), nodes and
backends ready as the largest any replica sees (every agent reports to every replica) —
and says which replicas it is made of.

Exports are plain JSON-able dicts: they travel between replicas through Redis
(:mod:`controlplane.api.fleet_stats`). Durations are rounded to the microsecond.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.core import stats as stats_mod

_COUNTS = ("requests_total", "cache_hits_exact", "cache_hits_semantic", "cache_misses",
           "cache_bypass", "cache_errors")


def export(stats: stats_mod.Stats, nodes_ready: int, backends_ready: int) -> dict[str, Any]:
    """This replica's figures with raw latency windows (JSON-able)."""
    snap = stats.snapshot()
    out: dict[str, Any] = {k: snap[k] for k in ("replica", "uptime_seconds", *_COUNTS)}
    out["nodes_ready"] = nodes_ready
    out["backends_ready"] = backends_ready
    for field, series in (("per_model", stats.per_model), ("per_backend", stats.per_backend)):
        out[field] = {key: {"requests": s.requests, "errors": s.errors,
                            "recent": [round(x, 6) for x in s.recent]}
                      for key, s in sorted(series.items())}
    return out


def merge(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The fleet's snapshot (``Stats.snapshot`` keys, plus ``nodes_ready``,
    ``backends_ready`` and ``replicas``, the names it is made of, in order)."""
    out: dict[str, Any] = {k: sum(int(p.get(k, 0)) for p in parts) for k in _COUNTS}
    hits = out["cache_hits_exact"] + out["cache_hits_semantic"]
    looked_up = hits + out["cache_misses"]
    out["cache_hit_rate"] = hits / looked_up if looked_up else 0.0
    out["uptime_seconds"] = max((float(p.get("uptime_seconds", 0.0)) for p in parts),
                                default=0.0)
    out["nodes_ready"] = max((int(p.get("nodes_ready", 0)) for p in parts), default=0)
    out["backends_ready"] = max((int(p.get("backends_ready", 0)) for p in parts), default=0)
    for field in ("per_model", "per_backend"):
        out[field] = _series(p.get(field, {}) for p in parts)
    out["replicas"] = sorted(str(p.get("replica", "")) for p in parts)
    return out


def _series(tables: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, stats_mod.Series] = {}
    for table in tables:
        for key, row in table.items():
            recent = [float(x) for x in row.get("recent", ())]
            old = merged.get(key)
            values = [*(old.recent if old else ()), *recent]
            merged[key] = stats_mod.Series(
                (old.requests if old else 0) + int(row.get("requests", 0)),
                (old.errors if old else 0) + int(row.get("errors", 0)),
                collections.deque(values, maxlen=max(1, len(values))))
    return {k: v.summary() for k, v in sorted(merged.items())}
