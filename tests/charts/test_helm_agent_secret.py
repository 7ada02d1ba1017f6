"""charts/synapse: the agents read their keys from a Secret of their own.

A pod that mounts a Secret has its node's kubelet fetch the whole Secret object (the Node
authorizer lets a node read every Secret its pods reference; a volume's `items` only
chooses the files). So the agent DaemonSet must reference no Secret that holds the admin
key, the tenants' API key or the Redis password: a compromised GPU node would read them.

What a user would notice: a GPU node holds only `agent-token` (agent.identity
sharedToken) and `metrics-token` (agent.metricsAuth); the agents' copies equal the keys
the control plane checks and the PodMonitor presents, in one render and after an upgrade
from a chart that had no agent Secret (the `lookup` read-back); an operator's own
Secrets are wired through `secrets.existingSecret` + `secrets.existingAgentSecret`, and
`existingSecret` alone keeps working as before with a warning in the install notes.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import shutil
from typing import Any

import pytest
import yaml

from tests.charts import helm
from tests.manifests import pods, render, validate

AGENT_KEYS = {"agent-token", "metrics-token"}
NEVER_ON_A_GPU_NODE = {"admin-key", "api-key", "redis-password"}
MODES = [
    pytest.param(identity, metrics, id=f"{identity}-metricsAuth-{metrics}")
    for identity in ("sharedToken", "serviceAccount") for metrics in ("true", "false")]


def _wanted(identity: str, metrics: str) -> set[str]:
    return ({"agent-token"} if identity == "sharedToken" else set()) | \
        ({"metrics-token"} if metrics == "true" else set())


def _secrets_referenced(workload: dict[str, Any]) -> set[str]:
    """Every Secret the pod template names: volumes (plain and projected), env and
    envFrom; the kubelet fetches each of them whole for the node."""
    spec = render.pod_spec(workload)
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for c in spec.get("initContainers", []) + spec["containers"]:
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


def _data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    data: dict[str, str] = render.find(objects, "Secret", name)["data"]
    return data


def _values_file(values: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((helm.VALUES_DIR / f"{values}.yaml").read_text())
    return loaded


@pytest.mark.parametrize(("identity", "metrics"), MODES)
@pytest.mark.parametrize("values", [None, "self-hosted-bundled", "self-hosted-pilot"],
                         ids=lambda v: v or "defaults")
def test_the_agents_reference_no_secret_holding_the_api_keys(
        values: str | None, identity: str, metrics: str) -> None:
    objects = helm.render_chart(values, f"agent.identity={identity}",
                                f"agent.metricsAuth.enabled={metrics}")
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    referenced = _secrets_referenced(ds)
    assert "synapse-auth" not in referenced
    wanted = _wanted(identity, metrics)
    if not wanted:   # nothing to read: no Secret at all, and none made for the agents
        assert referenced == set()
        assert not [o for o in objects if o["kind"] == "Secret"
                    and o["metadata"]["name"] != "synapse-auth"]
        return
    assert referenced == {"synapse-agent-auth"}
    # the node gets exactly what the agents read, nothing of the control plane's
    assert set(_data(objects, "synapse-agent-auth")) == wanted
    assert not NEVER_ON_A_GPU_NODE & set(_data(objects, "synapse-agent-auth"))
    # and the agents' config still finds each key where the pod mounts it
    volume = pods.mounted_volume(ds, render.container(ds, "agent"),
                                 "/var/run/secrets/synapse-agent")
    assert {i["key"] for i in volume["secret"]["items"]} == wanted
    # the control plane keeps the whole auth Secret
    deploy = render.find(objects, "Deployment", "synapse-controlplane")
    assert "synapse-auth" in _secrets_referenced(deploy)


def test_production_agents_mount_their_own_secret_only() -> None:
    objects = helm.render_chart("production")
    secrets = _values_file("production")["secrets"]
    assert secrets["existingAgentSecret"] not in ("", secrets["existingSecret"])
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    assert _secrets_referenced(ds) == {secrets["existingAgentSecret"]}
    # identity serviceAccount: the metrics token alone
    assert pods.metrics_token_secret(objects, "agent") == (
        secrets["existingAgentSecret"], "metrics-token")
    assert pods.metrics_token_secret(objects) == (secrets["existingSecret"], "metrics-token")
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert "WARNING: secrets.existingAgentSecret" not in helm.notes("production")


@pytest.mark.parametrize(("identity", "metrics"), [
    p for p in MODES if p.values != ("serviceAccount", "false")])   # that one needs none
def test_the_agent_secret_copies_the_auth_secret_in_one_render(
        identity: str, metrics: str) -> None:
    objects = helm.render_chart(None, f"agent.identity={identity}",
                                f"agent.metricsAuth.enabled={metrics}",
                                "monitoring.podMonitor.enabled=true")
    wanted = _wanted(identity, metrics)
    auth = _data(objects, "synapse-auth")
    agent = render.find(objects, "Secret", "synapse-agent-auth")
    assert {k: agent["data"][k] for k in wanted} == {k: auth[k] for k in wanted}
    for value in agent["data"].values():
        assert len(base64.b64decode(value)) >= 32
    # kept on uninstall like the auth Secret, whose values it copies
    assert agent["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    if metrics == "true":   # the PodMonitor presents the copy the agents check
        monitor = render.find(objects, "PodMonitor")
        assert monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {
            "name": "synapse-agent-auth", "key": "metrics-token"}


def _chart_seeing(cluster: dict[str, dict[str, str]], tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the chart whose `lookup` of a Secret answers from ``cluster`` (name ->
    data), as the API server would on `helm upgrade`."""
    chart = tmp_path / "synapse"
    shutil.copytree(helm.CHART, chart)   # symlinks followed: files/ holds their content
    found = 0
    for template in (chart / "templates").glob("*.*"):   # where the keys are read back
        text, n = re.subn(
            r'\(lookup "v1" "Secret" \.Release\.Namespace (\$\w+|\(include "[\w.]+" \.\))\)',
            r'(include "test.lookup" \1 | fromJson)', template.read_text())
        template.write_text(text)
        found += n
    assert found >= 1, "the chart reads no Secret back with lookup"
    objects = {name: {"data": data} for name, data in cluster.items()}
    (chart / "templates" / "_test_lookup.tpl").write_text(
        '{{- define "test.lookup" -}}{{- $cluster := `' + json.dumps(objects) +
        '` | fromJson -}}{{- get $cluster . | default dict | toJson -}}{{- end -}}\n')
    return chart


def _render_with(chart: pathlib.Path) -> list[dict[str, Any]]:
    proc = helm.template(None, chart=chart)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_an_upgrade_fills_the_agent_secret_with_the_keys_the_control_plane_checks(
        tmp_path: pathlib.Path) -> None:
    # a release installed by a chart without the agent Secret: only synapse-auth exists
    old = {k: _b64(f"old-{k}") for k in
           ("admin-key", "api-key", "agent-token", "metrics-token", "redis-password")}
    objects = _render_with(_chart_seeing({"synapse-auth": old}, tmp_path))
    assert _data(objects, "synapse-auth") == old
    assert _data(objects, "synapse-agent-auth") == {
        "agent-token": old["agent-token"], "metrics-token": old["metrics-token"]}


def test_the_auth_secret_wins_and_the_agent_secret_fills_what_it_lacks(
        tmp_path: pathlib.Path) -> None:
    auth = {"admin-key": _b64("admin"), "api-key": _b64("api"),
            "agent-token": _b64("agent-of-auth")}
    agent = {"agent-token": _b64("agent-of-agent"), "metrics-token": _b64("metrics-of-agent")}
    objects = _render_with(_chart_seeing({"synapse-auth": auth,
                                          "synapse-agent-auth": agent}, tmp_path))
    got = _data(objects, "synapse-auth")
    assert {k: got[k] for k in auth} == auth
    assert got["metrics-token"] == agent["metrics-token"]
    assert len(base64.b64decode(got["redis-password"])) >= 32   # new: neither had it
    assert _data(objects, "synapse-agent-auth") == {
        "agent-token": auth["agent-token"], "metrics-token": agent["metrics-token"]}


def test_an_existing_agent_secret_is_what_the_agents_mount_and_the_pod_monitor_presents(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ("secrets.existingSecret=mine", "secrets.existingAgentSecret=mine-agents",
            "monitoring.podMonitor.enabled=true", "monitoring.serviceMonitor.enabled=true")
    objects = helm.render_chart(None, *sets)
    assert not [o for o in objects if o["kind"] == "Secret"]
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    assert _secrets_referenced(ds) == {"mine-agents"}
    volume = pods.mounted_volume(ds, render.container(ds, "agent"),
                                 "/var/run/secrets/synapse-agent")
    assert volume["secret"]["items"] == [{"key": "agent-token", "path": "agent-token"},
                                         {"key": "metrics-token", "path": "metrics-token"}]
    deploy = render.find(objects, "Deployment", "synapse-controlplane")
    assert "mine" in _secrets_referenced(deploy)
    assert "mine-agents" not in _secrets_referenced(deploy)
    assert pods.metrics_token_secret(objects, "agent") == ("mine-agents", "metrics-token")
    assert pods.metrics_token_secret(objects) == ("mine", "metrics-token")
    pod_monitor = render.find(objects, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {
        "name": "mine-agents", "key": "metrics-token"}
    service_monitor = render.find(objects, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "name": "mine", "key": "metrics-token"}
    agent, _, _ = pods.settings_of(helm.prepare(objects, "agent", tmp_path), "agent",
                                   "chart", monkeypatch)
    assert agent.control_plane.token is not None
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)
    notes = helm.notes(None, *sets)
    assert "WARNING: secrets.existingAgentSecret" not in notes
    assert "`metrics-token` of Secret mine-agents" in notes


def test_an_existing_secret_alone_is_still_mounted_and_the_notes_warn() -> None:
    objects = helm.render_chart(None, "secrets.existingSecret=mine")
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    assert _secrets_referenced(ds) == {"mine"}
    volume = pods.mounted_volume(ds, render.container(ds, "agent"),
                                 "/var/run/secrets/synapse-agent")
    # still only the two files in the container (the node holds the rest)
    assert {i["key"] for i in volume["secret"]["items"]} == AGENT_KEYS
    notes = helm.notes(None, "secrets.existingSecret=mine")
    warning = notes[notes.index("WARNING: secrets.existingAgentSecret is empty"):]
    warning = " ".join(warning.split("\n\n", 1)[0].split())
    assert "Secret mine itself" in warning
    assert "every GPU node can read every key in it" in warning
    assert "the Redis password" in warning      # bundled Redis: its password is there
    # nothing to warn about when the agents mount no Secret at all
    quiet = helm.notes(None, "secrets.existingSecret=mine", "agent.identity=serviceAccount",
                       "agent.metricsAuth.enabled=false")
    assert "WARNING: secrets.existingAgentSecret" not in quiet


def test_with_the_chart_made_secrets_the_notes_point_the_scraper_at_the_agents_copy() -> None:
    notes = helm.notes()
    assert "WARNING: secrets.existingAgentSecret" not in notes
    assert "The agents' /metrics (model names, requests per model) needs the bearer token " \
           "in key `metrics-token` of Secret synapse-agent-auth" in notes


def test_an_agent_secret_without_an_auth_secret_is_refused() -> None:
    # the chart makes both Secrets from one set of values: an operator's agent Secret
    # would hold other tokens than the generated auth Secret
    error = helm.rejected(None, "secrets.existingAgentSecret=mine-agents")
    assert "don't meet the specifications of the schema" in error
    assert "/secrets/existingSecret'" in error


def test_the_auth_secret_named_as_the_agents_is_refused() -> None:
    error = helm.rejected(None, "secrets.existingSecret=mine",
                          "secrets.existingAgentSecret=mine")
    assert "secrets.existingAgentSecret names the auth Secret" in error


def test_an_upgrade_rolls_the_pods_only_when_the_keys_changed(tmp_path: pathlib.Path) -> None:
    """checksum/secret follows the keys the chart reads back: the same keys on an upgrade
    leave the pods alone, new ones (the Secrets deleted to rotate them) roll them."""
    def checksums(keys: dict[str, str], where: str) -> dict[str, str]:
        (tmp_path / where).mkdir()
        objects = _render_with(_chart_seeing({"synapse-auth": keys}, tmp_path / where))
        return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"]
                ["checksum/secret"] for o in render.workloads(objects)
                if o["metadata"]["name"] in ("synapse-controlplane", "synapse-agent",
                                             "synapse-redis")}

    names = ("admin-key", "api-key", "agent-token", "metrics-token", "redis-password")
    old = {k: _b64(f"old-{k}") for k in names}
    first, again = checksums(old, "first"), checksums(old, "again")
    assert len(first) == 3 and first == again
    rotated = checksums({k: _b64(f"new-{k}") for k in names}, "rotated")
    assert all(rotated[name] != first[name] for name in first), (first, rotated)
