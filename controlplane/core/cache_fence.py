"""Which cache writes an invalidation voids: those of lookups made before it.

An answer is stored after it was generated, seconds after its lookup missed. An
invalidation in between (the operator changed the model, or its answers were wrong)
would otherwise be undone by that store: the old model's answer lands in the cache just
after the cache was emptied of its kind. Each lookup therefore records the fence's
``epoch``; a store whose epoch an invalidation of its tenant or model has passed is
dropped, and the writer checks again once its write landed (a write racing the
invalidation's deletes is removed again; an L2 row is harmless once its L1 entry is gone,
since a semantic candidate whose response is missing is a miss).

Invalidations are admin-rare, so the fence remembers the last ``KEPT`` of them; a store
older than all of those is dropped (it is at least that many invalidations old).
Each process has its own fence; the serving workers of a pod tell each other of every
invalidation (``shared_routing``), so the fence holds pod-wide. Another replica's store in
flight (another pod, sharing the stores through Redis and Milvus) is not voided.
"""

from __future__ import annotations

import collections

KEPT = 256


class Fence:
    def __init__(self) -> None:
        self._epoch = 0
        self._recent: collections.deque[tuple[int, str | None, str | None]] = \
            collections.deque(maxlen=KEPT)

    @property
    def epoch(self) -> int:
        """The epoch a lookup records now."""
        return self._epoch

    def invalidated(self, tenant: str | None, model: str | None) -> None:
        """An invalidation of ``tenant`` and/or ``model`` (both None: everything) begins."""
        self._epoch += 1
        self._recent.append((self._epoch, tenant, model))

    def voids(self, epoch: int, tenant: str, model: str) -> bool:
        """Whether an invalidation since ``epoch`` covers ``tenant``'s ``model``."""
        if epoch == self._epoch:
            return False
        if epoch < self._recent[0][0] - 1:      # older than every one remembered
            return True
        return any(seq > epoch and (t is None or t == tenant) and (m is None or m == model)
                   for seq, t, m in self._recent)
