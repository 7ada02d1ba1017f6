"""Alert rules: promtool accepts them, unit tests cover every alert, and the shipped
PrometheusRule carries exactly the same groups. Metric names are checked in
test_metric_names."""

from __future__ import annotations

import re
from typing import Any

import yaml

from agent.core import types as agent_types
from tests.manifests import render, tools

MONITORING = render.MANIFESTS / "monitoring"
# what the issue asks to be alerted on, by the alert that covers it
REQUIRED = {
    "GPU memory > 90% for 5m": ("SynapseGPUMemoryHigh", "5m"),
    "GPU temperature > 85 C for 5m": ("SynapseGPUTemperatureHigh", "5m"),
    "engine queue > 10 waiting": ("SynapseEngineQueueHigh", None),
    "fallback rate > 0.1/s for 5m": ("SynapseFallbackRateHigh", "5m"),
    "backend down for 1m": ("SynapseBackendDown", "1m"),
    "node report stale": ("SynapseNodeReportStale", None),
    "cache error rate": ("SynapseCacheErrorRateHigh", None),
    "control-plane 5xx ratio": ("SynapseControlPlane5xxRatioHigh", None),
    "p95 latency": ("SynapseLatencyP95High", None),
}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules_passes() -> None:
    proc = tools.run_promtool("check", "rules", str(MONITORING / "alerts.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    proc = tools.run_promtool("test", "rules", "alerts_test.yaml", cwd=str(MONITORING))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_catch_a_broken_threshold(tmp_path: Any) -> None:
    # the unit tests are not vacuous: a wrong threshold makes them fail
    text = (MONITORING / "alerts.yaml").read_text()
    assert "synapse_agent_gpu_temperature_celsius > 85" in text
    (tmp_path / "alerts.yaml").write_text(
        text.replace("synapse_agent_gpu_temperature_celsius > 85",
                     "synapse_agent_gpu_temperature_celsius > 95"))
    (tmp_path / "alerts_test.yaml").write_text((MONITORING / "alerts_test.yaml").read_text())
    proc = tools.run_promtool("test", "rules", "alerts_test.yaml", cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "SynapseGPUTemperatureHigh" in proc.stdout + proc.stderr


def test_every_required_alert_exists_with_its_duration_and_a_runbook() -> None:
    rules = {r["alert"]: r for r in _rules() if "alert" in r}
    for what, (alert, duration) in REQUIRED.items():
        assert alert in rules, f"no alert for {what}"
        if duration:
            assert rules[alert]["for"] == duration, f"{alert}: for {rules[alert]['for']}"
    for name, rule in rules.items():
        assert rule["annotations"].get("runbook", "").strip(), f"{name} has no runbook line"
        assert rule["annotations"].get("summary"), f"{name} has no summary"
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if not case.get("exp_alerts")}
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts <= fired, f"alerts never fired by a unit test: {sorted(alerts - fired)}"
    missing_quiet = alerts - quiet - {"SynapseGPUTelemetryFailing"}
    assert not missing_quiet, f"alerts without a not-yet-firing case: {sorted(missing_quiet)}"


def test_prometheus_rule_matches_the_rule_file() -> None:
    rule_file = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    shipped = render.find(render.render("monitoring"), "PrometheusRule")
    assert shipped["spec"]["groups"] == rule_file["groups"], (
        "manifests/monitoring/prometheusrule.yaml differs from alerts.yaml: regenerate it "
        "with the command in its header")


def test_backend_down_matches_states_the_agent_reports() -> None:
    rule = next(r for r in _rules() if r.get("alert") == "SynapseBackendDown")
    states = re.search(r'state=~"([^"]+)"', rule["expr"])
    assert states, rule["expr"]
    phases = {p.value for p in agent_types.Phase}
    assert set(states.group(1).split("|")) <= phases, f"agent phases are {sorted(phases)}"
