"""Usage totals in Redis, shared by every control-plane replica.

One hash per UTC day (``synapse:usage:<day>``), one field per tenant, model and kind
(joined by the unit separator, which names cannot hold in practice and which is never
split ambiguously: the kind is always last and has no separator). A flush is one
pipeline of ``HINCRBY`` / ``HINCRBYFLOAT`` per non-zero count and an ``EXPIRE`` per day
(``retention_days``); a read is one ``HGETALL`` per day. Every call has a time budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

SEP = "\x1f"


class RedisUsageStore:
    def __init__(self, client: aioredis.Redis, timeout_s: float, retention_days: int,
                 prefix: str = "synapse:usage:") -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._ttl_s = retention_days * 86_400 + 86_400
        self._prefix = prefix

    async def add(self, rows: Mapping[tuple[str, str, str], Mapping[str, int | float]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        days = set()
        for (day, tenant, model), counts in rows.items():
            h = f"{self._prefix}{day}"
            days.add(h)
            for kind, value in counts.items():
                if not value:
                    continue
                field = SEP.join((tenant, model, kind))
                if isinstance(value, float):
                    pipe.hincrbyfloat(h, field, value)
                else:
                    pipe.hincrby(h, field, value)
        for h in days:
            pipe.expire(h, self._ttl_s)
        async with asyncio.timeout(self._timeout_s):
            await pipe.execute()

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> dict[tuple[str, str, str], dict[str, int | float]]:
        pipe = self._client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(f"{self._prefix}{day}")
        async with asyncio.timeout(self._timeout_s):
            hashes = await pipe.execute()
        out: dict[tuple[str, str, str], dict[str, int | float]] = {}
        for day, fields in zip(days, hashes, strict=True):
            for raw, value in fields.items():
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                parts = name.rsplit(SEP, 2)
                if len(parts) != 3:
                    continue
                t, model, kind = parts
                if tenant is not None and t != tenant:
                    continue
                text = value.decode() if isinstance(value, bytes) else str(value)
                out.setdefault((day, t, model), {})[kind] = (
                    float(text) if kind == "cost" else int(float(text)))
        return out
