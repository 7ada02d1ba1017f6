"""Chaos, short version: the fleet of ``bench/chaos.py`` (two replicas, two agents with
two simulators each, Redis, a Milvus Lite server, a TEI embedder) under steady load while
a few faults happen in turn, a few seconds each. The full figures come from
``python -m bench.chaos``; this test checks the promises, not the timings:

* no request fails while a healthy backend exists (only streams broken after their
  first byte may fail, and they end with an SSE error event);
* nothing wrong is cached (no failed prompt is an exact hit; hits equal the original);
* a restarted control-plane replica gets every backend back (its agents re-register);
* restarted on its existing L2 data (Milvus restarted under it), semantic hits resume;
* when every engine of the model fails, its fallback model serves: nothing fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from bench import chaos
from tests import fleet

FAULTS = ["sigkill_engine", "error_rate_20", "stall_stream", "kill_redis",
          "restart_controlplane", "restart_controlplane_l2", "intent_race", "primary_down"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("chaos")
    with chaos.chaos_fleet(tmp) as fl:
        yield asyncio.run(chaos.run_chaos(fl, FAULTS, duration=2.5, workers=4,
                                          settle_timeout=45))
    assert not fleet.scan_for_secrets(fleet.log_files(tmp))


def test_every_fault_ran_under_load(result: dict[str, Any]) -> None:
    for name in ["none", *FAULTS]:
        figures = result["faults"][name]
        assert figures["sent"] > 0, name
        assert not figures.get("not_recovered"), (name, figures)


def test_no_request_failed_while_a_healthy_backend_existed(result: dict[str, Any]) -> None:
    assert result["failed_with_healthy_backend"] == 0, {
        n: f.get("errors") for n, f in result["faults"].items()
        if f["failed_with_healthy_backend"]}
    for name, figures in result["faults"].items():
        # The only failures allowed are visible ones: streams cut after their first byte.
        assert figures["failed"] == figures["failed_visible"], (name, figures)


def test_nothing_wrong_was_cached(result: dict[str, Any]) -> None:
    assert result["wrongly_cached"] == 0
    assert sum(f["cache_hits"] for f in result["faults"].values()) > 0  # the cache worked


def test_a_restarted_replica_gets_its_backends_back(result: dict[str, Any]) -> None:
    assert result["faults"]["restart_controlplane"]["reregistered"] is True
    assert not result["faults"]["restart_controlplane"].get("not_recovered")


def test_semantic_hits_resume_after_a_restart_on_existing_l2_data(
        result: dict[str, Any]) -> None:
    figures = result["faults"]["restart_controlplane_l2"]
    assert figures["semantic_before"] is True, ("no semantic hit even before", figures)
    assert result["semantic_resumed"] is True, ("no semantic hit after", figures)


def test_two_replicas_editing_intent_at_once_lose_nothing(result: dict[str, Any]) -> None:
    figures = result["faults"]["intent_race"]
    assert figures["edits"] > 0 and figures["lost"] == 0, figures


def test_when_every_engine_of_the_model_fails_the_fallback_model_serves(
        result: dict[str, Any]) -> None:
    figures = result["faults"]["primary_down"]
    assert figures["sent"] > 0 and figures["failed"] == 0, figures
    assert figures["fallbacks"] > 0, figures
