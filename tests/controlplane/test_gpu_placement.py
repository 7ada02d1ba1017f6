"""Placement onto GPUs, end to end: a control-plane replica (Admin + Connect on real gRPC)
and a real ``synapse agent`` process with the fake GPU source on a 4-GPU node (fixed
memory in use: 10, 20, 30 and 40 GiB of 80) and an engine port range. Its "vLLM" is the
stand-in engine, so the command line and environment the agent gives it can be read off
the engine process.

Two deploys by free VRAM land on different GPUs, on ports inside the range, each with
``CUDA_VISIBLE_DEVICES`` and ``--gpu-memory-utilization`` from its plan; a third that
does not fit is refused with its reason, which ``synapsectl`` prints. And an engine plan
that does not fit what the agent sees is refused by the agent, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import pathlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import psutil
import yaml

from controlplane import config, ctl
from controlplane.core import types
from protos.synapse.v1 import admin_pb2, common_pb2
from tests import harness
from tests.agent.conftest import STAND_IN
from tests.controlplane.test_admin import ADMIN_KEY, Admin, Replica, eventually

GIB = 1024**3
NODE = "gpu-node"
TOKEN = "agent-token-for-placement-tests"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(n: int) -> tuple[int, int]:
    """``n`` consecutive ports nobody listens on (the engine port range of the test)."""
    for _ in range(100):
        first = harness.free_port()
        if first + n <= 65535 and all(_free(p) for p in range(first, first + n)):
            return first, first + n - 1
    raise AssertionError(f"no {n} consecutive free ports")


def cp_settings() -> config.ControlPlaneSettings:
    return config.ControlPlaneSettings.model_validate({
        "replica_id": "placement", "grpc": {"host": "127.0.0.1", "port": 0},
        "auth": {"admin_key": ADMIN_KEY, "agent_token": TOKEN, "tenants": []},
        "cache": {"enabled": False}})


def agent_config(tmp: pathlib.Path, cp_address: str, ports: tuple[int, int]) -> pathlib.Path:
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "node_name": NODE,
        "control_plane": {"addresses": [cp_address], "report_interval_s": 0.2,
                          "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "token": TOKEN},
        "grpc": {"host": "127.0.0.1", "port": 0}, "metrics": {"host": "127.0.0.1", "port": 0},
        "telemetry": {"source": "fake", "interval_s": 0.1, "fake_gpus": [
            {"name": "Fake 80GB", "memory_total_gb": 80, "memory_used_gb": used}
            for used in (10, 20, 30, 40)]},
        "supervisor": {"log_dir": str(tmp / "engines"), "probe_interval_s": 0.2,
                       "scrape_interval_s": 0.2, "stop_grace_s": 2, "drain_grace_s": 0,
                       "vllm_command": STAND_IN, "vllm_device": "cuda",
                       "engine_port_range": list(ports)}}))
    return path


@contextlib.asynccontextmanager
async def fleet(tmp: pathlib.Path, processes: harness.ProcessPool,
                ) -> AsyncIterator[tuple[Replica, harness.ManagedProcess, Admin, tuple[int, int]]]:
    replica = await Replica(cp_settings()).start()
    ports = free_port_range(4)
    admin = Admin(replica.address)
    try:
        agent = processes.start("agent", ["synapse", "agent", "--config",
                                          str(agent_config(tmp, replica.address, ports))])
        await eventually(lambda: _gpus_reported(replica) == 4, "the node's four GPUs", 60)
        yield replica, agent, admin, ports
    finally:
        await admin.channel.close()
        processes.stop_all()
        await replica.stop()


def _gpus_reported(replica: Replica) -> int:
    view = replica.services.registry.node(NODE)
    return len(view.report.gpus) if view is not None and view.report is not None else 0


def _reported_free_gb(replica: Replica, index: int) -> float:
    view = replica.services.registry.node(NODE)
    assert view is not None
    return round(view.report.gpus[index].memory_free_bytes / GIB, 1)


def _ready(replica: Replica, name: str) -> bool:
    view = replica.services.registry.node(NODE)
    return view is not None and any(b.name == name and b.phase == "ready"
                                    for b in view.backends)


def _engine(agent: harness.ManagedProcess, port: int) -> psutil.Process:
    """The engine process the agent started on ``port``."""
    for child in psutil.Process(agent.pid).children(recursive=True):
        argv = child.cmdline()
        if "--port" in argv and argv[argv.index("--port") + 1] == str(port):
            return child
    raise AssertionError(f"no engine on port {port}")


def deploy(model: str, gb: float, tp: int = 1) -> admin_pb2.DeployModelRequest:
    extra = ["--tensor-parallel-size", str(tp)] if tp > 1 else []
    return admin_pb2.DeployModelRequest(model=model, engine=common_pb2.ENGINE_KIND_VLLM,
                                        memory_required_bytes=int(gb * GIB), extra_args=extra)


def synapsectl(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = ctl.main(list(argv), environ={"SYNAPSE_ADMIN_TOKEN": ADMIN_KEY})
    return code, err.getvalue()


async def test_two_deploys_get_their_own_gpu_and_port_and_a_third_is_refused(
        tmp_path: pathlib.Path, processes: harness.ProcessPool) -> None:
    async with fleet(tmp_path, processes) as (replica, agent, admin, (first, last)):
        a = await admin("DeployModel", deploy("model-a", 30))
        assert [(p.node, p.backend) for p in a.placements] == [(NODE, "model-a-vllm")]
        # the engine runs and the node's next report shows its memory in use (the fake
        # source, like NVML, counts what a running engine holds)
        await eventually(lambda: _ready(replica, "model-a-vllm"), "model-a ready", 60)
        await eventually(lambda: _reported_free_gb(replica, 0) == 40.0, "GPU 0 in use")
        await admin("DeployModel", deploy("model-b", 30))
        await eventually(lambda: _ready(replica, "model-b-vllm"), "model-b ready", 60)
        await eventually(lambda: _reported_free_gb(replica, 1) == 30.0, "GPU 1 in use")

        desired = replica.fleet.intent.get(NODE).desired
        plans = {n: (s["gpuIndices"], s["port"]) for n, s in desired.items()}
        # 70 then 60 GiB free: each engine on the emptiest GPU, the range's first ports
        assert plans == {"model-a-vllm": ([0], first), "model-b-vllm": ([1], first + 1)}
        assert first + 1 <= last
        for gpu, port in plans.values():
            engine = _engine(agent, port)
            argv = engine.cmdline()
            assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.375"   # 30/80
            assert engine.environ()["CUDA_VISIBLE_DEVICES"] == str(gpu[0])

        # GPUs now hold 40, 30, 50 and 40 GiB free: 100 GiB over two GPUs does not fit
        code, err = await asyncio.to_thread(
            synapsectl, "--server", replica.address, "deploy", "model-c", "--engine", "vllm",
            "--memory-gb", "100", "--tensor-parallel-size", "2")
        assert code == 1
        assert err.strip() == (
            "synapsectl: error: the Admin service refused deploy model-c (FAILED_PRECONDITION): "
            "cannot place model-c: no node fits "
            f"100.0 GiB ({NODE}: 40.0 GiB free on the weakest of its 2 best GPUs, "
            "50.0 GiB needed on each)")
        assert "model-c-vllm" not in replica.fleet.intent.get(NODE).desired


async def test_the_agent_refuses_a_plan_that_does_not_fit_and_says_why(
        tmp_path: pathlib.Path, processes: harness.ProcessPool) -> None:
    async with fleet(tmp_path, processes) as (replica, _, _, (first, last)):
        def spec(name: str, port: int, gpu: int, fraction: float) -> dict[str, Any]:
            return {"name": name, "engine": "ENGINE_KIND_VLLM", "model": "m", "port": port,
                    "gpuIndices": [gpu], "gpuMemoryUtilization": fraction}

        # what a control plane with a stale view of the node might send
        result = await replica.services.registry.send_command(NODE, types.Command(
            "desired_backends", backends=(spec("fits", first, 0, 0.5),
                                          spec("too-big", first + 1, 3, 0.75),
                                          spec("off-range", last + 1, 1, 0.1))))
        assert not result.ok
        assert result.error.split("; ") == [
            "too-big: does not fit: GPU 3 has 40.0 GiB free, 60.0 GiB needed",
            f"off-range: does not fit: port {last + 1} is outside the engine port range "
            f"{first}-{last}"]
        await eventually(lambda: _ready(replica, "fits"), "the engine that fits", 60)
        view = replica.services.registry.node(NODE)
        assert view is not None and {b.name for b in view.backends} == {"fits"}
