"""The pair scorer behind ``Node.ScorePairs``: a MiniLM cross-encoder (issue 22).

The semantic cache asks whether a new prompt means the same as a cached one. A
cross-encoder reads both texts at once and answers better than comparing two embeddings,
but it needs torch, which the control plane does not have; every agent running
``embedder.kind: minilm`` already has it, so the agent scores pairs.

* **The model** is :mod:`synapse_common.pair_scorer_model`'s, the one definition the
  training uses too: all-MiniLM-L6-v2's transformer reading ``[CLS] a [SEP] b [SEP]``
  truncated ``longest_first`` to ``meta.max_len`` tokens, the last hidden state
  mean-pooled over the attention mask, then the ``Linear(hidden, 1)`` head (dropout off:
  eval mode), under ``torch.inference_mode``. A score is the average of the logits of
  ``(query, candidate)`` and ``(candidate, query)``.
* **The weights** are a :mod:`synapse_common.pair_scorer` file (``embedder.pair_scorer``:
  ``shipped``, ``none`` or a path); its layers replace the base parameters of the same
  name, the others stay the installed base weights. A file fitted on other base weights,
  or one that cannot be read, leaves the scorer unavailable with the reason (logged once)
  rather than scoring with weights it was not trained with. ``shipped`` when the build
  ships no file is simply no scorer (one info line).
* **Runtime**: ``embedder.runtime`` (the embedder's setting, and its
  ``embedder.onnx_cache_dir``): ``auto`` runs the network in onnxruntime when it is
  installed and its logits match torch's at start (:mod:`agent.embedding.pair_scorer_onnx`:
  faster per pair, and a pair's two orders run side by side when two cores are free),
  else torch with one log line; ``torch`` forces torch; ``onnx`` requires it (else
  the scorer is unavailable with the reason). Float32 either way, never quantised.
* **Precision** (``embedder.pair_scorer_precision``): ``bfloat16`` runs the network's
  matrix products in bfloat16 on oneDNN instead, on a CPU with AMX-BF16, after a
  start-up check against float32 (:mod:`agent.embedding.pair_scorer_bf16`: much
  cheaper there, the logits move slightly); anywhere else, or when the check fails,
  one log line and the float32 runtime above. ``auto`` does the same (bfloat16 where
  AMX-BF16 passes its check, else float32): the loader accepts it for a configuration
  that allows it (:class:`agent.config.EmbedderSettings` decides the default). Refitting
  the stack on bfloat16 logits gives the same stack, so one stack serves both
  precisions. The scorer id is the same.
* **Off the event loop, one batch at a time**: the model runs in a worker thread behind
  a lock, so concurrent calls queue instead of splitting the cores between two forward
  passes. The lock is held until the thread ends, even when its caller gave up (a thread
  cannot be stopped), and a caller that gave up while waiting never starts its work.
  (The embedder has its own queue: a ScorePairs call and an Embed batch can still run
  side by side; both are short.)
* Texts are never logged.

Errors are the :mod:`agent.embedding.errors` tree plus :class:`ScorerUnavailable`
(FAILED_PRECONDITION in :mod:`agent.node_service`): bad input is
:class:`errors.InvalidInput`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import errors, onnx_path, pair_scorer_bf16, pair_scorer_onnx, protocol
from synapse_common import embedder_tuning, pair_scorer_model
from synapse_common import pair_scorer as scorer_file

log = logging.getLogger(__name__)
MAX_CANDIDATES = scorer_file.MAX_PAIRS


class ScorerUnavailable(errors.EmbedderUnavailable):
    """No pair scorer on this agent, or it is loading or failed to load: not worth a retry
    on this agent soon, so FAILED_PRECONDITION rather than the embedder's UNAVAILABLE."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A ready cross-encoder: the file, the transformer with its layers, the tokenizer."""

    file: scorer_file.PairScorerFile
    model: Any        # pair_scorer_model's network, eval mode
    tokenizer: Any
    onnx: pair_scorer_onnx.OnnxNetwork | None = None   # the same network in onnxruntime
    bf16: pair_scorer_bf16.Lanes | None = None       # ... in bfloat16 on oneDNN

    @property
    def scorer_id(self) -> str:
        return self.file.scorer_id

    @property
    def runtime(self) -> str:
        if self.bf16 is not None:
            return "torch-bfloat16"
        return "torch" if self.onnx is None else "onnx"


def load(path: pathlib.Path, runtime: str = "torch", cache_dir: str = "",
         precision: str = "float32", cpu_flags: frozenset[str] | None = None) -> Loaded:
    """Read and check the file, build the network on the installed base weights with the
    file's layers and head, in eval mode (blocking: seconds); with ``precision``
    ``bfloat16`` or ``auto`` its checked bfloat16 network when this CPU (``cpu_flags``,
    default this machine's) runs it, else with ``runtime`` ``auto`` or ``onnx`` its checked ONNX
    export (kept in ``cache_dir``; see the module docstring). Raises ``ValueError`` (a :class:`scorer_file.PairScorerError` for the
    file), ``OSError``, ``RuntimeError`` or ``ImportError`` with the reason."""
    file = scorer_file.load(path)
    scorer_file.check_base(file, embedder_tuning.base_id())
    net = pair_scorer_model.build(file.layers, file.head_weight, file.head_bias)
    net.eval()      # training's dropout off
    loaded = Loaded(file, net, pair_scorer_model.tokenizer())
    if precision in ("bfloat16", "auto"):
        fast = _bf16(loaded, cpu_flags, precision)
        if fast is not None:
            return dataclasses.replace(loaded, bf16=fast)
    if runtime == "torch":
        return loaded
    return dataclasses.replace(loaded, onnx=_onnx(loaded, runtime, cache_dir))


def _bf16(loaded: Loaded, cpu_flags: frozenset[str] | None,
          setting: str = "bfloat16") -> pair_scorer_bf16.Lanes | None:
    """The checked bfloat16 network, or None (logged once, naming the ``setting`` that
    asked for it) for the float32 runtimes."""
    try:
        fast, diff = pair_scorer_bf16.load(loaded.model, loaded.tokenizer,
                                           loaded.file.max_len, cpu_flags,
                                           pair_scorer_bf16.lanes())
    except pair_scorer_bf16.Unavailable as exc:
        quiet = isinstance(exc, pair_scorer_bf16.NotSupported)  # an expected set-up
        (log.info if quiet else log.warning)("pair scorer in float32 (embedder."
                                             "pair_scorer_precision is %s, but %s)",
                                             setting, exc)
        return None
    log.info("pair scorer: bfloat16 logits within %.2g of float32's on the check pairs",
             diff)
    return fast


def _onnx(loaded: Loaded, runtime: str, cache_dir: str) -> pair_scorer_onnx.OnnxNetwork | None:
    """The checked ONNX network, or None for torch (``auto``); raises for ``onnx``."""
    try:
        return pair_scorer_onnx.load(loaded.model, loaded.tokenizer, loaded.scorer_id,
                                     loaded.file.max_len, cache_dir, pair_scorer_onnx.lanes())
    except onnx_path.OnnxUnavailable as exc:
        if runtime == "onnx":
            raise RuntimeError(f"embedder.runtime is onnx, but {exc}") from None
        quiet = isinstance(exc, onnx_path.NotInstalled)  # an expected set-up
        (log.info if quiet else log.warning)("pair scorer on torch: %s", exc)
        return None


def score_blocking(loaded: Loaded, query: str, candidates: list[str]) -> np.ndarray:
    """The averaged logits of (query, c) and (c, query) for each candidate, float32."""
    net = loaded.bf16 or loaded.onnx or loaded.model
    return pair_scorer_model.logits(net, loaded.tokenizer, [query] * len(candidates),
                                    candidates, max_len=loaded.file.max_len)


def validate(query: str, candidates: list[str], max_text_chars: int) -> None:
    """Raise :class:`errors.InvalidInput` naming the field that is wrong."""
    if not query:
        raise errors.InvalidInput("query is empty")
    if not candidates:
        raise errors.InvalidInput("candidates is empty")
    if len(candidates) > MAX_CANDIDATES:
        raise errors.TooLarge(f"{len(candidates)} candidates; at most {MAX_CANDIDATES} per "
                              "call")
    for field, text in [("query", query), *((f"candidates[{i}]", c)
                                            for i, c in enumerate(candidates))]:
        if not text:
            raise errors.InvalidInput(f"{field} is empty")
        if len(text) > max_text_chars:
            raise errors.TooLarge(f"{field} has {len(text)} characters; at most "
                                  f"{max_text_chars}")


class PairScorer(protocol.LoadsOnce):
    """The scorer ``embedder.pair_scorer`` names; ``start`` loads it (once, off the loop).

    ``reason`` set at construction means there is no scorer to load (``none``, nothing
    shipped, another embedder kind); ``loaded`` (tests) is a scorer that is ready at once.
    """

    def __init__(self, cfg: EmbedderSettings, path: pathlib.Path | None, reason: str = "",
                 loaded: Loaded | None = None) -> None:
        self._cfg = cfg
        self._path = path
        self._loaded = loaded
        self._error = reason
        self._lock: asyncio.Lock | None = None   # made on the serving loop

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    @property
    def scorer_id(self) -> str:
        return self._loaded.scorer_id if self._loaded is not None else ""

    async def _load_once(self) -> None:
        if self._loaded is not None or self._path is None:
            return
        try:
            self._loaded = await asyncio.to_thread(load, self._path, self._cfg.runtime,
                                                   self._cfg.onnx_cache_dir,
                                                   self._cfg.pair_scorer_precision)
        except (ValueError, OSError, RuntimeError, ImportError) as exc:
            self._error = f"embedder.pair_scorer {self._path}: {exc}"
            log.error("pair scorer unavailable: %s", self._error)
            return
        log.info("pair scorer %s loaded from %s (%s)", self.scorer_id, self._path,
                 self._loaded.runtime)

    def unavailable(self) -> ScorerUnavailable:
        return ScorerUnavailable(self._error or "the pair scorer is still loading")

    async def score(self, query: str, candidates: list[str]) -> tuple[np.ndarray, str]:
        """Validated; the averaged logits (float32, one per candidate) and the scorer id."""
        validate(query, candidates, self._cfg.max_text_chars)
        loaded = self._loaded
        if loaded is None:
            raise self.unavailable()
        scores = await self._exclusive(functools.partial(score_blocking, loaded, query,
                                                         candidates))
        return scores, loaded.scorer_id

    async def _exclusive(self, work: Callable[[], np.ndarray]) -> np.ndarray:
        """``work`` in a worker thread, one at a time, holding the lock until the thread ends.

        A caller cancelled while it waits for the lock never starts its work. One cancelled
        while its thread runs returns at once, but the thread cannot be stopped: the lock
        stays held until it ends (released by the thread's own completion, not by the
        caller), so the next call never runs beside it on the same cores.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        lock = self._lock
        await lock.acquire()
        try:
            # as asyncio.to_thread does, but a future that is queued at once, not a task
            job = asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, work)
        except BaseException:
            lock.release()
            raise
        job.add_done_callback(functools.partial(_release, lock))
        return await asyncio.shield(job)

    async def close(self) -> None:
        if self._loaded is not None:
            for runner in (self._loaded.onnx, self._loaded.bf16):
                if runner is not None:
                    runner.close()
        self._loaded = None
        self._error = "the pair scorer is closed"


def _release(lock: asyncio.Lock, job: asyncio.Future[np.ndarray]) -> None:
    """The thread ended: the next call may run. Its failure, if its caller left, is
    taken here so asyncio does not report it as never retrieved."""
    lock.release()
    if not job.cancelled():
        job.exception()


def build(cfg: EmbedderSettings) -> PairScorer:
    """The scorer the settings describe, not loaded yet (a reason when there is none)."""
    if cfg.kind != "minilm":
        return PairScorer(cfg, None, f"no pair scorer on this agent (it runs with "
                          f"embedder.kind: minilm; this agent's is {cfg.kind})")
    path = scorer_file.resolve(cfg.pair_scorer)
    if path is None:
        return PairScorer(cfg, None, "no pair scorer on this agent (embedder.pair_scorer: none)")
    if cfg.pair_scorer == "shipped" and not path.exists():
        log.info("no pair scorer: embedder.pair_scorer is shipped and this build ships none")
        return PairScorer(cfg, None, "no pair scorer on this agent (embedder.pair_scorer: "
                          "shipped, and this build ships no pair-scorer file)")
    return PairScorer(cfg, path)
