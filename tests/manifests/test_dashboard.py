"""The Grafana dashboard: well-formed, variables as promised, panels for every topic of
the issue, and PromQL that Prometheus' own parser accepts (via promtool). Metric names
are checked in test_metric_names."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from tests.manifests import render, tools
from tests.manifests.grafana import expressions, load, panels

# topic of the issue → a metric whose presence shows it is on the dashboard
TOPICS = {
    "request rate and status": "synapse_requests_total",
    "latency p50/p95/p99": "synapse_request_duration_seconds_bucket",
    "TTFT": "synapse_time_to_first_byte_seconds_bucket",
    "cache hit rate by layer": "synapse_cache_hits_total",
    "routing decisions": "synapse_route_decisions_total",
    "routing accuracy": "synapse_route_prediction_error_ttft_seconds_bucket",
    "learned costs": "synapse_route_learned_prefill_seconds_per_token",
    "retries": "synapse_upstream_retries_total",
    "backend states": "synapse_backends",
    "GPU utilisation": "synapse_agent_gpu_utilization_percent",
    "GPU memory": "synapse_agent_gpu_memory_used_bytes",
    "GPU temperature": "synapse_agent_gpu_temperature_celsius",
    "GPU power": "synapse_agent_gpu_power_watts",
    "engine queue": "synapse_agent_engine_requests_waiting",
    "KV usage": "synapse_agent_engine_kv_cache_usage_ratio",
    "embedding latency": "synapse_embedding_duration_seconds_bucket",
    "tokens per tenant": "synapse_tokens_total",
    "queue depth per class and tenant": "synapse_queue_depth",
    "queue wait per class and tenant": "synapse_queue_wait_seconds_bucket",
}


def test_dashboard_has_datasource_model_and_node_variables() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "node"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"] and variables[name]["multi"]


def test_every_panel_queries_the_selected_datasource() -> None:
    dash = load()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for p in load()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']} overlaps another"
        taken |= cells


def test_dashboard_covers_every_topic_of_the_issue() -> None:
    text = "\n".join(expressions(load()))
    missing = [topic for topic, metric in TOPICS.items() if metric not in text]
    assert not missing, f"no panel for: {missing}"
    for q in (0.5, 0.95, 0.99):
        assert f"histogram_quantile({q}, sum by (le) (rate(synapse_request_duration" in text


def test_model_and_node_variables_filter_the_panels() -> None:
    exprs = expressions(load())
    assert any('model=~"$model"' in e for e in exprs)
    assert any('node=~"$node"' in e for e in exprs)


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus would receive."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_every_panel_query_parses_as_promql(tmp_path: pathlib.Path) -> None:
    # promtool parses rule expressions with Prometheus' parser: each query becomes a
    # recording rule in a throwaway rule file
    rules = [{"record": f"dashboard:query{i}", "expr": _as_promql(e)}
             for i, e in enumerate(expressions(load()))]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = tools.run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_ships_as_a_grafana_sidecar_configmap() -> None:
    cm = render.find(render.render("monitoring"), "ConfigMap", "synapse-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["synapse.json"]) == load()
