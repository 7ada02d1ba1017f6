"""Rows older than the TTL are deleted from the store, not only skipped by searches.

Searches already ignore rows created before ``wall() - ttl_s`` (expiry is absolute, as in
L1); without deleting them the store would grow for ever. Every ``interval_s`` the index
deletes the rows created before the cut-off (one delete by expression: every replica may
run it, it is idempotent) and tells the in-memory parts (``on_expired``). A failure is
logged, at most once per ``interval_s``, and retried at the next period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from controlplane.core.l2 import timing
from synapse_common import aiotasks

log = logging.getLogger("synapse.cache")


class Expiry:
    def __init__(self, delete_older: Callable[[float], Awaitable[int]],
                 on_expired: Callable[[float], None], ttl_s: float, interval_s: float,
                 time: timing.Time) -> None:
        self._delete_older = delete_older
        self._on_expired = on_expired
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._time = time
        self._task: asyncio.Task[None] | None = None
        self.deleted = 0            # rows deleted by this process (for tests and logs)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.interval_s > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def run_once(self) -> int:
        cutoff = self._time.wall() - self.ttl_s
        count = await self._delete_older(cutoff)
        self._on_expired(cutoff)
        self.deleted += count
        return count

    async def _loop(self) -> None:
        while True:
            await self._time.sleep(self.interval_s)
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("L2 expiry failed, retried in %.0f s: %s: %s", self.interval_s,
                            type(exc).__name__, exc)

    async def close(self) -> None:
        await aiotasks.stop(self._task)
        self._task = None
