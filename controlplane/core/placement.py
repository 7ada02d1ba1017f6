"""Placement for ``DeployModel`` without explicit nodes: most VRAM headroom first.

A node's headroom is the free memory of its emptiest GPU as NVML last reported it,
minus the memory declared by engines that are placed there but have not allocated yet
(starting, or sent and not yet reported). One engine runs on one GPU here, so the best
single GPU — not the node's sum — decides whether a model fits. Nodes that are down,
cordoned or draining, or whose telemetry failed (no numbers to trust), are not
candidates; the refusal names why each node was passed over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True, slots=True)
class NodeCapacity:
    name: str
    status: str                       # registry node status
    telemetry_ok: bool
    gpu_free_bytes: tuple[int, ...]   # per GPU, from NVML
    pending_bytes: int = 0            # declared by engines not yet using their memory

    @property
    def headroom_bytes(self) -> int:
        best = max(self.gpu_free_bytes, default=0)
        return max(0, best - self.pending_bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class PlacementResult:
    nodes: tuple[str, ...]
    refusal: str = ""                 # why nothing fits, when ``nodes`` is empty


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def place(candidates: Sequence[NodeCapacity], need_bytes: int, replicas: int) -> PlacementResult:
    """Choose ``replicas`` distinct nodes that fit ``need_bytes``, most headroom first."""
    reasons: list[str] = []
    fitting: list[NodeCapacity] = []
    for node in candidates:
        if node.status != "ready":
            reasons.append(f"{node.name}: {node.status}")
        elif not node.telemetry_ok:
            reasons.append(f"{node.name}: no GPU telemetry")
        elif not node.gpu_free_bytes:
            reasons.append(f"{node.name}: no GPUs")
        elif node.headroom_bytes < need_bytes:
            reasons.append(f"{node.name}: {_gib(node.headroom_bytes)} free on its best GPU")
        else:
            fitting.append(node)
    fitting.sort(key=lambda n: (-n.headroom_bytes, n.name))
    if len(fitting) < replicas:
        if not candidates:
            return PlacementResult((), "no nodes are registered")
        have = f"only {len(fitting)} of {replicas} needed nodes fit" if fitting else "no node fits"
        detail = "; ".join(reasons) or "-"
        return PlacementResult((), f"{have} {_gib(need_bytes)} ({detail})")
    return PlacementResult(tuple(n.name for n in fitting[:replicas]))
