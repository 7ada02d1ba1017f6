"""The monitoring overlay scrapes what the deploy overlays actually run: the
ServiceMonitor selects the control plane's metrics Service (which the API Service is not:
/metrics lists every tenant's traffic) and names its metrics port, the
PodMonitor selects the agent pods and names theirs, and both processes serve /metrics
on those ports according to their configs. The control plane's /metrics needs a token
(every pod in the cluster reaches its port without NetworkPolicies), and the
ServiceMonitor presents the one the control plane reads."""

from __future__ import annotations

import pytest

from tests.manifests import pods, render

# The overlays whose /metrics needs a token. embedded-dev (one development tenant, keys
# from Secret `synapse-dev` in the environment) leaves its metrics port open.
TOKEN_OVERLAYS = ("bundled", "production")


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_service_monitor_scrapes_every_control_plane_replica(overlay: str) -> None:
    monitor = render.find(render.render("monitoring"), "ServiceMonitor")
    objects = render.render(overlay)
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in objects if s["kind"] == "Service"
                and selector.items() <= s["metadata"].get("labels", {}).items()]
    # exactly one: selecting the headless Service too would scrape every replica twice
    assert [s["metadata"]["name"] for s in services] == ["synapse-controlplane-metrics"], \
        overlay
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    api = next(o for o in objects if o["kind"] == "Service"
               and o["metadata"]["name"] == "synapse-controlplane")
    assert {p["name"] for p in api["spec"]["ports"]} == {"http", "grpc"}, overlay
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in ports


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_pod_monitor_scrapes_every_agent(overlay: str) -> None:
    monitor = render.find(render.render("monitoring"), "PodMonitor")
    ds = render.find(render.render(overlay), "DaemonSet", "synapse-agent")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = render.ports(render.container(ds, "agent"))
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", TOKEN_OVERLAYS)
def test_service_monitor_presents_the_token_the_control_plane_demands(overlay: str) -> None:
    source = pods.metrics_token_secret(render.render(overlay))
    assert source == ("synapse-auth", "metrics-token"), overlay
    monitor = render.find(render.render("monitoring"), "ServiceMonitor")
    name, key = source
    assert [e.get("authorization") for e in monitor["spec"]["endpoints"]] == [
        {"type": "Bearer", "credentials": {"name": name, "key": key}}]


@pytest.mark.parametrize("overlay", TOKEN_OVERLAYS)
def test_pod_monitor_presents_the_token_the_agents_demand(overlay: str) -> None:
    """The agents' /metrics names the models and their running and waiting requests (a
    model one tenant alone may use shows that tenant's traffic): it wants the same token,
    mounted beside agent-token from the agents' own Secret (a GPU node's kubelet fetches
    whole Secrets: never synapse-auth's API keys), and the PodMonitor presents it."""
    source = pods.metrics_token_secret(render.render(overlay), "agent")
    assert source == ("synapse-agent-auth", "metrics-token"), overlay
    monitor = render.find(render.render("monitoring"), "PodMonitor")
    name, key = source
    assert [e.get("authorization") for e in monitor["spec"]["podMetricsEndpoints"]] == [
        {"type": "Bearer", "credentials": {"name": name, "key": key}}]

