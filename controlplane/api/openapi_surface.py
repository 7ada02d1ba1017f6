"""The OpenAPI description of the paths beyond chat, completions and embeddings (issue
20), merged into ``GET /openapi.json`` by :mod:`controlplane.api.openapi`.

As there, request schemas name the fields Synapse itself reads and allow any other (they
pass to the backend); each path lists its error statuses. ``/v1/messages`` (and
``/count_tokens`` under it) answers errors in Anthropic's shape (``AnthropicError``), every other path in the OpenAI
envelope; audio uploads are ``multipart/form-data`` and speech answers binary audio.
"""

from __future__ import annotations

from typing import Any

_JSON = "application/json"
_SSE = "text/event-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": True,
            "properties": properties}


_MODEL = {"type": "string", "minLength": 1}
_STRING_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array",
                                                   "items": {"type": "string"}}]}

SCHEMAS: dict[str, Any] = {
    "AnthropicError": _object(["type", "error"], type={"const": "error"},
                              error=_object(["type", "message"], type={"type": "string"},
                                            message={"type": "string"}),
                              request_id={"type": "string"}),
    "ResponseRequest": _object(
        ["model", "input"], model=_MODEL, input={"anyOf": [{"type": "string"},
                                                           {"type": "array"}]},
        instructions={"type": ["string", "null"]}, stream={"type": ["boolean", "null"]},
        max_output_tokens={"type": ["integer", "null"], "minimum": 1},
        previous_response_id={"type": ["string", "null"]},
        store={"type": ["boolean", "null"]}),
    "MessageRequest": _object(
        ["model", "max_tokens", "messages"], model=_MODEL,
        max_tokens={"type": "integer", "minimum": 1},
        messages={"type": "array", "minItems": 1},
        system={"anyOf": [{"type": "string"}, {"type": "array"}]},
        tools={"type": "array"}, tool_choice={"type": "object"},
        stream={"type": "boolean"}, stop_sequences={"type": "array",
                                                    "items": {"type": "string"}}),
    "CountTokensRequest": _object(
        ["model", "messages"], model=_MODEL, messages={"type": "array", "minItems": 1},
        system={"anyOf": [{"type": "string"}, {"type": "array"}]},
        tools={"type": "array"}),
    "RerankRequest": _object(["model", "query", "documents"], model=_MODEL,
                             query={"type": "string", "minLength": 1},
                             documents={"type": "array", "minItems": 1},
                             top_n={"type": ["integer", "null"], "minimum": 0}),
    "ScoreRequest": _object(["model"], model=_MODEL, text_1=_STRING_OR_LIST,
                            text_2=_STRING_OR_LIST),
    "TokenizeRequest": _object(["model"], model=_MODEL, prompt={"type": "string"},
                               messages={"type": "array"}),
    "DetokenizeRequest": _object(["model", "tokens"], model=_MODEL, tokens={
        "type": "array", "items": {"type": "integer", "minimum": 0}}),
    "SpeechRequest": _object(["model", "input"], model=_MODEL,
                             input={"type": "string", "minLength": 1},
                             voice={"type": "string"}, response_format={"type": "string"},
                             speed={"type": "number"}),
    "AudioUpload": {"type": "object", "required": ["file", "model"],
                    "additionalProperties": True,
                    "properties": {"file": {"type": "string", "format": "binary"},
                                   "model": _MODEL, "language": {"type": "string"},
                                   "prompt": {"type": "string"},
                                   "response_format": {"type": "string"},
                                   "stream": {"type": "boolean"}}},
    "Answer": {"type": "object", "additionalProperties": True},
}


def _errors(shape: str, statuses: dict[str, str]) -> dict[str, Any]:
    return {code: {"description": why, "content": {_JSON: {"schema": _ref(shape)}}}
            for code, why in statuses.items()}


# Why a model's path answers 503, by the error's ``code`` (every path of the document
# lists them in its 503's description).
UNAVAILABLE_CODES = {
    "no_backend": "no backend serving the path's task can serve the model now",
    "queue_timeout": "the request waited in the fair queue past its deadline "
                     "(Retry-After)",
    "upstream_busy": "this process holds as many whole answers as it may (Retry-After)",
    "server_shutting_down": "this replica is shutting down (another one can answer)",
}
UNAVAILABLE = "by error.code: " + "; ".join(f"{code}: {why}"
                                            for code, why in UNAVAILABLE_CODES.items())
# Anthropic's error has no code: every 503 is an ``overloaded_error``.
_ANTHROPIC_UNAVAILABLE = ("overloaded_error: " + "; ".join(UNAVAILABLE_CODES.values()))

_COMMON_ERRORS = {
    "400": "an invalid field (named in the error)",
    "401": "missing or unknown API key",
    "403": "the admin key used on /v1",
    "404": "unknown model, or one the tenant may not use (GET /v1/models lists its own)",
    "413": "body larger than http.max_body_bytes",
    "429": "over the tenant's rate or token limit; see Retry-After",
    "502": "every backend tried failed",
    "503": UNAVAILABLE,
    "504": "no backend answered in time",
}


def _post(summary: str, request: tuple[str, str], answers: dict[str, Any],
          errors: str = "Error", overrides: dict[str, str] | None = None,
          security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    media, schema = request
    anthropic = {"503": _ANTHROPIC_UNAVAILABLE} if errors == "AnthropicError" else {}
    return {"post": {
        "summary": summary, "security": security or [{"bearer": []}],
        "requestBody": {"required": True, "content": {media: {"schema": _ref(schema)}}},
        "responses": {"200": {"description": "the backend's answer", "content": answers},
                      **_errors(errors, {**_COMMON_ERRORS, **anthropic,
                                         **(overrides or {})})}}}


def _json_answer(stream: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {_JSON: {"schema": _ref("Answer")}}
    if stream:
        out[_SSE] = {"schema": {"type": "string"}}
    return out


_UPLOAD = ("multipart/form-data", "AudioUpload")
_UPLOAD_ERRORS = {"413": "the file is larger than http.max_audio_bytes (refused at once "
                         "when Content-Length says so)",
                  "408": "the upload stalled longer than http.body_timeout_s"}


def paths() -> dict[str, Any]:
    return {
        "/v1/responses": _post("Create a model response (OpenAI Responses API)",
                               (_JSON, "ResponseRequest"), _json_answer(stream=True),
                               overrides={"404": "unknown model, or a previous_response_id "
                                          "this tenant cannot continue"}),
        "/v1/messages": _post(
            "Create a message (Anthropic Messages API; x-api-key or Bearer)",
            (_JSON, "MessageRequest"), _json_answer(stream=True), errors="AnthropicError",
            security=[{"apiKey": []}, {"bearer": []}]),
        "/v1/messages/count_tokens": _post(
            "Count a message's input tokens (Anthropic; the engine's count, else an "
            "estimate: x-synapse-count)", (_JSON, "CountTokensRequest"), _json_answer(),
            errors="AnthropicError", security=[{"apiKey": []}, {"bearer": []}]),
        "/v1/audio/transcriptions": _post("Transcribe audio", _UPLOAD,
                                          {**_json_answer(stream=True), "text/plain": {
                                              "schema": {"type": "string"}}},
                                          overrides=_UPLOAD_ERRORS),
        "/v1/audio/translations": _post("Translate audio into English", _UPLOAD,
                                        {**_json_answer(), "text/plain": {
                                            "schema": {"type": "string"}}},
                                        overrides=_UPLOAD_ERRORS),
        "/v1/audio/speech": _post("Synthesise speech (audio streamed back)",
                                  (_JSON, "SpeechRequest"),
                                  {"audio/*": {"schema": {"type": "string",
                                                          "format": "binary"}}}),
        "/v1/rerank": _post("Rank documents by relevance to a query",
                            (_JSON, "RerankRequest"), _json_answer()),
        "/v1/score": _post("Score text pairs", (_JSON, "ScoreRequest"), _json_answer()),
        "/tokenize": _post("Tokenize a prompt with the model's tokenizer",
                           (_JSON, "TokenizeRequest"), _json_answer()),
        "/detokenize": _post("Turn token ids back into text", (_JSON, "DetokenizeRequest"),
                             _json_answer()),
    }


SECURITY_SCHEMES = {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
