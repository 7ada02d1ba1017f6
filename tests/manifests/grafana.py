"""Reading the Grafana dashboard: its panels, queries and variable queries."""

from __future__ import annotations

import json
from typing import Any

from tests.manifests import render

DASHBOARD = render.MANIFESTS / "grafana" / "synapse.json"


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict[str, Any]) -> list[str]:
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append(query)
    return out
