"""charts/synapse with `agent.identity: serviceAccount`: each agent presents its pod's
projected ServiceAccount token instead of the shared `agent-token`, and the control plane
has the Kubernetes API review it (auth.agent_review, TokenReview).

What a user would notice: the agent holds no shared secret and its config points at a
token the pod really has; the control plane's review names the agents' real
ServiceAccount and audience, finds its own token and the cluster's CA where its settings
look, may create TokenReviews, and may reach the API server through the NetworkPolicies.
The default (`sharedToken`) renders none of it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from tests.charts import helm
from tests.manifests import pods, render, validate
from tests.manifests.test_networkpolicies import AGENT, CP, EXTERNAL, may_connect

SA_MODE = "agent.identity=serviceAccount"
IDENTITY_DIR = "/var/run/secrets/synapse/agent-identity"


def _workload(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def _config(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    cm = render.find(objects, "ConfigMap", name)
    data: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return data


def _volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in render.pod_spec(workload)["volumes"]}


def _mounts(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in render.pod_spec(workload)["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("values", [None, *helm.VALUES_FILES], ids=lambda v: v or "defaults")
def test_every_object_validates_strictly(values: str | None) -> None:
    objects = helm.render_chart(values, SA_MODE, "networkPolicy.enabled=true")
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)
    proc = helm.run("lint", "--strict", str(helm.CHART), "--set", SA_MODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_agent_presents_its_projected_token_and_holds_no_shared_secret(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, SA_MODE, "agent.identityAudience=synapse-agent-eu")
    agent, ds, container = pods.settings_of(helm.prepare(objects, "agent", tmp_path),
                                            "agent", "chart", monkeypatch)
    assert agent.control_plane.token is None
    assert agent.control_plane.token_file == f"{IDENTITY_DIR}/token"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == IDENTITY_DIR)
    assert mount["readOnly"] is True
    volume = _volumes(ds)[mount["name"]]
    assert volume["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "synapse-agent-eu", "expirationSeconds": 3600, "path": "token"}}]
    # the agents' Secret: only the metrics token is left, never agent-token
    secret = pods.mounted_volume(ds, container, "/var/run/secrets/synapse-agent")
    assert secret["secret"]["items"] == [{"key": "metrics-token", "path": "metrics-token"}]


def test_without_agent_metrics_auth_the_agent_mounts_no_secret_at_all() -> None:
    # a secret volume with no items would project every key, the tenants' API keys too
    objects = helm.render_chart(None, SA_MODE, "agent.metricsAuth.enabled=false")
    ds = _workload(objects, "DaemonSet")
    assert not [v for v in _volumes(ds).values() if "secret" in v]
    assert "/var/run/secrets/synapse-agent" not in _mounts(ds)
    assert IDENTITY_DIR in _mounts(ds)


@pytest.mark.parametrize("release", ["synapse", "edge"])
def test_the_control_plane_reviews_the_agents_service_account(
        release: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, SA_MODE, "agent.identityAudience=synapse-agent-eu",
                                release=release)
    cp, deploy, _ = pods.settings_of(helm.prepare(objects, "controlplane", tmp_path),
                                             "controlplane", "chart", monkeypatch)
    review = cp.auth.agent_review
    assert review is not None
    ds = _workload(objects, "DaemonSet")
    agent_sa = render.pod_spec(ds)["serviceAccountName"]
    assert review.service_accounts == [f"system:serviceaccount:{helm.NAMESPACE}:{agent_sa}"]
    assert review.audience == "synapse-agent-eu"
    assert cp.auth.agent_token is not None       # still keys other things
    # its own token and the cluster's CA are where the settings look, automount or not
    mounts = _mounts(deploy)
    directory = str(pathlib.PurePosixPath(review.token_file).parent)
    assert str(pathlib.PurePosixPath(review.ca_file).parent) == directory
    assert mounts[directory]["readOnly"] is True
    sources = _volumes(deploy)[mounts[directory]["name"]]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["path"] == pathlib.PurePosixPath(review.token_file).name
    assert "audience" not in token               # the API server's own audience
    ca = next(s["configMap"] for s in sources if "configMap" in s)
    assert ca == {"name": "kube-root-ca.crt", "items": [
        {"key": "ca.crt", "path": pathlib.PurePosixPath(review.ca_file).name}]}


def test_the_control_planes_account_may_create_token_reviews() -> None:
    objects = helm.render_chart(None, SA_MODE)
    deploy = _workload(objects, "Deployment")
    binding = _workload(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
    assert binding["roleRef"]["kind"] == "ClusterRole"
    # a role of its own with TokenReviews alone: system:auth-delegator would also let it
    # create SubjectAccessReviews, which it never does
    role = render.find(objects, "ClusterRole", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["authentication.k8s.io"],
                              "resources": ["tokenreviews"], "verbs": ["create"]}]
    assert helm.NAMESPACE in role["metadata"]["name"] and "namespace" not in role["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": helm.NAMESPACE,
                                    "name": render.pod_spec(deploy)["serviceAccountName"]}]
    # cluster-scoped: releases of one name in two namespaces get bindings of their own
    assert helm.NAMESPACE in binding["metadata"]["name"]
    assert "namespace" not in binding["metadata"]
    # not the name of the binding to system:auth-delegator that releases before made: a
    # binding's roleRef cannot change, so keeping the name failed every helm upgrade
    assert "-token-review-" not in binding["metadata"]["name"]


def test_the_control_plane_may_reach_the_api_server() -> None:
    policies = [o for o in helm.render_chart("production", SA_MODE) if o["kind"] == "NetworkPolicy"]
    for port in (443, 6443):
        assert may_connect(policies, CP, EXTERNAL, port), port
        assert not may_connect(policies, AGENT, EXTERNAL, port), port
    default = [o for o in helm.render_chart("production", "agent.identity=sharedToken")
               if o["kind"] == "NetworkPolicy"]
    assert not may_connect(default, CP, EXTERNAL, 6443)


def test_the_api_server_can_be_the_only_address_reviews_go_to() -> None:
    def review_rules(*sets: str) -> list[dict[str, Any]]:
        objects = helm.render_chart("production", SA_MODE, *sets)
        policy = next(o for o in objects if o["kind"] == "NetworkPolicy"
                      and o["spec"]["podSelector"].get("matchLabels", {}).get(
                          "app.kubernetes.io/name") == "synapse-controlplane")
        return [r for r in policy["spec"].get("egress", [])
                if {p.get("port") for p in r.get("ports", [])} == {443, 6443}]

    (anywhere,) = review_rules()
    assert "to" not in anywhere
    (narrowed,) = review_rules("networkPolicy.apiServerCIDRs={10.0.0.1/32,fd00::1/128}")
    assert narrowed["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}},
                              {"ipBlock": {"cidr": "fd00::1/128"}}]


# values/production.yaml sets serviceAccount (test below); the others keep the default
SHARED_TOKEN_VALUES = [None, *(v for v in helm.VALUES_FILES if v != "production")]


def test_production_uses_the_service_account_identity() -> None:
    objects = helm.render_chart("production")
    role = _workload(objects, "ClusterRoleBinding")["roleRef"]["name"]
    assert render.find(objects, "ClusterRole", role)["rules"][0]["resources"] == ["tokenreviews"]
    agent = _config(objects, f"{helm.RELEASE}-agent-config")["control_plane"]
    assert agent["token_file"] == f"{IDENTITY_DIR}/token" and "token" not in agent
    assert "agent_review" in _config(objects, f"{helm.RELEASE}-controlplane-config")["auth"]


@pytest.mark.parametrize("values", SHARED_TOKEN_VALUES, ids=lambda v: v or "defaults")
def test_the_default_is_the_shared_token(values: str | None) -> None:
    objects = helm.render_chart(values)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for workload in (_workload(objects, "DaemonSet"), _workload(objects, "Deployment")):
        assert not [v for v in _volumes(workload).values() if "projected" in v]
    agent = _config(objects, f"{helm.RELEASE}-agent-config")["control_plane"]
    assert "token_file" not in agent and agent["token"]["file"].endswith("/agent-token")
    assert "agent_review" not in _config(objects, f"{helm.RELEASE}-controlplane-config")["auth"]


def test_the_schema_rejects_an_unknown_identity() -> None:
    assert "/agent/identity'" in helm.rejected(None, "agent.identity=podToken")
    assert "/agent/identityAudience'" in helm.rejected(None, SA_MODE, "agent.identityAudience=")
