"""Placement: nodes by headroom, GPUs by free memory (tensor parallel: N GPUs), the
engine's memory fraction, a port from the node's engine port range; refusals say why."""

from __future__ import annotations

import pytest

from controlplane.core import placement

GIB = 1024**3


def node(free_gb: list[float], name: str = "n", pending_gb: dict[int, float] | None = None,
         ports: tuple[int, int] | None = (9000, 9003), taken: tuple[int, ...] = (),
         status: str = "ready") -> placement.NodeCapacity:
    pending = pending_gb or {}
    gpus = tuple(placement.Gpu(i, 80 * GIB, int(f * GIB), int(pending.get(i, 0) * GIB))
                 for i, f in enumerate(free_gb))
    return placement.NodeCapacity(name, status, True, gpus, 0, ports, frozenset(taken))


def test_one_gpu_engine_takes_the_gpu_with_most_headroom_and_the_first_free_port() -> None:
    plan = placement.plan(node([40, 70, 50], taken=(9000,)), placement.Need(30 * GIB))
    assert plan == placement.EnginePlan((1,), 9001, 0.375)   # 30 of 80 GiB


def test_pending_engines_count_against_their_gpu() -> None:
    n = node([70, 60], pending_gb={0: 30})
    assert placement.plan(n, placement.Need(30 * GIB)).gpu_indices == (1,)


def test_tensor_parallel_takes_n_gpus_each_holding_a_share() -> None:
    plan = placement.plan(node([20, 50, 45, 60]), placement.Need(80 * GIB, gpus=2))
    assert plan.gpu_indices == (1, 3) and plan.gpu_memory_utilization == 0.5
    with pytest.raises(placement.NoFit, match=r"4 GPUs needed .* 3 reported"):
        placement.plan(node([70, 70, 70]), placement.Need(10 * GIB, gpus=4))
    with pytest.raises(placement.NoFit, match=r"45\.0 GiB free on the weakest of its 2 best"):
        placement.plan(node([20, 50, 45, 10]), placement.Need(100 * GIB, gpus=2))


def test_an_asked_fraction_must_fit_and_is_passed_as_is() -> None:
    assert placement.plan(node([50]), placement.Need(utilization=0.5)).gpu_memory_utilization \
        == 0.5
    with pytest.raises(placement.NoFit, match=r"30\.0 GiB free on its best GPU"):
        placement.plan(node([30]), placement.Need(utilization=0.5))


def test_nothing_declared_gets_the_emptiest_gpu_and_no_fraction() -> None:
    assert placement.plan(node([10, 30]), placement.Need()) == \
        placement.EnginePlan((1,), 9000, 0.0)


def test_ports_come_from_the_range_or_are_left_to_the_agent() -> None:
    with pytest.raises(placement.NoFit, match="every port of its engine port range 9000-9001"):
        placement.plan(node([70], ports=(9000, 9001), taken=(9000, 9001)), placement.Need())
    assert placement.plan(node([70], ports=None), placement.Need()).port == 0


def test_place_ranks_nodes_and_names_why_others_were_passed_over() -> None:
    nodes = [node([30], "a"), node([70], "b"), node([90], "c", status="cordoned")]
    assert placement.place(nodes, placement.Need(20 * GIB), 2).nodes == ("b", "a")
    refused = placement.place(nodes, placement.Need(40 * GIB), 2)
    assert refused.nodes == ()
    assert refused.refusal == ("only 1 of 2 needed nodes fit 40.0 GiB "
                               "(a: 30.0 GiB free on its best GPU; c: cordoned)")
