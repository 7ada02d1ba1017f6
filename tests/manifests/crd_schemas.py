"""Minimal structural schemas for the Prometheus Operator custom resources we ship.

kubernetes-validate only knows built-in kinds, and the Operator's CRDs are not installed
here. These JSON Schemas are a documented subset of the `monitoring.coreos.com/v1` CRDs
(ServiceMonitor, PodMonitor, PrometheusRule): every object level that our manifests use
is closed (`additionalProperties: false`) and lists the real CRD's field names at that
level, so a misspelled field fails just as `kubernetes-validate --strict` fails on a
built-in kind. Fields of the CRDs that we do not use at all may be missing here; adding
one to a manifest means adding it here, from the CRD, too.
"""

from __future__ import annotations

from typing import Any

DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                       r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
NAMESPACE_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"any": {"type": "boolean"},
                   "matchNames": {"type": "array", "items": {"type": "string"}}},
}
RELABEL = {
    "type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "sourceLabels": {"type": "array", "items": {"type": "string"}},
            "separator": {"type": "string"}, "targetLabel": {"type": "string"},
            "regex": {"type": "string"}, "modulus": {"type": "integer"},
            "replacement": {"type": "string"},
            "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                "hashmod", "HashMod", "labelmap", "LabelMap", "labeldrop",
                                "LabelDrop", "labelkeep", "LabelKeep", "lowercase",
                                "Lowercase", "uppercase", "Uppercase", "keepequal",
                                "KeepEqual", "dropequal", "DropEqual"]},
        }},
}
SECRET_KEY_SELECTOR = {
    "type": "object", "additionalProperties": False, "required": ["key"],
    "properties": {"key": {"type": "string"}, "name": {"type": "string"},
                   "optional": {"type": "boolean"}},
}
# The CRDs' SafeAuthorization: the credentials only ever by reference to a Secret's key.
AUTHORIZATION = {
    "type": "object", "additionalProperties": False,
    "properties": {"type": {"type": "string"}, "credentials": SECRET_KEY_SELECTOR},
}
_ENDPOINT_COMMON: dict[str, Any] = {
    "port": {"type": "string"},
    "targetPort": {"type": ["integer", "string"]},
    "path": {"type": "string"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "params": {"type": "object"},
    "interval": DURATION, "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
    "trackTimestampsStaleness": {"type": "boolean"},
    "relabelings": RELABEL, "metricRelabelings": RELABEL,
    "tlsConfig": {"type": "object"}, "authorization": AUTHORIZATION,
    "basicAuth": {"type": "object"}, "oauth2": {"type": "object"},
    "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
    "filterRunning": {"type": "boolean"}, "proxyUrl": {"type": "string"},
}
OBJECT_META = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": STRING_MAP, "annotations": STRING_MAP},
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
                       "kind": {"const": kind}, "metadata": OBJECT_META, "spec": spec},
    }


SERVICE_MONITOR = _resource("ServiceMonitor", {
    "type": "object", "additionalProperties": False, "required": ["selector"],
    "properties": {
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {**_ENDPOINT_COMMON, "bearerTokenFile": {"type": "string"}}}},
        "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer"}, "labelLimit": {"type": "integer"},
    },
})

POD_MONITOR = _resource("PodMonitor", {
    "type": "object", "additionalProperties": False, "required": ["selector"],
    "properties": {
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {**_ENDPOINT_COMMON, "portNumber": {"type": "integer"},
                           "bearerTokenSecret": {"type": "object"}}}},
        "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
        "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer"}, "labelLimit": {"type": "integer"},
    },
})

PROMETHEUS_RULE = _resource("PrometheusRule", {
    "type": "object", "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": DURATION,
            "query_offset": DURATION, "limit": {"type": "integer"},
            "partial_response_strategy": {"type": "string"}, "labels": STRING_MAP,
            "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {
                    "alert": {"type": "string"}, "record": {"type": "string"},
                    "expr": {"type": ["string", "integer"]}, "for": DURATION,
                    "keep_firing_for": DURATION, "labels": STRING_MAP,
                    "annotations": STRING_MAP,
                }}},
        }}}},
})

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
