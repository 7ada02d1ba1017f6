"""charts/synapse: lint, strict validation of what every values file renders, the
processes' configs, the schema and the chart's own checks rejecting wrong values.

The equivalence with the kustomize overlays is test_helm_equivalence; this covers what
the overlays do not have: the pilot values, other release names, the Ingress, bundled
stores behind NetworkPolicies, upstream egress rules derived from the URLs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
import tarfile
from typing import Any

import pytest
import yaml

from agent import config as agent_config
from synapse_common import settings
from tests.charts import helm
from tests.manifests import pods, render, test_kustomize, test_networkpolicies, validate
from tests.manifests.test_networkpolicies import (
    AGENT,
    CLIENT,
    CP,
    EXTERNAL,
    PROMETHEUS,
    Pod,
    may_connect,
)

ALL_VALUES = (None, *helm.VALUES_FILES)


def _ids(values: str | None) -> str:
    return values or "defaults"


def test_the_values_files_are_the_documented_three() -> None:
    assert helm.VALUES_FILES == ("production", "self-hosted-bundled", "self-hosted-pilot")


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_helm_lint_strict(values: str | None) -> None:
    args = ["-f", str(helm.VALUES_DIR / f"{values}.yaml")] if values else []
    proc = helm.run("lint", "--strict", str(helm.CHART), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_every_object_validates_strictly(values: str | None) -> None:
    objects = helm.render_chart(values)
    assert len(objects) >= 8
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)
    for obj in objects:
        if obj["kind"] in test_kustomize.CLUSTER_SCOPED:  # production's ClusterRoleBinding
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
            continue
        assert obj["metadata"]["namespace"] == helm.NAMESPACE, obj["metadata"]["name"]


def test_ingress_renders_and_validates() -> None:
    objects = helm.render_chart(
        "production", "ingress.enabled=true", "ingress.className=nginx",
        "ingress.tls[0].secretName=synapse-tls", "ingress.tls[0].hosts[0]=synapse.example.com")
    ingress = render.find(objects, "Ingress")
    assert not validate.errors(ingress), validate.errors(ingress)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = next(o for o in objects
                   if o["kind"] == "Service" and o["metadata"]["name"] == backend["name"])
    assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]
    assert ingress["spec"]["ingressClassName"] == "nginx"


def _settings(objects: list[dict[str, Any]], process: str, tmp_path: pathlib.Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The settings the process would load from the chart's ConfigMap and pod env."""
    return pods.settings_of(helm.prepare(objects, process, tmp_path), process, "chart",
                            monkeypatch)


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
@pytest.mark.parametrize("release", ["synapse", "edge"])
def test_configs_validate_and_match_the_pods(values: str | None, release: str,
                                             tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(values, release=release)
    cp, deploy, cp_container = _settings(objects, "controlplane", tmp_path, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in cp_container["ports"]}
    assert (cp.http.port, cp.grpc.port) == (ports["http"], ports["grpc"])
    agent, ds, agent_container = _settings(objects, "agent", tmp_path, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in agent_container["ports"]}
    assert (agent.grpc.port, agent.metrics.port) == (ports["grpc"], ports["metrics"])
    # the agents dial the headless Service of this release's control plane
    headless = render.find(objects, "Service", f"{deploy['metadata']['name']}-headless")
    assert headless["spec"]["selector"].items() <= \
        deploy["spec"]["template"]["metadata"]["labels"].items()
    assert agent.control_plane.dns_name == (
        f"{headless['metadata']['name']}.{helm.NAMESPACE}.svc.cluster.local:{cp.grpc.port}")
    # the kubelet waits for the control plane's drain and grace (defaults or the config's)
    assert render.pod_spec(deploy)["terminationGracePeriodSeconds"] > \
        cp.http.drain_delay_s + cp.http.shutdown_grace_s
    grace = render.pod_spec(ds)["terminationGracePeriodSeconds"]
    assert grace > agent.supervisor.drain_grace_s + agent.supervisor.stop_grace_s
    # the engines' compile cache is under HOME, an emptyDir (Kubernetes makes it mode
    # 0777): no folder above it would pass the check for other users' folders
    home = next(e["value"] for e in agent_container["env"] if e["name"] == "HOME")
    assert "emptyDir" in pods.mounted_volume(ds, agent_container, home)
    assert not agent.supervisor.compile_cache_check_parents
    # the agents mount a Secret of their own, never the control plane's (a GPU node's
    # kubelet fetches whole Secrets), holding the token the control plane demands
    cp_secret = pods.mounted_volume(deploy, cp_container, "/var/run/secrets/synapse")
    agent_secret = pods.mounted_volume(ds, agent_container, "/var/run/secrets/synapse-agent")
    assert cp_secret["secret"]["secretName"] != agent_secret["secret"]["secretName"]
    created = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "Secret"}
    if created:
        auth = created[cp_secret["secret"]["secretName"]]
        copies = created[agent_secret["secret"]["secretName"]]
        assert copies == {k: auth[k] for k in copies}
    # only the tokens the agents need, never the API keys; with agent.identity
    # serviceAccount (production) their projected token replaces agent-token
    reviewed = cp.auth.agent_review is not None
    shared = [] if reviewed else [{"key": "agent-token", "path": "agent-token"}]
    assert agent_secret["secret"]["items"] == [
        *shared, {"key": "metrics-token", "path": "metrics-token"}]
    assert cp.auth.agent_token is not None
    assert (agent.control_plane.token is None) == reviewed
    assert (agent.control_plane.token_file is not None) == reviewed
    if release != "synapse":
        names = [o["metadata"]["name"] for o in objects]
        assert all(n == f"{release}-synapse" or n.startswith(f"{release}-synapse-")
                   for n in names), names


def test_the_pilot_needs_no_stores_and_runs_one_replica(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart("self-hosted-pilot")
    cp, deploy, _ = _settings(objects, "controlplane", tmp_path, monkeypatch)
    assert cp.redis.url is None
    assert cp.cache.milvus_uri.get_secret_value().startswith(cp.data_dir + "/")
    assert deploy["spec"]["replicas"] == 1
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    agent, _, _ = _settings(objects, "agent", tmp_path, monkeypatch)
    assert agent.telemetry.source == "nvml"


@pytest.mark.parametrize("values", ["self-hosted-pilot", "self-hosted-bundled"])
def test_a_created_secret_holds_the_four_keys(values: str) -> None:
    secret = render.find(helm.render_chart(values), "Secret", "synapse-auth")
    redis = {"redis-password"} if values == "self-hosted-bundled" else set()   # its Redis
    assert set(secret["data"]) == {"admin-key", "api-key", "agent-token", "metrics-token",
                                   *redis}
    for value in secret["data"].values():
        assert len(base64.b64decode(value)) >= 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_secret_values_are_only_ever_referenced(values: str | None) -> None:
    for workload in render.workloads(helm.render_chart(values)):
        for c in render.pod_spec(workload)["containers"]:
            for env in c.get("env", []):
                if any(w in env["name"].upper() for w in ("KEY", "TOKEN", "PASSWORD", "SECRET")):
                    assert env.get("valueFrom", {}).get("secretKeyRef"), env["name"]


SCHEMA_ERRORS = [
    (("controlPlane.replicaCount=two",), r"/controlPlane/replicaCount': got string, want integer"),
    (("controlPlane.replicas=3",), r"/controlPlane': additional properties 'replicas'"),
    (("dependencies.redis.mode=memcached",), r"/dependencies/redis/mode': value must be one of"),
    (("dependencies.redis.external.url=http://redis:6379",), r"/dependencies/redis/external/url'"),
    (("monitoring.serviceMonitor.interval=15 seconds",), r"/monitoring/serviceMonitor/interval'"),
    (("ingress.hosts[0].host=a", "ingress.hosts[0].paths[0].path=/",
      "ingress.hosts[0].paths[0].pathType=prefix"), r"/ingress/hosts/0/paths/0/pathType'"),
    (("agent.ports.metrics=70000",), r"/agent/ports/metrics'"),
    (("controlPlane.metricsAuth.enabled=yes",), r"/controlPlane/metricsAuth/enabled'"),
    (("controlPlane.metricsAuth.token=x",), r"/controlPlane/metricsAuth': additional prop"),
    (("agent.metricsAuth.enabled=yes",), r"/agent/metricsAuth/enabled'"),
    (("agent.metricsAuth.token=x",), r"/agent/metricsAuth': additional prop"),
    (("upstreams[0].name=x", "upstreams[0].url=ollama:11434", "upstreams[0].models[0]=m"),
     r"/upstreams/0/url'"),
]


@pytest.mark.parametrize(("sets", "message"), SCHEMA_ERRORS, ids=[s[0][0] for s in SCHEMA_ERRORS])
def test_the_schema_rejects_a_wrong_value(sets: tuple[str, ...], message: str) -> None:
    error = helm.rejected(None, *sets)
    assert "don't meet the specifications of the schema" in error
    assert re.search(message, error), error


def test_the_schema_rejects_a_wrong_values_file(tmp_path: pathlib.Path) -> None:
    data = yaml.safe_load((helm.VALUES_DIR / "production.yaml").read_text())
    data["autoscaling"]["controlPlane"]["maxReplica"] = 12  # misspelled
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = helm.run("lint", str(helm.CHART), "-f", str(bad))
    assert proc.returncode != 0
    assert "additional properties 'maxReplica'" in proc.stdout + proc.stderr


CHART_CHECKS = [
    (("dependencies.redis.mode=none",), "dependencies.redis.mode none"),
    (("dependencies.milvus.mode=lite",), "dependencies.milvus.mode lite"),
    (("dependencies.redis.mode=external",), "dependencies.redis.external.url or"),
    (("dependencies.milvus.mode=external",), "dependencies.milvus.external.endpoint or"),
    (("controlPlane.replicaCount=1", "autoscaling.controlPlane.enabled=false"),
     "controlPlane.podDisruptionBudget"),
    (("autoscaling.controlPlane.minReplicas=7",), "minReplicas is above"),
    (("agent.terminationGracePeriodSeconds=100",), "agent.terminationGracePeriodSeconds (100)"),
    (("controlPlane.config.upstreams[0].name=x",), "controlPlane.config.upstreams"),
    (("controlPlane.terminationGracePeriodSeconds=50",),
     "controlPlane.terminationGracePeriodSeconds (50)"),
    (("controlPlane.config.http.shutdown_grace_s=55",),
     "controlPlane.terminationGracePeriodSeconds (60)"),
    (("controlPlane.ports.metrics=null", "monitoring.serviceMonitor.enabled=true"),
     "monitoring.serviceMonitor.enabled needs controlPlane.ports.metrics"),
    (("agentLink.tls.enabled=true", "agentLink.tls.agentCertificates=secret",
      "agentLink.tls.controlPlaneSecret=synapse-link", "agentLink.tls.agentSecret=synapse-link"),
     "agentLink.tls.agentSecret names agentLink.tls.controlPlaneSecret"),
    (("dependencies.milvus.mode=external",
      "dependencies.milvus.external.endpoint=https://root:Milvus@milvus.example:19530"),
     "dependencies.milvus.external.endpoint holds credentials"),
    (("controlPlane.config.auth.tenants[0].name=team",
      "controlPlane.config.auth.tenants[0].keys[0]=sk-team-literal-key-0123"),
     "controlPlane.config.auth.tenants[0].keys[0] is a literal key"),
    (("upstreams[0].name=hosted", "upstreams[0].url=https://api.openai.com/v1",
      "upstreams[0].models[0]=m", "upstreams[0].api_key=sk-upstream-literal-key"),
     "upstreams[0].api_key is a literal key"),
    (("controlPlane.config.cache.milvus_token=root:Milvus-literal",),
     "controlPlane.config.cache.milvus_token is a literal token"),
    # a null label is dropped after the schema's minProperties, leaving selectors that
    # match every pod in every namespace
    (("networkPolicy.enabled=true", r"networkPolicy.adminClientLabels.synapse\.dev/admin-client=null"),
     "networkPolicy.adminClientLabels is empty"),
]


@pytest.mark.parametrize(("sets", "message"), CHART_CHECKS, ids=[c[1] for c in CHART_CHECKS])
def test_the_chart_refuses_values_that_cannot_work(sets: tuple[str, ...], message: str) -> None:
    assert message in helm.rejected(None, *sets)


@pytest.mark.parametrize("sets", [
    ("controlPlane.config.auth.tenants[0].keys[0]=sk-team-literal-key-0123",),
    ("upstreams[0].name=hosted", "upstreams[0].url=https://api.openai.com/v1",
     "upstreams[0].models[0]=m", "upstreams[0].api_key=sk-upstream-literal-key"),
    ("dependencies.milvus.mode=external",
     "dependencies.milvus.external.endpoint=https://root:Milvus@milvus.example:19530"),
    ("controlPlane.config.cache.milvus_token=root:Milvus-literal",),
], ids=["tenant key", "upstream key", "milvus userinfo", "milvus token"])
def test_a_refused_secret_is_not_quoted(sets: tuple[str, ...]) -> None:
    error = helm.rejected(None, *sets)
    for secret in ("sk-team-literal-key-0123", "sk-upstream-literal-key", "Milvus@",
                   "Milvus-literal"):
        assert secret not in error


def test_keys_by_reference_or_digest_are_accepted() -> None:
    """The forms the refusals point to render: {file:}, {env:} and key_sha256 digests."""
    objects = helm.render_chart(
        None, "controlPlane.config.auth.tenants[0].name=team",
        "controlPlane.config.auth.tenants[0].keys[0].file=/var/run/secrets/synapse/api-key",
        "controlPlane.config.auth.tenants[0].keys[1].env=TEAM_KEY",
        "controlPlane.config.auth.tenants[1].name=other",
        f"controlPlane.config.auth.tenants[1].key_sha256[0]={'0' * 64}",
        "upstreams[0].name=hosted", "upstreams[0].url=https://api.openai.com/v1",
        "upstreams[0].models[0]=m", "upstreams[0].api_key.env=OPENAI_API_KEY")
    data = yaml.safe_load(render.find(objects, "ConfigMap", "synapse-controlplane-config")
                          ["data"]["config.yaml"])
    assert data["upstreams"][0]["api_key"] == {"env": "OPENAI_API_KEY"}
    assert data["auth"]["tenants"][0]["keys"][1] == {"env": "TEAM_KEY"}


def test_bundled_stores_behind_network_policies() -> None:
    objects = helm.render_chart("self-hosted-bundled", "networkPolicy.enabled=true")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    redis = Pod("synapse", (("app.kubernetes.io/name", "synapse-redis"),))
    milvus = Pod("synapse", (("app.kubernetes.io/name", "synapse-milvus"),))
    assert may_connect(policies, CP, redis, 6379)
    assert may_connect(policies, CP, milvus, 19530)
    for src, dst, port in ((CLIENT, redis, 6379), (AGENT, redis, 6379), (CLIENT, milvus, 19530),
                           (CP, EXTERNAL, 6379), (CP, EXTERNAL, 19530)):
        assert not may_connect(policies, src, dst, port), (src, dst, port)


def test_every_upstream_gets_an_egress_rule() -> None:
    sets = []
    for i, url in enumerate(("http://vllm.gpu-pool.svc.cluster.local:8001",
                             "http://tgi.models:8080", "https://api.openai.com/v1",
                             "http://local-llm")):
        sets += [f"upstreams[{i}].name=u{i}", f"upstreams[{i}].url={url}",
                 f"upstreams[{i}].models[0]=m"]
    policies = [o for o in helm.render_chart("production", *sets)
                if o["kind"] == "NetworkPolicy"]
    assert may_connect(policies, CP, Pod("gpu-pool", (("app", "vllm"),)), 8001)
    assert not may_connect(policies, CP, Pod("gpu-pool", (("app", "vllm"),)), 8002)
    assert may_connect(policies, CP, Pod("models", (("app", "tgi"),)), 8080)
    assert not may_connect(policies, CP, Pod("inference", (("app", "tgi"),)), 8080)
    assert may_connect(policies, CP, EXTERNAL, 443)
    # a bare name is this namespace: egress opens, its ingress is the upstream's own policy
    local = Pod("synapse", (("app", "local-llm"),))
    assert test_networkpolicies._allowed(policies, CP, local, 80, "TCP", "Egress")


def test_config_changes_roll_the_pods() -> None:
    before = helm.render_chart("production")
    after = helm.render_chart("production", "agent.config.supervisor.drain_grace_s=100")
    for kind, name in (("DaemonSet", "synapse-agent"), ("Deployment", "synapse-controlplane")):
        old = render.find(before, kind, name)["spec"]["template"]["metadata"]["annotations"]
        new = render.find(after, kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert (old != new) == (kind == "DaemonSet"), kind
    # and the agent's settings model sees the change
    cm = render.find(after, "ConfigMap", "synapse-agent-config")
    data = yaml.safe_load(cm["data"]["config.yaml"])
    data["control_plane"].pop("token", None)  # a mounted secret file, absent here
    assert settings.validate(agent_config.AgentSettings, data).supervisor.drain_grace_s == 100


def test_a_packaged_chart_carries_the_linked_files(tmp_path: pathlib.Path) -> None:
    # files/ links to the dashboard, alert rules and etcd config under manifests/ (one
    # copy each); `helm package` must store their content, not the links
    proc = helm.run("package", str(helm.CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    package = next(tmp_path.glob("synapse-*.tgz"))
    with tarfile.open(package) as tar:
        for link in (helm.CHART / "files").iterdir():
            assert link.is_symlink(), f"{link.name}: keep the one copy under manifests/"
            member = tar.getmember(f"synapse/files/{link.name}")
            assert member.isfile()
            stored = tar.extractfile(member)
            assert stored is not None and stored.read() == link.resolve().read_bytes()
    packaged = helm.template("production", chart=package)
    assert packaged.returncode == 0, packaged.stderr
    assert list(yaml.safe_load_all(packaged.stdout)) == \
        list(yaml.safe_load_all(helm.template("production").stdout))


def test_metrics_are_kept_from_tenants_by_default(tmp_path: pathlib.Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics lists every tenant's traffic: by default it has a port of its own, which
    the ServiceMonitor scrapes and neither the API Service nor the Ingress exposes."""
    objects = helm.render_chart(None, "monitoring.serviceMonitor.enabled=true",
                                "ingress.enabled=true", "networkPolicy.enabled=true")
    cp, _, _ = _settings(objects, "controlplane", tmp_path, monkeypatch)
    assert cp.metrics.port == 9101 and cp.metrics.port != cp.http.port
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    api = services["synapse-controlplane"]
    assert {p["name"] for p in api["spec"]["ports"]} == {"http", "grpc"}
    assert "synapse.dev/metrics" not in api["metadata"]["labels"]
    ingress = render.find(objects, "Ingress")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"]
                for p in r["http"]["paths"]]
    assert backends and all(b == {"name": "synapse-controlplane", "port": {"name": "http"}}
                            for b in backends)
    monitor = render.find(objects, "ServiceMonitor")
    scraped = [s for s in services.values() if monitor["spec"]["selector"]["matchLabels"]
               .items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["synapse-controlplane-metrics"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert may_connect(policies, PROMETHEUS, CP, 9101)
    assert not may_connect(policies, CLIENT, CP, 9101)


def test_metrics_on_a_port_of_their_own(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart("production", "controlPlane.ports.metrics=9090")
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)
    cp, _, c = _settings(objects, "controlplane", tmp_path, monkeypatch)
    assert cp.metrics.port == 9090
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    monitor = render.find(objects, "ServiceMonitor")
    service = next(o for o in objects if o["kind"] == "Service"
                   and o["metadata"]["name"] == "synapse-controlplane-metrics")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert ports == {"metrics": {"name": "metrics", "port": 9090, "targetPort": "metrics",
                                 "protocol": "TCP"}}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert may_connect(policies, PROMETHEUS, CP, 9090)
    assert not may_connect(policies, CLIENT, CP, 9090)


METRICS_TOKEN_FILE = "/var/run/secrets/synapse/metrics-token"


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_the_metrics_port_needs_a_token_by_default(values: str | None) -> None:
    """Without NetworkPolicies every pod in the cluster, a tenant's included, reaches the
    metrics port by pod address: by default /metrics needs the key `metrics-token` of the
    auth Secret (mounted with the others), and the ServiceMonitor presents it."""
    objects = helm.render_chart(values, "monitoring.serviceMonitor.enabled=true")
    configmap = render.find(objects, "ConfigMap", "synapse-controlplane-config")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["metrics"]["bearer_token_file"] == METRICS_TOKEN_FILE
    secret_name, key = pods.metrics_token_secret(objects) or ("<none>", "<none>")
    assert key == "metrics-token"
    existing = yaml.safe_load((helm.VALUES_DIR / f"{values}.yaml").read_text()
                              ).get("secrets", {}).get("existingSecret") if values else ""
    if existing:   # the operator's Secret, which must hold the key (values/production.yaml)
        assert secret_name == existing
        assert not [o for o in objects if o["kind"] == "Secret"]
    else:
        assert secret_name == "synapse-auth"
        assert key in render.find(objects, "Secret", secret_name)["data"]
    monitor = render.find(objects, "ServiceMonitor")
    assert [e["authorization"] for e in monitor["spec"]["endpoints"]] == [
        {"type": "Bearer", "credentials": {"name": secret_name, "key": key}}]
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)


def test_an_existing_secret_supplies_the_metrics_token() -> None:
    objects = helm.render_chart(None, "secrets.existingSecret=mine",
                                "monitoring.serviceMonitor.enabled=true")
    assert pods.metrics_token_secret(objects) == ("mine", "metrics-token")
    monitor = render.find(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "name": "mine", "key": "metrics-token"}


def test_opting_out_leaves_the_metrics_port_open() -> None:
    """controlPlane.metricsAuth.enabled false: no token for the control plane, the
    ServiceMonitor scrapes without one (and every pod that reaches the port reads every
    tenant's traffic, unless NetworkPolicies keep them out). The agents keep theirs, so
    the Secret keeps the key."""
    objects = helm.render_chart(None, "controlPlane.metricsAuth.enabled=false",
                                "monitoring.serviceMonitor.enabled=true")
    assert pods.metrics_token_secret(objects) is None
    monitor = render.find(objects, "ServiceMonitor")
    assert all("authorization" not in e for e in monitor["spec"]["endpoints"])
    assert pods.metrics_token_secret(objects, "agent") == ("synapse-agent-auth",
                                                           "metrics-token")
    assert "metrics-token" in render.find(objects, "Secret", "synapse-auth")["data"]
    assert render.find(objects, "Secret", "synapse-agent-auth")["data"]["metrics-token"] == \
        render.find(objects, "Secret", "synapse-auth")["data"]["metrics-token"]


def test_the_metrics_token_also_guards_metrics_on_the_api_port() -> None:
    """controlPlane.ports.metrics null puts /metrics on the API port; the token then
    guards it there (in place of the admin key)."""
    objects = helm.render_chart(None, "controlPlane.ports.metrics=null")
    configmap = render.find(objects, "ConfigMap", "synapse-controlplane-config")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["metrics"] == {"bearer_token_file": METRICS_TOKEN_FILE}


AGENT_METRICS_TOKEN_FILE = "/var/run/secrets/synapse-agent/metrics-token"


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_the_agents_metrics_port_needs_the_token_by_default(values: str | None) -> None:
    """The agents' /metrics names the models and their running and waiting requests (a
    model one tenant alone may use shows that tenant's traffic), and every pod reaches it
    without NetworkPolicies: by default the agents read key `metrics-token` of their own
    Secret (mounted beside agent-token), the control plane's value, and the PodMonitor
    presents it."""
    objects = helm.render_chart(values, "monitoring.podMonitor.enabled=true")
    configmap = render.find(objects, "ConfigMap", "synapse-agent-config")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["metrics"]["bearer_token_file"] == AGENT_METRICS_TOKEN_FILE
    source = pods.metrics_token_secret(objects, "agent")
    assert source is not None and source[1] == "metrics-token"
    secret_name, key = source
    cp_secret, cp_key = pods.metrics_token_secret(objects) or ("<none>", "<none>")
    assert secret_name != cp_secret
    if not [o for o in objects if o["kind"] == "Secret"]:   # values/production.yaml
        assert secret_name == yaml.safe_load((helm.VALUES_DIR / f"{values}.yaml").read_text()
                                             )["secrets"]["existingAgentSecret"]
    else:   # the control plane's token: one value, one scrape credential
        assert render.find(objects, "Secret", secret_name)["data"][key] == \
            render.find(objects, "Secret", cp_secret)["data"][cp_key]
    monitor = render.find(objects, "PodMonitor")
    assert [e["authorization"] for e in monitor["spec"]["podMetricsEndpoints"]] == [
        {"type": "Bearer", "credentials": {"name": secret_name, "key": key}}]
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)


def test_an_existing_secret_supplies_the_agents_metrics_token() -> None:
    objects = helm.render_chart(None, "secrets.existingSecret=mine",
                                "monitoring.podMonitor.enabled=true")
    assert pods.metrics_token_secret(objects, "agent") == ("mine", "metrics-token")
    monitor = render.find(objects, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {
        "name": "mine", "key": "metrics-token"}


def test_opting_the_agents_out_leaves_their_metrics_port_open() -> None:
    """agent.metricsAuth.enabled false: the agents mount only agent-token, their config
    has no token file and the PodMonitor scrapes without one; the control plane keeps its
    token."""
    objects = helm.render_chart(None, "agent.metricsAuth.enabled=false",
                                "monitoring.podMonitor.enabled=true",
                                "monitoring.serviceMonitor.enabled=true")
    assert pods.metrics_token_secret(objects, "agent") is None
    ds = render.find(objects, "DaemonSet", "synapse-agent")
    volume = pods.mounted_volume(ds, render.container(ds, "agent"),
                                 "/var/run/secrets/synapse-agent")
    assert volume["secret"]["items"] == [{"key": "agent-token", "path": "agent-token"}]
    monitor = render.find(objects, "PodMonitor")
    assert all("authorization" not in e for e in monitor["spec"]["podMetricsEndpoints"])
    assert pods.metrics_token_secret(objects) == ("synapse-auth", "metrics-token")


def test_opting_both_out_leaves_the_key_out_of_the_secret() -> None:
    objects = helm.render_chart(None, "agent.metricsAuth.enabled=false",
                                "controlPlane.metricsAuth.enabled=false")
    assert "metrics-token" not in render.find(objects, "Secret", "synapse-auth")["data"]
    assert pods.metrics_token_secret(objects, "agent") is None
    assert pods.metrics_token_secret(objects) is None


@pytest.mark.parametrize("values", ALL_VALUES, ids=_ids)
def test_the_agent_runs_as_a_user_and_group_of_its_own(values: str | None) -> None:
    """hostPID lets the agent and its engines see the control plane's processes on a
    shared node: under the same uid/gid they could read its mounted Secret through
    /proc/<pid>/root and its environment through /proc/<pid>/environ."""
    objects = helm.render_chart(values)
    ids = {}
    for kind, name in (("DaemonSet", "synapse-agent"), ("Deployment", "synapse-controlplane")):
        sc = render.pod_spec(render.find(objects, kind, name))["securityContext"]
        ids[kind] = {sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]}
    assert not ids["DaemonSet"] & ids["Deployment"], ids


OFF_GPU_NODES = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
    {"weight": 100, "preference": {"matchExpressions": [
        {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}]}}]}}


def test_the_control_plane_and_stores_prefer_nodes_without_gpus() -> None:
    """A GPU node's kubelet fetches every Secret its pods mount: a control-plane (or Redis)
    pod there would bring the whole auth Secret, which secrets.existingAgentSecret keeps
    from GPU nodes. Preferred, not required, so a cluster of GPU nodes only still runs."""
    objects = helm.render_chart("self-hosted-bundled")
    for kind, name in (("Deployment", "synapse-controlplane"), ("StatefulSet", "synapse-redis"),
                       ("StatefulSet", "synapse-milvus")):
        assert render.pod_spec(render.find(objects, kind, name))["affinity"] == OFF_GPU_NODES, name
    agent = render.pod_spec(render.find(objects, "DaemonSet", "synapse-agent"))
    assert "affinity" not in agent


def test_an_affinity_of_the_users_replaces_the_default() -> None:
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["system"]}]}]}}}
    sets = []
    for prefix in ("controlPlane", "dependencies.redis.bundled", "dependencies.milvus.bundled"):
        sets += [f"{prefix}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuring"
                 f"Execution.nodeSelectorTerms[0].matchExpressions[0].{k}={v}"
                 for k, v in (("key", "pool"), ("operator", "In"), ("values[0]", "system"))]
    objects = helm.render_chart("self-hosted-bundled", *sets)
    for kind, name in (("Deployment", "synapse-controlplane"), ("StatefulSet", "synapse-redis"),
                       ("StatefulSet", "synapse-milvus")):
        assert render.pod_spec(render.find(objects, kind, name))["affinity"] == mine, name


def test_the_notes_warn_when_no_network_policy_is_rendered() -> None:
    """Without NetworkPolicies every pod in the cluster reaches the engines' ports, the
    agents' and the control plane's gRPC ports and the stores: the install says so."""
    assert "WARNING: networkPolicy.enabled is false" in helm.notes()
    assert "WARNING: networkPolicy.enabled is false" not in helm.notes("production")


TLS_ON = ("agentLink.tls.enabled=true", "agentLink.tls.controlPlaneSecret=synapse-link",
          "agentLink.tls.controlPlaneCAConfigMap=synapse-link-ca")


@pytest.mark.parametrize("sets", [(), TLS_ON], ids=["tls off", "tls on"])
def test_the_notes_say_engine_traffic_is_plain_http(sets: tuple[str, ...]) -> None:
    """agentLink.tls covers the gRPC link only: prompts, answers and the engine key go to
    the engines in plain HTTP whatever it says, which the operator must know to decide on
    the CNI's encryption."""
    notes = " ".join(helm.notes("production", *sets).split())
    assert "engines is plain HTTP whatever agentLink.tls says" in notes
    assert "WireGuard or IPsec" in notes


def test_the_notes_tell_when_replicas_turn_ready() -> None:
    """/ready waits for the registry to sync, not for a routable backend, unless
    registry.ready_requires_backend (controlplane/api/readiness.py): the notes say which."""
    default = " ".join(helm.notes().split())
    assert "ready once they have heard from an agent or after registry.sync_grace_s" in default
    assert "unready while no backend is routable" not in default
    strict = " ".join(helm.notes(
        None, "controlPlane.config.registry.ready_requires_backend=true").split())
    assert "unready while no backend is routable" in strict


def _secret_checksum(data: dict[str, str], keys: list[str]) -> str:
    """What the chart hashes: the JSON of the keys a pod reads (Go's encoding: sorted
    keys, no spaces)."""
    chosen = {k: data[k] for k in keys}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def test_new_keys_in_a_chart_made_secret_roll_the_pods() -> None:
    """Rotating the chart's keys (delete its Secrets, helm upgrade) must restart the pods
    that read them: Redis and the control plane take the Redis password from their
    environment, which a changed Secret never reaches. The pod templates carry a
    checksum of exactly the keys each one reads, from the same values as the Secret."""
    objects = helm.render_chart("self-hosted-bundled")
    auth = render.find(objects, "Secret", "synapse-auth")["data"]
    agent = render.find(objects, "Secret", "synapse-agent-auth")["data"]
    expected = {("Deployment", "synapse-controlplane"): _secret_checksum(auth, sorted(auth)),
                ("StatefulSet", "synapse-redis"): _secret_checksum(auth, ["redis-password"]),
                ("DaemonSet", "synapse-agent"): _secret_checksum(agent, sorted(agent))}
    for (kind, name), checksum in expected.items():
        annotations = render.find(objects, kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/secret"] == checksum, name


def test_an_existing_secret_gets_no_checksum() -> None:
    """The chart cannot read a Secret it does not make (helm template, GitOps): its pods
    must be restarted by hand after a rotation, which the chart README says."""
    for workload in render.workloads(helm.render_chart("production")):
        assert "checksum/secret" not in workload["spec"]["template"]["metadata"].get(
            "annotations", {}), workload["metadata"]["name"]
