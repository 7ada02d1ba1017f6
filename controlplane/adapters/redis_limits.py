"""Rate-limit state in Redis, so a tenant's limit holds across control-plane replicas.

One Lua script per check, atomic on the server: a token bucket in a hash (tokens, stamp)
refilled from Redis's own clock (``TIME``, so replicas with skewed clocks agree) and a
concurrency set (sorted by lease expiry) of the slots in flight (named by the limiter). A lease expires on
its own after ``lease_s``, so a replica that dies mid-request cannot leak slots forever.
Every call has a time budget; a failure raises and the core falls back to local limits.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local maxc = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then
    return {0, '1000', 'concurrency'}
  end
end
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
  local tokens = tonumber(b[1]) or burst
  local stamp = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
    redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
    return {0, tostring(math.ceil((1 - tokens) / rate * 1000)), 'rate'}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'stamp', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 60)
end
return {1, '0', ''}
"""


class RedisLimitStore:
    def __init__(self, client: aioredis.Redis, timeout_s: float, lease_s: float,
                 prefix: str = "synapse:rl:") -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._prefix = prefix
        self._script: Any = client.register_script(_ACQUIRE)

    def _keys(self, tenant: str) -> list[str]:
        return [f"{self._prefix}{tenant}:bucket", f"{self._prefix}{tenant}:active"]

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrent: int,
                      slot: str) -> tuple[bool, float, str]:
        """(allowed, retry after seconds, which limit refused) for one request."""
        args = [rate, burst, max_concurrent, slot, self._lease_s]
        async with asyncio.timeout(self._timeout_s):
            allowed, retry_ms, which = await self._script(keys=self._keys(tenant), args=args)
        if int(allowed):
            return True, 0.0, ""
        which = which.decode() if isinstance(which, bytes) else str(which)
        return False, float(retry_ms) / 1000.0, which

    async def release(self, tenant: str, slot: str) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._client.zrem(self._keys(tenant)[1], slot)


MAX_CONNECTIONS = 64


def connect(url: str) -> aioredis.Redis:
    """A client for ``url``; connections are made lazily, on first use. The limits',
    token limits', usage's and intent's client (the L1 sizes its time-outs to its budget;
    the stats fan-out, an adapter of its own, takes these): the read time-out makes a
    Redis that accepts connections and never answers fail each call, not hang it.

    A *blocking* pool: redis-py's default pool raises "Too many connections" at once when
    more than 100 calls are in flight, so a burst of clients made the limiter fall back to
    per-replica buckets exactly when the shared limit mattered. Here a call waits for a
    free connection; the caller's ``asyncio.timeout`` still bounds the wait.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=None, socket_connect_timeout=1.0,
        socket_timeout=1.0, health_check_interval=30)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
