"""The generation backend of ``synapse up``: the engine simulator (the default) or, with
``--engine vllm``, a real vLLM from the engine tier (``make engines``) serving SmolLM2-135M
on the CPU.

The real engine runs with ``--enforce-eager`` (start-up in tens of seconds instead of
minutes of torch.compile, for somewhat slower decoding), the dtype that serves right and
fastest on this CPU (:func:`engines.cpu_dtype`), a 4,096-token context and
``--enable-prompt-tokens-details`` (so answers report ``cached_tokens``). The agent adds
vLLM's CPU environment itself (:mod:`agent.engine_env`); it is told the device is the
CPU, since the engine tier's vLLM is the CPU build whatever the machine has.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from synapse_common import engines

SIMULATOR_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
SIMULATOR_ALIASES = ("llama",)
VLLM_ALIASES = ("smollm2",)
VLLM_MAX_MODEL_LEN = 4096
VLLM_FLAGS = ("--enforce-eager", "--enable-prompt-tokens-details")


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the configs of ``synapse up`` need to know about the generation backend."""

    model: str  # the name the control plane serves
    aliases: list[str]
    backend: dict[str, Any] | None  # the agent's backend entry; None behind --upstream
    supervisor: dict[str, Any]  # agent supervisor settings the backend needs
    what: str  # for the progress line: what "ready" waits for


def choose(args: argparse.Namespace, port: int) -> Generation:
    """The backend ``args`` ask for; :class:`engines.EngineTierMissing` when ``--engine
    vllm`` finds no engine tier (its message says ``make engines``)."""
    if args.upstream:
        model = args.model or SIMULATOR_MODEL
        return Generation(model, _aliases(args, SIMULATOR_ALIASES), None, {}, "upstream")
    if args.engine == "vllm":
        return _vllm(args, port)
    model = args.model or SIMULATOR_MODEL
    backend = {"name": "simulator", "engine": "simulator", "model": model,
               "served_model_names": [model], "port": port, "memory_required_gb": 18,
               "extra_args": ["--time-scale", str(args.time_scale)]}
    return Generation(model, _aliases(args, SIMULATOR_ALIASES), backend, {},
                      "agent, simulator and embedder")


def _vllm(args: argparse.Namespace, port: int) -> Generation:
    tier = engines.find()
    command, model_dir = tier.require_vllm()
    model = args.model or tier.model_name
    backend = {"name": "vllm", "engine": "vllm", "model": str(model_dir),
               "served_model_names": [model], "port": port,
               "max_model_len": VLLM_MAX_MODEL_LEN,
               "extra_args": ["--dtype", engines.cpu_dtype(), *VLLM_FLAGS]}
    supervisor = {"vllm_command": command, "vllm_device": "cpu"}
    return Generation(model, _aliases(args, VLLM_ALIASES), backend, supervisor,
                      "agent, vLLM (SmolLM2-135M on the CPU) and embedder")


def _aliases(args: argparse.Namespace, default: tuple[str, ...]) -> list[str]:
    return list(args.alias) if args.alias is not None else list(default)
