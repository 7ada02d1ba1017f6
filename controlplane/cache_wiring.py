"""The response cache's concrete parts, built from settings: adapters wired into the core.

``controlplane.core`` never imports ``controlplane.adapters``; this module (beside
``main``, above both) is where the two meet for the cache: L1 (Redis, or the in-process
LRU with its journal in ``data_dir``) and the L2 index over the Milvus store.
"""

from __future__ import annotations

import os
from typing import Any

from controlplane import config
from controlplane.adapters import l1, l1_journal, milvus
from controlplane.core.l2 import index as l2_index
from controlplane.core.l2 import timing

L1_JOURNAL = "l1.sqlite"
L2_LITE_FILE = "l2.db"


def build_l1(settings: config.ControlPlaneSettings, *, tenants: int) -> l1.L1Store:
    """Redis when ``redis.url``, else the in-process LRU (kept in ``data_dir`` when
    ``cache.l1_persist``, and read back from there now, before the process serves), its
    bounds split equally between the ``tenants`` configured (so no tenant's writes evict
    another's entries)."""
    c = settings.cache
    if settings.redis.url:
        return l1.RedisL1(settings.redis.url.get_secret_value(),
                          timeout_s=max(settings.redis.timeout_s, c.l1_budget_ms / 1000))
    journal = (l1_journal.SqliteJournal(os.path.join(settings.data_dir, L1_JOURNAL))
               if c.l1_persist else None)
    store = l1.MemoryL1(c.l1_max_entries, c.l1_max_bytes, journal=journal, tenants=tenants)
    store.restore_now()
    return store


def build_l2(settings: config.ControlPlaneSettings, dim: int | None = None,
             ) -> l2_index.L2Index:
    """The L2 index over Milvus: ``cache.milvus_uri``, else a Lite file in ``data_dir``;
    ``dim``, when the cache is pinned to one embedder, is its vectors' dimension (no other
    is ever written or creates the collection).

    The store starts opening now, in a thread (Milvus Lite starts a server, and loading a
    collection after a restart can take many seconds): a first lookup that had to open it
    spent its whole budget on that and was served without the cache. ``/ready`` waits for
    it, a bounded time (:mod:`controlplane.api.readiness`); if it fails, the process serves
    without L2 and the serving path tries again."""
    c = settings.cache
    uri = (c.milvus_uri.get_secret_value() if c.milvus_uri
           else os.path.join(settings.data_dir, L2_LITE_FILE))
    token = c.milvus_token.get_secret_value() if c.milvus_token else None
    index = milvus_l2(uri, c.collection, token, label=None if c.milvus_uri else L2_LITE_FILE,
                     ttl_s=c.ttl_s,
                     mirror_max_rows=c.l2_mirror_max_rows,
                     mirror_refresh_s=c.l2_mirror_refresh_s,
                     expiry_interval_s=c.l2_expiry_interval_s, dim=dim)
    index.store.warm_up()
    return index


def milvus_l2(uri: str, collection: str, token: str | None = None, *,
              time: timing.Time = timing.Time(), label: str | None = None,
              **options: Any) -> l2_index.L2Index:
    """An L2 index over a Milvus store at ``uri`` (tests and benchmarks use it too);
    ``label``: what the log calls a Lite file (the data-dir-relative name), never the
    URI, which may be a secret."""
    store = milvus.MilvusStore(uri, collection, token, clock=time.monotonic, label=label)
    return l2_index.L2Index(store, l2_index.Options(collection=collection, **options), time)
