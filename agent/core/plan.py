"""Whether the control plane's plan for an engine fits this node. Pure, no I/O.

The control plane places an engine from the node's last report (GPUs by free memory,
``--gpu-memory-utilization`` as the engine's share of each GPU's total, a port from
``supervisor.engine_port_range``); the agent checks the plan against what it knows now
before starting anything, and refuses what does not fit with one reason per engine
(``"<name>: does not fit: <why>"``, which the control plane shows to the operator):

* the port lies in the engine port range and no other engine of the node uses it;
* every GPU index exists;
* each GPU holds the share: share = fraction * total must not exceed its free memory
  minus the shares of engines placed there that have not allocated yet (starting).
  vLLM makes the same check when it starts; refusing here says why before a crash loop.

Engines already running with the same spec are not checked again (a re-sent desired set
must not stop what runs), and a spec without a planned fraction (``0``) only gets the
port and GPU-index checks: nothing was declared to compare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from agent.core import types

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Claim:
    """What one engine of the node holds or will hold."""

    name: str
    port: int | None
    gpu_indices: tuple[int, ...]
    fraction: float                  # of each GPU's total; 0 = not declared
    starting: bool                   # will allocate its share (running ones are in NVML)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _port(spec: types.EngineSpec, port_range: tuple[int, int] | None,
          others: Sequence[Claim]) -> str | None:
    if spec.port is None:
        return None
    if port_range is not None and not port_range[0] <= spec.port <= port_range[1]:
        return f"port {spec.port} is outside the engine port range " \
               f"{port_range[0]}-{port_range[1]}"
    user = next((c.name for c in others if c.port == spec.port), None)
    return f"port {spec.port} is used by backend {user}" if user else None


def _gpu(index: int, share: float, sample: types.GpuSample | None,
         others: Sequence[Claim]) -> str | None:
    if sample is None:
        return f"GPU {index} does not exist on this node"
    if not share or sample.memory_total_bytes is None or sample.memory_free_bytes is None:
        return None
    total = sample.memory_total_bytes
    starting = sum(c.fraction * total for c in others
                   if index in c.gpu_indices and c.starting)
    free = sample.memory_free_bytes - starting
    if share * total > free:
        return f"GPU {index} has {_gib(max(0.0, free))} free, {_gib(share * total)} needed"
    return None


def refusal(spec: types.EngineSpec, fraction: float, gpus: Sequence[types.GpuSample],
            port_range: tuple[int, int] | None, others: Sequence[Claim]) -> str | None:
    """Why ``spec`` (with planned ``fraction``, 0 = none) does not fit; None when it does."""
    by_index = {g.index: g for g in gpus}
    for why in (_port(spec, port_range, others),
                *(_gpu(i, fraction, by_index.get(i), others) for i in spec.gpu_indices)):
        if why:
            return f"{spec.name}: does not fit: {why}"
    return None


def refusals(new: Iterable[tuple[types.EngineSpec, float]], running: Sequence[Claim],
             gpus: Sequence[types.GpuSample],
             port_range: tuple[int, int] | None) -> dict[str, str]:
    """Check each new spec against the running engines and the new ones accepted before
    it (an engine replaced by a new spec of the same name does not count against it)."""
    accepted: list[Claim] = []
    out: dict[str, str] = {}
    for spec, fraction in new:
        others = [c for c in (*running, *accepted) if c.name != spec.name]
        why = refusal(spec, fraction, gpus, port_range, others)
        if why:
            out[spec.name] = why
        else:
            accepted.append(Claim(spec.name, spec.port, spec.gpu_indices, fraction, True))
    return out
