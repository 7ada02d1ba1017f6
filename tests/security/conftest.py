"""The security fleet: two control-plane replicas sharing a password-protected Redis
(L1 cache and rate limits), each with its own Milvus Lite file, and one agent that runs
two simulators and embeds with the in-process MiniLM (so semantic hits happen), streaming
to both replicas.

Everything logs at ``debug`` — the most talkative level an operator can pick — and at
teardown every log file of the fleet, plus every error body the tests collected, is
scanned for the configured secrets (keys, the upstream key, the Redis password).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import pytest

from tests import fleet, harness

LIMITED_KEY = "sk-rel-limited-5b7d9f1a3c2e4d68"
RATE, BURST = 20.0, 100
SECRETS = (*fleet.SECRETS, LIMITED_KEY)


@dataclasses.dataclass
class SecureFleet:
    urls: list[str]              # the two replicas' HTTP base URLs
    grpcs: list[str]             # their gRPC host:port
    tmp: pathlib.Path
    redis_port: int
    bodies: list[bytes]
    redis: harness.ManagedProcess | None = None
    engine_urls: list[str] = dataclasses.field(default_factory=list)  # the agent's engines

    def secrets(self) -> tuple[str, ...]:
        """:data:`SECRETS` and the keys the agent chose for its engines."""
        return (*SECRETS, *(harness.engine_key_at(url) for url in self.engine_urls))


def start_redis(pool: harness.ProcessPool, tmp: pathlib.Path,
                port: int = 0) -> tuple[int, harness.ManagedProcess]:
    port = port or harness.free_port()
    proc = pool.start("redis", harness.redis_argv(port, tmp, "--requirepass",
                                                  fleet.REDIS_PASSWORD),
                      ready=lambda: _redis_up(port), timeout=15)
    return port, proc


def _redis_up(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"-NOAUTH")
    except OSError:
        return False


@pytest.fixture(scope="package")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    tmp = tmp_path_factory.mktemp("security")
    pool = harness.ProcessPool(tmp)
    http = [harness.free_port(), harness.free_port()]
    grpc = [harness.free_port(), harness.free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in http]
    gw = SecureFleet(urls, [f"127.0.0.1:{p}" for p in grpc], tmp, 0, [])
    try:
        gw.redis_port, gw.redis = start_redis(pool, tmp)
        redis_url = f"redis://:{fleet.REDIS_PASSWORD}@127.0.0.1:{gw.redis_port}/0"
        for i in range(2):
            cfg = fleet.controlplane_config(
                f"sec-{i}", http[i], grpc[i], tmp / f"data-{i}",
                redis={"url": redis_url, "timeout_s": 3.0},
                cache={"semantic_enabled": True, "semantic_budget_ms": 5000,
                       "l1_budget_ms": 1000},
                logging={"level": "debug"})
            cfg["auth"]["tenants"].append({"name": "limited", "keys": [LIMITED_KEY],
                                           "requests_per_second": RATE, "burst": BURST})
            path = fleet.write_yaml(tmp / f"cp-{i}.yaml", cfg)
            pool.start(f"controlplane-{i}", ["synapse", "controlplane", "--config", str(path),
                                             "--log-level", "debug"],
                       ready_url=f"{urls[i]}/health", timeout=60)
        engines = {"gen-a": harness.free_port(), "gen-b": harness.free_port()}
        gw.engine_urls = [f"http://127.0.0.1:{p}" for p in engines.values()]
        agent_cfg = fleet.agent_config("sec-node", gw.grpcs, engines, tmp / "engines",
                                       time_scale=0)
        agent_cfg["embedder"] = {"kind": "minilm"}
        for backend in agent_cfg["backends"]:       # proof of origin for cached answers
            backend["extra_args"].append("--answer-origin")
        path = fleet.write_yaml(tmp / "agent.yaml", agent_cfg)
        agent = pool.start("agent", ["synapse", "agent", "--config", str(path),
                                     "--log-level", "debug"])
        for url in urls:
            harness.wait_until(lambda u=url: fleet.backends_ready(u) >= 2, 90,
                               f"both engines ready behind {url}", proc=agent, interval=0.3)
        harness.wait_until(lambda: fleet.node_embeds(agent_cfg["grpc"]["advertise_address"]),
                           120, "the agent's MiniLM to load", proc=agent, interval=0.3)
        yield gw
    finally:
        pool.stop_all()
    leaks = fleet.scan_for_secrets(fleet.log_files(tmp), gw.bodies, SECRETS)
    assert not leaks, f"configured secrets found in logs or error bodies: {leaks}"
