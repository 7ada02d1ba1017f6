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
  ``max_bytes``; Redis is bounded by its own ``maxmemory`` policy, and both refuse single
  values larger than ``max_value_bytes``.
- Time budgets are the caller's (``asyncio.wait_for`` in the response cache); the Redis
  client also carries socket time-outs so a dead server cannot leave a call hanging.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from typing import Protocol

import redis.asyncio as aioredis

from synapse_common.clock import Clock

KEY_PREFIX = "synapse:cache:v1:"


class L1Store(Protocol):
    kind: str

    async def get(self, tenant: str, model: str, key: str) -> bytes | None: ...

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        """Write with an absolute TTL; False when the value was refused (too large)."""
        ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        """Remove entries of a tenant and/or model (both None: everything); count removed."""
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
    """In-process LRU with absolute TTL and entry/byte bounds (embedded mode)."""

    kind = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = time.monotonic,
                 max_value_bytes: int = 4 * 1024 * 1024) -> None:
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_value = min(max_value_bytes, max_bytes)
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    async def get(self, tenant: str, model: str, key: str) -> bytes | None:
        skey = storage_key(tenant, model, key)
        entry = self._entries.get(skey)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(skey)
            return None
        self._entries.move_to_end(skey)     # LRU order only; the deadline stays
        return entry.value

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        if len(value) > self._max_value:
            return False
        skey = storage_key(tenant, model, key)
        if skey in self._entries:
            self._drop(skey)
        self._entries[skey] = _Entry(value, self._clock() + ttl_s, tenant, model)
        self._bytes += len(value)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        doomed = [k for k, e in self._entries.items()
                  if (tenant is None or e.tenant == tenant) and (model is None or e.model == model)]
        for skey in doomed:
            self._drop(skey)
        return len(doomed)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, skey: str) -> None:
        entry = self._entries.pop(skey)
        self._bytes -= len(entry.value)


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

    async def close(self) -> None:
        await self._client.aclose()
