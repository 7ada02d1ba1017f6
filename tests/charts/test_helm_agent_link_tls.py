"""charts/synapse with `agentLink.tls.enabled`: the agents' streams to the control plane
and the control plane's Node calls to the agents go over TLS.

What a user would notice: each side's config points at certificate files its pod really
has (from its own Secret, mode 0440, only the keys it needs), the agents check the
control plane's certificate for the headless Service name they dial, and the agents stay
probed although their gRPC port no longer speaks plain text (kubelet's gRPC probe cannot
do TLS: /healthz on the metrics port). How the control plane checks the agents depends on
`agentCertificates`: `selfSigned` (the default) has every agent make its own certificate
at start (`grpc.tls_self_signed`), mount no key and only the control plane's CA from a
ConfigMap, and the control plane pin each registered certificate and call no agent in
plain text (`grpc.node_tls_required`); `secret` mounts one shared certificate on every
agent, which the control plane checks for `serverName` against a CA. Off (the default),
none of it renders.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.charts import helm
from tests.manifests import pods, render, validate

ON = ("agentLink.tls.enabled=true", "agentLink.tls.controlPlaneSecret=cp-link",
      "agentLink.tls.agentCertificates=secret", "agentLink.tls.agentSecret=agent-link")
SELF_SIGNED = ("agentLink.tls.enabled=true", "agentLink.tls.controlPlaneSecret=cp-link",
               "agentLink.tls.controlPlaneCAConfigMap=cp-ca")
TLS_DIR = "/var/run/secrets/synapse-link"
ITEMS = [{"key": k, "path": k} for k in ("tls.crt", "tls.key", "ca.crt")]
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _link_secret(workload: dict[str, Any], container: dict[str, Any],
                 items: list[dict[str, str]] = ITEMS) -> dict[str, Any]:
    volume = pods.mounted_volume(workload, container, TLS_DIR)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR)
    assert mount["readOnly"] is True
    secret: dict[str, Any] = volume["secret"]
    assert secret["defaultMode"] == 0o440          # the pod's group only (fsGroup)
    assert secret["items"] == items
    return secret


@pytest.mark.parametrize("mode", [ON, SELF_SIGNED], ids=["secret", "selfSigned"])
@pytest.mark.parametrize("values", [None, *helm.VALUES_FILES], ids=lambda v: v or "defaults")
def test_every_object_validates_strictly(values: str | None, mode: tuple[str, ...]) -> None:
    problems = validate.problems(helm.render_chart(values, *mode))
    assert not problems, "\n".join(problems)
    sets = [arg for item in mode for arg in ("--set", item)]
    proc = helm.run("lint", "--strict", str(helm.CHART), *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("release", ["synapse", "edge"])
def test_the_control_plane_serves_tls_and_checks_the_agents(
        release: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, *ON, "agentLink.tls.serverName=gpu-agent",
                                release=release)
    cp, deploy, container = pods.settings_of(helm.prepare(objects, "controlplane", tmp_path),
                                             "controlplane", "chart", monkeypatch)
    assert _link_secret(deploy, container)["secretName"] == "cp-link"
    g = cp.grpc
    assert (g.tls_cert_file, g.tls_key_file, g.node_ca_file) == (
        f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key", f"{TLS_DIR}/ca.crt")
    assert g.node_server_name == "gpu-agent"
    # the name the agents check is the one the values ask the certificate to carry
    (tmp_path / "agent").mkdir()
    agent, _, _ = pods.settings_of(helm.prepare(objects, "agent", tmp_path / "agent"),
                                   "agent", "chart", monkeypatch)
    host = agent.control_plane.dns_name.rpartition(":")[0]
    headless = [o["metadata"]["name"] for o in objects if o["kind"] == "Service"
                and o["spec"].get("clusterIP") == "None"
                and o["metadata"]["name"].endswith("-controlplane-headless")]
    assert [host] == [f"{name}.{helm.NAMESPACE}.svc.cluster.local" for name in headless]
    assert not agent.control_plane.addresses      # no address checked by its own host


def test_the_agent_checks_the_control_plane_and_serves_node_over_tls(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, *ON)
    agent, ds, container = pods.settings_of(helm.prepare(objects, "agent", tmp_path),
                                            "agent", "chart", monkeypatch)
    assert _link_secret(ds, container)["secretName"] == "agent-link"
    assert agent.control_plane.tls_ca_file == f"{TLS_DIR}/ca.crt"
    assert (agent.grpc.tls_cert_file, agent.grpc.tls_key_file) == (
        f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key")
    # the agent's own token mount is untouched, and holds no TLS key
    tokens = pods.mounted_volume(ds, container, "/var/run/secrets/synapse-agent")
    assert all(item["key"] not in ("tls.key", "ca.crt") for item in tokens["secret"]["items"])


def test_the_agents_probes_move_to_healthz_on_the_metrics_port(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, *ON)
    agent, _, container = pods.settings_of(helm.prepare(objects, "agent", tmp_path),
                                           "agent", "chart", monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind in PROBES:
        probe = container[kind]
        assert "grpc" not in probe, kind
        assert probe["httpGet"]["path"] == "/healthz", kind
        assert ports[probe["httpGet"]["port"]] == agent.metrics.port, kind
    # /healthz needs no token: the metrics token guards /metrics alone
    assert agent.metrics.bearer_token_file


@pytest.mark.parametrize("values", [None, *helm.VALUES_FILES], ids=lambda v: v or "defaults")
def test_off_by_default(values: str | None) -> None:
    objects = helm.render_chart(values)
    for kind, process in (("DaemonSet", "agent"), ("Deployment", "controlplane")):
        workload = next(o for o in objects if o["kind"] == kind
                        and render.pod_spec(o)["containers"][0]["args"][0] == process)
        spec = render.pod_spec(workload)
        assert not [v for v in spec["volumes"] if v["name"] == "link-tls"]
        if process == "agent":
            for kind_ in PROBES:
                assert spec["containers"][0][kind_]["grpc"], kind_
    configs = {o["metadata"]["name"]: o["data"]["config.yaml"] for o in objects
               if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})}
    for name, text in configs.items():
        for key in ("tls_cert_file", "tls_ca_file", "node_ca_file", "node_server_name",
                    "tls_self_signed", "node_tls_required"):
            assert key not in text, (name, key)


def test_the_schema_wants_both_secrets_and_a_dns_server_name() -> None:
    assert "/agentLink/tls/controlPlaneSecret'" in helm.rejected(
        None, "agentLink.tls.enabled=true", "agentLink.tls.agentCertificates=secret",
        "agentLink.tls.agentSecret=agent-link")
    assert "/agentLink/tls/agentSecret'" in helm.rejected(
        None, "agentLink.tls.enabled=true", "agentLink.tls.agentCertificates=secret",
        "agentLink.tls.controlPlaneSecret=cp-link")
    assert "/agentLink/tls/serverName'" in helm.rejected(None, *ON,
                                                          "agentLink.tls.serverName=Not A Name")


def test_the_schema_wants_the_control_planes_ca_for_self_signed_agents_and_a_known_mode(
        ) -> None:
    assert "/agentLink/tls/controlPlaneCAConfigMap'" in helm.rejected(
        None, "agentLink.tls.enabled=true", "agentLink.tls.controlPlaneSecret=cp-link")
    assert "/agentLink/tls/agentCertificates'" in helm.rejected(
        None, *SELF_SIGNED, "agentLink.tls.agentCertificates=perNode")
    # selfSigned is the default and needs no agentSecret
    assert not validate.problems(helm.render_chart(None, *SELF_SIGNED))


def test_self_signed_agents_make_their_own_certificate_and_mount_no_key(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, *SELF_SIGNED)
    agent, ds, container = pods.settings_of(helm.prepare(objects, "agent", tmp_path),
                                            "agent", "chart", monkeypatch)
    assert agent.grpc.tls_self_signed
    assert (agent.grpc.tls_cert_file, agent.grpc.tls_key_file) == (None, None)
    assert agent.control_plane.tls_ca_file == f"{TLS_DIR}/ca.crt"
    volume = pods.mounted_volume(ds, container, TLS_DIR)
    assert "secret" not in volume
    assert volume["configMap"] == {"name": "cp-ca", "defaultMode": 0o444,
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    # no Secret the agents mount names the control plane's, and none holds a TLS key
    spec = render.pod_spec(ds)
    for v in spec["volumes"]:
        if "secret" in v:
            assert v["secret"]["secretName"] != "cp-link", v
            assert all(i["key"] != "tls.key" for i in v["secret"].get("items", [])), v
    for kind in PROBES:
        assert container[kind]["httpGet"]["path"] == "/healthz", kind


def test_the_control_plane_pins_self_signed_agents_and_refuses_plain_text(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(None, *SELF_SIGNED)
    cp, deploy, container = pods.settings_of(helm.prepare(objects, "controlplane", tmp_path),
                                             "controlplane", "chart", monkeypatch)
    items = [{"key": k, "path": k} for k in ("tls.crt", "tls.key")]
    assert _link_secret(deploy, container, items)["secretName"] == "cp-link"
    g = cp.grpc
    assert (g.tls_cert_file, g.tls_key_file) == (f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key")
    assert (g.node_ca_file, g.node_server_name) == (None, None)
    assert g.node_tls_required
