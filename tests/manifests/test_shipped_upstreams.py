"""Every upstream the shipped production configs declare names its ``kind``: without one
an upstream is probed on ``/health`` and spoken to as vLLM, so the production Ollama
fallback (no ``/health``) was never routable (probe 82)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from tests.charts import helm
from tests.manifests import render

REPO = pathlib.Path(__file__).resolve().parents[2]


def _upstreams(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for o in objects:
        if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {}):
            found += yaml.safe_load(o["data"]["config.yaml"]).get("upstreams") or []
    return found


@pytest.mark.parametrize("where", ["examples", "kustomize", "helm"])
def test_every_shipped_production_upstream_names_its_kind(where: str) -> None:
    if where == "examples":
        config = yaml.safe_load((REPO / "examples/production/controlplane.yaml").read_text())
        upstreams = config.get("upstreams") or []
    elif where == "kustomize":
        upstreams = _upstreams(render.render("production"))
    else:
        upstreams = _upstreams(helm.render_chart("production"))
    assert upstreams, f"{where}: the production config declares no upstream to check"
    for upstream in upstreams:
        assert upstream.get("kind"), f"{where}: upstream {upstream['name']} names no kind"
        if "ollama" in upstream["name"]:
            assert upstream["kind"] == "ollama", upstream
