"""Every metric name in the dashboard and the alert rules is one the code exports.

The exported names come from the code's own registries (`controlplane.metrics.Metrics`,
`agent.metrics.Metrics` on a fresh registry), so a renamed or removed metric fails here
instead of leaving an empty panel or an alert that can never fire. Label names used in
matchers must exist on the metric too.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.manifests import grafana, promql, render

ALERTS = render.MANIFESTS / "monitoring" / "alerts.yaml"


def _alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [str(rule["expr"]) for g in groups for rule in g["rules"]]


def _dashboard_expressions() -> list[str]:
    dash = grafana.load()
    exprs = grafana.expressions(dash)
    # label_values(metric, label): only the first argument is a metric
    for query in grafana.variable_queries(dash):
        m = re.match(r"\s*label_values\(\s*([^,)]+)", query)
        exprs.append(m.group(1) if m else query)
    return exprs


SOURCES = {"alerts": _alert_expressions, "dashboard": _dashboard_expressions}


@pytest.mark.parametrize("source", SOURCES)
def test_every_metric_name_is_exported_by_the_code(source: str) -> None:
    exported = promql.exported()
    expressions = SOURCES[source]()
    assert expressions
    unknown = {name: expr for expr in expressions for name in promql.used_metrics(expr)
               if name not in exported}
    assert not unknown, f"{source} uses metrics the code does not export: {unknown}"


@pytest.mark.parametrize("source", SOURCES)
def test_every_matcher_label_exists_on_its_metric(source: str) -> None:
    exported = promql.exported()
    for expr in SOURCES[source]():
        for metric, labels in promql.selectors(expr):
            allowed = exported.get(metric, set()) | promql.TARGET_LABELS
            assert labels <= allowed, f"{metric} has no label {sorted(labels - allowed)}"


def test_the_scanner_catches_an_unknown_name() -> None:
    expr = 'sum by (layer) (rate(synapse_cache_hitz_total{layer="l1"}[5m])) > 0.5'
    assert promql.used_metrics(expr) == {"synapse_cache_hitz_total"}
    assert "synapse_cache_hitz_total" not in promql.exported()
