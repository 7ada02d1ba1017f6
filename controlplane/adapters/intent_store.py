"""Operator intent in Redis: one hash, field = node name, value = the intent as JSON.

Small and rarely written, so every call simply reads or writes the hash; calls carry the
client's socket timeouts. Writes are a compare-and-set in one Lua script (atomic on the
server): the new record is stored only if the field still holds what the writer read, so
two replicas editing one node at once never overwrite each other's change — the loser
reads again and re-applies its change (``FleetIntent.update``). A Redis outage makes
Admin calls fail with UNAVAILABLE rather than pretend a cordon was stored.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

KEY = "synapse:intent:nodes"

# KEYS[1] hash; ARGV[1] node, ARGV[2] '1' when the field is expected absent, ARGV[3] the
# expected value otherwise, ARGV[4] the new value. Returns 1 when written, 0 when not.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current then return 0 end
elseif current ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisIntentStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._cas: Any = client.register_script(_COMPARE_AND_SET)

    async def load(self) -> dict[str, str]:
        raw = await self._client.hgetall(KEY)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def get(self, node: str) -> str | None:
        raw = await self._client.hget(KEY, node)
        return None if raw is None else _text(raw)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        absent = "1" if expected is None else "0"
        written = await self._cas(keys=[KEY], args=[node, absent, expected or "", text])
        return bool(int(written))

    async def close(self) -> None:
        await self._client.aclose()
