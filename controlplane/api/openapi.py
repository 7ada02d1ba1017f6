"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``
(the paths of issue 20 — Responses, Messages, audio, rerank, tokenize — are described in
:mod:`controlplane.api.openapi_surface`).

Written by hand next to the routes it describes (they are few and stable); request
schemas list the fields Synapse itself checks and allow any others, since unknown fields
pass through to the backend. Every route lists the error statuses it can produce, each
with the OpenAI error envelope.
"""

from __future__ import annotations

from typing import Any

from controlplane import config
from controlplane.api import observability, openapi_surface
from controlplane.core import validation

ERROR = {"$ref": "#/components/schemas/Error"}
_JSON = "application/json"


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": ERROR}}}


_ERRORS = {
    "400": _err("invalid JSON or an invalid field (named in error.param)"),
    "401": _err("missing or unknown API key"),
    "403": _err("the tenant may not use this model"),
    "404": _err("unknown model (GET /v1/models lists them)"),
    "413": _err("body larger than http.max_body_bytes"),
    "429": {**_err("over the tenant's rate limit; see Retry-After"),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    "502": _err("every backend tried failed"),
    "503": {**_err(openapi_surface.UNAVAILABLE),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    "504": _err("no backend answered in time"),
}

_MESSAGE = {"type": "object", "required": ["role"], "additionalProperties": True,
            "properties": {"role": {"enum": sorted(validation.ROLES)},
                           "content": {"anyOf": [{"type": "string"}, {"type": "array"},
                                                 {"type": "null"}]}}}

_TOKENS = {"type": "array", "minItems": 1,
           "items": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}}
_STRINGS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
_TOKEN_BATCH = {"type": "array", "minItems": 1, "items": _TOKENS}   # a prompt per array
# stream_options only with stream: true (as OpenAI and vLLM require), but for an empty
# one (vLLM takes it).
_STREAM_OPTIONS_RULE = {"if": {"required": ["stream_options"],
                               "properties": {"stream_options": {"type": "object",
                                                                 "minProperties": 1}}},
                        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}

# Optional fields may be null, as in OpenAI's own API (null = not given).
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "user": {"type": ["string", "null"]},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "stream_options": {"type": ["object", "null"]},
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}},
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"], "additionalProperties": True,
        "properties": {**_COMMON, "messages": {"type": "array", "minItems": 1,
                                               "items": _MESSAGE},
                       "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1}},
        **_STREAM_OPTIONS_RULE},
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
        "properties": {**_COMMON, "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                                       _STRINGS, _TOKENS, _TOKEN_BATCH]},
                       "max_tokens": {"type": ["integer", "null"], "minimum": 0,
                                      "description": "0 only with echo: scores the prompt"}},
        **_STREAM_OPTIONS_RULE},
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"], "additionalProperties": True,
        "properties": {"model": {"type": "string", "minLength": 1},
                       "user": {"type": ["string", "null"]},
                       "encoding_format": {"enum": ["float", "base64", None]},
                       "input": {"anyOf": [{"type": "string", "minLength": 1}, _STRINGS,
                                           _TOKENS]}}},
    "Completion": {"type": "object", "additionalProperties": True,
                   "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                  "choices": {"type": "array"}, "usage": {"type": "object"}}},
    "EmbeddingList": {"type": "object", "additionalProperties": True,
                      "properties": {"object": {"const": "list"}, "data": {"type": "array"}}},
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"],
                                            "properties": {
            "id": {"type": "string"}, "object": {"const": "model"},
            "created": {"type": "integer"}, "owned_by": {"type": "string"},
            "root": {"type": "string", "description": "the canonical model an alias names"},
            "max_model_len": {"type": "integer", "minimum": 1, "description":
                              "the smallest context length the model's backends report "
                              "(absent when one does not say)"}}}}}},
    "Status": {"type": "object", "properties": {"status": {"type": "string"}},
               "additionalProperties": True},
    "Stats": {"type": "object", "required": ["cache_hit_rate", "requests_total"],
              "additionalProperties": True,
              "properties": {"cache_hit_rate": {"type": "number"},
                             "requests_total": {"type": "integer"},
                             "per_model": {"type": "object"},
                             "per_backend": {"type": "object"},
                             "replicas_asked": {"type": "integer"},
                             "replicas_answered": {"type": "integer"},
                             "replicas": {"type": "array", "items": {"type": "string"}},
                             "fleet_error": {"type": "string"}}},
}

_SYNAPSE_HEADERS = {
    "x-request-id": {"schema": {"type": "string"}},
    "x-synapse-cache": {"schema": {"enum": ["hit-exact", "hit-semantic", "miss", "bypass"]}},
    "x-synapse-backend": {"schema": {"type": "string"}, "description": "on a miss"},
    "x-synapse-route": {"schema": {"type": "string"}, "description": "why that backend"},
}


def _post(summary: str, request: str, response: str, stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {_JSON: {"schema": {"$ref": f"#/components/schemas/{response}"}}}
    if stream:
        # Server-sent events: "data: <chunk JSON>" lines, then "data: [DONE]".
        content["text/event-stream"] = {"schema": {}}
    keys = {k: v for k, v in _ERRORS.items()}
    return {"post": {
        "summary": summary, "security": [{"bearer": []}],
        "parameters": [{"name": "x-session-id", "in": "header", "required": False,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {_JSON: {"schema": {
            "$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": {"description": "the backend's (or the cache's) answer",
                              "headers": _SYNAPSE_HEADERS, "content": content}, **keys}}}


def _get(summary: str, schema: str, codes: dict[str, Any],
         secured: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {_JSON: {"schema": {
            "$ref": f"#/components/schemas/{schema}"}}}}, **codes}}
    if secured:
        op["security"] = [{"bearer": []}]
    return {"get": op}


def _metrics(settings: config.ControlPlaneSettings) -> dict[str, Any]:
    """``/metrics`` as the API port serves it: absent with ``metrics.port``, else
    secured unless open (:func:`observability.guard`)."""
    if settings.metrics.port is not None:
        return {}
    op: dict[str, Any] = {"summary": "Prometheus metrics", "responses": {"200": {
        "description": "text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}}}
    guard = observability.guard(settings, on_api_port=True)
    if guard != "open":
        op["summary"] += " (the metrics token)" if guard == "token" else " (admin key)"
        op["security"] = [{"bearer": []}]
        op["responses"].update({"401": _ERRORS["401"]} if guard == "token" else
                               {"401": _ERRORS["401"], "403": _err("not the admin key")})
    return {"/metrics": {"get": op}}


def spec(settings: config.ControlPlaneSettings) -> dict[str, Any]:
    auth = {k: _ERRORS[k] for k in ("401",)}
    admin = {"401": _ERRORS["401"], "403": _err("not the admin key")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Synapse control plane", "version": "1",
                 "description": "OpenAI-compatible API of a Synapse control plane."},
        "paths": {
            "/v1/chat/completions": _post("Create a chat completion",
                                          "ChatCompletionRequest", "Completion", True),
            "/v1/completions": _post("Create a completion", "CompletionRequest",
                                     "Completion", True),
            "/v1/embeddings": _post("Create embeddings", "EmbeddingRequest",
                                    "EmbeddingList", False),
            "/v1/models": _get("List models (canonical names and aliases)", "ModelList",
                               auth, secured=True),
            "/health": _get("Liveness", "Status", {}),
            "/ready": _get("Readiness: the registry is synced (and with "
                           "registry.ready_requires_backend, a backend is routable)", "Status",
                           {"503": {"description": "not ready", "content": {_JSON: {
                               "schema": {"$ref": "#/components/schemas/Status"}}}}}),
            **_metrics(settings),
            "/api/v1/stats": _get("Request and cache statistics (admin key)", "Stats",
                                  admin, secured=True),
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {
                "description": "OpenAPI 3.1", "content": {_JSON: {"schema": {
                    "type": "object"}}}}}}},
            **openapi_surface.paths(),
        },
        "components": {"schemas": {**SCHEMAS, **openapi_surface.SCHEMAS},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           **openapi_surface.SECURITY_SCHEMES}},
    }
