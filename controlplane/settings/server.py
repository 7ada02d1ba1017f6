"""Listener settings: the HTTP API, the gRPC server, /metrics and the Admin service."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from synapse_common import settings as common
from synapse_common.settings import Section

MAX_WORKERS = 64
# Upper bounds only where a larger value breaks the process rather than merely allowing
# more: gRPC takes its message limits as a C int (above, the server does not start:
# OverflowError); aiohttp's C parser takes the header limit as an unsigned long (above,
# every request fails), and no client sends a header line near a mebibyte, while each
# connection may buffer that much before it is refused.
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
MAX_HEADER_BYTES = 1024 * 1024


class HttpSettings(Section):
    host: str = Field("0.0.0.0", description="address the OpenAI-compatible API listens on")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 = pick a free port)")
    workers: int | Literal["auto"] = Field(
        "auto", description="serving processes sharing the HTTP port (1 to "
        f"{MAX_WORKERS}); auto = the CPUs this process may use (its affinity, capped by its "
        "container's CPU limit), when what the workers "
        "must share can be shared (redis.url set; the cache off, or its L1 in Redis and its "
        "L2 on a Milvus server), else 1")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="largest request body accepted (413 above)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=MAX_HEADER_BYTES,
                                  description="largest header line")
    upstream_connect_timeout_s: float = Field(2.0, gt=0, description="connect timeout to a backend")
    upstream_first_byte_timeout_s: float = Field(
        120.0, gt=0, description="time allowed for a backend's first response byte (504 after)")
    upstream_idle_timeout_s: float = Field(
        120.0, gt=0, description="longest gap between streamed chunks before the stream is cut")
    upstream_deadline_s: float | None = Field(
        None, gt=0, description="time allowed for a request's first response byte over all "
        "its attempts, fallback models included (each attempt still has "
        "upstream_first_byte_timeout_s at most); none = router.max_attempts x "
        "upstream_first_byte_timeout_s")
    tls_cert_file: str | None = Field(None, description="PEM certificate; enables HTTPS with key")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request head (request line and headers) must arrive "
        "within this many seconds of its first byte, else the connection is closed")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this many seconds of "
        "its head (408 and the connection closed otherwise)")
    keepalive_timeout_s: float = Field(
        75.0, gt=0, description="an idle connection (kept alive, or that never sent a "
        "byte) is closed after this many seconds")
    drain_delay_s: float = Field(
        5.0, ge=0, le=120, description="at SIGTERM, /ready answers 503 at once and the "
        "process keeps accepting and serving requests for this many seconds more, so load "
        "balancers and Kubernetes endpoints stop sending new ones before the listener "
        "closes (Ctrl-C, SIGINT, skips it; 0 = close at once)")
    shutdown_grace_s: float = Field(
        45.0, gt=0, le=3600, description="after the drain delay the listener closes and "
        "requests in flight get this many seconds to finish; what is still running then "
        "is ended cleanly (a stream with its error event, a request not yet answered with "
        "503 server_shutting_down). A pod's terminationGracePeriodSeconds must exceed "
        "drain_delay_s + shutdown_grace_s with a few seconds to spare")
    media_urls: Literal["public", "inline", "any"] = Field(
        "public", description="media URLs a request may name for the engine to fetch "
        "(images, audio, video): public = data: URLs and http(s) URLs whose host is not a "
        "loopback, private, link-local or internal address or name; inline = data: URLs "
        "only; any = every URL (controlplane/core/media_urls.py)")
    max_connections: int = Field(
        10_000, ge=16, description="client connections one serving process keeps open "
        "(each is a file descriptor; at most three quarters of the process's open-file "
        "limit): a new one beyond it closes the connection idle longest, else the one whose "
        "request head has been arriving longest (a second or more), else is closed at once")
    fast_lane: bool = Field(
        True, description="serve POST /v1/chat/completions and /v1/completions on a lean "
        "HTTP/1.1 path (httptools) instead of aiohttp's request machinery; other routes, "
        "odd requests and TLS are aiohttp's either way")
    max_json_depth: int = Field(64, ge=4, le=250,
                                description="deepest nesting of arrays and objects in a "
                                "request body (400 above)")
    max_json_containers: int = Field(
        65536, ge=256, description="most arrays and objects in a request body (400 above, "
        "counted on the raw bytes before the body is parsed). The server walks a body's "
        "containers in Python (its cache key, media URLs, prompt): a body of millions of "
        "tiny arrays would hold the event loop, and every tenant, for seconds")
    max_messages: int = Field(
        2048, ge=1, description="most messages in a request's messages array (chat "
        "completions, Anthropic messages and count_tokens, tokenize), and most items in a "
        "Responses input array; 400 above, as OpenAI's own limit. Each message "
        "costs CPU to validate, key and tokenize: a body of many tiny messages costs far "
        "more per byte than its size says")
    max_n: int = Field(
        8, ge=1, description="most choices one generating request may ask for (n, and the "
        "legacy best_of, which vLLM 0.32 ignores); 400 above. Each choice is a sequence "
        "the engine runs at once, so one request of n=64 takes 64 of its seats; token "
        "limits charge n x the completion estimate")
    max_structured_output_bytes: int = Field(
        16 * 1024, ge=256, description="largest structured-output constraint of a request, "
        "as JSON (structured_outputs, response_format, the legacy guided_json / guided_regex "
        "/ guided_grammar / guided_choice, Responses' text.format); 400 above. The engine "
        "compiles it into a grammar, on threads that run on past its own timeout: a huge "
        "regex or schema costs every tenant the engine's CPU. The same bound holds "
        "Anthropic's output_config.format; tools have http.max_tool_schema_bytes")
    max_tool_schema_bytes: int = Field(
        64 * 1024, ge=256, description="largest total of the tool parameter schemas the "
        "engine compiles into a grammar for one request, as JSON: every tool's under a "
        "forced tool_choice (required, Anthropic's any), the named tool's under a named "
        "choice, and under auto those of tools marked strict (the OpenAI Agents SDK marks "
        "every tool strict); 400 above. Apart from max_structured_output_bytes because an "
        "agent's ordinary tool set is many schemas where a response_format is one")
    max_sequences: int = Field(
        256, ge=1, description="most sequences one generating request may ask the engine "
        "for: the prompts of a /v1/completions batch (a prompt array of strings, and each "
        "of prompt_embeds) x n; 400 above. Each is a sequence the engine runs at once (vLLM's "
        "max_num_seqs is its seat count, 256 by default on most hardware), and the fair "
        "queue counts a request's seats by them; OpenAI itself takes up to 2,048 prompts")
    max_pooling_inputs: int = Field(
        2048, ge=1, description="most inputs one pooling request may ask the engine for: "
        "the texts (or token-id arrays) of a /v1/embeddings input array, a /v1/rerank's "
        "documents, a /v1/score's pairs; 400 above. vLLM pools each as a request of its "
        "own, and the in-flight ledger counts each as a seat; OpenAI's embeddings take up "
        "to 2,048 inputs and clients send batches of a thousand")
    max_pooling_input_bytes: int = Field(
        256 * 1024, ge=1024, description="largest text of one pooling input, in UTF-8 "
        "bytes: each string of a /v1/embeddings input, a /v1/rerank's query and each of "
        "its documents, each text of a /v1/score; 400 naming the field and index above. "
        "An engine tokenizes each whole before it can refuse one longer than its "
        "context; pooling models hold up to 32k tokens, a few bytes each")
    request_chat_templates: bool = Field(
        False, description="let a request carry its own chat_template (or "
        "chat_template_kwargs.chat_template); off, it is a 400, as vLLM refuses one unless "
        "started with --trust-request-chat-template (which the agent passes only when an "
        "engine's extra_args add it: on here, add it to every engine's). The engine "
        "renders it as Jinja in its API server, whatever its size: on, every tenant may "
        "send one, so turn it on only when every tenant is trusted with that")
    request_media_kwargs: bool = Field(
        False, description="let a request carry its own mm_processor_kwargs (arguments of "
        "vLLM's multimodal processor, such as an image's pixel cap) or media_io_kwargs "
        "(of its media loaders, such as a video's frame count); off, each is a 400. They "
        "override the engine's own per request, so they set what the request's images "
        "and videos cost the engine, which its tokens do not show: turn it on only when "
        "every tenant is trusted with that. vLLM refuses them too unless started with "
        "--trust-request-mm-kwargs: on here, add it to every engine's extra_args")
    max_audio_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="largest audio upload (the multipart body of "
        "/v1/audio/transcriptions and /translations, streamed to the backend, never held in "
        "memory); 413 above, at once when Content-Length says so")

    @pydantic.model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        common.tls_both_or_neither(self.tls_cert_file, self.tls_key_file)
        return self

    @pydantic.model_validator(mode="after")
    def _n_within_sequences(self) -> HttpSettings:
        if self.max_n > self.max_sequences:
            raise ValueError(f"max_n ({self.max_n}) is above max_sequences "
                             f"({self.max_sequences}): every n between would be refused "
                             "for its sequences")
        return self

    @pydantic.field_validator("workers")
    @classmethod
    def _workers_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"must be 'auto' or a count from 1 to {MAX_WORKERS}")
        return value


class MetricsSettings(Section):
    port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port (same host as "
        "http.host) instead of the API port, open to whoever reaches it unless "
        "bearer_token_file is set (keep it off the API's Service and Ingress); none = on "
        "the API port, where with auth.enabled it needs the admin key (it lists every "
        "tenant's traffic)")
    bearer_token_file: str | None = Field(
        None, description="file holding a token /metrics then requires as 'Authorization: "
        "Bearer <token>' (the chart's ServiceMonitor presents the metrics-token key of the "
        "auth Secret as its authorization credentials)")


class GrpcSettings(Section):
    host: str = Field("0.0.0.0", description="address the gRPC server (agents, Admin) listens on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free port)")
    tls_cert_file: str | None = Field(None, description="PEM certificate; enables TLS with key")
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=MAX_GRPC_MESSAGE_BYTES,
                                   description="largest gRPC message this process sends; "
                                   "what it receives is also capped at "
                                   "controlplane/api/grpc_server.py MAX_RECEIVE_BYTES (its "
                                   "callers' requests and agents' reports are small)")
    node_ca_file: str | None = Field(
        None, description="PEM CA bundle that signed the agents' Node-service certificates "
        "(their grpc.tls_cert_file): set, every Node call (Node.Embed, Node.ScorePairs: "
        "tenants' texts) goes over TLS and an agent that cannot prove itself with it, or "
        "serves plain text, is not called, whatever certificate it registered; none = Node "
        "calls in plain text, except to agents that registered a certificate of their own "
        "(grpc.tls_self_signed), checked against that certificate alone (pinned)")
    node_server_name: str | None = Field(
        None, min_length=1, description="name the agents' Node-service certificates carry, "
        "checked instead of the host of the address each agent advertises (node IPs vary); "
        "none = that host (the certificates then need it as a subject alternative name)")
    node_tls_required: bool = Field(
        False, description="without node_ca_file, call no agent in plain text: an agent "
        "whose Register carries no certificate of its own (its grpc.tls_self_signed) is "
        "not called. Agents that sent one are dialled with TLS trusting that certificate "
        "alone (with node_ca_file set, the CA decides for every agent instead)")

    @pydantic.model_validator(mode="after")
    def _tls_pair(self) -> GrpcSettings:
        common.tls_both_or_neither(self.tls_cert_file, self.tls_key_file)
        if self.node_server_name and not self.node_ca_file:
            raise ValueError("node_ca_file: required with node_server_name (the name is "
                             "checked on TLS connections, which the CA turns on)")
        return self


class AdminSettings(Section):
    enabled: bool = Field(True, description="serve the Admin gRPC service")
