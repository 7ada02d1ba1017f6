"""The L2 index: what the response cache searches and writes, composed of small parts.

Every search is filtered to one scope hash: a semantic hit can never cross tenants,
models, conversations or parameter sets, whatever the vectors say. Where a search is
answered:

1. a mirrored scope (``mirrored``): numpy over its rows in memory;
2. otherwise the store, merged by ``ref`` with the rows written since the last flush
   (``recent``), so this replica reads its own writes at once.

A write goes to the store, then to the recent-write buffer, the mirror and the scope
presence map. An invalidation clears what each part remembers, then deletes in the store.
Rows older than the TTL are deleted by ``expiry``. The parts never call each other; this
class is the only place that knows the order. Its design notes live with each part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from controlplane.core.l2 import expiry, mirror, mirrored, presence, recent, rows, schema, timing
from controlplane.core.l2 import store as store_mod


@dataclasses.dataclass(frozen=True)
class Options:
    collection: str = "synapse_cache"     # named in errors
    flush_interval_s: float = 1.0         # at most one store flush per interval after writes
    mirror_max_rows: int = 100_000        # 0 = never mirror: every search asks the store
    mirror_refresh_s: float = 5.0
    mirror_reload_s: float = 300.0
    retry_s: float = 5.0                  # a scope the store failed to load waits this long
    ttl_s: float = 0.0                    # rows older than this are deleted (0 = kept)
    expiry_interval_s: float = 60.0
    dim: int | None = None                # the embedder's, when known: see ``schema``


class L2Index:
    def __init__(self, store: store_mod.Store, options: Options = Options(),
                 time: timing.Time = timing.Time()) -> None:
        self.store = store
        self.options = options
        self._time = time
        self.schema = schema.Schema(store, options.collection, options.dim)
        self.recent = recent.RecentWrites(self._flush_store, options.flush_interval_s, time)
        self.mirrored = mirrored.MirroredScopes(
            store, mirror.ScopeMirror(options.mirror_max_rows, options.mirror_refresh_s,
                                      options.mirror_reload_s, time.monotonic),
            time.monotonic, options.retry_s, self.recent.of_scope, self.schema.opened)
        self.presence = presence.ScopePresence(store.exclusive, time.monotonic)
        self.expiry = expiry.Expiry(self._delete_older, self.presence.expired, options.ttl_s,
                                    options.expiry_interval_s, time)

    async def search(self, scope: str, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> list[rows.Candidate]:
        found = self.mirrored.get(scope)
        if found is not None:
            self.schema.check(vector)
            return await self.mirrored.search(found, vector, top_k, min_created_at)
        if await self.schema.opened() is None:
            return []       # nothing was ever stored
        self.schema.check(vector)
        recent_found = self.recent.search(scope, vector, top_k, min_created_at)
        hits = await self.store.search(scope, vector, top_k, min_created_at)
        merged = {h.ref: rows.Candidate(h.ref, h.text, h.vector, h.similarity, h.created_at)
                  for h in hits}
        for cand in recent_found:
            merged.setdefault(cand.ref, cand)
        return sorted(merged.values(), key=lambda c: -c.similarity)[:top_k]

    async def insert(self, written: Sequence[rows.Row]) -> None:
        """Write rows in one store call (the response cache batches its writes). Rows of
        another dimension than the collection's are left out and, once the others are
        written, reported as a :class:`schema.DimensionError`: one bad vector does not
        cost its batch."""
        if not written:
            return
        now = self._time.wall()
        records = [rows.Record.of(r, now) for r in written]
        await self.schema.for_write([int(r.vector.shape[-1]) for r in records])
        fitting = [r for r in records if self.schema.matches(r.vector)]
        if fitting:
            await self._write(fitting)
        if len(fitting) < len(records):
            odd = next(r for r in records if not self.schema.matches(r.vector))
            self.schema.check(odd.vector)

    async def _write(self, records: list[rows.Record]) -> None:
        await self.store.insert(records)
        self.recent.add(records)
        self.mirrored.wrote(records)
        self.presence.wrote(records)
        self.expiry.start()

    async def has_entries(self, scope: str, min_created_at: float) -> bool:
        """Whether the scope holds a live row (see ``presence``; no vectors involved)."""
        known = self.presence.answer(scope, min_created_at)
        if known is not None:
            return known
        if self.mirrored.has_live(scope, min_created_at):
            return True
        self.presence.scan_soon(self._newest_per_scope)
        found = self.recent.has(scope, min_created_at) or await self._exists(scope,
                                                                             min_created_at)
        if found:
            self.presence.remember(scope)
        return found

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        self.forget(tenant, model)
        if await self.schema.opened() is None:
            return 0
        return await self.store.delete(tenant, model)

    def forget(self, tenant: str | None, model: str | None) -> None:
        """Drop what this process remembers of ``tenant``/``model``'s rows (the presence
        map, the mirror, the recent-write buffer), the store left alone: what a sibling
        worker's invalidation, which deleted them in the shared store, leaves to do here."""
        self.presence.forget()      # other scopes remain: the next probe reads them again
        self.mirrored.clear()
        self.recent.drop(tenant, model)

    async def delete_entry(self, ref: str, scope: str | None = None) -> int:
        """Delete one entry's rows (a hit judged wrong) everywhere at once: the recent-write
        buffer, the mirror of its scope (the whole mirror when the scope is not known; a
        scope is read again at its next search) and the store."""
        self.recent.drop_ref(ref)
        if scope is None:
            self.mirrored.clear()
        else:
            self.mirrored.scopes.drop(scope)
        if await self.schema.opened() is None:
            return 0
        return await self.store.delete_ref(ref)

    def warm_up(self) -> None:
        """Open the store in the background (Milvus Lite starts a server: about a second;
        an existing collection is loaded), so the first lookups do not spend their budget
        on it; start the expiry."""
        self.store.warm_up()
        self.expiry.start()

    async def flush(self) -> None:
        """Flush now (tests and benchmarks; the serving path relies on the debounce)."""
        await self.recent.flush()

    async def expire(self) -> int:
        """Delete the rows older than the TTL now (the expiry runs this periodically)."""
        return await self.expiry.run_once()

    async def close(self) -> None:
        for part in (self.mirrored, self.presence, self.recent, self.expiry):
            await part.close()
        await self.store.close()

    async def _flush_store(self) -> None:
        if self.schema.dim is not None:
            await self.store.flush()

    async def _exists(self, scope: str, min_created_at: float) -> bool:
        if await self.schema.opened() is None:
            return False
        return await self.store.exists(scope, min_created_at)

    async def _delete_older(self, before: float) -> int:
        if await self.schema.opened() is None:
            return 0
        return await self.store.delete_older(before)

    async def _newest_per_scope(self) -> dict[str, float]:
        if await self.schema.opened() is None:
            return {}       # no collection yet: no scope has rows
        return await self.store.newest_per_scope()
