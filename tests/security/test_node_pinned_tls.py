"""Per-node certificates on the agents' Node service, pinned through Register
(``grpc.tls_self_signed`` on the agents; the control plane with no ``grpc.node_ca_file``
and ``grpc.node_tls_required``), against real processes: control planes, agents, the
TEI-mode simulator as the embedder (a text and its upper-cased copy get one vector).

- The control plane embeds through an agent that made its own certificate at start (a
  semantic hit needs it).
- A second agent process, with a certificate of its own and the shared agent token (a
  compromised GPU node), answering at the address another node registered, is never sent
  a text: the handshake fails, the cache fails open.
- An agent that restarts makes a new certificate; the control plane's next call is
  dialled with the new pin (not over the channel that trusts the old one).
"""

from __future__ import annotations

import dataclasses
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fleet, harness
from tests.security.test_hostile_tenant_cache import chat, metric, until_status
from tests.security.test_node_tls import make_ca, make_leaf


@dataclasses.dataclass
class Fleet:
    pool: harness.ProcessPool
    cp: str                    # the control plane whose agent is where it registered
    misdirected_cp: str        # the one whose agent registered the stand-in's address
    misdirected_log: pathlib.Path
    agent: harness.ManagedProcess
    agent_config: pathlib.Path
    stand_in_metrics: str      # the stand-in agent's /metrics URL


def _cp(tmp: pathlib.Path, name: str, sim: int, cert: tuple[str, str]) -> tuple[list[str], str, int]:
    http, grpc_port = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config(
        name, http, grpc_port, tmp / f"data-{name}",
        upstreams=[{"name": "sim", "url": f"http://127.0.0.1:{sim}", "models": [fleet.MODEL]}],
        grpc={"host": "127.0.0.1", "port": grpc_port, "tls_cert_file": cert[0],
              "tls_key_file": cert[1], "node_tls_required": True},
        cache={"semantic_enabled": True, "embed_model": fleet.EMBED, "l1_budget_ms": 1000,
               "semantic_budget_ms": 5000},
        logging={"level": "info"})
    path = fleet.write_yaml(tmp / f"{name}.yaml", cfg)
    return ["synapse", "controlplane", "--config", str(path)], f"http://127.0.0.1:{http}", grpc_port


def _agent(tmp: pathlib.Path, name: str, cp_grpc: int, ca: str, tei: int,
           advertise: str | None = None) -> tuple[pathlib.Path, dict[str, Any]]:
    cfg = fleet.agent_config(name, [], {}, tmp / f"engines-{name}",
                             tei_url=f"http://127.0.0.1:{tei}")
    cfg["control_plane"].update(dns_name=f"localhost:{cp_grpc}", tls_ca_file=ca,
                                dns_refresh_s=1)
    cfg["metrics"]["port"] = harness.free_port()
    cfg["grpc"]["tls_self_signed"] = True
    if advertise:
        cfg["grpc"]["advertise_address"] = advertise
    return fleet.write_yaml(tmp / f"agent-{name}.yaml", cfg), cfg


def _start_agent(pool: harness.ProcessPool, name: str, path: pathlib.Path,
                 cp: str, streams: int = 1) -> harness.ManagedProcess:
    proc = pool.start(f"agent-{name}", ["synapse", "agent", "--config", str(path)])
    harness.wait_until(lambda: metric(cp, "synapse_agent_streams") >= streams, 60,
                       f"agent {name} streaming", proc=proc, interval=0.2)
    return proc


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("node-pinned-tls")
    ca = make_ca(tmp, "ca")
    cp_cert = make_leaf(tmp, "controlplane", "localhost", ca)
    sim, tei = harness.free_port(), harness.free_port()
    pool = harness.ProcessPool(tmp)
    try:
        pool.start("simulator", fleet.simulator_argv(sim, time_scale=0),
                   ready_url=f"http://127.0.0.1:{sim}/health")
        pool.start("tei", fleet.tei_argv(tei), ready_url=f"http://127.0.0.1:{tei}/health")
        urls, grpc_ports, cps = {}, {}, {}
        for name in ("pinned", "misdirected"):
            argv, urls[name], grpc_ports[name] = _cp(tmp, name, sim, cp_cert)
            cps[name] = pool.start(f"controlplane-{name}", argv,
                                   ready_url=f"{urls[name]}/health", timeout=60)
        path, _ = _agent(tmp, "pinned", grpc_ports["pinned"], str(ca[0]), tei)
        agent = _start_agent(pool, "pinned", path, urls["pinned"])
        # The stand-in: an agent of its own (its own certificate, the shared token) that
        # registers nowhere (no control plane there) and answers where the other node
        # said its Node service is.
        dead = harness.free_port()
        stand_in_path, stand_in = _agent(tmp, "stand-in", dead, str(ca[0]), tei)
        stand_in_address = stand_in["grpc"]["advertise_address"]
        pool.start("agent-stand-in", ["synapse", "agent", "--config", str(stand_in_path)],
                   ready_url=f"http://127.0.0.1:{stand_in['metrics']['port']}/healthz")
        victim_path, _ = _agent(tmp, "victim", grpc_ports["misdirected"], str(ca[0]), tei,
                                advertise=stand_in_address)
        _start_agent(pool, "victim", victim_path, urls["misdirected"])
        yield Fleet(pool, urls["pinned"], urls["misdirected"], cps["misdirected"].log_path,
                    agent, path,
                    f"http://127.0.0.1:{stand_in['metrics']['port']}/metrics")
    finally:
        pool.stop_all()


def _node_calls(metrics_url: str) -> float:
    """``Node.Embed`` calls an agent saw, whatever their outcome."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("synapse_agent_embed_requests_total{"))


def _semantic_hit(cp: str, question: str) -> None:
    """``question`` is stored (embedded) and its upper-cased copy found (embedded)."""
    stored = metric(cp, "synapse_cache_stores_total", layer="semantic")
    assert chat(cp, question).headers["x-synapse-cache"] == "miss"
    harness.wait_until(lambda: metric(cp, "synapse_cache_stores_total",
                                      layer="semantic") > stored, 30, "the semantic entry")
    until_status(lambda: chat(cp, question.upper()), "hit-semantic",
                 "a semantic hit, embedded by Node.Embed over the pinned TLS channel")


def test_the_control_plane_embeds_through_an_agents_own_certificate(pinned: Fleet) -> None:
    _semantic_hit(pinned.cp, "What does a pinned certificate prove?")


def test_a_stand_in_at_a_nodes_address_with_another_certificate_gets_no_text(
        pinned: Fleet) -> None:
    errors = metric(pinned.misdirected_cp, "synapse_cache_errors_total", layer="embedder")
    for n in range(3):
        reply = chat(pinned.misdirected_cp, f"A prompt the stand-in must not see, {n}")
        assert reply.headers["x-synapse-cache"] == "miss"     # the cache failed open
    assert metric(pinned.misdirected_cp, "synapse_cache_errors_total",
                  layer="embedder") > errors
    assert _node_calls(pinned.stand_in_metrics) == 0
    # grpc's own log line: the control plane checked the stand-in's certificate against
    # the pinned one and refused it (it did not skip the call)
    log = pinned.misdirected_log.read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_a_restarted_agent_is_dialled_with_its_new_certificate(pinned: Fleet) -> None:
    _semantic_hit(pinned.cp, "Which channel does the restarted agent get?")
    before = metric(pinned.cp, "synapse_cache_stores_total", layer="semantic")
    pinned.agent.stop()
    harness.wait_until(lambda: metric(pinned.cp, "synapse_agent_streams") == 0, 30,
                       "the agent's stream to end")
    pinned.agent = _start_agent(pinned.pool, "pinned-again", pinned.agent_config, pinned.cp)
    assert metric(pinned.cp, "synapse_cache_stores_total", layer="semantic") == before
    _semantic_hit(pinned.cp, "Does a new start bring a new certificate?")
