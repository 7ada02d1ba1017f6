"""Latency-model profiles: built-in names, or a YAML file of ``ProfileSettings`` fields.

``realistic`` (the default: ``config.ProfileSettings``'s defaults, where the numbers live):
Llama-3.1-8B-Instruct, BF16, one H100 SXM 80GB, vLLM V1. Loosely calibrated from public
figures, not measured here:

* ``prefill_s_per_token`` 0.00012 s (≈ 8.3k tokens/s): an 8B model costs ~2 x 8e9 =
  16 GFLOP per token; at a realistic ~15-20 % of the H100's ~990 dense BF16 TFLOPS for
  attention-heavy mixed batches this is 8-10k prefill tokens/s, in line with published
  vLLM prefill throughput for 8B models on H100.
* ``decode_base_s`` 0.012 s: a decode step must read all ~16 GB of weights; at 3.35 TB/s
  that is ~5 ms, and with scheduling, sampling and detokenisation overheads vLLM reports
  ~8-12 ms per output token at batch 1 (~80-120 tokens/s per stream).
* ``decode_per_seq_s`` 0.00015 s: each extra sequence adds KV reads and a little
  compute; at the 256-sequence cap a step is ~50 ms, i.e. ~5k output tokens/s, the order
  of vLLM's reported 8B/H100 throughput.
* ``num_gpu_blocks`` 28,000 x ``block_size`` 16: KV bytes per token are
  2 (K and V) x 32 layers x 8 KV heads x 128 head dim x 2 bytes = 128 KiB, so a 16-token
  block is 2 MiB. 80 GB x 0.9 (``gpu_memory_utilization``) ≈ 72 GB, minus ~16 GB of
  weights and ~2-3 GB of activations and CUDA graphs ≈ 54 GB ≈ 27-28k blocks (vLLM logs
  about 440k KV tokens for this setup).
* ``max_num_seqs`` 256, ``max_num_batched_tokens`` 8192: vLLM V1's defaults for online
  serving on a large GPU; ``max_model_len`` 131,072: Llama 3.1's context.

``fast``: the same engine shape with a tenth of every cost, for demos. Tests normally
keep ``realistic`` and shrink time with ``--time-scale`` instead, so the model's logic is
exercised unchanged.
"""

from __future__ import annotations

import pathlib
from typing import Any

from simulator.config import ProfileSettings
from synapse_common import settings

REALISTIC: dict[str, Any] = ProfileSettings().model_dump()
"""The figures this module's docstring explains: the config defaults, written once there."""

FAST: dict[str, Any] = {
    **REALISTIC,
    "prefill_s_per_token": 0.000012,
    "decode_base_s": 0.0012,
    "decode_per_seq_s": 0.000015,
}

BUILTIN: dict[str, dict[str, Any]] = {"realistic": REALISTIC, "fast": FAST}


class ProfileError(ValueError):
    """A profile name or file that cannot be used; ``str()`` is one line."""


def load(name_or_path: str) -> dict[str, Any]:
    """Profile fields from a built-in name or a YAML file (validated by the caller)."""
    if name_or_path in BUILTIN:
        return dict(BUILTIN[name_or_path])
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"--profile {name_or_path}: neither a built-in profile "
                           f"({', '.join(BUILTIN)}) nor a readable file")
    try:   # the config files' loader: a repeated key is refused, no snippet quoted
        data = settings.load_yaml(path, f"--profile {name_or_path}")
    except settings.ConfigError as exc:
        raise ProfileError(str(exc)) from None
    if isinstance(data, dict) and isinstance(data.get("profile"), dict):
        data = data["profile"]  # a whole simulator config file: take its profile section
    if not isinstance(data, dict):
        raise ProfileError(f"--profile {name_or_path}: expected a mapping of profile fields")
    return data


def default() -> ProfileSettings:
    return ProfileSettings.model_validate(REALISTIC)
