"""Whether a scope holds live rows, answered from memory wherever that is safe.

Most lookups ask this first (``has_entries``): every conversation and parameter set is a
scope of its own, so most scopes are empty and a "no" lets the lookup skip the embedding.

- **The sole writer of its store** (a Milvus Lite file belongs to one process) reads every
  scope's newest row once in the background (``scan``) and then answers exactly from that
  map, which its own writes keep current. Writes made while the scan runs are replayed
  onto its result. An invalidation drops the map (other scopes remain): the next probe
  starts another scan.
- **A shared store** (a Milvus server; other replicas write too) remembers only a "yes",
  for ``positive_ttl_s``: scopes rarely empty out and a stale yes costs one search; a no is
  never remembered, since another replica may write the scope at any moment.

Anything not known here is asked of the store by the index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from controlplane.core.l2 import rows
from synapse_common import aiotasks
from synapse_common.clock import Clock

POSITIVE_TTL_S = 30.0
KNOWN_MAX = 100_000


class ScopePresence:
    def __init__(self, exclusive: bool, clock: Clock,
                 positive_ttl_s: float = POSITIVE_TTL_S, known_max: int = KNOWN_MAX) -> None:
        self.exclusive = exclusive
        self._clock = clock
        self._ttl = positive_ttl_s
        self._known_max = known_max
        self._known: dict[str, float] = {}          # scope -> until when "has rows" holds
        self.newest: dict[str, float] | None = None  # sole writer: scope -> newest created_at
        self._scan: asyncio.Task[None] | None = None
        self._scan_writes: list[tuple[str, float]] = []
        self._generation = 0
        self._closed = False

    def answer(self, scope: str, min_created_at: float) -> bool | None:
        """True / False when memory knows, None when the store must be asked."""
        if self.newest is not None:
            return self.newest.get(scope, -1.0) >= min_created_at
        if self._known.get(scope, 0.0) > self._clock():
            return True
        return None

    def remember(self, scope: str) -> None:
        """The scope was seen with a live row."""
        self._known[scope] = self._clock() + self._ttl
        if len(self._known) > self._known_max:
            self._known.clear()

    def wrote(self, records: Sequence[rows.Record]) -> None:
        for r in records:
            if self.newest is not None:
                self.newest[r.scope] = max(self.newest.get(r.scope, -1.0), r.created_at)
            elif self.scanning:
                self._scan_writes.append((r.scope, r.created_at))

    def forget(self) -> None:
        """After an invalidation: nothing remembered; a running scan's result is dropped."""
        self._known.clear()
        self.newest = None
        self._generation += 1

    def expired(self, before: float) -> None:
        """Rows created before ``before`` were deleted: scopes with nothing newer leave."""
        if self.newest is not None:
            self.newest = {s: t for s, t in self.newest.items() if t >= before}

    @property
    def scanning(self) -> bool:
        return self._scan is not None and not self._scan.done()

    def scan_soon(self, read: Callable[[], Awaitable[dict[str, float]]]) -> None:
        """Sole writer: read every scope's newest row once, in the background."""
        if not self.exclusive or self.scanning or self._closed or self.newest is not None:
            return
        self._scan_writes = []
        self._scan = asyncio.get_running_loop().create_task(self._read(read, self._generation))

    async def _read(self, read: Callable[[], Awaitable[dict[str, float]]],
                    generation: int) -> None:
        try:
            newest = await read()
        except Exception:
            return      # the probe keeps asking the store; the next call tries again
        if generation != self._generation:
            return
        for scope, created in self._scan_writes:    # written while the scan ran
            newest[scope] = max(newest.get(scope, -1.0), created)
        self.newest = newest

    async def close(self) -> None:
        self._closed = True
        await aiotasks.stop(self._scan, quiet=True)
