"""Model and static-upstream settings: canonical names, aliases, fallbacks, and the
OpenAI-compatible servers configured by URL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pydantic
from pydantic import Field

from controlplane.core import upstream_kinds
from synapse_common import logs
from synapse_common.settings import Secret, Section, TaskList, tasks_field


class ModelSettings(Section):
    name: str = Field(..., min_length=1, description="canonical model name")
    aliases: list[str] = Field(default_factory=list, description="other names clients may use")
    fallbacks: list[str] = Field(default_factory=list,
                                 description="models to use, in order, when none of this one can serve")
    cache_target_precision: float | None = Field(
        None, gt=0, lt=1, description="verifier operating point for this model (default: cache's)")
    memory_required_gb: float | None = Field(None, gt=0,
                                             description="VRAM an engine of it needs (placement)")
    tokenizer: str | None = Field(
        None, min_length=1, description="the model's tokenizer for prefix routing: its HF "
        "directory (tokenizer.json, tokenizer_config.json, chat template) or tokenizer.json; "
        "none = the shared approximation")


class UpstreamSettings(Section):
    name: str = Field(..., min_length=1, description="backend name in headers and metrics")
    url: str = Field(..., pattern=r"^https?://", description="OpenAI-compatible base URL, "
                     "with or without the trailing /v1 (http://h:8000 and http://h:8000/v1 "
                     "are the same server)")
    models: list[str] = Field(..., min_length=1, description="models it serves (canonical "
                              "names or aliases)")
    kind: upstream_kinds.KindName | None = Field(
        None, description="the server: vllm, sglang, tgi, llamacpp, ollama, or openai (a "
        "hosted OpenAI-compatible API with a key). It decides the health probe (Ollama: "
        "/api/version; openai: GET /v1/models with the key) and the metrics read (none for "
        "ollama and openai); none = probe health_path, read no metrics")
    model_names: dict[str, str] = Field(
        default_factory=dict, description="the upstream's own name for a model it serves "
        "(model or alias -> its name, e.g. {llama: 'llama3.1:8b'}): requests carry the "
        "upstream's name, answers the name the client asked for")
    api_key: Secret | None = Field(None, description="key sent to the upstream as "
                                   "'Authorization: Bearer <key>' (never logged)")
    health_path: str = Field("/health", description="probed for health (2xx = healthy) when "
                             "no kind is set")
    probe_interval_s: float | None = Field(
        None, gt=0, description="how often its health is probed; none = "
        "registry.upstream_probe_interval_s, and for kind openai at most once a minute")
    task: Literal["generate", "embed"] = Field("generate", description="what it serves")
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences the engine runs at once (vLLM's --max-num-seqs): "
        "the fair queue counts this backend's seats from it; none = learn them from its "
        "metrics (kind vllm or sglang), which a burst of arrivals can mislead")
    tasks: TaskList = tasks_field(
        "task alone. A vLLM serves generate, responses, messages and tokenize; Synapse "
        "translates /v1/messages to chat for one that does not")

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # A URL's user:password@ is a secret too: shown masked, as the log shows it.
        for name, value in super().__repr_args__():
            yield name, logs.mask_url_credentials(value) if name == "url" else value

    @pydantic.field_validator("url")
    @classmethod
    def _url_is_one_printable_token(cls, value: str) -> str:
        # A tab or a space in user:password@ still works (URL parsers drop or encode it)
        # but splits the URL wherever it is shown, and the password showed with it.
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("holds whitespace or control characters; percent-encode them "
                             "(a space is %20)")
        return value

    @pydantic.model_validator(mode="after")
    def _mapped_models_are_served(self) -> UpstreamSettings:
        for name in self.model_names:
            if name not in self.models:
                raise ValueError(f"model_names: {name!r} is not one of this upstream's models "
                                 f"{self.models}")
        return self
