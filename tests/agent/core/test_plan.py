"""The agent's check of a control-plane plan: port range, GPU indices, free memory."""

from __future__ import annotations

from agent.core import plan, types

GIB = 1024**3


def gpus(free_gb: list[float]) -> list[types.GpuSample]:
    return [types.GpuSample(i, f"GPU-{i}", "fake", memory_total_bytes=80 * GIB,
                            memory_free_bytes=int(f * GIB)) for i, f in enumerate(free_gb)]


def spec(name: str, port: int | None = 9000, indices: tuple[int, ...] = (0,),
         fraction: float = 0.5) -> types.EngineSpec:
    return types.EngineSpec(name, "vllm", "m", port=port, gpu_indices=indices,
                            gpu_memory_utilization=fraction)


def test_a_plan_that_fits_is_accepted() -> None:
    assert plan.refusals([(spec("a"), 0.5)], [], gpus([50]), (9000, 9003)) == {}


def test_memory_port_and_gpu_refusals_say_why() -> None:
    refused = plan.refusals([(spec("a"), 0.5), (spec("b", 9100), 0.1),
                             (spec("c", 9001, (7,)), 0.1)], [], gpus([30]), (9000, 9003))
    assert refused == {
        "a": "a: does not fit: GPU 0 has 30.0 GiB free, 40.0 GiB needed",
        "b": "b: does not fit: port 9100 is outside the engine port range 9000-9003",
        "c": "c: does not fit: GPU 7 does not exist on this node"}


def test_starting_engines_and_earlier_specs_count_against_the_gpu_and_port() -> None:
    starting = plan.Claim("old", 9000, (0,), 0.25, starting=True)
    running = plan.Claim("up", 9001, (0,), 0.25, starting=False)   # already in NVML's free
    refused = plan.refusals([(spec("a", 9002), 0.25), (spec("b", 9003), 0.3),
                             (spec("c", 9000, (1,)), 0.1)],
                            [starting, running], gpus([60, 70]), (9000, 9003))
    # GPU 0: 60 GiB free, 20 of them for "old" (starting), then 20 for "a": 20 left
    assert refused == {"b": "b: does not fit: GPU 0 has 20.0 GiB free, 24.0 GiB needed",
                       "c": "c: does not fit: port 9000 is used by backend old"}


def test_a_spec_without_a_planned_fraction_is_only_checked_for_port_and_gpus() -> None:
    assert plan.refusals([(spec("a", fraction=0.9), 0.0)], [], gpus([1]), None) == {}
