"""Review 117, LOW-1: with Redis accepting but not answering, /api/v1/stats waited the
stats timeout for Redis and then again for the pod's other processes. They are now asked
at the same time as Redis, so both share one deadline. Counted, not timed: the fakes record
whether the siblings were being asked while Redis was."""

from __future__ import annotations

import asyncio
import pathlib
import types
from typing import Any

import orjson
import pytest

from controlplane.api import fleet_stats, worker_metrics


class SilentRedis:
    """A fanout whose question goes unanswered: it lets the loop run a few turns (others'
    requests in flight meanwhile), then fails as a Redis timeout would."""

    def __init__(self, siblings_asked: list[float]) -> None:
        self.siblings_asked = siblings_asked
        self.siblings_asked_during_redis = -1

    async def ask(self, timeout_s: float) -> tuple[int, list[bytes]]:
        for _ in range(5):
            await asyncio.sleep(0)
        self.siblings_asked_during_redis = len(self.siblings_asked)
        raise TimeoutError


class AnsweringRedis(SilentRedis):
    async def ask(self, timeout_s: float) -> tuple[int, list[bytes]]:
        for _ in range(5):
            await asyncio.sleep(0)
        return 0, []


def services(fanout: Any, sockets: tuple[pathlib.Path, ...]) -> Any:
    counter = types.SimpleNamespace(inc=lambda: None)
    return types.SimpleNamespace(
        settings=types.SimpleNamespace(stats=types.SimpleNamespace(fleet_timeout_s=2.0)),
        stats_fanout=fanout, worker_metrics_sockets=sockets, replica="pod",
        metrics=types.SimpleNamespace(
            redis_errors=types.SimpleNamespace(labels=lambda *_: counter)))


@pytest.fixture
def siblings(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts the pod's other processes were asked with; each answers its figures
    once Redis has been given its turns."""
    asked: list[float] = []

    async def fetch(path: pathlib.Path, timeout_s: float, route: str = "") -> str | None:
        asked.append(timeout_s)
        for _ in range(10):
            await asyncio.sleep(0)
        return orjson.dumps({"requests": 1}).decode()

    monkeypatch.setattr(worker_metrics, "fetch", fetch)
    monkeypatch.setattr(fleet_stats, "local", lambda svc: {"requests": 1})
    return asked


async def test_the_pods_processes_are_asked_while_redis_is(siblings: list[float]) -> None:
    redis = SilentRedis(siblings)
    snap = await fleet_stats.snapshot(services(redis, (pathlib.Path("/x/metrics-1.sock"),)))
    assert redis.siblings_asked_during_redis == 1
    assert siblings == [2.0]   # one deadline: the same timeout, from the same start
    assert snap["replicas_asked"] == 2 and snap["replicas_answered"] == 2
    assert snap["fleet_error"] == "redis unreachable (TimeoutError): this pod's figures only"


async def test_with_redis_answering_the_siblings_are_not_counted(
        siblings: list[float]) -> None:
    snap = await fleet_stats.snapshot(
        services(AnsweringRedis(siblings), (pathlib.Path("/x/metrics-1.sock"),)))
    assert snap["replicas_asked"] == 1 and snap["fleet_error"] == ""
