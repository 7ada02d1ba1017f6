"""L1, the exact-match layer: Redis (shared by replicas) or an in-process LRU (embedded).

Both implement :class:`L1Store`; the response cache never knows which one it has.

Design decisions:

- Values are opaque bytes (the response cache serialises); keys are the exact key of
  ``controlplane.core.cache_rules`` plus the tenant and model, which the store folds into
  the stored key so that invalidation by tenant or model needs no secondary index:
  ``<prefix><sha(tenant)[:16]>:<sha(model)[:16]>:<exact key>``. Redis invalidation is a
  ``SCAN MATCH`` + ``UNLINK`` in batches (admin-rare, never on the serving path).
- Expiry is absolute: Redis ``SET PX`` at write time, and a read never touches the TTL;
  the LRU stores the deadline from an injected monotonic clock.
- Size bound: the LRU evicts least-recently-used entries past ``max_entries`` or
  ``max_bytes``, split equally between the configured tenants, each tenant's writes
  evicting only its own entries (:mod:`controlplane.core.tenant_lru`: tenants must not
  push out, nor count, each other's entries). Redis is bounded by its own ``maxmemory``
  policy, which evicts across tenants: that isolation holds for the in-process LRU only.
  Both refuse single values larger than ``max_value_bytes``.
- Durable in embedded mode: given a journal (``l1_journal``, SQLite in ``data_dir``), the
  LRU writes every change behind to disk and reads it back once at start, so a restart
  keeps the responses that L2's semantic rows point to. Expiry times cross the restart as
  wall-clock seconds. The process reads it before it serves (:meth:`MemoryL1.restore_now`,
  from ``cache_wiring``): read in the background at the first lookup, as it was, the
  requests of a restart's first moments missed entries the journal held, and with no
  backend registered yet a request a hit would have answered was a 503. The journal is
  bounded by ``max_bytes``, so the wait at start is too. An L1 built without that call
  (tests) reads it in the background at its first use, and old entries miss until then.
  Entries the read evicts (the journal held more than a tenant's share: a tenant added,
  the bounds lowered) leave the journal at once, before the loop runs.
- Removals that must hold are durable before they return: ``invalidate`` and ``delete`` (a
  hit judged wrong, a voided write) await the journal's flush of their removal, so a
  process killed right after does not serve the removed entries again at its restart. A
  failed flush raises (the caller reports the layer as not done). Evictions and expiry
  stay write-behind: an entry they bring back is one the bounds or its TTL still allow.
- Time budgets are the caller's (``asyncio.wait_for`` in the response cache); the Redis
  client also carries socket time-outs so a dead server cannot leave a call hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from typing import Protocol

import redis.asyncio as aioredis

from controlplane.adapters import l1_journal
from controlplane.core import tenant_lru
from synapse_common import clock as clocks
from synapse_common.clock import Clock

KEY_PREFIX = "synapse:cache:v1:"
log = logging.getLogger("synapse.cache")


class L1Store(Protocol):
    kind: str

    async def get(self, tenant: str, model: str, key: str) -> bytes | None: ...

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        """Write with an absolute TTL; False when the value was refused (too large)."""
        ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        """Remove entries of a tenant and/or model (both None: everything); count removed."""
        ...

    async def delete(self, tenant: str, model: str, key: str) -> bool:
        """Remove one entry (a hit judged wrong); whether it was there."""
        ...

    async def close(self) -> None: ...


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def storage_key(tenant: str, model: str, key: str) -> str:
    return f"{KEY_PREFIX}{_tag(tenant)}:{_tag(model)}:{key}"


def match_pattern(tenant: str | None, model: str | None) -> str:
    return f"{KEY_PREFIX}{_tag(tenant) if tenant is not None else '*'}:" \
           f"{_tag(model) if model is not None else '*'}:*"


@dataclasses.dataclass
class _Entry:
    value: bytes
    expires_at: float
    tenant: str
    model: str


class MemoryL1:
    """In-process LRU with absolute TTL and entry/byte bounds (embedded mode), split
    equally between ``tenants`` (:mod:`controlplane.core.tenant_lru`): one tenant's
    writes evict only its own entries, so a tenant can neither push another's answers out
    nor read the others' write volume from its own evictions."""

    kind = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = clocks.monotonic,
                 max_value_bytes: int = 4 * 1024 * 1024,
                 journal: l1_journal.SqliteJournal | None = None,
                 wall: Clock = clocks.wall, tenants: int = 1) -> None:
        self._entries: tenant_lru.TenantLRU[_Entry] = tenant_lru.TenantLRU(
            max_entries, tenants, max_bytes, _size)
        # a value larger than a tenant's share of the bytes could never be kept
        self._max_value = min(max_value_bytes, tenant_lru.share(max_bytes, tenants))
        self._clock = clock
        self._wall = wall
        self._journal = journal
        self._restore: asyncio.Task[None] | None = None
        self._restored_at_start = False       # restore_now read the journal
        self._invalidated: list[tuple[str | None, str | None]] = []   # while restoring

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._entries.bytes_used

    async def get(self, tenant: str, model: str, key: str) -> bytes | None:
        if self._journal is not None:
            self._restore_soon()
        skey = storage_key(tenant, model, key)
        entry = self._entries.get(tenant, skey)  # LRU order only; the deadline stays
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(tenant, skey)
            return None
        return entry.value

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        if len(value) > self._max_value:
            return False
        skey = storage_key(tenant, model, key)
        if self._journal is not None:
            self._restore_soon()
            self._journal.put(l1_journal.Saved(skey, tenant, model, value,
                                               self._wall() + ttl_s))
        self._forget(self._entries.put(tenant, skey,
                                       _Entry(value, self._clock() + ttl_s, tenant, model)))
        return True

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        doomed = [(t, k) for t, k, e in self._entries.items(tenant) if _matches(e, tenant, model)]
        for t, skey in doomed:
            self._entries.pop(t, skey)
        if self._journal is not None:
            self._journal.delete_matching(tenant, model)
            if self._restoring:     # the read may meet rows deleted in the queue only
                self._invalidated.append((tenant, model))
            await self._journal.flush()
        return len(doomed)

    async def delete(self, tenant: str, model: str, key: str) -> bool:
        skey = storage_key(tenant, model, key)
        found = self._entries.pop(tenant, skey) is not None
        if self._journal is not None:   # even if absent: it may be in the journal, unrestored
            self._journal.delete(skey)
            await self._journal.flush()
        return found

    async def close(self) -> None:
        if self._restore is not None:
            self._restore.cancel()
            await asyncio.gather(self._restore, return_exceptions=True)
        if self._journal is not None:
            await self._journal.close()
        self._entries.clear()

    def _drop(self, tenant: str, skey: str) -> None:
        self._entries.pop(tenant, skey)
        if self._journal is not None:
            self._journal.delete(skey)

    def _forget(self, evicted: list[tuple[str, _Entry]]) -> None:
        """Entries evicted from memory leave the journal too (a restart must not bring
        back more than the bounds hold)."""
        if self._journal is not None:
            for skey, _ in evicted:
                self._journal.delete(skey)

    def restore_now(self) -> None:
        """Read the journal back now, before the process serves (blocking: call it
        before the event loop runs), so the first lookups after a restart find what it
        kept; the background read at first use is then skipped."""
        if self._journal is None or self._restore is not None or self._restored_at_start:
            return
        self._restored_at_start = True
        wall = self._wall()
        try:
            saved = self._journal.load_now(wall)
        except Exception as exc:    # serving goes on without the old entries
            self._unreadable(exc)
            return
        self._keep(saved, wall)
        try:
            self._journal.flush_now()       # what the bounds evicted: no loop to queue for
        except Exception as exc:            # the next start evicts them again
            log.warning("cache L1 journal %s: write failed: %s: %s", self._journal.path,
                        type(exc).__name__, exc)

    @property
    def _restoring(self) -> bool:
        """The journal is still to be read back, or being read, in the background."""
        return not self._restored_at_start and (self._restore is None
                                                or not self._restore.done())

    def _restore_soon(self) -> None:
        if self._restore is None and not self._restored_at_start:
            self._restore = asyncio.get_running_loop().create_task(self._restored())

    async def _restored(self) -> None:
        """Entries of the journal, older than (and under) those written since the start,
        each tenant's within its own share."""
        assert self._journal is not None
        wall = self._wall()
        try:
            saved = await self._journal.load(wall)
        except Exception as exc:    # serving goes on without the old entries
            self._invalidated.clear()
            self._unreadable(exc)
            return
        self._keep(saved, wall)

    def _unreadable(self, exc: Exception) -> None:
        assert self._journal is not None
        log.warning("cache L1 journal %s could not be read: %s: %s", self._journal.path,
                    type(exc).__name__, exc)

    def _keep(self, saved: list[l1_journal.Saved], wall: float) -> None:
        """``saved`` (read at ``wall``) into memory, under the entries written since the
        start and without those invalidated meanwhile."""
        mono = self._clock()
        by_tenant: dict[str, list[tuple[str, _Entry]]] = {}
        for s in saved:
            if not any(_matches(s, t, m) for t, m in self._invalidated):
                by_tenant.setdefault(s.tenant, []).append(
                    (s.skey, _Entry(s.value, mono + s.expires_at - wall, s.tenant, s.model)))
        self._invalidated.clear()
        for tenant, items in by_tenant.items():
            self._forget(self._entries.put_older(tenant, items))


def _size(entry: _Entry) -> int:
    return len(entry.value)


def _matches(entry: _Entry | l1_journal.Saved, tenant: str | None, model: str | None) -> bool:
    return (tenant is None or entry.tenant == tenant) and (model is None or entry.model == model)


class RedisL1:
    """Redis through ``redis.asyncio``; shared by every control-plane replica."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float = 0.05,
                 max_value_bytes: int = 4 * 1024 * 1024) -> None:
        # Socket time-outs bound every call even if a caller forgets its own budget; the
        # connect time-out keeps a dead server from stalling the first request.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=max(timeout_s, 0.01), socket_connect_timeout=max(timeout_s, 0.01),
            retry_on_timeout=False, health_check_interval=0)
        self._max_value = max_value_bytes

    async def get(self, tenant: str, model: str, key: str) -> bytes | None:
        value = await self._client.get(storage_key(tenant, model, key))
        if value is None:
            return None
        return value if isinstance(value, bytes) else str(value).encode()

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        if len(value) > self._max_value:
            return False
        await self._client.set(storage_key(tenant, model, key), value,
                               px=max(1, int(ttl_s * 1000)))
        return True

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        removed = 0
        batch: list[bytes] = []
        async for skey in self._client.scan_iter(match=match_pattern(tenant, model), count=1000):
            batch.append(skey)
            if len(batch) >= 500:
                removed += int(await self._client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(await self._client.unlink(*batch))
        return removed

    async def delete(self, tenant: str, model: str, key: str) -> bool:
        return bool(await self._client.unlink(storage_key(tenant, model, key)))

    async def close(self) -> None:
        await self._client.aclose()
