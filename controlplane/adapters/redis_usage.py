"""Usage totals in Redis, shared by every control-plane replica.

One hash per UTC day (``synapse:usage:<day>``), one field per tenant, model and kind
(joined by the unit separator, which names cannot hold in practice and which is never
split ambiguously: the kind is always last and has no separator). A read is one
``HGETALL`` per day. Every call has a time budget.

A flush is one Lua script, atomic in Redis: ``SET <prefix>batch:<id> 1 NX EX <ttl>``
and, only if that set it, an ``HINCRBY`` / ``HINCRBYFLOAT`` per non-zero count and an
``EXPIRE`` per day (``retention_days``). A batch sent again (its first call timed out
after Redis applied it) therefore changes nothing: each batch id counts once for as long
as its marker lives, the usage's own retention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

SEP = "\x1f"
# KEYS: the batch marker, then the day hashes. ARGV: the marker's ttl, then per count
# (index of its hash in KEYS, field, "i" or "f", value).
ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 4 do
  local h = KEYS[tonumber(ARGV[i])]
  if ARGV[i + 2] == 'f' then
    redis.call('HINCRBYFLOAT', h, ARGV[i + 1], ARGV[i + 3])
  else
    redis.call('HINCRBY', h, ARGV[i + 1], ARGV[i + 3])
  end
end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[1]) end
return 1
"""


class RedisUsageStore:
    def __init__(self, client: aioredis.Redis, timeout_s: float, retention_days: int,
                 prefix: str = "synapse:usage:") -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._ttl_s = retention_days * 86_400 + 86_400
        self._prefix = prefix
        self._add_once = client.register_script(ADD_ONCE)

    async def add(self, rows: Mapping[tuple[str, str, str], Mapping[str, int | float]],
                  batch_id: str) -> None:
        hashes: dict[str, int] = {}         # day hash -> its index in KEYS (from 2)
        args: list[str | int] = [self._ttl_s]
        for (day, tenant, model), counts in rows.items():
            index = hashes.setdefault(f"{self._prefix}{day}", len(hashes) + 2)
            for kind, value in counts.items():
                if not value:
                    continue
                field = SEP.join((tenant, model, kind))
                op = "f" if isinstance(value, float) else "i"
                args += [index, field, op, repr(value) if op == "f" else str(value)]
        keys = [f"{self._prefix}batch:{batch_id}", *hashes]
        async with asyncio.timeout(self._timeout_s):
            await self._add_once(keys=keys, args=args)

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
