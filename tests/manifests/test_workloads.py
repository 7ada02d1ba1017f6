"""What the issue asks of the workloads, checked on the rendered overlays.

Control plane: replicas, probes on /health and /ready, resources, non-root, read-only root
filesystem, no capabilities, a PDB and an HPA that target it, the two Services.
Agent: the GPU node settings (nodeSelector, toleration, runtime class, visible devices,
no device-plugin request, hostPID, priority, rolling update of one node at a time, a
weights volume) and none of them in embedded-dev. Services and probes name real ports.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.manifests import render

GPU_OVERLAYS = ("bundled", "production")


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def _hardened(workload: dict[str, Any], c: dict[str, Any]) -> None:
    """Non-root, read-only root filesystem, no capabilities, secrets readable by the pod's
    group at most, and writable HOME and /tmp."""
    pod = render.pod_spec(workload)
    name = workload["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] != 0, name
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, name
    assert sc["allowPrivilegeEscalation"] is False, name
    assert sc["capabilities"]["drop"] == ["ALL"], name
    assert pod["automountServiceAccountToken"] is False, name
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
    assert c["resources"]["limits"]["memory"], name
    volumes = {v["name"]: v for v in pod["volumes"]}
    for v in volumes.values():      # the agent's token was mounted 0644 (probe finding)
        if "secret" in v:
            assert v["secret"].get("defaultMode") in (0o400, 0o440), (name, v["name"])
    writable = {m["mountPath"] for m in c["volumeMounts"]
                if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")}
    assert "/tmp" in writable, f"{name}: /tmp must be writable with a read-only root"
    home = _env(c).get("HOME")
    assert home is None or home in writable, f"{name}: HOME {home} is not writable"


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_control_plane_deployment(overlay: str) -> None:
    objects = render.render(overlay)
    deploy = render.find(objects, "Deployment", "synapse-controlplane")
    c = render.container(deploy, "controlplane")
    assert deploy["spec"]["replicas"] == (1 if overlay == "embedded-dev" else
                                          2 if overlay == "bundled" else 3)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    _hardened(deploy, c)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_control_plane_has_a_pdb_and_an_hpa(overlay: str) -> None:
    objects = render.render(overlay)
    deploy = render.find(objects, "Deployment", "synapse-controlplane")
    pdb = render.find(objects, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    # replicas are unready while they sync (or, with registry.ready_requires_backend,
    # while no backend is routable); drains must not hang on that
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    hpa = render.find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["minReplicas"] <= deploy["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_embedded_dev_has_one_replica_and_no_pdb_or_hpa() -> None:
    kinds = {o["kind"] for o in render.render("embedded-dev")}
    assert "PodDisruptionBudget" not in kinds  # minAvailable 1 of 1 would block node drains
    assert "HorizontalPodAutoscaler" not in kinds


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_agents_reach_every_replica_even_before_it_is_ready(overlay: str) -> None:
    objects = render.render(overlay)
    headless = render.find(objects, "Service", "synapse-controlplane-headless")
    assert headless["spec"]["clusterIP"] == "None"
    # /ready waits for an agent's report (or a backend, with ready_requires_backend),
    # which only agents bring: unready replicas must resolve
    assert headless["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_agent_daemonset_on_gpu_nodes(overlay: str) -> None:
    ds = render.find(render.render(overlay), "DaemonSet", "synapse-agent")
    pod = render.pod_spec(ds)
    c = render.container(ds, "agent")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["runtimeClassName"] == "nvidia"
    assert _env(c)["NVIDIA_VISIBLE_DEVICES"] == "all"
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in c["resources"].get(section, {})
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["terminationGracePeriodSeconds"] >= 135
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    weights = [m for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]]]
    assert weights and weights[0]["mountPath"] == "/models"
    assert weights[0]["readOnly"] is True, "engines only read weights"
    _hardened(ds, c)


def test_embedded_dev_agent_needs_no_gpu() -> None:
    ds = render.find(render.render("embedded-dev"), "DaemonSet", "synapse-agent")
    pod = render.pod_spec(ds)
    c = render.container(ds, "agent")
    for key in ("nodeSelector", "tolerations", "runtimeClassName", "priorityClassName"):
        assert key not in pod, key
    assert pod["hostPID"] is False
    assert "NVIDIA_VISIBLE_DEVICES" not in _env(c)
    assert all("hostPath" not in v for v in pod["volumes"])


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_services_and_probes_name_real_ports(overlay: str) -> None:
    objects = render.render(overlay)
    workloads = list(render.workloads(objects))
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"{overlay}: Service {svc['metadata']['name']} selects no pods"
        ports = {p["name"] for w in targets for c in render.pod_spec(w)["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for w in workloads:
        for c in render.pod_spec(w)["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if action:
                    port = action["port"]
                    assert port in names or port in numbers, (w["metadata"]["name"], kind)


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_config_changes_roll_the_pods(overlay: str) -> None:
    # generated ConfigMaps carry a content hash in their name, so a new config is a new
    # pod template
    for cm in (o for o in render.render(overlay) if o["kind"] == "ConfigMap"):
        if cm["metadata"]["name"].startswith(("synapse-controlplane-config",
                                              "synapse-agent-config")):
            assert cm["metadata"]["name"].rsplit("-", 1)[1].isalnum()
            assert len(cm["metadata"]["name"].rsplit("-", 1)[1]) == 10


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_the_agent_runs_as_a_user_and_group_of_its_own(overlay: str) -> None:
    """The agent shares the host's PID namespace (hostPID), it and the engines it starts
    (which read tenant input) see every process on the node. Under the control plane's
    uid they could read a control-plane pod's mounted Secret through /proc/<pid>/root
    (0440, group fsGroup) and its environment through /proc/<pid>/environ."""
    objects = render.render(overlay)
    agent = render.pod_spec(render.find(objects, "DaemonSet", "synapse-agent"))
    cp = render.pod_spec(render.find(objects, "Deployment", "synapse-controlplane"))
    agent_ids = {agent["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")}
    cp_ids = {cp["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")}
    assert not agent_ids & cp_ids, (agent_ids, cp_ids)
