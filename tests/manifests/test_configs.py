"""The ConfigMaps of every overlay parse with the processes' own config models.

Each Synapse container is checked as it would start: its ConfigMap's `config.yaml` (found
through the volume mounted at the directory of --config / SYNAPSE_CONFIG_PATH), plus its environment
(`SYNAPSE_*` overrides applied by the loader; `{env: X}` secrets must be set by the pod
spec; `$(VAR)` references resolved), plus `{file: P}` secrets, which must lie under a
mounted Secret volume (a temporary file stands in for the Secret's content). Then the
settings must agree with the pod spec: ports, the headless Service the agents dial, and
a termination grace period that covers the agent's drain.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from agent import config as agent_config
from synapse_cli import commands
from synapse_common import settings
from tests.manifests import pods, render


def listens_as_declared(container: dict[str, Any], **settings_ports: int) -> None:
    """Each port the settings give is the container's declared port of that name."""
    ports = render.ports(container)
    for name, port in settings_ports.items():
        assert port == ports[name], (name, port, ports)


def test_every_synapse_container_runs_a_real_command() -> None:
    for overlay in render.DEPLOY_OVERLAYS:
        for workload in render.workloads(render.render(overlay)):
            for c in render.pod_spec(workload)["containers"]:
                if c["image"].split("/")[-1].startswith("synapse-"):
                    assert c["args"][0] in commands.COMMANDS, \
                        f"{overlay}: {c['name']} runs unknown `synapse {c['args'][0]}`"


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_control_plane_config_validates_and_matches_the_pod(
        overlay: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, workload, c = pods.load_settings(overlay, "controlplane", tmp_path, monkeypatch)
    listens_as_declared(c, http=cfg.http.port, grpc=cfg.grpc.port)
    assert cfg.logging.format == "json"
    if cfg.auth.key_file:
        dirs = [d.rstrip("/") + "/" for d in pods.secret_mount_dirs(workload, c)]
        assert any(cfg.auth.key_file.startswith(d) for d in dirs), cfg.auth.key_file
    assert cfg.auth.admin_key is not None, f"{overlay}: no admin key configured"
    data_mounts = [m["mountPath"] for m in c["volumeMounts"]]
    assert cfg.data_dir in data_mounts, f"data_dir {cfg.data_dir} is not a writable mount"


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_agent_config_validates_and_matches_the_pod(
        overlay: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, workload, c = pods.load_settings(overlay, "agent", tmp_path, monkeypatch)
    listens_as_declared(c, grpc=cfg.grpc.port, metrics=cfg.metrics.port)
    assert cfg.node_name == pods.FIELD_REFS["spec.nodeName"]
    assert cfg.grpc.advertise_address == f"{pods.FIELD_REFS['status.podIP']}:{cfg.grpc.port}"
    # the control plane proxies to the engines: they must listen on, and be advertised
    # with, the pod's address
    assert cfg.supervisor.engine_host == "0.0.0.0"
    assert cfg.supervisor.advertise_host == pods.FIELD_REFS["status.podIP"]
    # the agent dials every replica through the headless Service
    objects = render.render(overlay)
    headless = render.find(objects, "Service", "synapse-controlplane-headless")
    assert headless["spec"]["clusterIP"] == "None"
    host, port = cfg.control_plane.dns_name.rsplit(":", 1)
    meta = headless["metadata"]
    assert host == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert int(port) in [p["port"] for p in headless["spec"]["ports"]]
    assert not cfg.control_plane.addresses
    # SIGTERM → drain → engines stopped, all before the kubelet's SIGKILL
    grace = render.pod_spec(workload)["terminationGracePeriodSeconds"]
    needed = cfg.supervisor.drain_grace_s + cfg.supervisor.stop_grace_s
    assert grace > needed, f"{overlay}: grace {grace}s does not cover drain+stop {needed}s"
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    assert cfg.supervisor.log_dir in writable, "engine log dir must be a writable mount"


def test_gpu_overlays_run_real_gpus_and_dev_runs_none(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, _, _ = pods.load_settings("embedded-dev", "agent", tmp_path, monkeypatch)
    assert dev.telemetry.source == "fake"
    assert {b.engine for b in dev.backends} == {"simulator"}
    for overlay in ("bundled", "production"):
        cfg, _, _ = pods.load_settings(overlay, "agent", tmp_path, monkeypatch)
        assert cfg.telemetry.source == "nvml"
        assert "vllm" in {b.engine for b in cfg.backends}


def test_production_agents_present_their_own_identity_not_the_shared_token(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an agent can register only as the node its pod runs on: it holds no agent-token,
    # which would let it register as any node, and presents its projected token instead
    objects = render.render("production")
    agent, ds, c = pods.load_settings("production", "agent", tmp_path, monkeypatch)
    assert agent.control_plane.token is None
    assert agent.control_plane.token_file is not None
    presented = pods.projected_token(ds, c, agent.control_plane.token_file)
    volumes = {v["name"]: v for v in render.pod_spec(ds)["volumes"]}
    for mount in c["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:  # without items every key would be projected
            assert secret["items"], mount["mountPath"]
            assert "agent-token" not in [i["key"] for i in secret["items"]], mount["mountPath"]
    # the control plane reviews tokens of exactly this pod's ServiceAccount and audience
    cp, deploy, cp_c = pods.load_settings("production", "controlplane", tmp_path, monkeypatch)
    review = cp.auth.agent_review
    assert review is not None, "production: the control plane reviews no agent identity"
    account = render.pod_spec(ds)["serviceAccountName"]
    render.find(objects, "ServiceAccount", account)
    assert review.service_accounts == [
        f"system:serviceaccount:{ds['metadata']['namespace']}:{account}"]
    assert review.audience == presented["audience"]
    assert cp.auth.agent_token is not None  # still keys the engines' cache salts
    # with its own token (the API server's audience) and the cluster's CA where it looks
    assert "audience" not in pods.projected_token(deploy, cp_c, review.token_file)
    ca = pathlib.PurePosixPath(review.ca_file)
    sources = pods.mounted_volume(deploy, cp_c, str(ca.parent))["projected"]["sources"]
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [
        {"key": "ca.crt", "path": ca.name}]}} in sources
    # and may create TokenReviews
    binding = render.find(objects, "ClusterRoleBinding")
    role = render.find(objects, "ClusterRole", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["authentication.k8s.io"],
                              "resources": ["tokenreviews"], "verbs": ["create"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": "synapse",
                                    "name": render.pod_spec(deploy)["serviceAccountName"]}]


@pytest.mark.parametrize("overlay", ("embedded-dev", "bundled"))
def test_other_overlays_keep_the_shared_agent_token(
        overlay: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _, _ = pods.load_settings(overlay, "agent", tmp_path, monkeypatch)
    assert agent.control_plane.token is not None and agent.control_plane.token_file is None
    cp, _, _ = pods.load_settings(overlay, "controlplane", tmp_path, monkeypatch)
    assert cp.auth.agent_review is None
    assert not {"ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in render.render(overlay)}


@pytest.mark.parametrize("overlay", ("bundled", "production"))
def test_gpu_agents_mount_their_own_secret_never_synapse_auth(overlay: str) -> None:
    # the kubelet fetches the whole Secret a pod mounts (`items` only chooses the files):
    # a GPU node that mounted synapse-auth would hold the admin and API keys
    objects = render.render(overlay)
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    volumes = render.pod_spec(ds)["volumes"]
    assert [v["secret"]["secretName"] for v in volumes if "secret" in v] == \
        ["synapse-agent-auth"]
    for c in render.pod_spec(ds)["containers"]:
        assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        assert not c.get("envFrom")
    deploy = render.find(objects, "Deployment", "synapse-controlplane")
    assert "synapse-auth" in [v["secret"]["secretName"]
                              for v in render.pod_spec(deploy)["volumes"] if "secret" in v]


def test_a_misspelled_config_field_is_caught(tmp_path: pathlib.Path) -> None:
    data = yaml.safe_load((render.MANIFESTS / "base" / "agent.yaml").read_text())
    data["supervisor"]["drain_grace"] = 120
    data["control_plane"].pop("token", None)  # a mounted secret file, absent here
    with pytest.raises(settings.ConfigError, match=r"supervisor\.drain_grace: unknown setting"):
        settings.validate(agent_config.AgentSettings, data)


SECRET_FIELDS = ("admin_key", "milvus_token", "token", "api_key")


def _literal_secrets(value: Any, where: str = "") -> list[str]:
    """Paths of secret fields that hold a literal instead of {env:}/{file:}."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key in SECRET_FIELDS and item is not None and not isinstance(item, dict):
                found.append(path)
            elif key == "keys" and isinstance(item, list):
                found += [f"{path}[{i}]" for i, k in enumerate(item) if not isinstance(k, dict)]
            else:
                found += _literal_secrets(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _literal_secrets(item, f"{where}[{i}]")
    return found


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_secrets_in_configs_are_references_not_literals(overlay: str) -> None:
    for cm in (o for o in render.render(overlay) if o["kind"] == "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            literals = _literal_secrets(yaml.safe_load(text))
            assert not literals, f"{overlay} {cm['metadata']['name']}/{key}: {literals}"


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_engines_started_by_the_agent_cannot_pick_up_its_config(overlay: str) -> None:
    # the supervisor's children (`synapse simulator`, vLLM) inherit the agent's environment
    # and would read SYNAPSE_CONFIG_PATH, or the default path, as their own config
    _, c = next((w, c) for w, c in pods.synapse_containers(render.render(overlay))
                if c["args"][0] == "agent")
    env = pods.container_environ(c)
    assert "SYNAPSE_CONFIG_PATH" not in env
    path = pods.config_path(c, env)
    assert path != settings.DEFAULT_CONFIG_PATH
    default_dir = str(pathlib.PurePosixPath(settings.DEFAULT_CONFIG_PATH).parent)
    assert default_dir not in [m["mountPath"].rstrip("/") for m in c["volumeMounts"]]
