"""The supervisor in process, with real engine processes and real HTTP endpoints."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import metrics, supervisor
from agent import runner as runners
from agent.config import SupervisorSettings
from agent.core import types
from agent.core.types import Phase
from tests import harness
from tests.agent.conftest import STAND_IN


def _settings(tmp_path, **kw) -> SupervisorSettings:
    base = {"log_dir": str(tmp_path / "logs"), "probe_interval_s": 0.1,
            "scrape_interval_s": 0.1, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
            "stop_grace_s": 2, "unhealthy_after": 2, "simulator_command": STAND_IN}
    return SupervisorSettings(**{**base, **kw})


@pytest.fixture
async def make(tmp_path) -> AsyncIterator[Callable[..., supervisor.Supervisor]]:
    made: list[supervisor.Supervisor] = []
    changes: list[int] = []

    def build(**kw) -> supervisor.Supervisor:
        hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n",
                                 lambda: changes.append(1))
        sup = supervisor.Supervisor(_settings(tmp_path, **kw), hooks, "127.0.0.1")
        made.append(sup)
        return sup

    yield build
    for sup in made:  # also when a test failed half-way: no engine outlives the test
        await sup.stop_all()


async def test_external_backend_is_probed_ready_unhealthy_ready(make):
    healthy = {"ok": True}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["ok"] else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = harness.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sup = make()
    spec = types.EngineSpec(name="remote", engine="external", model="m", task="embed",
                            url=f"http://127.0.0.1:{port}/")
    await sup.start([spec])
    r = sup.runners["remote"]
    await harness.until(lambda: r.phase == Phase.READY, 10, "ready")
    assert r.url == f"http://127.0.0.1:{port}" and r.pid == 0
    healthy["ok"] = False
    await harness.until(lambda: r.phase == Phase.UNHEALTHY, 10, "unhealthy")
    healthy["ok"] = True
    await harness.until(lambda: r.phase == Phase.READY, 10, "ready again")
    await sup.stop_all()
    await runner.cleanup()
    assert r.phase == Phase.STOPPED


async def test_engine_not_ready_by_the_deadline_is_killed_and_restarted(make):
    never_healthy = [sys.executable, "-c", "import time; time.sleep(60)"]
    sup = make(simulator_command=never_healthy, startup_deadline_s=0.3)
    await sup.start([types.EngineSpec(name="slow", engine="simulator", model="m")])
    r = sup.runners["slow"]
    await harness.until(lambda: r.restarts >= 1, 10, "a restart")
    reasons = " ".join(r.sink.lines())
    assert "exited with code -9" in reasons
    await harness.until(lambda: "not ready within 0.3s" in r.reason or r.phase == Phase.STARTING, 5,
                 "the reason")
    await sup.stop_all()


async def test_drain_waits_for_in_flight_requests(make, tmp_path):
    busy = tmp_path / "busy"
    busy.write_text("1")
    sup = make()
    spec = types.EngineSpec(name="gen", engine="simulator", model="m",
                            extra_args=("--busy-file", str(busy)))
    await sup.start([spec])
    r = sup.runners["gen"]
    await harness.until(lambda: r.metrics_ok, 20, "a scrape")
    sup.set_draining(True)
    assert r.status(sup.draining).phase == Phase.DRAINING
    assert not await sup.wait_idle(0.5)  # one request still running
    busy.unlink()
    assert await sup.wait_idle(10)
    status = r.status(sup.draining)
    assert status.kv_capacity_tokens == 16000 and status.kv_block_size == 16
    sup.set_draining(False)
    assert r.status(sup.draining).phase == Phase.READY
    await sup.stop_all()


async def test_naming_a_crashlooping_backend_again_retries_it(make):
    crashing = [sys.executable, "-c", "import sys; sys.exit(1)"]
    sup = make(simulator_command=crashing, crashloop_restarts=1)
    await sup.start([])
    spec = types.EngineSpec(name="flaky", engine="simulator", model="m")
    assert await sup.apply_desired([spec]) == []
    r = sup.runners["flaky"]
    await harness.until(lambda: r.phase == Phase.CRASHLOOP, 10, "crashloop")
    restarts = r.restarts
    assert await sup.apply_desired([spec]) == []
    await harness.until(lambda: r.restarts > restarts, 10, "a retry")
    assert await sup.apply_desired([]) == []
    assert "flaky" not in sup.runners and r.phase == Phase.STOPPED
    await sup.stop_all()


async def test_an_engine_unhealthy_for_too_long_is_restarted(make, tmp_path):
    sick = tmp_path / "sick"
    sup = make(unhealthy_restart_s=0.3)
    spec = types.EngineSpec(name="gen", engine="simulator", model="m",
                            extra_args=("--sick-file", str(sick)))
    await sup.start([spec])
    r = sup.runners["gen"]
    await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
    sick.write_text("1")
    await harness.until(lambda: r.phase == Phase.UNHEALTHY, 10, "unhealthy")
    await harness.until(lambda: r.restarts == 1, 10, "a restart")
    sick.unlink()
    await harness.until(lambda: r.phase == Phase.READY, 20, "ready after the restart")
    assert any(line.startswith("[synapse-agent] unhealthy for 0.3s; restart in")
               for line in r.sink.lines())


def _environ(pid: int) -> dict[str, str]:
    raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


async def test_a_vllm_backend_without_gpu_gets_the_cpu_environment_under_its_own(make):
    sup = make(vllm_command=STAND_IN, vllm_device="cpu", vllm_cpu_kvcache_gib=0.5)
    spec = types.EngineSpec(name="v", engine="vllm", model="/models/smol",
                            served_model_names=("smol",),
                            env=(("VLLM_CPU_OMP_THREADS_BIND", "1"),))
    await sup.start([spec])
    r = sup.runners["v"]
    await harness.until(lambda: r.phase == Phase.READY, 15, "the engine to be ready")
    environ = _environ(r.pid)
    assert environ["VLLM_TARGET_DEVICE"] == "cpu" and environ["VLLM_CPU_KVCACHE_SPACE"] == "0.5"
    assert environ["HF_HUB_OFFLINE"] == "1"
    assert environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"  # the backend's own env wins
    assert any("--model /models/smol" in line for line in r.sink.lines())


async def test_a_vllm_backend_on_a_gpu_node_gets_no_cpu_variables(make):
    sup = make(vllm_command=STAND_IN, vllm_device="cuda")
    await sup.start([types.EngineSpec(name="g", engine="vllm", model="m", gpu_indices=(1,))])
    r = sup.runners["g"]
    await harness.until(lambda: r.phase == Phase.READY, 15, "the engine to be ready")
    environ = _environ(r.pid)
    assert "VLLM_TARGET_DEVICE" not in environ and environ["CUDA_VISIBLE_DEVICES"] == "1"
