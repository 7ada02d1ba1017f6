"""An in-memory copy of busy L2 scopes, searched with numpy instead of a store round trip.

Why: every semantic lookup searches one scope, and a Milvus call costs far more than the
search itself (``bench/cache_latency.py`` shows both). Milvus stays the durable, shared
store and the source of truth; the mirror is a read cache of it, kept per scope:

- **Filled from the store.** The first search of a scope goes to the store and starts a
  background load of the scope's live rows (``mirrored``). Scopes with more than
  ``SCOPE_MAX_ROWS`` rows are not mirrored (they keep searching the store); the whole
  mirror holds at most ``max_rows`` rows, least recently searched scopes leaving first.
- **Fresh enough.** Rows this replica writes are added at once. Rows other replicas
  write are picked up by a background refresh at most every ``refresh_s`` while the
  scope is searched (rows newer than the newest seen, minus an overlap for clock skew and
  bounded consistency), and the scope is loaded whole again every ``reload_s``, which
  also drops rows deleted elsewhere. A row missing from the mirror costs a hit, never
  correctness.
- **Never wrong.** Searches honour the TTL (``min_created_at``) like the store's filter,
  and what the mirror returns goes through the same checks as a store result: the
  verifier, then the L1 entry it points to, which must exist and carry the request's
  scope hash. Invalidation on this replica clears the mirror; one on another replica
  deletes the L1 entries, so a lingering row here can only turn into a miss.

This module is the data structure alone (no I/O, no tasks); ``mirrored`` keeps it filled.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from controlplane.core.l2 import rows as l2_rows
from synapse_common.clock import Clock

SCOPE_MAX_ROWS = 16_383        # under Milvus' query window (16,384): bigger scopes stay there
INLINE_MAX_ROWS = 2_048        # up to this a search runs on the event loop (µs)
REFRESH_OVERLAP_S = 60.0       # a refresh re-reads rows this much older than the newest seen

Due = Literal["reload", "refresh"]


@dataclasses.dataclass(frozen=True)
class MirrorRow:
    ref: str
    text: str
    vector: np.ndarray
    created_at: float


class ScopeRows:
    """The live rows of one scope: a vector matrix grown in place, and their fields."""

    def __init__(self, dim: int, now: float) -> None:
        self._vectors = np.empty((64, dim), dtype=np.float32)
        self._created = np.empty(64, dtype=np.float64)
        self.refs: list[str] = []
        self.texts: list[str] = []
        self._index: set[str] = set()
        self.loaded_at = now
        self.refreshed_at = now
        self.newest = 0.0

    def __len__(self) -> int:
        return len(self.refs)

    def add(self, found: Sequence[l2_rows.Stored]) -> int:
        """Append rows not present yet (by ref); the number added."""
        fresh = [r for r in found if r.ref not in self._index]
        if not fresh:
            return 0
        n, need = len(self.refs), len(self.refs) + len(fresh)
        if need > len(self._vectors):
            size = max(need, 2 * len(self._vectors))
            self._vectors = np.resize(self._vectors, (size, self._vectors.shape[1]))
            self._created = np.resize(self._created, size)
        for i, row in enumerate(fresh, start=n):
            self._vectors[i] = row.vector
            self._created[i] = row.created_at
            self.refs.append(row.ref)
            self.texts.append(row.text)
            self._index.add(row.ref)
            self.newest = max(self.newest, row.created_at)
        return len(fresh)

    def search(self, vector: np.ndarray, top_k: int,
               min_created_at: float) -> list[l2_rows.Candidate]:
        """Exact top-k by inner product among rows created at or after ``min_created_at``."""
        n = len(self.refs)
        if n == 0:
            return []
        sims = self._vectors[:n] @ np.asarray(vector, dtype=np.float32)
        sims[self._created[:n] < min_created_at] = -np.inf
        k = min(top_k, n)
        best = np.argpartition(-sims, k - 1)[:k]
        best = best[np.argsort(-sims[best])]
        return [l2_rows.Candidate(self.refs[i], self.texts[i], self._vectors[i].copy(),
                               float(sims[i]), float(self._created[i]))
                for i in best if sims[i] > -np.inf]

    def has_live(self, min_created_at: float) -> bool:
        n = len(self.refs)
        return bool(n) and bool((self._created[:n] >= min_created_at).any())


def exact_top_k(found: Sequence[l2_rows.Stored], vector: np.ndarray, top_k: int,
                min_created_at: float) -> list[l2_rows.Candidate]:
    """The mirror's exact top-k over a few rows that are not mirrored (recent writes)."""
    if not found:
        return []
    scope = ScopeRows(len(vector), 0.0)
    scope.add(found)
    return scope.search(vector, top_k, min_created_at)


class ScopeMirror:
    """Mirrored scopes by scope hash, least recently searched first out."""

    def __init__(self, max_rows: int, refresh_s: float, reload_s: float, clock: Clock) -> None:
        self.max_rows = max_rows
        self.refresh_s = refresh_s
        self.reload_s = reload_s
        self._clock = clock
        self._scopes: collections.OrderedDict[str, ScopeRows] = collections.OrderedDict()
        self._rows = 0

    @property
    def enabled(self) -> bool:
        return self.max_rows > 0

    @property
    def rows(self) -> int:
        return self._rows

    def get(self, scope: str) -> ScopeRows | None:
        found = self._scopes.get(scope)
        if found is not None:
            self._scopes.move_to_end(scope)
        return found

    def due(self, scope_rows: ScopeRows) -> Due | None:
        """``"reload"``, ``"refresh"`` or None: what a search of this scope should start."""
        now = self._clock()
        if now - scope_rows.loaded_at >= self.reload_s:
            scope_rows.loaded_at = scope_rows.refreshed_at = now   # one attempt per period
            return "reload"
        if now - scope_rows.refreshed_at >= self.refresh_s:
            scope_rows.refreshed_at = now
            return "refresh"
        return None

    def put(self, scope: str, found: Sequence[l2_rows.Stored], dim: int) -> bool:
        """Replace a scope with a full load; False when it is too big to mirror."""
        self.drop(scope)
        if len(found) > min(SCOPE_MAX_ROWS, self.max_rows):
            return False
        entry = ScopeRows(dim, self._clock())
        entry.add(found)
        self._scopes[scope] = entry
        self._rows += len(entry)
        self._evict()
        return True

    def add(self, scope: str, found: Sequence[l2_rows.Stored]) -> None:
        """Rows written (by this replica, or seen by a refresh) into a mirrored scope."""
        entry = self._scopes.get(scope)
        if entry is None:
            return
        self._rows += entry.add(found)
        if len(entry) > SCOPE_MAX_ROWS:
            self.drop(scope)
        self._evict()

    def drop(self, scope: str) -> None:
        entry = self._scopes.pop(scope, None)
        if entry is not None:
            self._rows -= len(entry)

    def clear(self) -> None:
        self._scopes.clear()
        self._rows = 0

    def _evict(self) -> None:
        while self._rows > self.max_rows and self._scopes:
            _, entry = self._scopes.popitem(last=False)
            self._rows -= len(entry)
