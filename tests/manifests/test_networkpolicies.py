"""The production NetworkPolicies let exactly the needed flows through.

A small evaluator of NetworkPolicy semantics (pod and namespace selectors with
matchLabels, ports, policy types; a pod no policy selects is open in that direction)
answers "may A reach B on port P" for the rendered policies; the test lists the flows
Synapse needs and flows that must stay closed.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

import pytest
import yaml

from tests.manifests import render


@dataclasses.dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple[tuple[str, str], ...]

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


EXTERNAL = None  # an address outside the cluster (external Redis, Milvus, the internet)
CP = Pod("synapse", (("app.kubernetes.io/name", "synapse-controlplane"),))
AGENT = Pod("synapse", (("app.kubernetes.io/name", "synapse-agent"),))
CLIENT = Pod("apps", (("app", "web"),))
ADMIN = Pod("ops", (("synapse.dev/admin-client", "true"),))
PROMETHEUS = Pod("monitoring", (("app", "prometheus"),))
DNS = Pod("kube-system", (("k8s-app", "kube-dns"),))


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    assert not (selector or {}).get("matchExpressions"), "evaluator handles matchLabels only"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Pod | None) -> bool:
    if other is None:  # only an ipBlock could name an external address
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], other.ns_labels()):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or _matches(peer["podSelector"], dict(other.labels))


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol
                            and p.get("port") <= port <= p.get("endPort", p.get("port"))
                            for p in ports)


def _allowed(policies: list[dict[str, Any]], pod: Pod, other: Pod | None, port: int,
             protocol: str, direction: str) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                 and direction in p["spec"].get("policyTypes", ["Ingress"])
                 and _matches(p["spec"]["podSelector"], dict(pod.labels))]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other)
                                       for peer in peers)
            if peer_ok and _port_matches(rule, port, protocol):
                return True
    return False


def may_connect(policies: list[dict[str, Any]], src: Pod | None, dst: Pod | None, port: int,
                protocol: str = "TCP") -> bool:
    egress = src is None or _allowed(policies, src, dst, port, protocol, "Egress")
    ingress = dst is None or _allowed(policies, dst, src, port, protocol, "Ingress")
    return egress and ingress


@pytest.fixture(scope="module")
def policies() -> list[dict[str, Any]]:
    found = [o for o in render.render("production") if o["kind"] == "NetworkPolicy"]
    assert found, "production ships no NetworkPolicy"
    return found


NEEDED = [
    ("client -> control plane API", CLIENT, CP, 8080, "TCP"),
    ("prometheus -> control plane /metrics", PROMETHEUS, CP, 9101, "TCP"),
    ("agent -> control plane report stream", AGENT, CP, 50051, "TCP"),
    ("synapsectl pod -> Admin gRPC", ADMIN, CP, 50051, "TCP"),
    ("control plane -> agent Node.Embed", CP, AGENT, 50052, "TCP"),
    ("control plane -> engine in the agent pod", CP, AGENT, 8000, "TCP"),
    ("prometheus -> agent /metrics", PROMETHEUS, AGENT, 9102, "TCP"),
    ("control plane -> external Redis", CP, EXTERNAL, 6379, "TCP"),
    ("control plane -> external Milvus", CP, EXTERNAL, 19530, "TCP"),
    # TokenReviews of the agents' ServiceAccount tokens (auth.agent_review)
    ("control plane -> Kubernetes API server", CP, EXTERNAL, 443, "TCP"),
    ("control plane -> Kubernetes API server endpoint", CP, EXTERNAL, 6443, "TCP"),
    ("control plane -> DNS", CP, DNS, 53, "UDP"),
    ("agent -> DNS", AGENT, DNS, 53, "UDP"),
    ("agent -> DNS over TCP", AGENT, DNS, 53, "TCP"),
]
FORBIDDEN = [
    ("client -> Admin/agent gRPC port", CLIENT, CP, 50051, "TCP"),
    ("client -> agent Node.Embed", CLIENT, AGENT, 50052, "TCP"),
    ("client -> agent metrics", CLIENT, AGENT, 9102, "TCP"),
    ("client -> control plane metrics", CLIENT, CP, 9101, "TCP"),
    ("client -> engine, bypassing the control plane", CLIENT, AGENT, 8000, "TCP"),
    ("agent -> another agent", AGENT, AGENT, 50052, "TCP"),
    ("agent -> control plane API", AGENT, CP, 8080, "TCP"),
    ("agent -> the internet", AGENT, EXTERNAL, 443, "TCP"),
    ("agent -> Kubernetes API server endpoint", AGENT, EXTERNAL, 6443, "TCP"),
    # 443 is open to any address for the API server (its address is the cluster's own)
    ("control plane -> the internet over HTTP", CP, EXTERNAL, 80, "TCP"),
    ("control plane -> any pod in another namespace", CP, CLIENT, 8080, "TCP"),
]


@pytest.mark.parametrize(("flow", "src", "dst", "port", "protocol"), NEEDED,
                         ids=[f[0] for f in NEEDED])
def test_needed_flows_are_allowed(policies: list[dict[str, Any]], flow: str, src: Pod | None,
                                  dst: Pod | None, port: int, protocol: str) -> None:
    assert may_connect(policies, src, dst, port, protocol), f"{flow} is blocked"


@pytest.mark.parametrize(("flow", "src", "dst", "port", "protocol"), FORBIDDEN,
                         ids=[f[0] for f in FORBIDDEN])
def test_other_flows_are_denied(policies: list[dict[str, Any]], flow: str, src: Pod | None,
                                dst: Pod | None, port: int, protocol: str) -> None:
    assert not may_connect(policies, src, dst, port, protocol), f"{flow} is open"


def test_every_configured_upstream_is_reachable(policies: list[dict[str, Any]]) -> None:
    cm = render.find(render.render("production"), "ConfigMap", "synapse-controlplane-config")
    upstreams = yaml.safe_load(cm["data"]["config.yaml"]).get("upstreams", [])
    assert upstreams, "production config has no upstream to check"
    for upstream in upstreams:
        url = urllib.parse.urlsplit(upstream["url"])
        host = url.hostname or ""
        parts = host.split(".")
        assert len(parts) >= 2 and parts[2:3] in ([], ["svc"]), \
            f"{host}: only in-cluster upstreams (name.namespace.svc) are checked here"
        target = Pod(parts[1], (("app", "upstream"),))
        port = url.port or (443 if url.scheme == "https" else 80)
        assert may_connect(policies, CP, target, port), f"upstream {upstream['name']} blocked"


def test_the_control_plane_reaches_every_configured_engine(
        policies: list[dict[str, Any]]) -> None:
    cm = render.find(render.render("production"), "ConfigMap", "synapse-agent-config")
    backends = yaml.safe_load(cm["data"]["config.yaml"])["backends"]
    for backend in backends:
        port = backend.get("port")
        assert port, f"backend {backend['name']}: set a port (policies open 8000-8999 only)"
        assert may_connect(policies, CP, AGENT, port), f"engine {backend['name']} blocked"


def test_the_control_plane_reaches_every_port_it_deploys_engines_on(
        policies: list[dict[str, Any]]) -> None:
    cm = render.find(render.render("production"), "ConfigMap", "synapse-agent-config")
    supervisor = yaml.safe_load(cm["data"]["config.yaml"])["supervisor"]
    assert supervisor.get("engine_port_range"), \
        "set supervisor.engine_port_range: DeployModel gives engines ports from it"
    first, last = supervisor["engine_port_range"]
    for port in (first, (first + last) // 2, last):
        assert may_connect(policies, CP, AGENT, port), f"deployed engine port {port} blocked"
    assert not may_connect(policies, CP, AGENT, last + 1)   # the range is all that is open
