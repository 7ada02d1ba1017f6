"""The agent's side of placement: what it tells the control plane, what it accepts.

* ``port_range``: the ``supervisor.engine_port_range`` advertised in ``Register``, from
  which the control plane picks each deployed engine's port.
* ``accept``: a ``DesiredBackends`` command → the specs to run and one error per spec
  refused, either invalid (:func:`agent.convert.spec_from_proto`) or a plan that does
  not fit (:mod:`agent.core.plan`: port range, GPU indices, free memory). The spec's
  ``gpu_memory_utilization`` is the planned share; CUDA_VISIBLE_DEVICES and vLLM's
  ``--gpu-memory-utilization`` come from the spec (:mod:`agent.core.commands`).
* ``holding``: the GPUs and share each engine of the supervisor holds, for the fake GPU
  source (NVML sees real engines' memory by itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent import convert, supervisor
from agent.config import SupervisorSettings
from agent.core import plan, types
from agent.core.types import Phase
from protos.synapse.v1 import controlplane_pb2

RUNNING = (Phase.READY, Phase.UNHEALTHY)


def port_range(cfg: SupervisorSettings) -> controlplane_pb2.PortRange | None:
    if cfg.engine_port_range is None:
        return None
    first, last = cfg.engine_port_range
    return controlplane_pb2.PortRange(first=first, last=last)


def _claims(sup: supervisor.Supervisor) -> list[plan.Claim]:
    return [plan.Claim(name, r.port or None, r.spec.gpu_indices,
                       r.spec.gpu_memory_utilization if r.spec.gpu_indices else 0.0,
                       r.phase == Phase.STARTING)
            for name, r in sup.runners.items()]


def holding(sup: supervisor.Supervisor) -> list[tuple[tuple[int, ...], float]]:
    return [(r.spec.gpu_indices, r.spec.gpu_memory_utilization)
            for r in sup.runners.values() if r.spec.gpu_indices and r.phase in RUNNING]


def accept(msg: controlplane_pb2.DesiredBackends, sup: supervisor.Supervisor,
           gpus: Sequence[types.GpuSample]) -> tuple[list[types.EngineSpec], list[str]]:
    specs: list[types.EngineSpec] = []
    errors: list[str] = []
    new: list[tuple[types.EngineSpec, float]] = []
    for wire in msg.backends:
        try:
            spec = convert.spec_from_proto(wire)
        except convert.SpecError as exc:
            errors.append(str(exc))
            continue
        specs.append(spec)
        runner = sup.runners.get(spec.name)
        if runner is None or runner.spec != spec:
            new.append((spec, wire.gpu_memory_utilization))
    refused = plan.refusals(new, _claims(sup), gpus, sup.cfg.engine_port_range)
    errors += refused.values()
    return [s for s in specs if s.name not in refused], errors
