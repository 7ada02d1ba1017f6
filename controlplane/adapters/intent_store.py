"""Operator intent in Redis: one hash, field = node name, value = the intent as JSON.

Small and rarely written, so every call simply reads or writes the hash; calls carry the
client's socket timeouts. A Redis outage makes Admin calls fail with UNAVAILABLE rather
than pretend a cordon was stored.
"""

from __future__ import annotations

import redis.asyncio as aioredis

KEY = "synapse:intent:nodes"


class RedisIntentStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def load(self) -> dict[str, str]:
        raw = await self._client.hgetall(KEY)
        return {(k.decode() if isinstance(k, bytes) else str(k)):
                (v.decode() if isinstance(v, bytes) else str(v)) for k, v in raw.items()}

    async def save(self, node: str, text: str) -> None:
        await self._client.hset(KEY, node, text)
