"""Text Embeddings Inference over HTTP: the agent's embedder when ``embedder.kind`` is tei.

* ``/info`` gives ``model_id``, ``model_sha`` (together the embedder id) and
  ``max_client_batch_size`` (TEI rejects larger batches with 413); it is read again after
  a failure, in case TEI restarted with another model (the service then evicts the old
  model's cached vectors).
* Calls are micro-batched like the in-process model's (:mod:`agent.embedding.batcher`:
  fair between tenants, one batch of up to ``embedder.max_batch`` texts at a time); a
  batch larger than TEI's client batch goes out as concurrent posts of that size, so a
  ``max_batch`` a few times TEI's keeps TEI's own batching busy.
* Raw vectors are asked for (``normalize: false``): the service normalises on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import batcher, errors

log = logging.getLogger(__name__)


class TeiEmbedder(batcher.Batched):
    """Text Embeddings Inference over HTTP."""

    def __init__(self, cfg: EmbedderSettings, headers: Mapping[str, str] | None = None) -> None:
        if not cfg.tei_url:
            raise ValueError("embedder.tei_url is required when embedder.kind is tei")
        self._url = cfg.tei_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        self._cfg = cfg
        self._headers = dict(headers or {})  # the engine key's, for the agent's own TEI
        self._session: aiohttp.ClientSession | None = None
        self._info: dict[str, Any] | None = None
        self.embedder_id = ""
        self._client_batch = cfg.max_batch
        self.batcher = batcher.MicroBatcher.for_settings(self._post_all, cfg)

    @property
    def ready(self) -> bool:
        return self._info is not None

    async def probe(self) -> bool:
        """Ready, re-reading ``/info`` when TEI was lost (health must not stick at down)."""
        if self._info is None and self._session is not None:
            with contextlib.suppress(errors.EmbedderUnavailable):
                await self._refresh_info()
        return self.ready

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            await self._refresh_info()
        except errors.EmbedderUnavailable as exc:
            log.warning("TEI not reachable yet: %s", exc)

    async def _refresh_info(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self._url + "/info") as r:
                r.raise_for_status()
                info = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise errors.EmbedderUnavailable(f"TEI at {self._url} is unavailable: {exc}") from None
        self._info = info
        sha = info.get("model_sha") or f"tei-{info.get('version', 'unknown')}"
        self.embedder_id = f"{info.get('model_id', 'unknown')}@{sha}"
        self._client_batch = max(1, min(self._cfg.max_batch,
                                        int(info.get("max_client_batch_size") or 32)))

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self._info is None:
            await self._refresh_info()
        return await self.batcher.submit(texts)

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
                    raise errors.InvalidInput(f"TEI rejected the input: {(await r.text())[:200]}")
                r.raise_for_status()
                data = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._info = None  # re-read /info next time: TEI may have restarted
            raise errors.EmbedderUnavailable(f"TEI at {self._url} failed: {exc}") from None
        return np.asarray(data, dtype=np.float32)

    async def close(self) -> None:
        await self.batcher.close()
        if self._session is not None:
            await self._session.close()
