"""The agent link over TLS in both directions, against real processes, with certificates
made by the openssl CLI: a CA, a control-plane certificate for ``localhost`` (the name
the agents resolve, as they resolve the chart's headless Service, and dial by address)
and an agent certificate for ``synapse-agent`` (``grpc.node_server_name``: the control
plane dials agents at addresses no certificate names).

- A control plane with ``grpc.node_ca_file`` embeds through a TLS agent's ``Node.Embed``
  (a semantic hit needs it), and the agent's Node port refuses plain text.
- The same control plane never calls an agent whose Node service is plain text: the
  agent sees no call, the cache fails open and requests are still answered.
- An agent with ``control_plane.tls_ca_file`` does not register with a control plane
  whose certificate another CA signed (a stand-in on the network once made an agent
  start an engine).

The embedder is the TEI-mode simulator behind the agents (a text and its upper-cased copy
get one vector): what is under test is the Node call, not the model.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from protos.synapse.v1 import node_pb2, node_pb2_grpc
from tests import fleet, harness, node_auth
from tests.security.test_hostile_tenant_cache import chat, metric, until_status

SERVER_NAME = "synapse-agent"


def _openssl(*args: str) -> None:
    openssl = harness.tool("openssl", "the TLS tests need its CLI: apt-get install openssl")
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(certificate, key) of a fresh self-signed CA."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
             str(key), "-out", str(cert), "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(folder: pathlib.Path, name: str, dns: str,
              ca: tuple[pathlib.Path, pathlib.Path]) -> tuple[str, str]:
    """(certificate, key) for the DNS name ``dns``, signed by ``ca``."""
    cert, key, csr = (folder / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{dns}\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={dns}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext))
    return str(cert), str(key)


@dataclasses.dataclass
class Link:
    tls_cp: str               # HTTP base of the control plane with node_ca_file
    plain_cp: str             # ... of a second one, whose agent serves Node in plain text
    rogue_cp: str             # ... of a control plane with a certificate of another CA
    tls_node: str             # the TLS agent's Node address
    plain_agent_metrics: str  # the plain-text agent's /metrics URL
    ca: str
    rogue_agent: harness.ManagedProcess


def _cp(tmp: pathlib.Path, name: str, sim: int, cert: tuple[str, str],
        ca: str) -> tuple[pathlib.Path, str, int]:
    http, grpc_port = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config(
        name, http, grpc_port, tmp / f"data-{name}",
        upstreams=[{"name": "sim", "url": f"http://127.0.0.1:{sim}", "models": [fleet.MODEL]}],
        grpc={"host": "127.0.0.1", "port": grpc_port, "tls_cert_file": cert[0],
              "tls_key_file": cert[1], "node_ca_file": ca, "node_server_name": SERVER_NAME},
        cache={"semantic_enabled": True, "embed_model": fleet.EMBED, "l1_budget_ms": 1000,
               "semantic_budget_ms": 5000},
        logging={"level": "info"})
    return fleet.write_yaml(tmp / f"{name}.yaml", cfg), f"http://127.0.0.1:{http}", grpc_port


def _agent(tmp: pathlib.Path, name: str, cp_grpc: int, ca: str, tei: int | None,
           node_tls: tuple[str, str] | None) -> tuple[pathlib.Path, dict[str, object]]:
    cfg = fleet.agent_config(name, [], {}, tmp / f"engines-{name}",
                             tei_url=f"http://127.0.0.1:{tei}" if tei else None)
    # by name, as the chart's agents dial the headless Service: the A records are dialled
    cfg["control_plane"].update(dns_name=f"localhost:{cp_grpc}", tls_ca_file=ca,
                                dns_refresh_s=1)
    cfg["metrics"]["port"] = harness.free_port()
    if node_tls is not None:
        cfg["grpc"].update(tls_cert_file=node_tls[0], tls_key_file=node_tls[1])
    return fleet.write_yaml(tmp / f"agent-{name}.yaml", cfg), cfg


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    tmp = tmp_path_factory.mktemp("node-tls")
    ca = make_ca(tmp, "ca")
    cp_cert = make_leaf(tmp, "controlplane", "localhost", ca)
    agent_cert = make_leaf(tmp, "agent", SERVER_NAME, ca)
    rogue_cert = make_leaf(tmp, "rogue", "localhost", make_ca(tmp, "rogue-ca"))
    sim, tei = harness.free_port(), harness.free_port()
    pool = harness.ProcessPool(tmp)
    try:
        pool.start("simulator", fleet.simulator_argv(sim, time_scale=0),
                   ready_url=f"http://127.0.0.1:{sim}/health")
        pool.start("tei", fleet.tei_argv(tei), ready_url=f"http://127.0.0.1:{tei}/health")
        urls, agents, procs = {}, {}, {}
        for name, cert, node_tls in (("tls", cp_cert, agent_cert), ("plain", cp_cert, None),
                                     ("rogue", rogue_cert, None)):
            path, urls[name], grpc_port = _cp(tmp, name, sim, cert, str(ca[0]))
            pool.start(f"controlplane-{name}", ["synapse", "controlplane", "--config",
                                                str(path)],
                       ready_url=f"{urls[name]}/health", timeout=60)
            agent_path, agents[name] = _agent(tmp, name, grpc_port, str(ca[0]),
                                              None if name == "rogue" else tei, node_tls)
            procs[name] = pool.start(f"agent-{name}", ["synapse", "agent", "--config",
                                                       str(agent_path)])
            if name != "rogue":
                harness.wait_until(lambda u=urls[name]: metric(u, "synapse_agent_streams") >= 1,
                                   60, f"agent {name} streaming over TLS", proc=procs[name],
                                   interval=0.2)
        tls_node = str(agents["tls"]["grpc"]["advertise_address"])  # type: ignore[index]
        harness.wait_until(lambda: _embeds_over_tls(tls_node, str(ca[0])), 60,
                           "the TLS agent's embedder", interval=0.2)
        plain_node = str(agents["plain"]["grpc"]["advertise_address"])  # type: ignore[index]
        harness.wait_until(lambda: fleet.node_embeds(plain_node), 60,
                           "the plain-text agent's embedder", interval=0.2)
        metrics_port = agents["plain"]["metrics"]["port"]  # type: ignore[index]
        yield Link(urls["tls"], urls["plain"], urls["rogue"], tls_node,
                   f"http://127.0.0.1:{metrics_port}/metrics", str(ca[0]), procs["rogue"])
    finally:
        pool.stop_all()


def _embeds_over_tls(address: str, ca: str) -> bool:
    credentials = grpc.ssl_channel_credentials(pathlib.Path(ca).read_bytes())
    with grpc.secure_channel(address, credentials, options=(
            ("grpc.ssl_target_name_override", SERVER_NAME),)) as channel:
        try:
            node_pb2_grpc.NodeStub(channel).Embed(node_pb2.EmbedRequest(texts=["ping"]),
                                                  metadata=node_auth.metadata(), timeout=5)
        except grpc.RpcError:
            return False
    return True


def _node_calls(metrics_url: str) -> float:
    """``Node.Embed`` calls an agent saw, whatever their outcome."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("synapse_agent_embed_requests_total{"))


def test_the_semantic_cache_embeds_through_the_tls_agent(link: Link) -> None:
    question = "What does the agent link encrypt?"
    assert chat(link.tls_cp, question).headers["x-synapse-cache"] == "miss"
    harness.wait_until(lambda: metric(link.tls_cp, "synapse_cache_stores_total",
                                      layer="semantic") >= 1, 30, "the semantic entry")
    until_status(lambda: chat(link.tls_cp, question.upper()), "hit-semantic",
                 "a semantic hit, embedded by Node.Embed over TLS")


def test_the_tls_agents_node_port_refuses_plain_text(link: Link) -> None:
    assert not fleet.node_embeds(link.tls_node)
    assert _embeds_over_tls(link.tls_node, link.ca)


def test_a_plain_text_agent_is_never_sent_a_text(link: Link) -> None:
    before = _node_calls(link.plain_agent_metrics)
    errors = metric(link.plain_cp, "synapse_cache_errors_total", layer="embedder")
    for n in range(3):
        reply = chat(link.plain_cp, f"A prompt that stays on this side, number {n}")
        assert reply.headers["x-synapse-cache"] == "miss"     # the cache failed open
    assert metric(link.plain_cp, "synapse_cache_errors_total", layer="embedder") > errors
    assert _node_calls(link.plain_agent_metrics) == before


def test_an_agent_does_not_register_with_a_control_plane_its_ca_did_not_sign(
        link: Link) -> None:
    log = link.rogue_agent.log_path
    # grpc's own log line: the agent checked the stand-in's certificate and refused it
    harness.wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(errors="replace"),
                       30, "the agent's refused handshake with the stand-in", interval=0.2)
    assert metric(link.rogue_cp, "synapse_agent_streams") == 0
    nodes = fleet.get_json(f"{link.rogue_cp}/api/v1/stats").get("nodes")
    assert not nodes, nodes
