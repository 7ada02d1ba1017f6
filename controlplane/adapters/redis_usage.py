"""Usage totals in Redis, shared by every control-plane replica.

One hash per UTC day (``synapse:usage:<day>``), one field per tenant, model and kind
(joined by the unit separator, which names cannot hold in practice and which is never
split ambiguously: the kind is always last and has no separator). A read is one
``HGETALL`` per day. Every call has a time budget.

A batch is applied once: each chunk of at most :data:`CHUNK_FIELDS` counts is one Lua
script, ``SET <prefix>batch:<chunk id> 1 NX EX <ttl>`` and, only if that set it, an
``HINCRBY`` / ``HINCRBYFLOAT`` per non-zero count and an ``EXPIRE`` per day
(``retention_days``). A chunk sent again (its first call timed out after Redis applied
it, or a later chunk of its batch failed) therefore changes nothing: each chunk id counts
once for as long as its marker lives, the usage's own retention. The chunks are cut in
the batch's row order, so a retry of the batch makes the same chunks with the same ids
(``<batch id>.<n>``; a batch of one chunk keeps its plain id).

- **Chunked**, because a script holds Redis whole while it runs: one batch of
  ``PENDING_MAX`` rows kept every other client (rate limits, caches) waiting while it
  ran.
- **A refused field stops no other.** Values are checked before they are sent
  (:func:`usage_book.storable_rows`: a bad one dropped with a warning), and each
  increment runs under ``redis.pcall``: a field Redis still refuses (an increment past
  int64, a field an older release left holding a non-integer) is skipped and named in
  one warning, and the rest of the chunk is applied. Without it Redis kept the marker and
  the increments before the error, and the retry, seeing the marker, dropped the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from controlplane.core import usage_book

SEP = "\x1f"
CHUNK_FIELDS = 2_000        # counts per script call: bounds how long one holds Redis
log = logging.getLogger("synapse.controlplane.fairness")
# KEYS: the batch marker, then the day hashes. ARGV: the marker's ttl, then per count
# (index of its hash in KEYS, field, "i" or "f", value). Returns the refused counts, as
# (index of its hash, field) pairs.
ADD_ONCE = """
local refused = {}
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return refused end
for i = 2, #ARGV, 4 do
  local index = tonumber(ARGV[i])
  local op = 'HINCRBY'
  if ARGV[i + 2] == 'f' then op = 'HINCRBYFLOAT' end
  local r = redis.pcall(op, KEYS[index], ARGV[i + 1], ARGV[i + 3])
  if type(r) == 'table' and r.err then
    refused[#refused + 1] = index
    refused[#refused + 1] = ARGV[i + 1]
  end
end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[1]) end
return refused
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
        rows, _ = usage_book.storable_rows(rows)
        counts = [(day, tenant, model, kind, value)
                  for (day, tenant, model), plain in rows.items()
                  for kind, value in plain.items() if value]
        chunks = [counts[i:i + CHUNK_FIELDS] for i in range(0, len(counts), CHUNK_FIELDS)]
        for n, chunk in enumerate(chunks):
            await self._add_chunk(chunk, batch_id if len(chunks) == 1 else f"{batch_id}.{n}")

    async def _add_chunk(self, counts: Sequence[tuple[str, str, str, str, int | float]],
                         chunk_id: str) -> None:
        hashes: dict[str, int] = {}         # day hash -> its index in KEYS (from 2)
        days: dict[int, str] = {}
        args: list[str | int] = [self._ttl_s]
        for day, tenant, model, kind, value in counts:
            index = hashes.setdefault(f"{self._prefix}{day}", len(hashes) + 2)
            days[index] = day
            cost = kind == "cost"
            args += [index, SEP.join((tenant, model, kind)), "f" if cost else "i",
                     repr(float(value)) if cost else str(value)]
        keys = [f"{self._prefix}batch:{chunk_id}", *hashes]
        async with asyncio.timeout(self._timeout_s):
            refused = await self._add_once(keys=keys, args=args)
        if refused:
            named = []
            for index, raw in zip(refused[::2], refused[1::2], strict=True):
                field = raw.decode() if isinstance(raw, bytes) else str(raw)
                tenant, model, kind = field.rsplit(SEP, 2)
                named.append(f"{days.get(int(index), '?')} tenant {tenant!r} model "
                             f"{model!r} {kind}")
            log.warning("usage counts Redis refused (an increment past int64, or a field "
                        "not holding a number of its kind) were skipped, the rest of the "
                        "batch stored: %s", "; ".join(named[:20]))

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
