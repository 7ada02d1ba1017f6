"""Metric names used in PromQL expressions, and the names the code really exports.

`used_metrics` is a deliberately simple PromQL scanner (no full parser exists here): it
drops string literals, label matchers `{...}`, range/offset brackets `[...]` and label
lists after by/without/on/ignoring/group_left/group_right, then keeps every identifier
that is not a function call, keyword, number or Grafana variable. `selectors` pairs each
metric with the label names its matchers use. `exported` instantiates both processes'
`Metrics` on a fresh registry, creates one child per labelled metric, and lists every
sample name the registry would expose (`_total`, `_bucket`, `_sum`, `_count`, `_created`).
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from agent import metrics as agent_metrics
from controlplane import metrics as cp_metrics

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GRAFANA_VAR = re.compile(r"\$\{?\w+(?::\w+)?\}?")
# labels Prometheus adds to every scraped series (target labels)
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}


def _strip(expr: str) -> str:
    expr = _GRAFANA_VAR.sub("", expr)
    expr = _STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    return _LABEL_LISTS.sub(" ", expr)


def used_metrics(expr: str) -> set[str]:
    """Every metric name an expression reads."""
    stripped = _strip(expr)
    names = set()
    for m in _IDENT.finditer(stripped):
        name = m.group(1)
        start = m.start(1)
        # the exponent of a number such as 76e9 is not a name
        if start > 0 and stripped[start - 1].isdigit():
            continue
        if name.lower() not in KEYWORDS:
            names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its matchers) for every `metric{...}` in an expression."""
    expr = _STRINGS.sub('""', _GRAFANA_VAR.sub("", expr))
    return [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(expr)]


def _metric_objects(metrics: Any) -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def exported() -> dict[str, set[str]]:
    """Every sample name both processes expose, with its label names."""
    registry = CollectorRegistry()
    objects = [*_metric_objects(cp_metrics.Metrics(registry)),
               *_metric_objects(agent_metrics.Metrics(registry))]
    for metric in objects:
        labelnames = metric._labelnames
        if labelnames:
            metric.labels(*["x"] * len(labelnames))
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names
