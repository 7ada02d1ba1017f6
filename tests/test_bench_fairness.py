"""``bench/fairness.py``'s phases: which control planes each asks for and what they are
configured with (no process started)."""

from __future__ import annotations

import pathlib

import pytest

from bench import fairness
from controlplane import config, workers


def planes(*argv: str) -> list[fairness.Plane]:
    return fairness.planes(fairness.parser().parse_args(list(argv)))


def settings(plane: fairness.Plane, tmp: pathlib.Path,
             redis: str = "") -> config.ControlPlaneSettings:
    args = fairness.parser().parse_args([])
    cfg = fairness.controlplane_config(plane, 8080, ["http://127.0.0.1:9"], args,
                                       tmp / plane.name, redis)
    return config.ControlPlaneSettings.model_validate(cfg)


def test_the_default_run_starts_the_queue_off_and_on_planes_only() -> None:
    assert [(p.name, p.workers, p.same_class) for p in planes()] == [
        ("off", 1, False), ("on", 1, False)]


def test_the_pod_phase_alone_starts_one_worker_and_a_pod_in_one_class(
        tmp_path: pathlib.Path) -> None:
    one, pod = planes("--phases", "pod", "--pod-workers", "2")
    assert (one.workers, pod.workers) == (1, 2)
    for plane in (one, pod):
        s = settings(plane, tmp_path, "redis://127.0.0.1:6390/0")
        assert s.fairness.queue.enabled
        assert {t.name: t.priority for t in s.auth.tenants} == {
            "quiet": "interactive", "noisy": "interactive"}
        assert workers.count(s) == plane.workers   # the settings allow the pod


def test_the_flood_phases_keep_the_noisy_tenant_in_the_lower_class(
        tmp_path: pathlib.Path) -> None:
    for plane in planes("--phases", "alone,off,on,hold0"):
        s = settings(plane, tmp_path)
        assert {t.name: t.priority for t in s.auth.tenants} == {
            "quiet": "interactive", "noisy": "batch"}
        assert workers.count(s) == 1


def test_a_phase_name_that_contains_another_does_not_run_it() -> None:
    assert [p.name for p in planes("--phases", "alone")] == ["off"]


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(SystemExit):
        fairness.parser().parse_args(["--phases", "alone,pods"])
