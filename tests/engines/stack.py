"""A real stack for tests: a control plane, an agent, and the real vLLM (SmolLM2-135M on
the CPU, from ``make engines``) that the agent supervises — one home for its configs.

:func:`start` is a context manager any suite can use (``control-plane sections`` merge
into the fleet's control-plane config); ``tests/engines/conftest.py`` runs one for the
whole session, since a vLLM takes tens of seconds to start and ~4 GB of memory. A missing
engine tier fails the test with the message that says ``make engines``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from synapse_common import engines
from tests import fleet, harness

NODE = "engine-node"
BACKEND = "vllm"
START_S = 480.0  # vLLM's start-up on a 2-core machine that other jobs keep busy, with margin


@dataclasses.dataclass
class RealStack:
    base: str  # http://127.0.0.1:PORT
    admin: str  # control-plane gRPC host:port
    engine_url: str  # vLLM itself, around Synapse
    agent: harness.ManagedProcess
    model: str
    workdir: pathlib.Path

    @property
    def backend_key(self) -> str:
        return f"{NODE}/{BACKEND}"

    @property
    def engine_key(self) -> str:
        """The key the agent gave vLLM (VLLM_API_KEY) and the control plane presents."""
        return harness.engine_key_at(self.engine_url)

    def client(self, key: str = fleet.TENANT_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0,
                             timeout=120)

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([harness.console_script("synapsectl"), "--server", self.admin,
                               *argv], env={**os.environ, "SYNAPSE_ADMIN_TOKEN": fleet.ADMIN_KEY},
                              capture_output=True, text=True, timeout=60, check=False)

    def engine(self) -> dict[str, Any]:
        """The vLLM backend as ``synapsectl describe node`` shows it (JSON)."""
        done = self.ctl("-o", "json", "describe", "node", NODE)
        assert done.returncode == 0, done.stderr
        node = json.loads(done.stdout)
        return dict(next(b for b in node["backends"] if b["name"] == BACKEND))


def _agent_config(cp_grpc: int, log_dir: pathlib.Path, command: list[str],
                  model_dir: pathlib.Path, model: str, port: int) -> dict[str, Any]:
    cfg = fleet.agent_config(NODE, [f"127.0.0.1:{cp_grpc}"], {}, log_dir)
    cfg["supervisor"].update({
        "vllm_command": command, "vllm_device": "cpu", "vllm_cpu_kvcache_gib": 1,
        "startup_deadline_s": START_S, "stop_grace_s": 15.0, "drain_grace_s": 10.0,
        "probe_timeout_s": 5.0, "unhealthy_after": 3})
    cfg["backends"] = [{
        "name": BACKEND, "engine": "vllm", "model": str(model_dir),
        "served_model_names": [model], "port": port, "max_model_len": 4096,
        "extra_args": ["--dtype", engines.cpu_dtype(), "--enforce-eager",
                       "--enable-prompt-tokens-details"]}]
    return cfg


def require_vllm(why: str) -> tuple[engines.EngineTier, list[str], pathlib.Path]:
    """The engine tier, vLLM's server command and the model directory; without them the
    test fails with ``why`` and the message that says ``make engines``."""
    tier = engines.find()
    try:
        command, model_dir = tier.require_vllm()
    except engines.EngineTierMissing as exc:
        pytest.fail(f"{why}: {exc}", pytrace=False)
    return tier, command, model_dir


@contextlib.contextmanager
def start(work: pathlib.Path, **cp_sections: Any) -> Iterator[RealStack]:
    """Control plane, agent and vLLM in ``work``; stopped on exit."""
    tier, command, model_dir = require_vllm("this test runs a real vLLM")
    pool = harness.ProcessPool(work)
    http, grpc, port = harness.free_port(), harness.free_port(), harness.free_port()
    sections: dict[str, Any] = {
        "http": {"upstream_first_byte_timeout_s": 120.0, "upstream_idle_timeout_s": 60.0},
        "models": [{"name": tier.model_name, "aliases": ["smollm2"]}], **cp_sections}
    cp = fleet.controlplane_config("cp", http, grpc, work / "cp-data", **sections)
    cp_path = fleet.write_yaml(work / "cp.yaml", cp)
    agent_path = fleet.write_yaml(work / "agent.yaml", _agent_config(
        grpc, work / "engine-logs", command, model_dir, tier.model_name, port))
    base = f"http://127.0.0.1:{http}"
    try:
        pool.start("controlplane", ["synapse", "controlplane", "--config", str(cp_path)],
                   ready_url=f"{base}/health")
        agent = pool.start("agent", ["synapse", "agent", "--config", str(agent_path)])
        harness.wait_until(lambda: fleet.backends_ready(base) == 1, START_S,
                           "the real vLLM to be ready behind the control plane",
                           interval=0.5, proc=agent)
        yield RealStack(base, f"127.0.0.1:{grpc}", f"http://127.0.0.1:{port}", agent,
                        tier.model_name, work)
    finally:
        pool.stop_all()
