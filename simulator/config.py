"""Engine-simulator settings: profile (latency model), faults, TEI mode.

The default profile is loosely calibrated to Llama-3.1-8B-Instruct in BF16 on one H100
80GB under vLLM V1; the figures' sources are in ``simulator/profiles.py``, whose
``realistic`` profile is the defaults below (written once, here).

Precedence: defaults < YAML file < ``SYNAPSE_*`` environment < ``--profile`` < single
flags (``--max-num-seqs`` …), applied by ``simulator.main``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from simulator import tasks as sim_tasks
from synapse_common.settings import LoggingSettings, Secret, Section


class ProfileSettings(Section):
    prefill_s_per_token: float = Field(0.00012, ge=0, description="prefill seconds per uncached token")
    decode_base_s: float = Field(0.012, ge=0, description="decode step seconds at batch 1")
    decode_per_seq_s: float = Field(0.00015, ge=0, description="added step seconds per running sequence")
    max_num_seqs: int = Field(256, ge=1, description="concurrent sequences (vLLM max_num_seqs)")
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="tokens scheduled per engine step; longer prompts prefill in "
                                "chunks (vLLM V1 chunked prefill)")
    num_gpu_blocks: int = Field(28_000, ge=1, description="KV cache capacity in blocks")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_model_len: int = Field(131_072, ge=16, description="longest prompt + output")
    default_max_tokens: int = Field(256, ge=1, description="output length when max_tokens is unset")


class FaultSettings(Section):
    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of requests answered 500")
    crash_after: int | None = Field(None, ge=1, description="exit non-zero after N requests")
    hang: bool = Field(False, description="accept requests and never answer")
    stall_after_chunks: int | None = Field(
        None, ge=0, description="streams stop after N chunks, then the connection drops")
    stall_s: float = Field(2.0, ge=0, description="how long a stalled response stays silent "
                                                  "before the connection drops (wall seconds)")
    slow_start_s: float = Field(0.0, ge=0, description="/health answers 503 for this long")


class SimulatorSettings(Section):
    engine: Literal["vllm", "tei", "speech"] = Field(
        "vllm", description="what to imitate: vLLM, TEI, or a text-to-speech server "
                            "(openedai-speech / Speaches shapes)")
    tasks: list[str] = Field(
        default_factory=list,
        description="what the engine serves (simulator.tasks names); empty = the engine's "
                    "default set. Advertised in /v1/models, /version, /info and /openapi.json")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port (0 = pick)")
    model: str = Field("meta-llama/Meta-Llama-3.1-8B-Instruct", description="model id")
    served_model_names: list[str] = Field(default_factory=list, description="names served")
    time_scale: float = Field(1.0, ge=0, description="multiplies every modelled delay; 0 = instant")
    seed: int = Field(0, description="seed for deterministic output")
    profile: ProfileSettings = Field(default_factory=ProfileSettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)
    embedder: Literal["hash", "minilm"] = Field("hash", description="TEI mode vectors")
    embed_dim: int = Field(384, ge=1, description="TEI mode hashed-vector dimension")
    max_client_batch_size: int = Field(32, ge=1, description="TEI mode batch limit (422 above)")
    max_input_length: int = Field(512, ge=1, description="TEI mode longest input in tokens "
                                                         "(413 above unless truncate is set)")
    max_audio_mb: float = Field(25.0, gt=0, description="largest audio upload for "
                                "transcription (vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB)")
    answer_origin: bool = Field(
        False, description="name the request that produced each whole chat or completions "
                           "answer in a field of its own, ``origin`` (tests: the response "
                           "cache gives every replay a fresh id, so the id cannot say where "
                           "a cached answer came from)")
    responses_store: bool = Field(
        False, description="keep answers of /v1/responses in memory so previous_response_id "
                           "and GET /v1/responses/{id} work (vLLM's "
                           "VLLM_ENABLE_RESPONSES_API_STORE; off by default, as in vLLM)")
    api_key: Secret | None = Field(
        None, description="key callers must present as 'Authorization: Bearer <key>' "
        "on every path but GET /health (simulator.auth: as the agent's guarded engines); an agent "
        "sets it for the engines it starts through SYNAPSE_API_KEY. None: any caller")
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("tasks")
    @classmethod
    def _tasks_fit_the_engine(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # engine is declared first, so it is validated (or missing, if invalid) already
        engine = info.data.get("engine")
        if engine is not None:
            sim_tasks.resolve(engine, value)
        return list(dict.fromkeys(value))
