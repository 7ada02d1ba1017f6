"""Placement for ``DeployModel``: which nodes, which GPUs on each, which port.

A GPU's headroom is its free memory as NVML last reported it, minus the memory of
engines placed there that have not allocated yet (starting, or sent and not reported),
minus what engines of unknown placement declared on the node (they may sit on any GPU).

* **Nodes** (when none is named): the nodes where an engine plan fits, most headroom on
  their best GPU first. Nodes that are down, cordoned or draining, or whose telemetry
  failed (no numbers to trust), are not candidates; the refusal names why each node was
  passed over.
* **GPUs** on a node: a tensor-parallel size of N takes the N GPUs with the most
  headroom, each holding an equal share of the engine's memory. The share is what the
  engine declared (``memory_required_bytes / N``), or ``--gpu-memory-utilization`` times
  the GPU's total when the operator gave the fraction; it must fit each GPU's headroom.
  The plan's ``gpu_memory_utilization`` is that share as a fraction of the GPU's total
  (vLLM's meaning of the flag), so an engine never claims memory another engine holds.
  An engine that declares neither still gets the GPUs with the most headroom, but no
  fraction (the engine's default applies) and no guarantee: nothing says what it needs.
* **Port**: the lowest port of the node's engine port range (the agent's
  ``supervisor.engine_port_range``) that no engine of the node uses; 0 when the agent
  has no range (it then picks a free port itself).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

STEPS = 1000   # --gpu-memory-utilization in steps of 0.001 (80 MiB of an 80 GiB GPU)


@dataclasses.dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    total_bytes: int
    free_bytes: int
    pending_bytes: int = 0            # engines placed here that have not allocated yet


@dataclasses.dataclass(frozen=True, slots=True)
class NodeCapacity:
    name: str
    status: str                       # registry node status
    telemetry_ok: bool
    gpus: tuple[Gpu, ...]             # with memory figures, from NVML
    pending_bytes: int = 0            # declared by engines whose GPUs are unknown
    port_range: tuple[int, int] | None = None
    ports_taken: frozenset[int] = frozenset()

    def headroom(self, gpu: Gpu) -> int:
        return max(0, gpu.free_bytes - gpu.pending_bytes - self.pending_bytes)

    def best(self, count: int) -> list[Gpu]:
        """The ``count`` GPUs with the most headroom (lowest index first on ties)."""
        return sorted(self.gpus, key=lambda g: (-self.headroom(g), g.index))[:count]

    @property
    def headroom_bytes(self) -> int:
        best = self.best(1)
        return self.headroom(best[0]) if best else 0


@dataclasses.dataclass(frozen=True, slots=True)
class Need:
    bytes: int = 0                    # the engine's declared VRAM, all GPUs; 0 = unknown
    gpus: int = 1                     # tensor-parallel size
    utilization: float = 0.0          # --gpu-memory-utilization asked for; 0 = derived


@dataclasses.dataclass(frozen=True, slots=True)
class EnginePlan:
    gpu_indices: tuple[int, ...]      # empty: no GPU plan (the node reports no GPUs)
    port: int                         # 0: the agent picks
    gpu_memory_utilization: float     # 0: not planned (no GPUs)


class NoFit(Exception):
    """The engine does not fit the node; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlacementResult:
    nodes: tuple[str, ...]
    refusal: str = ""                 # why nothing fits, when ``nodes`` is empty


def gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _fraction(chosen: Sequence[Gpu], need: Need) -> float:
    """The engine's share of each GPU as a fraction of its total: the one asked for, or
    the declared bytes over the smallest total, rounded up to a step of 1/STEPS."""
    if need.utilization:
        return need.utilization
    share = need.bytes / need.gpus
    return min(1.0, math.ceil(max(share / g.total_bytes for g in chosen) * STEPS - 1e-9)
               / STEPS)


def _refusal(node: NodeCapacity, chosen: Sequence[Gpu], need: Need, fraction: float) -> str:
    if need.gpus == 1:
        return f"{gib(node.headroom(chosen[0]))} free on its best GPU"
    worst = min(node.headroom(g) for g in chosen)
    return (f"{gib(worst)} free on the weakest of its {need.gpus} best GPUs, "
            f"{gib(fraction * chosen[0].total_bytes)} needed on each")


def _gpus(node: NodeCapacity, need: Need) -> tuple[tuple[int, ...], float]:
    if len(node.gpus) < need.gpus:
        raise NoFit(f"{need.gpus} GPUs needed (tensor parallel), {len(node.gpus)} reported")
    chosen = node.best(need.gpus)
    indices = tuple(sorted(g.index for g in chosen))
    if not need.bytes and not need.utilization:
        return indices, 0.0
    fraction = _fraction(chosen, need)
    if not all(math.ceil(fraction * g.total_bytes) <= node.headroom(g) for g in chosen):
        raise NoFit(_refusal(node, chosen, need, fraction))
    return indices, fraction


def _port(node: NodeCapacity) -> int:
    if node.port_range is None:
        return 0
    first, last = node.port_range
    for port in range(first, last + 1):
        if port not in node.ports_taken:
            return port
    raise NoFit(f"every port of its engine port range {first}-{last} is taken")


def plan(node: NodeCapacity, need: Need) -> EnginePlan:
    """GPUs, memory fraction and port of one engine on ``node``; raises :class:`NoFit`."""
    port = _port(node)
    if not node.telemetry_ok or not node.gpus:
        return EnginePlan((), port, need.utilization)
    indices, fraction = _gpus(node, need)
    return EnginePlan(indices, port, fraction)


def place(candidates: Sequence[NodeCapacity], need: Need, replicas: int) -> PlacementResult:
    """Choose ``replicas`` distinct nodes where the engine fits, most headroom first."""
    reasons: list[str] = []
    fitting: list[NodeCapacity] = []
    for node in candidates:
        if node.status != "ready":
            reasons.append(f"{node.name}: {node.status}")
        elif not node.telemetry_ok:
            reasons.append(f"{node.name}: no GPU telemetry")
        elif not node.gpus:
            reasons.append(f"{node.name}: no GPUs")
        else:
            try:
                plan(node, need)
            except NoFit as exc:
                reasons.append(f"{node.name}: {exc}")
            else:
                fitting.append(node)
    fitting.sort(key=lambda n: (-n.headroom_bytes, n.name))
    if len(fitting) < replicas:
        if not candidates:
            return PlacementResult((), "no nodes are registered")
        have = f"only {len(fitting)} of {replicas} needed nodes fit" if fitting else "no node fits"
        detail = "; ".join(reasons) or "-"
        return PlacementResult((), f"{have} {gib(need.bytes)} ({detail})")
    return PlacementResult(tuple(n.name for n in fitting[:replicas]))
