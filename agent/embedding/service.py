"""What ``Node.Embed`` calls: the per-call limits, the per-tenant cache, and the embedder.

* Limits per call (``embedder.max_texts``, ``max_text_chars``, ``max_call_chars``) are
  checked before anything is looked up or queued; over them is :class:`errors.TooLarge`.
* The cache (:class:`agent.core.lru.EmbeddingLru`) stores raw vectors exactly as the
  embedder produced them (float32 little-endian bytes); ``normalize`` is applied on the
  way out, so one entry serves both kinds of request.
* The cache is partitioned by tenant: a tenant's own repeats hit, while the same text from
  another tenant is a miss, computed again, and answered in the time of any new text.
  So neither the ``cached`` flags nor the latency tell one tenant what another sent (a
  shared cache answered another tenant's prompts measurably faster). The price is one
  vector per tenant for a text several tenants send. ``tenant=None`` is a call whose
  tenant cannot be trusted (an unauthenticated caller): it skips the cache entirely,
  neither reading nor writing it.
* Only misses reach the embedder, deduplicated within a call. They queue there as the
  call's tenant (:func:`agent.embedding.batcher.tenant_scope`): the model is shared
  round-robin between tenants, so one tenant's large calls cannot starve another's
  lookups (the untrusted calls, ``tenant=None``, share one turn).
* When the embedder's id changes (TEI restarted with another model), the old vectors of
  that model are evicted: they are not comparable with the new ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import batcher, errors, protocol

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    model: str
    dim: int
    vectors: bytes  # len(texts) * dim little-endian float32, row-major
    cached: list[bool]
    embedder_id: str


class EmbeddingService:
    def __init__(self, cfg: EmbedderSettings, embedder: protocol.Embedder,
                 cache: lru.EmbeddingLru,
                 on_lookup: Callable[[int, int], None] = lambda hits, misses: None) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.embedder = embedder
        self.cache = cache
        self._on_lookup = on_lookup
        self._embedder_id = ""

    def _validate(self, model: str, texts: list[str]) -> str:
        if model and model != self.model:
            raise errors.UnknownModel(f"model {model!r} is not served here (this agent "
                                      f"embeds with {self.model!r})")
        if not texts:
            raise errors.InvalidInput("texts is empty")
        if len(texts) > self.cfg.max_texts:
            raise errors.TooLarge(f"{len(texts)} texts; at most {self.cfg.max_texts} per call")
        for i, text in enumerate(texts):
            if not text:
                raise errors.InvalidInput(f"texts[{i}] is empty")
            if len(text) > self.cfg.max_text_chars:
                raise errors.TooLarge(f"texts[{i}] has {len(text)} characters; at most "
                                      f"{self.cfg.max_text_chars}")
        total = sum(map(len, texts))
        if total > self.cfg.max_call_chars:
            raise errors.TooLarge(f"the texts have {total} characters in all; at most "
                                  f"{self.cfg.max_call_chars} per call")
        return self.model

    async def embed(self, model: str, texts: list[str], normalize: bool,
                    tenant: str | None = "") -> EmbedResult:
        name = self._validate(model, texts)
        rows = self._lookup(name, texts, tenant)
        cached = [r is not None for r in rows]
        missing = list(dict.fromkeys(t for t, r in zip(texts, rows, strict=True) if r is None))
        self._on_lookup(sum(cached), len(texts) - sum(cached))
        if missing:
            with batcher.tenant_scope(tenant):
                fresh = await self.embedder.embed(missing)
            self._check_embedder_id(name)
            by_text = {t: fresh[i].astype("<f4").tobytes() for i, t in enumerate(missing)}
            if tenant is not None:
                for text, vector in by_text.items():
                    self.cache.put(name, text, vector, scope=tenant)
            rows = [r if r is not None else by_text[t] for t, r in zip(texts, rows, strict=True)]
        matrix = np.frombuffer(b"".join(r for r in rows if r is not None), dtype="<f4")
        matrix = matrix.reshape(len(texts), -1)
        if normalize:
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix = matrix / np.where(norms == 0, 1, norms)
        return EmbedResult(name, int(matrix.shape[1]), matrix.astype("<f4").tobytes(), cached,
                           self.embedder.embedder_id)

    def _lookup(self, model: str, texts: list[str], tenant: str | None) -> list[bytes | None]:
        if tenant is None:
            return [None] * len(texts)
        return [self.cache.get(model, t, scope=tenant) for t in texts]

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
