"""One real control plane (subprocess) in front of one simulator, shared by the
bad-input modules: starting processes is the slow part, abusing them is cheap.

Logging is at ``debug`` on purpose: the secret scan at teardown then covers the most
talkative setting an operator could choose.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import pytest

from tests import fleet, harness


@dataclasses.dataclass
class Gateway:
    url: str
    grpc: str
    tmp: pathlib.Path
    bodies: list[bytes]          # error bodies seen by the tests, scanned for secrets


@pytest.fixture(scope="package")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("badinput")
    sim_port, tei_port = harness.free_port(), harness.free_port()
    http, grpc = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config(
        "badinput", http, grpc, tmp / "data",
        upstreams=[{"name": "sim", "url": f"http://127.0.0.1:{sim_port}",
                    "models": [fleet.MODEL], "api_key": fleet.UPSTREAM_KEY,
                    "tasks": ["generate", "responses", "messages", "tokenize"]},
                   {"name": "tei", "url": f"http://127.0.0.1:{tei_port}",
                    "models": [fleet.EMBED], "task": "embed"}],
        logging={"level": "debug"})
    path = fleet.write_yaml(tmp / "cp.yaml", cfg)
    pool = harness.ProcessPool(tmp)
    url = f"http://127.0.0.1:{http}"
    gw = Gateway(url, f"127.0.0.1:{grpc}", tmp, [])
    try:
        pool.start("simulator", fleet.simulator_argv(sim_port, time_scale=0),
                   ready_url=f"http://127.0.0.1:{sim_port}/health")
        pool.start("tei", fleet.tei_argv(tei_port),
                   ready_url=f"http://127.0.0.1:{tei_port}/health")
        cp = pool.start("controlplane", ["synapse", "controlplane", "--config", str(path)],
                        ready_url=f"{url}/health", timeout=60)
        harness.wait_until(lambda: harness.http_ok(f"{url}/ready"), 30,
                           "the simulator upstream to be routable", proc=cp)
        yield gw
    finally:
        pool.stop_all()
    leaks = fleet.scan_for_secrets(fleet.log_files(tmp), gw.bodies)
    assert not leaks, f"configured secrets found in logs or error bodies: {leaks}"
