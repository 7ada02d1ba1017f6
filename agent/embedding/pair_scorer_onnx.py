"""The pair scorer's network in onnxruntime: ``Node.ScorePairs``' fast path.

:func:`load` (blocking, run off the event loop at start) exports the loaded cross-encoder
(:mod:`synapse_common.pair_scorer_model`'s network with the file's layers and head) once
to an ONNX file cached on disk, opens it in onnxruntime, and checks its logits against the
torch network's; any failure raises :class:`onnx_path.OnnxUnavailable` with the reason and
the caller keeps torch (see :mod:`agent.embedding.pair_scorer`), as the embedder does
(:mod:`agent.embedding.onnx_path`, whose session options, one thread per session and no
busy-waiting, exporter settings and cache rules, a file reused only when its SHA-256
matches its sidecar and its directory is private, are reused).

* The whole network is exported, transformer, masked mean pooling and head (``input_ids``,
  ``attention_mask``, ``token_type_ids`` → ``logits``, dynamic batch and sequence axes),
  in eval mode (dropout off). Tokenizing (both orders, ``longest_first`` to
  ``max_len``), batching and averaging the two orders stay
  :func:`pair_scorer_model.logits`'s: :class:`OnnxNetwork` is called as the torch network
  is (tensors in, a tensor of logits out), so the two runtimes differ only in the network.
* Float32, never quantised: int8 cost recall when it was tried.
* The file name carries the scorer id (which changes with the weights, the base weights
  included), the torch version and the opset, so changed weights or a changed exporter
  never reuse a stale file; it is written to a temporary file and renamed. When the cache
  directory is not writable the export goes to a temporary directory for this run only.
* The start-up check scores :data:`CHECK_PAIRS` one at a time and as one padded batch; every
  logit must equal torch's to :data:`TOLERANCE`. A score moves the stacked logit by
  ``w_pair`` times its change, so a decision can only differ for a pair whose stacked
  logit lies within ``w_pair * TOLERANCE`` of the operating point
  (``bench.pair_scorer_runtimes`` counts such changes on the held-out pairs).
* **Lanes** (:func:`lanes`): rows run side by side in single-threaded sessions rather
  than one session with intra-op threads, which wake their workers at every operator
  (no busy-waiting is allowed: the event loop and gRPC share the cores); one split per
  call is one wake-up.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import logging
import os
import pathlib
import re
import tempfile
import warnings
from typing import Any

import numpy as np

from agent.embedding import onnx_path
from synapse_common import pair_scorer_model

log = logging.getLogger(__name__)

MAX_LANES = 2     # a pair's two orders side by side
TOLERANCE = 1e-4  # max abs difference from the torch network's logit, per pair
INPUTS = onnx_path.INPUTS
# Fixed pairs of the start-up check: short, unicode, truncated at max_len, reordered.
CHECK_PAIRS = [("hi", "hello"),
               ("How do I reset my password?", "How can I change my password?"),
               ("été, naïve café — unicode text", "How do I lose 5 kg in a month?"),
               (" ".join(["kubernetes schedules pods onto nodes"] * 40),
                "What does the Kubernetes scheduler do?"),
               ("What is the capital of France?", "The cat sat on the mat. " * 6)]


def cache_file(cache_dir: str, scorer_id: str) -> pathlib.Path:
    import torch

    key = f"{scorer_id}-torch{torch.__version__}-opset{onnx_path.OPSET}"
    return (pathlib.Path(cache_dir).expanduser()
            / f"pair-scorer-{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.onnx")


def export(net: Any, tokenizer: Any, path: pathlib.Path) -> None:
    """Export the network (eval mode) to ``path`` (a temporary file, then renamed)."""
    import torch

    net.eval()
    enc = tokenizer(["a sample", "a longer sample text for the export"],
                    ["another one", "and its pair"], padding=True, return_tensors="pt")
    args = tuple(enc[name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["logits"] = {0: "batch"}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, args, tmp, input_names=list(INPUTS),
                              output_names=["logits"], dynamic_axes=axes,
                              opset_version=onnx_path.OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        net.eval()  # whatever the exporter did, the torch path stays in eval mode
        if os.path.exists(tmp):
            os.unlink(tmp)


def lanes() -> int:
    """Rows run side by side: :data:`MAX_LANES`, or fewer when this process may use fewer
    cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_LANES, cores))


class OnnxNetwork:
    """The exported network, called as :func:`pair_scorer_model.logits` calls the torch
    one: the three token tensors in, a tensor of one logit per row out.

    The rows are split into ``lanes`` contiguous slices run at once, one single-threaded
    ``run`` each (the calling thread takes the first, a small pool the others): the rows
    are independent and already padded alike, so each logit is what one batch would give
    (up to summation order; the start-up check holds it to :data:`TOLERANCE`).
    """

    def __init__(self, session: Any, lanes: int = 1) -> None:
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._lanes = max(1, lanes)
        self._pool = (concurrent.futures.ThreadPoolExecutor(
            self._lanes - 1, thread_name_prefix="pair-scorer") if self._lanes > 1 else None)

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        import torch

        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids}
        feeds = {name: given[name].numpy() for name in self._inputs}
        rows = len(feeds[self._inputs[0]])
        cuts = [rows * k // self._lanes for k in range(self._lanes + 1)]
        parts = [{name: value[lo:hi] for name, value in feeds.items()}
                 for lo, hi in itertools.pairwise(cuts) if hi > lo]
        later = [self._pool.submit(self._run, part) for part in parts[1:]] if self._pool else []
        first = self._run(parts[0])
        return torch.from_numpy(np.concatenate([first, *(f.result() for f in later)]))

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out: np.ndarray = self._session.run(["logits"], feeds)[0]
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def load(net: Any, tokenizer: Any, scorer_id: str, max_len: int, cache_dir: str,
         lanes: int = 1) -> OnnxNetwork:
    """Export (once per cache file), open and check the ONNX network (blocking)."""
    missing = [name for name in ("onnx", "onnxruntime")    # the exporter needs onnx
               if importlib.util.find_spec(name) is None]
    if missing:
        raise onnx_path.NotInstalled(f"onnxruntime and onnx are needed (no "
                                     f"{' or '.join(missing)})")
    try:
        runner = _open(net, tokenizer, cache_file(cache_dir, scorer_id), lanes)
    except Exception as exc:
        raise onnx_path.OnnxUnavailable(f"ONNX export/load failed: {type(exc).__name__}: "
                                        f"{exc}") from None
    return checked(runner, net, tokenizer, max_len)


def _open(net: Any, tokenizer: Any, path: pathlib.Path, lanes: int) -> OnnxNetwork:
    def opened(onnx_bytes: bytes) -> OnnxNetwork:
        return OnnxNetwork(onnx_path._session(onnx_bytes, 1), lanes)

    return onnx_path.open_cached(path, lambda to: export(net, tokenizer, to), opened,
                                 log, "pair scorer", "the network")



def checked(runner: OnnxNetwork, net: Any, tokenizer: Any, max_len: int) -> OnnxNetwork:
    try:
        diff = pair_scorer_model.max_logit_difference(runner, net, tokenizer, max_len, CHECK_PAIRS)
    except Exception as exc:
        raise onnx_path.OnnxUnavailable(f"ONNX check failed: {type(exc).__name__}: "
                                        f"{exc}") from None
    if not diff <= TOLERANCE:  # NaN fails too
        raise onnx_path.OnnxUnavailable(f"ONNX logits differ from torch's by {diff:.3g} "
                                        f"(> {TOLERANCE:g})")
    log.info("pair scorer: ONNX logits match torch's (max abs difference %.2g)", diff)
    return runner
