"""The pair scorer's network in bfloat16 on oneDNN: an opt-in fast path for
``Node.ScorePairs`` on CPUs with AMX (``embedder.pair_scorer_precision: bfloat16``).

Why: in float32 a scorer pass is compute-bound (torch and onnxruntime both run near the
cores' float32 peak), so only a lower precision makes it much cheaper. A CPU with
AMX-BF16 (Intel Xeon since Sapphire Rapids) multiplies bfloat16 matrices many times
faster than float32 ones; onnxruntime has no bfloat16 kernels on the CPU, torch has them
(oneDNN), so this path is torch.

* **The same network**, computed by :class:`pair_scorer_model.FastNetwork` from the
  loaded torch network's own weights rather than by the transformers modules, whose
  eager forward costs more in per-operator overhead than in the matrices at the sizes a
  lookup sends (a pair or a few); its docstring says what is fused and what stays
  float32. In float32 it runs on any CPU and gives the torch network's logits: the tests
  hold the rewrite to that.
* **Precision**: the logits move (bfloat16 keeps 8 bits of mantissa), within
  :data:`TOLERANCE` on the start-up pairs. A stack decision can only change for a pair
  whose stacked logit lies that close to the operating point, but on the held-out pairs
  a few do, so the setting is off by default (``float32``). The scorer id does not
  change: the control plane's stack reads these logits as its scorer's.
* **Used only where it helps and holds**: the CPU must report AMX-BF16 (``amx_bf16`` in
  its flags, and torch's own AMX check where it has one), torch must have oneDNN and its
  prepacked linear, and the logits of :data:`pair_scorer_onnx.CHECK_PAIRS`, one pair at
  a time and as one padded batch, must equal the float32 network's to
  :data:`TOLERANCE`. Otherwise :class:`Unavailable` says why and the caller keeps the
  float32 runtime (:mod:`agent.embedding.pair_scorer`). Once checked, the network is run
  once at every shape a call of up to two pairs per lane makes
  (:func:`pair_scorer_model.warm`), so that such lookups do not pay oneDNN's first use
  of a shape.
* **Lanes** (:class:`Lanes`): with one torch intra-op thread (``OMP_NUM_THREADS=1``, as
  the benchmarks run the agent), a call of two pairs or more splits its rows into
  :func:`pair_scorer_onnx.lanes` slices run side by side, as the ONNX path does; one
  pair's two rows run in one pass (a split gained nothing there), and with more torch
  threads torch's own intra-op threads already use the cores.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import pathlib
from typing import Any

from agent.embedding import pair_scorer_onnx
from synapse_common import pair_scorer_model

TOLERANCE = 0.25   # max abs difference from the float32 network's logit, per pair
SPLIT_ROWS = 4     # rows (two pairs, each in both orders) from which a call is split
CPUINFO = pathlib.Path("/proc/cpuinfo")


class Unavailable(Exception):
    """The bfloat16 path cannot be used here; ``str()`` says why."""


class NotSupported(Unavailable):
    """This CPU or this torch cannot run it (an expected set-up, not a failure)."""


def cpu_flags(path: pathlib.Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def unsupported(flags: frozenset[str]) -> str | None:
    """Why this process cannot run the bfloat16 path on a CPU with ``flags``, or None."""
    if "amx_bf16" not in flags:
        return "the CPU has no AMX-BF16"
    return pair_scorer_model.onednn_bf16_missing()


def lanes() -> int:
    """Slices a split call runs in: :func:`pair_scorer_onnx.lanes` with one torch
    intra-op thread, else 1 (torch's own threads already use the cores)."""
    return pair_scorer_onnx.lanes() if pair_scorer_model.intra_op_threads() == 1 else 1


class Lanes:
    """A :class:`pair_scorer_model.FastNetwork` whose calls of :data:`SPLIT_ROWS` rows or
    more run in ``lanes`` contiguous slices at once (the calling thread takes the first,
    a small pool the others); each row's logit is what one pass would give, up to
    summation order."""

    def __init__(self, fast: pair_scorer_model.FastNetwork, lanes: int) -> None:
        self.fast = fast
        self._lanes = max(1, lanes)
        self._pool = (concurrent.futures.ThreadPoolExecutor(
            self._lanes - 1, thread_name_prefix="pair-scorer") if self._lanes > 1 else None)

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        rows = len(input_ids)
        if self._pool is None or rows < SPLIT_ROWS:
            return self.fast(input_ids, attention_mask, token_type_ids)
        cuts = [rows * k // self._lanes for k in range(self._lanes + 1)]
        parts = [(input_ids[lo:hi], attention_mask[lo:hi], token_type_ids[lo:hi])
                 for lo, hi in itertools.pairwise(cuts) if hi > lo]
        # FastNetwork enters inference mode itself: the caller's is thread-local.
        later = [self._pool.submit(self.fast, *part) for part in parts[1:]]
        return pair_scorer_model.FastNetwork.join([self.fast(*parts[0]),
                                                   *(f.result() for f in later)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)



def load(net: Any, tokenizer: Any, max_len: int, flags: frozenset[str] | None = None,
         lanes: int = 1) -> tuple[Lanes, float]:
    """The checked bfloat16 network in ``lanes`` and its largest difference on the check
    pairs (blocking); ``flags``: the CPU's (default: read from Linux). Raises
    :class:`Unavailable` with the reason."""
    reason = unsupported(cpu_flags() if flags is None else flags)
    if reason is not None:
        raise NotSupported(reason)
    try:
        fast = Lanes(pair_scorer_model.FastNetwork(net), lanes)
        diff = pair_scorer_model.max_logit_difference(fast, net, tokenizer, max_len,
                                                      pair_scorer_onnx.CHECK_PAIRS)
    except Exception as exc:
        raise Unavailable(f"bfloat16 check failed: {type(exc).__name__}: {exc}") from None
    if not diff <= TOLERANCE:  # NaN fails too
        raise Unavailable(f"bfloat16 logits differ from float32's by {diff:.3g} "
                          f"(> {TOLERANCE:g})")
    pair_scorer_model.warm(fast.fast, max_len)
    return fast, diff
