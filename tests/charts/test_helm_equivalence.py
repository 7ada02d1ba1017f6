"""The chart renders what the kustomize overlays render, so the two never drift.

`values/production.yaml` must give the objects of overlays/production plus
overlays/monitoring, and `values/self-hosted-bundled.yaml` those of overlays/bundled, for
release `synapse` in namespace `synapse`: the same kinds and names, and the same specs
(images, ports, probes, env, volumes, resources, selectors, NetworkPolicy rules, HPA and
PDB settings), the same configs (parsed), the same dashboard and alert rules.

What may differ, each for a reason:
- the overlays' Namespace: a chart installs into the release's namespace (created with
  --create-namespace or beforehand) and does not own it;
- names: kustomize's content hash on generated ConfigMaps (the chart rolls pods with a
  checksum annotation instead), and the namespace-wide policies `default-deny` and
  `allow-dns`, which the chart prefixes with the release's name like every object;
- labels: the chart adds Helm's own (instance, managed-by, chart) and its pod templates
  carry annotations (config checksums); the overlays' labels must all be there;
- the Secrets the chart creates when no `secrets.existingSecret` is given (bundled): the
  auth Secret and the agents' copy of their two keys, which the overlays' operator
  creates by hand;
- the control plane's `replicas` under an HPA: the chart leaves the field to the HPA
  (Helm 4 applies server-side, and a chart that sets it conflicts with the HPA's scale
  writes on every upgrade); the overlay's replicas must equal the HPA's minReplicas;
- env lists are compared by name (order only matters for $(VAR) references, which the
  config tests resolve); a missing imagePullPolicy is Kubernetes' default, IfNotPresent.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from tests.charts import helm
from tests.manifests import render

# values file -> the overlays it stands for
EQUIVALENT = {
    "production": ("production", "monitoring"),
    "self-hosted-bundled": ("bundled",),
}
RENAMED = {"default-deny": "synapse-default-deny", "allow-dns": "synapse-allow-dns"}
HELM_LABELS = ("app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart")
KUSTOMIZE_HASH = re.compile(r"^(synapse-[a-z0-9-]+-config)-[a-z0-9]{10}$")


def _name(name: str) -> str:
    match = KUSTOMIZE_HASH.match(name)
    return RENAMED.get(name, match.group(1) if match else name)


def _by_name(items: list[Any]) -> Any:
    """Lists of named entries (containers, env, ports, volumes) as name -> entry."""
    if items and all(isinstance(i, dict) and "name" in i for i in items):
        names = [i["name"] for i in items]
        if len(set(names)) == len(names):
            return {n: _normalize(i) for n, i in zip(names, items, strict=True)}
    return [_normalize(i) for i in items]


def _normalize(value: Any) -> Any:
    if isinstance(value, list):
        return _by_name(value)
    if not isinstance(value, dict):
        return value
    out = {k: _normalize(v) for k, v in value.items()}
    if "configMap" in out and "name" in out["configMap"]:
        out["configMap"]["name"] = _name(out["configMap"]["name"])
    if "image" in out and "name" in out:  # a container
        out.setdefault("imagePullPolicy", "IfNotPresent")
    return out


def _data(cm: dict[str, Any]) -> dict[str, Any]:
    parse = {".json": json.loads, ".yaml": yaml.safe_load}
    return {key: parse[key[key.rindex("."):]](text) for key, text in cm["data"].items()}


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """Everything of an object that both renderings must agree on."""
    out = copy.deepcopy(obj)
    meta = out.pop("metadata")
    out["namespace"] = meta.get("namespace")
    if obj["kind"] == "ConfigMap":
        out["data"] = _data(obj)
    template = out.get("spec", {}).get("template", {}).get("metadata")
    if template is not None:
        template.pop("annotations", None)
        for key in HELM_LABELS:
            template["labels"].pop(key, None)
    return dict(_normalize(out))


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], _name(obj["metadata"]["name"])


def _replicas_left_to_the_hpa(overlay: dict[tuple[str, str], Any],
                              chart: dict[tuple[str, str], Any]) -> None:
    key = ("Deployment", "synapse-controlplane")
    hpa = chart.get(("HorizontalPodAutoscaler", "synapse-controlplane"))
    if hpa is None or key not in overlay:
        return
    assert "replicas" not in chart[key]["spec"], "under an HPA the chart must not set replicas"
    assert overlay[key]["spec"].pop("replicas") == hpa["spec"]["minReplicas"]


def _pairs(values: str) -> tuple[dict[tuple[str, str], Any], dict[tuple[str, str], Any]]:
    overlay = {_key(o): o for name in EQUIVALENT[values] for o in render.render(name)
               if o["kind"] != "Namespace"}
    chart = {_key(o): o for o in helm.render_chart(values)}
    _replicas_left_to_the_hpa(overlay, chart)
    return overlay, chart


@pytest.mark.parametrize("values", sorted(EQUIVALENT))
def test_same_kinds_and_names(values: str) -> None:
    overlay, chart = _pairs(values)
    missing = sorted(set(overlay) - set(chart))
    assert not missing, f"{values}: the chart lacks {missing} that the overlays render"
    extra = sorted(set(chart) - set(overlay))
    secrets = [k for k in extra if k[0] == "Secret"]
    assert extra == secrets, f"{values}: the chart renders {extra} the overlays do not"
    if secrets:  # created only when no existing Secret is referenced
        assert secrets == [("Secret", "synapse-agent-auth"), ("Secret", "synapse-auth")]
        assert not yaml.safe_load((helm.VALUES_DIR / f"{values}.yaml").read_text()) \
            .get("secrets", {}).get("existingSecret")


def differences(chart: Any, overlay: Any, path: str = "") -> list[str]:
    """Where two normalized objects differ, as `path: chart ... overlay ...` lines."""
    if isinstance(chart, dict) and isinstance(overlay, dict):
        return [line for key in sorted(set(chart) | set(overlay), key=str)
                for line in differences(chart.get(key, "<absent>"),
                                        overlay.get(key, "<absent>"), f"{path}.{key}")]
    if isinstance(chart, list) and isinstance(overlay, list) and len(chart) == len(overlay):
        return [line for i, (a, b) in enumerate(zip(chart, overlay, strict=True))
                for line in differences(a, b, f"{path}[{i}]")]
    return [] if chart == overlay else [f"{path or '.'}: chart {chart!r}, overlay {overlay!r}"]


@pytest.mark.parametrize("values", sorted(EQUIVALENT))
def test_same_specs_configs_and_rules(values: str) -> None:
    overlay, chart = _pairs(values)
    found = [f"{key[0]}/{key[1]}{line}" for key in sorted(overlay)
             for line in differences(comparable(chart[key]), comparable(overlay[key]))]
    assert not found, (f"{values}: the chart differs from the overlays (change both, see "
                       "charts/synapse/README.md):\n" + "\n".join(found))


@pytest.mark.parametrize("values", sorted(EQUIVALENT))
def test_the_overlays_labels_are_all_there(values: str) -> None:
    overlay, chart = _pairs(values)
    for key, obj in overlay.items():
        want = obj["metadata"].get("labels", {})
        got = chart[key]["metadata"].get("labels", {})
        assert want.items() <= got.items(), f"{values}: {key} labels {want} vs {got}"


def test_the_comparison_bites() -> None:
    # a changed probe, image, port or policy rule must make the objects differ
    overlay, chart = _pairs("production")
    deploy = chart[("Deployment", "synapse-controlplane")]
    assert comparable(deploy) == comparable(overlay[("Deployment", "synapse-controlplane")])
    for path, value in ((("readinessProbe", "httpGet", "path"), "/health"),
                        (("image",), "ghcr.io/synapse-fabric/synapse-controlplane:0.2.0"),
                        (("ports", 1, "containerPort"), 50052)):
        broken = copy.deepcopy(deploy)
        target = render.container(broken, "controlplane")
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        assert differences(comparable(broken), comparable(deploy)), path
    policy = copy.deepcopy(chart[("NetworkPolicy", "synapse-agent")])
    policy["spec"]["ingress"][1]["ports"][0]["port"] = 9103
    assert differences(comparable(policy),
                       comparable(overlay[("NetworkPolicy", "synapse-agent")])) == [
        ".spec.ingress[1].ports[0].port: chart 9103, overlay 9102"]
