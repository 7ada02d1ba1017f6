"""Token limits and budgets in Redis, so they hold across control-plane replicas.

The rule is ``controlplane.core.token_limits``'s (the asks are its ``Ask``s); these two
Lua scripts are its arithmetic run atomically on the server (one call per admission, one
per settlement):

* a tokens-per-minute bucket is a hash (level, stamp) refilled from Redis's own clock
  (``TIME``: replicas with skewed clocks agree), expiring once it would be full again;
* a budget is a float counter per scope and period, expiring at the period's end.

Admission checks every scope first and charges only when all of them allow; each call
has a time budget, and a failure raises (the core falls back to its local store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from controlplane.core import token_limits

FIELDS = 5   # ARGV per scope in _ADMIT: tpm, tokens, budget limit, budget amount, ttl

_REFILL = """
local function level(key, tpm, now)
  local b = redis.call('HMGET', key, 'level', 'stamp')
  local lvl = tonumber(b[1]) or tpm
  local stamp = tonumber(b[2]) or now
  return math.min(tpm, lvl + math.max(0, now - stamp) * tpm / 60)
end
local function save(key, lvl, tpm, now)
  redis.call('HSET', key, 'level', tostring(lvl), 'stamp', tostring(now))
  redis.call('EXPIRE', key, math.ceil(math.max(0, tpm - lvl) * 60 / tpm) + 60)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

_ADMIT = _REFILL + """
local n = #KEYS / 2
local levels = {}
for i = 1, n do
  local a = (i - 1) * 5
  local tpm = tonumber(ARGV[a + 1])
  if tpm > 0 then
    local lvl = level(KEYS[2 * i - 1], tpm, now)
    local want = math.min(tonumber(ARGV[a + 2]), tpm)
    if lvl < want then
      return {0, tostring(math.ceil((want - lvl) * 60000 / tpm)), 'tokens_per_minute', i - 1}
    end
    levels[i] = lvl
  end
  local limit = tonumber(ARGV[a + 3])
  if limit > 0 then
    local spent = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    if spent >= limit then
      return {0, tostring(math.ceil(tonumber(ARGV[a + 5]) * 1000)), 'budget', i - 1}
    end
  end
end
for i = 1, n do
  local a = (i - 1) * 5
  local tpm = tonumber(ARGV[a + 1])
  if tpm > 0 then
    save(KEYS[2 * i - 1], levels[i] - tonumber(ARGV[a + 2]), tpm, now)
  end
  if tonumber(ARGV[a + 3]) > 0 then
    redis.call('INCRBYFLOAT', KEYS[2 * i], ARGV[a + 4])
    redis.call('EXPIRE', KEYS[2 * i], math.ceil(tonumber(ARGV[a + 5])) + 60)
  end
end
return {1, '0', '', -1}
"""

_SETTLE = _REFILL + """
local n = #KEYS / 2
for i = 1, n do
  local a = (i - 1) * 3
  local tpm = tonumber(ARGV[a + 1])
  if tpm > 0 then
    local lvl = math.min(tpm, level(KEYS[2 * i - 1], tpm, now) + tonumber(ARGV[a + 2]))
    save(KEYS[2 * i - 1], lvl, tpm, now)
  end
  local delta = tonumber(ARGV[a + 3])
  if delta ~= 0 and redis.call('EXISTS', KEYS[2 * i]) == 1 then
    local spent = tonumber(redis.call('INCRBYFLOAT', KEYS[2 * i], ARGV[a + 3]))
    if spent < 0 then
      redis.call('SET', KEYS[2 * i], '0', 'KEEPTTL')
    end
  end
end
return 1
"""


class RedisTokenStore:
    def __init__(self, client: aioredis.Redis, timeout_s: float,
                 prefix: str = "synapse:tok:") -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._admit: Any = client.register_script(_ADMIT)
        self._settle: Any = client.register_script(_SETTLE)

    def _keys(self, asks: Sequence[token_limits.Ask]) -> list[str]:
        keys = []
        for a in asks:
            # Unused slots still get a key (never touched) so the script indexes by scope.
            keys.append(f"{self._prefix}b:{a.bucket}" if a.bucket else f"{self._prefix}-")
            keys.append(f"{self._prefix}s:{a.budget_key}" if a.budget_key
                        else f"{self._prefix}-")
        return keys

    async def admit(self, asks: Sequence[token_limits.Ask]) -> tuple[bool, float, str, int]:
        """(allowed, retry after seconds, the limit that refused, which ask refused)."""
        args: list[float | int] = []
        for a in asks:
            args += [a.tokens_per_minute if a.bucket else 0, a.tokens,
                     a.budget_limit if a.budget_key else 0, a.budget_amount, a.budget_ttl_s]
        async with asyncio.timeout(self._timeout_s):
            allowed, retry_ms, which, index = await self._admit(keys=self._keys(asks),
                                                                args=args)
        if int(allowed):
            return True, 0.0, "", -1
        which = which.decode() if isinstance(which, bytes) else str(which)
        return False, float(retry_ms) / 1000.0, which, int(index)

    async def settle(self, asks: Sequence[token_limits.Ask], tokens_delta: Sequence[int],
                     budget_delta: Sequence[float]) -> None:
        args: list[float | int] = []
        for a, dt, db in zip(asks, tokens_delta, budget_delta, strict=True):
            args += [a.tokens_per_minute if a.bucket else 0, dt, db if a.budget_key else 0]
        async with asyncio.timeout(self._timeout_s):
            await self._settle(keys=self._keys(asks), args=args)
