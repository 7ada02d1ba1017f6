"""Fleet-wide stats (issue 19): two control-plane replicas sharing a private redis-server;
``/api/v1/stats`` and ``synapsectl stats`` on either add up both and say how many answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pathlib
import tempfile
from collections.abc import AsyncIterator

import aiohttp

from controlplane import ctl
from controlplane.adapters import redis_fanout
from controlplane.api import admin_grpc, grpc_server, observability
from controlplane.core import stats as stats_mod
from controlplane.core import stats_merge
from tests import harness
from tests.controlplane import cp_testing as t

MSGS = [{"role": "user", "content": "hi"}]


def settings(name: str, backend: str, redis_url: str | None) -> object:
    return t.settings(replica_id=name, upstreams=[t.upstream("one", backend)],
                      **({"redis": {"url": redis_url, "timeout_s": 1.0}} if redis_url else {}))


async def http_stats(cp: t.RunningCP) -> dict:
    async with aiohttp.ClientSession() as s, s.get(
            f"{cp.url}/api/v1/stats", headers={"Authorization": f"Bearer {t.ADMIN}"}) as r:
        assert r.status == 200
        return await r.json()


@contextlib.asynccontextmanager
async def admin_address(cp: t.RunningCP) -> AsyncIterator[str]:
    server, port = await grpc_server.start("127.0.0.1", 0, [admin_grpc.admin(cp.services)])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def synapsectl(address: str, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ctl.main(["stats", *argv], environ={"SYNAPSE_ADMIN_ADDR": address,
                                                   "SYNAPSE_ADMIN_TOKEN": t.ADMIN})
    assert code == 0
    return out.getvalue()


def subscribed(cp: t.RunningCP) -> bool:
    fanout = cp.services.stats_fanout
    return isinstance(fanout, redis_fanout.Fanout) and fanout.subscribed


async def send(cp: t.RunningCP, n: int) -> None:
    client = cp.client()
    for _ in range(n):
        await client.chat.completions.create(model="llama", messages=MSGS)
    await client.close()


async def test_two_replicas_add_up_and_say_both_answered(
        redis_server: harness.RedisServer) -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(settings("cp-a", one.url, redis_server.url)) as a, \
                t.running(settings("cp-b", one.url, redis_server.url)) as b:
            await harness.until(lambda: subscribed(a) and subscribed(b), 10,
                                "both replicas to listen")
            await send(a, 3)
            await send(b, 2)
            for cp in (a, b):
                snap = await http_stats(cp)
                assert (snap["replicas_asked"], snap["replicas_answered"]) == (2, 2)
                assert snap["replicas"] == ["cp-a", "cp-b"] and snap["fleet_error"] == ""
                assert snap["requests_total"] == 5
                assert snap["per_backend"]["static/one"]["requests"] == 5
                assert snap["per_model"][t.MODEL]["p99_ms"] > 0
                assert snap["backends_ready"] == 1
            assert snap["replica"] == "cp-b"          # the one that answered the call
            async with admin_address(a) as address:
                text = await asyncio.to_thread(synapsectl, address)
                data = json.loads(await asyncio.to_thread(synapsectl, address, "-o", "json"))
            assert "Replicas:         2 of 2 answered (cp-a, cp-b)" in text
            assert "Requests:         5" in text
            assert (data["replicas_answered"], data["requests_total"]) == (2, "5")
        # b has stopped: a is asked alone
        async with t.running(settings("cp-a", one.url, redis_server.url)) as a:
            await harness.until(lambda: subscribed(a), 10, "the replica to listen")
            snap = await http_stats(a)
            assert (snap["replicas_asked"], snap["replicas_answered"]) == (1, 1)


async def test_redis_down_leaves_this_replicas_figures_and_says_why(
        redis_server: harness.RedisServer) -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(settings("cp-a", one.url, redis_server.url)) as a:
            await harness.until(lambda: subscribed(a), 10, "the replica to listen")
            await send(a, 2)
            await asyncio.to_thread(redis_server.kill)
            # (Admin.GetStats: /api/v1/stats also reads the usage book from Redis)
            async with admin_address(a) as address:
                snap = json.loads(await asyncio.to_thread(synapsectl, address, "-o", "json"))
    assert snap["requests_total"] == "2" and snap["replicas_answered"] == 1
    assert snap["fleet_error"].startswith("redis unreachable")
    assert "127.0.0.1" not in snap["fleet_error"]


async def test_without_redis_a_replica_is_one_of_one() -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(settings("solo", one.url, None)) as cp:
            await send(cp, 1)
            snap = await http_stats(cp)
    assert (snap["replicas_asked"], snap["replicas_answered"], snap["replicas"]) == (
        1, 1, ["solo"])
    assert snap["requests_total"] == 1 and snap["fleet_error"] == ""


def test_percentiles_are_over_the_union_of_the_windows() -> None:
    fast, slow = stats_mod.Stats(lambda: 0.0, "a"), stats_mod.Stats(lambda: 0.0, "b")
    for _ in range(90):
        fast.record("m", "x", 0.010, False, "miss")
    for _ in range(10):
        slow.record("m", "y", 1.0, False, "hit-exact")
    slow.record("m", "y", 2.0, True, "miss")
    merged = stats_merge.merge([stats_merge.export(fast, 1, 2),
                                stats_merge.export(slow, 1, 2)])
    model = merged["per_model"]["m"]
    assert (model["requests"], model["errors"]) == (101, 1)
    assert model["p50_ms"] == 10.0 and model["p95_ms"] == 1000.0
    assert merged["cache_hit_rate"] == 10 / 101
    assert merged["per_backend"]["y"]["requests"] == 11
    assert (merged["nodes_ready"], merged["backends_ready"]) == (1, 2)


@contextlib.asynccontextmanager
async def pod_of_two(redis_url: str | None) -> AsyncIterator[tuple[t.RunningCP, t.RunningCP]]:
    """Two processes of one pod (``http.workers: 2``), each serving its own figures on a
    private unix socket and knowing its sibling's, as ``controlplane.workers.join`` sets
    them up."""
    with tempfile.TemporaryDirectory(prefix="synapse-stats-") as directory:
        paths = [pathlib.Path(directory) / f"metrics-{i}.sock" for i in (0, 1)]
        async with t.backends(("one", "ok")) as (one,):
            pod, worker = (settings(name, one.url, redis_url).model_copy(update={
                "data_dir": pathlib.Path(directory) / name}) for name in ("pod", "pod-w1"))
            async with t.running(pod) as a, t.running(worker, primary=False) as b:
                runners = [await observability.serve_worker_metrics(cp.services, path)
                           for cp, path in ((a, paths[0]), (b, paths[1]))]
                a.services.worker_metrics_sockets = (paths[1],)
                b.services.worker_metrics_sockets = (paths[0],)
                try:
                    yield a, b
                finally:
                    for runner in runners:
                        await runner.cleanup()


async def test_with_redis_down_a_pods_stats_are_both_workers(
        redis_server: harness.RedisServer) -> None:
    """Probe 95 F6: with Redis down, ``synapsectl stats`` of a pod of two workers showed
    the one process's figures ("this replica's figures only"), missing every request the
    kernel gave the other."""
    async with pod_of_two(redis_server.url) as (a, b):
        await harness.until(lambda: subscribed(a) and subscribed(b), 10,
                            "both workers to listen")
        await send(a, 3)
        await send(b, 2)
        await asyncio.to_thread(redis_server.kill)
        async with admin_address(a) as address:
            snap = json.loads(await asyncio.to_thread(synapsectl, address, "-o", "json"))
            text = await asyncio.to_thread(synapsectl, address)
    assert snap["requests_total"] == "5" and snap["replicas"] == ["pod", "pod-w1"]
    assert (snap["replicas_asked"], snap["replicas_answered"]) == (2, 2)
    assert snap["fleet_error"].startswith("redis unreachable (")
    assert snap["fleet_error"].endswith("): this pod's figures only")
    assert "Requests:         5" in text


async def test_without_redis_a_pods_stats_are_both_workers_and_a_silent_one_is_said(
        ) -> None:
    async with pod_of_two(None) as (a, b):
        await send(a, 1)
        await send(b, 2)
        for cp in (a, b):
            snap = await http_stats(cp)
            assert snap["requests_total"] == 3 and snap["fleet_error"] == ""
            assert (snap["replicas_asked"], snap["replicas_answered"]) == (2, 2)
        b.services.worker_metrics_sockets = (pathlib.Path("/nonexistent/metrics-9.sock"),)
        snap = await http_stats(b)
        assert snap["requests_total"] == 2
        assert (snap["replicas_asked"], snap["replicas_answered"]) == (2, 1)
