"""The supervisor in process, with real engine processes and real HTTP endpoints."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import metrics, supervisor
from agent import runner as runners
from agent.core import types
from agent.core.types import Phase
from synapse_common import clock as clocks
from synapse_common import engine_key
from tests import harness
from tests.agent.conftest import STAND_IN
from tests.agent.supervisor_testing import drive, proc_environ, supervisor_settings
from tests.clock import VirtualTime, settle

FLOAT = 1e-9  # virtual seconds are sums of floats


@pytest.fixture
async def make(tmp_path) -> AsyncIterator[Callable[..., supervisor.Supervisor]]:
    made: list[supervisor.Supervisor] = []
    changes: list[int] = []

    def build(timing: clocks.Time = clocks.Time(), on_change: Callable[[], None] | None = None,
              engine_key: str | None = None, **kw) -> supervisor.Supervisor:
        hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n",
                              on_change or (lambda: changes.append(1)))
        sup = supervisor.Supervisor(supervisor_settings(tmp_path, **kw), hooks, "127.0.0.1", timing,
                                    engine_key=engine_key)
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
    # On virtual time: the drain's grace period runs out without being waited for.
    busy, vt = tmp_path / "busy", VirtualTime()
    busy.write_text("1")
    sup = make(timing=vt.time)
    spec = types.EngineSpec(name="gen", engine="simulator", model="m",
                            extra_args=("--busy-file", str(busy)))
    await sup.start([spec])
    r = sup.runners["gen"]
    await drive(vt, lambda: r.metrics_ok, "a scrape", paced=True)
    sup.set_draining(True)
    assert r.status(sup.draining).phase == Phase.DRAINING
    since, waiting = vt.now, asyncio.create_task(sup.wait_idle(0.5))
    await drive(vt, waiting.done, "the grace period", loops=3)   # the probe, scrape, drain
    assert not waiting.result()  # one request still running
    spent = vt.now - since       # a fresh scrape each 0.1 s until the grace period is over
    assert spent >= 0.5 > spent - 0.1 - FLOAT  # one step more where 5 x 0.1 < 0.5 in floats
    busy.unlink()
    waiting = asyncio.create_task(sup.wait_idle(10))
    await drive(vt, waiting.done, "idle", loops=3)
    assert waiting.result()
    status = r.status(sup.draining)
    assert status.kv_capacity_tokens == 16000 and status.kv_block_size == 16
    sup.set_draining(False)
    assert r.status(sup.draining).phase == Phase.READY
    await sup.stop_all()


async def test_a_crashlooping_backend_is_retried_at_once_only_when_named_to_retry(make):
    """The control plane sends a set the node refused part of again every pass: each
    resend retried every crash-looping engine of the node at once, so one restarted every
    pass instead of every crashloop_retry_s. Only an operator's
    deploy, which names the backend in ``retry``, retries it at once."""
    crashing = [sys.executable, "-c", "import sys; sys.exit(1)"]
    vt = VirtualTime()
    # crashloop_retry_s follows backoff_max_s here: a crash loop retries after 24-30 s
    sup = make(timing=vt.time, simulator_command=crashing, crashloop_restarts=1,
               backoff_max_s=30)
    await sup.start([])
    spec = types.EngineSpec(name="flaky", engine="simulator", model="m", task="embed")
    assert await sup.apply_desired([spec]) == []
    r = sup.runners["flaky"]

    def waits() -> int:   # the crash loop's waits begun (one noted at each exit)
        return sum("crashloop: " in line for line in r.sink.lines())

    await drive(vt, lambda: waits() == 1, "the crash loop's first wait", paced=True,
                loops=1)
    looping_at, restarts = vt.now, r.restarts
    assert await sup.apply_desired([spec]) == []            # the same set, sent again
    await settle()
    await drive(vt, lambda: r.restarts > restarts, "the crash loop's own retry", loops=1,
                within=40)
    # not at once: the wait is 24-30 s from the exit, which came a moment before
    # looping_at was seen, so the bound leaves that moment out
    assert vt.now - looping_at >= 0.8 * 30 - 5
    await drive(vt, lambda: waits() == 2, "the crash loop's next wait", paced=True,
                loops=1)
    restarts = r.restarts
    assert await sup.apply_desired([spec], retry={"flaky"}) == []   # deployed again
    await harness.until(lambda: r.restarts > restarts, 10, "a retry at once")
    assert await sup.apply_desired([]) == []
    assert "flaky" not in sup.runners and r.phase == Phase.STOPPED
    await sup.stop_all()


async def test_an_engine_unhealthy_for_too_long_is_restarted(make, tmp_path):
    # On virtual time: the probes' schedule and the restart's moment are the runner's
    # own, asserted exactly, and none of their seconds is waited out.
    sick, vt = tmp_path / "sick", VirtualTime()
    sup = make(unhealthy_restart_s=0.3, timing=vt.time)
    spec = types.EngineSpec(name="gen", engine="simulator", model="m",
                            extra_args=("--sick-file", str(sick)))
    await sup.start([spec])
    r = sup.runners["gen"]
    await drive(vt, lambda: r.phase == Phase.READY, "ready", paced=True)
    sick.write_text("1")
    sick_at = vt.now
    await drive(vt, lambda: r.phase == Phase.UNHEALTHY, "unhealthy")
    unhealthy_at = vt.now       # the second failed probe (unhealthy_after 2, 0.1 s apart)
    assert sick_at + 0.1 < unhealthy_at <= sick_at + 0.2 + 1e-9
    await drive(vt, lambda: "unhealthy for" in r.reason, "the restart")
    gap = vt.now - unhealthy_at  # restarted at the first probe (0.1 s apart) that finds it
    # unhealthy for unhealthy_restart_s, not one probe sooner (one later where the sum of
    # the probes' 0.1 s falls short of 0.3 in floats)
    assert gap >= 0.3 > gap - 0.1 - FLOAT
    await drive(vt, lambda: r.restarts == 1, "a restart")
    sick.unlink()
    await drive(vt, lambda: r.phase == Phase.READY, "ready after the restart", paced=True)
    assert any(line.startswith("[synapse-agent] unhealthy for 0.3s; restart in")
               for line in r.sink.lines())


def _cmdline(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode()


async def test_a_vllm_backend_without_gpu_gets_the_cpu_environment_under_its_own(make):
    sup = make(vllm_command=STAND_IN, vllm_device="cpu", vllm_cpu_kvcache_gib=0.5)
    spec = types.EngineSpec(name="v", engine="vllm", model="/models/smol",
                            served_model_names=("smol",),
                            env=(("VLLM_CPU_OMP_THREADS_BIND", "1"),))
    await sup.start([spec])
    r = sup.runners["v"]
    await harness.until(lambda: r.phase == Phase.READY, 15, "the engine to be ready")
    environ = proc_environ(r.pid)
    assert environ["VLLM_TARGET_DEVICE"] == "cpu" and environ["VLLM_CPU_KVCACHE_SPACE"] == "0.5"
    assert environ["HF_HUB_OFFLINE"] == "1"
    assert environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"  # the backend's own env wins
    assert any("--model /models/smol" in line for line in r.sink.lines())


async def test_a_vllm_backend_on_a_gpu_node_gets_no_cpu_variables(make):
    sup = make(vllm_command=STAND_IN, vllm_device="cuda")
    await sup.start([types.EngineSpec(name="g", engine="vllm", model="m", gpu_indices=(1,))])
    r = sup.runners["g"]
    await harness.until(lambda: r.phase == Phase.READY, 15, "the engine to be ready")
    environ = proc_environ(r.pid)
    assert "VLLM_TARGET_DEVICE" not in environ and environ["CUDA_VISIBLE_DEVICES"] == "1"


ENGINE_KEY = engine_key.derive("agent-token-for-the-supervisor-tests")


async def test_an_engine_gets_the_key_in_its_environment_only_and_is_probed_with_it(
        make, tmp_path):
    """The stand-in guards /health and /metrics with the key and prints it at start, as
    TEI prints its arguments: it becomes ready and scraped, and the key is in none of its
    command line, its log file, the reported lines or the runner's status."""
    assert ENGINE_KEY is not None
    sup = make(vllm_command=STAND_IN, vllm_device="cuda", engine_key=ENGINE_KEY)
    await sup.start([types.EngineSpec(name="k", engine="vllm", model="m")])
    r = sup.runners["k"]
    await harness.until(lambda: r.phase == Phase.READY and r.metrics_ok, 15,
                        "the guarded engine to be ready and scraped")
    assert proc_environ(r.pid)["VLLM_API_KEY"] == ENGINE_KEY
    assert ENGINE_KEY not in _cmdline(r.pid)
    await harness.until(lambda: any("api_key: Some(" in line for line in r.sink.lines()), 5,
                        "the engine to print its settings")
    status = r.status(draining=False)
    assert ENGINE_KEY not in repr(status) and ENGINE_KEY not in repr(r)
    await sup.stop_all()
    log_file = (tmp_path / "logs" / "k.log").read_text()
    assert "api_key: Some(\"**********\")" in log_file and ENGINE_KEY not in log_file


async def test_without_a_key_an_engine_gets_none_and_probes_send_none(make):
    sup = make(vllm_command=STAND_IN, vllm_device="cuda")
    await sup.start([types.EngineSpec(name="o", engine="vllm", model="m")])
    r = sup.runners["o"]
    await harness.until(lambda: r.phase == Phase.READY, 15, "the engine to be ready")
    assert "VLLM_API_KEY" not in proc_environ(r.pid)


async def test_a_crashlooping_backend_keeps_being_retried_and_a_good_start_clears_it(
        make, tmp_path):
    """It stayed in crashloop for good, even once its cause (a busy GPU, a port) was gone
    (probe finding): it is retried every crashloop_retry_s and ready once a retry works."""
    broken = tmp_path / "broken"
    broken.write_text("1")
    sup = make(crashloop_restarts=2, crashloop_window_s=600)
    spec = types.EngineSpec(name="cfg", engine="simulator", model="m",
                            extra_args=("--fail-while", str(broken)))
    await sup.start([spec])
    r = sup.runners["cfg"]
    await harness.until(lambda: r.phase == Phase.CRASHLOOP, 20, "crashloop")
    looping_at = r.restarts
    await harness.until(lambda: r.restarts >= looping_at + 2 and "retry in" in r.reason, 20,
                        "retries in crashloop")
    assert r.phase == Phase.CRASHLOOP and "restarts within 600s; retry in" in r.reason
    assert any("crashloop: " in line for line in r.sink.lines())
    broken.unlink()   # the cause goes away; nobody names the backend again
    await harness.until(lambda: r.phase == Phase.READY, 20, "ready after a retry")
    assert r.status(draining=False).phase == Phase.READY


class Stranger:
    """Another process's server on a port: answers /health with 200 to anyone."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = harness.free_port()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def health(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="not your engine")

        app = web.Application()
        app.router.add_get("/health", health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_a_port_held_by_another_process_is_never_reported_ready(make):
    """The engine could not bind, the other process answered /health and the backend was
    reported ready: tenants' prompts and the engine key went to a stranger (probe
    finding). Now the engine is not started while the port is held, the reason names the
    holder, and it starts once the port is free."""
    stranger, seen = Stranger(), []
    await stranger.start()
    sup = make(on_change=lambda: seen.extend(r.phase for r in sup.runners.values()))
    await sup.start([types.EngineSpec(name="p", engine="simulator", model="m",
                                      port=stranger.port)])
    r = sup.runners["p"]
    await harness.until(lambda: "restart in" in r.reason, 20, "a failed start")
    assert f"port {stranger.port} is held by pid " in r.reason
    assert "not by an engine of this agent" in r.reason
    assert r.pid == 0 and r.restarts == 0     # nothing was started to fail binding
    await stranger.stop()
    await harness.until(lambda: r.phase == Phase.READY, 20, "ready once the port is free")
    assert Phase.READY not in seen[:seen.index(Phase.READY)]
    assert r.url == f"http://127.0.0.1:{stranger.port}"


async def test_an_answer_from_a_process_outside_the_engines_tree_is_not_ready(make):
    """The port is free when the engine starts, then taken by another process while the
    engine (which never binds) starts up: its /health answers do not make it ready."""
    stranger, seen = Stranger(), []
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    sup = make(simulator_command=silent, startup_deadline_s=600,
               on_change=lambda: seen.extend(r.phase for r in sup.runners.values()))
    await sup.start([types.EngineSpec(name="q", engine="simulator", model="m",
                                      port=stranger.port)])
    r = sup.runners["q"]
    await harness.until(lambda: r.pid != 0, 20, "the engine to start")
    await stranger.start()
    try:
        await harness.until(lambda: r.phase == Phase.READY or "is answered by" in r.reason, 20,
                            "the stranger's answer")
        assert r.phase == Phase.STARTING
        hits = stranger.hits
        await harness.until(lambda: stranger.hits >= hits + 3, 20, "more probes")
        assert r.phase == Phase.STARTING and Phase.READY not in seen
        assert f"port {stranger.port} is answered by pid " in r.reason
        assert r.reason.endswith("not by this engine")
    finally:
        await stranger.stop()


async def test_a_port_the_agent_chose_is_replaced_when_another_process_takes_it(make):
    vt = VirtualTime()  # the restart (5 virtual s) waits for the test to take the port first
    sup = make(timing=vt.time, backoff_initial_s=5, backoff_max_s=5)
    await sup.start([types.EngineSpec(name="c", engine="simulator", model="m")])
    r = sup.runners["c"]
    await drive(vt, lambda: r.phase == Phase.READY, "ready", paced=True)
    chosen = r.port
    os.killpg(r.pid, signal.SIGKILL)
    await drive(vt, lambda: "restart in" in r.reason, "the engine's exit", paced=True)
    with socket.socket() as taken:   # another process takes the port meanwhile
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", chosen))
        taken.listen()
        await drive(vt, lambda: r.phase == Phase.READY, "ready on another port", paced=True)
        assert r.port != chosen and r.url == f"http://127.0.0.1:{r.port}"
        assert r.restarts == 1
    await sup.stop_all()


async def test_a_wrapped_engine_whose_port_is_served_outside_its_tree_becomes_ready(make):
    """``docker run`` as the command: the engine listens in the container, the port on the
    host is held by another process (docker-proxy), and the backend never became ready
    (review finding). With own_port false any answer on the port counts."""
    stranger = Stranger()     # stands for the container's published port
    await stranger.start()
    wrapper = [sys.executable, "-c", "import time; time.sleep(60)"]
    sup = make(simulator_command=wrapper)
    try:
        await sup.start([types.EngineSpec(name="w", engine="simulator", model="m",
                                          port=stranger.port, own_port=False)])
        r = sup.runners["w"]
        await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
        assert r.pid != 0 and r.restarts == 0
    finally:
        await stranger.stop()
