"""Fixtures for the agent tests: a stand-in control plane and agent configs/processes."""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests import harness, node_auth, pair_scorers
from tests.agent.control_plane import ControlPlaneServer

HERE = pathlib.Path(__file__).resolve().parent
STAND_IN = [sys.executable, str(HERE / "stand_in_engine.py")]


def engine_command() -> list[str]:
    """The real engine simulator (``synapse simulator``)."""
    return [harness.console_script("synapse"), "simulator"]


@pytest.fixture
def control_plane() -> Iterator[ControlPlaneServer]:
    server = ControlPlaneServer()
    server.start()
    yield server
    server.stop()


def agent_config(tmp_path: pathlib.Path, cp: ControlPlaneServer | None, **sections: Any
                 ) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node_name": "test-node",
        "control_plane": {"addresses": [cp.address] if cp else [], "report_interval_s": 0.3,
                          "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                          "connect_timeout_s": 1.0, "token": node_auth.TOKEN},
        "grpc": {"host": "127.0.0.1", "port": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "supervisor": {"log_dir": str(tmp_path / "engine-logs"), "probe_interval_s": 0.2,
                       "scrape_interval_s": 0.2, "backoff_initial_s": 0.2,
                       "backoff_max_s": 1.0, "stop_grace_s": 5, "drain_grace_s": 10,
                       "simulator_command": engine_command()},
    }
    harness.with_sections(cfg, sections)
    return cfg


class AgentProcess:
    def __init__(self, proc: harness.ManagedProcess) -> None:
        self.proc = proc

    def _port(self, pattern: str) -> int:
        match = re.search(pattern, self.proc.output())
        assert match, f"no {pattern!r} in the agent output:\n{self.proc.output_tail()}"
        return int(match.group(1))

    @property
    def metrics_url(self) -> str:
        port = self._port(r"agent metrics listening on http://127\.0\.0\.1:(\d+)")
        return f"http://127.0.0.1:{port}/metrics"

    @property
    def grpc_address(self) -> str:
        port = self._port(r"agent node gRPC listening on 127\.0\.0\.1:(\d+)")
        return f"127.0.0.1:{port}"

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()


@pytest.fixture
def start_agent(processes: harness.ProcessPool, tmp_path: pathlib.Path
                ) -> Callable[[dict[str, Any]], AgentProcess]:
    def start(cfg: dict[str, Any], name: str = "agent") -> AgentProcess:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        argv = [harness.console_script("synapse"), "agent", "--config", str(path)]
        proc = harness.ManagedProcess(name, argv, tmp_path / f"{name}.log")
        processes.procs.append(proc)  # stopped (whole group) at teardown
        harness.wait_until(lambda: "agent metrics listening" in proc.output(), 30,
                           "the agent to listen", proc=proc)
        return AgentProcess(proc)

    return start


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the module, as on a busy agent (the machine is shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_scorer_path(tmp_path_factory: pytest.TempPathFactory,
                      one_torch_thread: None) -> pathlib.Path:
    """A small pair scorer's weights file (``tests.pair_scorers.small_file``)."""
    return pair_scorers.small_file(tmp_path_factory.mktemp("scorer"))
