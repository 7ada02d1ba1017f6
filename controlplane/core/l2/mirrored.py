"""Keeps the scope mirror filled: background loads and refreshes of searched scopes.

A search of a scope that is not mirrored starts a load of its rows (``reload``); a search
of a mirrored one may start a ``refresh`` (rows newer than the newest seen) or a new full
load, when ``ScopeMirror.due`` says so. At most one task per scope. A scope the store could
not be read for, or too big to mirror, is not tried again for ``retry_s`` /
``ScopeMirror.reload_s``. An invalidation clears the mirror, and loads that started
before it do not put rows back (a generation number per invalidation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from controlplane.core.l2 import mirror, rows
from controlplane.core.l2 import store as store_mod
from synapse_common import aiotasks
from synapse_common.clock import Clock


class MirroredScopes:
    def __init__(self, store: store_mod.Store, scopes: mirror.ScopeMirror, clock: Clock,
                 retry_s: float, recent_rows: Callable[[str], Sequence[rows.Stored]],
                 dim: Callable[[], Awaitable[int | None]]) -> None:
        self.scopes = scopes
        self._store = store
        self._clock = clock
        self._retry_s = retry_s
        self._recent_rows = recent_rows
        self._dim = dim
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.unmirrorable: dict[str, float] = {}    # scope -> monotonic time to try again
        self._generation = 0
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.scopes.enabled

    def get(self, scope: str) -> mirror.ScopeRows | None:
        """The mirrored rows of a searched scope, starting whatever sync is due; None when
        the scope is not mirrored (yet): the caller asks the store."""
        if not self.scopes.enabled:
            return None
        found = self.scopes.get(scope)
        if found is None:
            self._sync(scope, "reload")
            return None
        due = self.scopes.due(found)
        if due is not None:
            self._sync(scope, due)
        return found

    async def search(self, found: mirror.ScopeRows, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> list[rows.Candidate]:
        if len(found) <= mirror.INLINE_MAX_ROWS:
            return found.search(vector, top_k, min_created_at)
        return await asyncio.to_thread(found.search, vector, top_k, min_created_at)

    def has_live(self, scope: str, min_created_at: float) -> bool:
        found = self.scopes.get(scope)
        return found is not None and found.has_live(min_created_at)

    def wrote(self, records: Sequence[rows.Record]) -> None:
        for r in records:
            self.scopes.add(r.scope, [r])

    def clear(self) -> None:
        self.scopes.clear()
        self._generation += 1

    @property
    def idle(self) -> bool:
        return not self.tasks

    def _sync(self, scope: str, due: mirror.Due) -> None:
        if self._closed or scope in self.tasks:
            return
        if due == "reload" and self.unmirrorable.get(scope, 0.0) > self._clock():
            return
        task = asyncio.get_running_loop().create_task(
            self._load(scope) if due == "reload" else self._refresh(scope))
        self.tasks[scope] = task
        task.add_done_callback(lambda _: self.tasks.pop(scope, None))

    async def _load(self, scope: str) -> None:
        generation = self._generation
        try:
            dim = await self._dim()
            if dim is None:
                return      # nothing stored yet: searches find nothing either
            found = await self._store.scope_rows(scope, None, mirror.SCOPE_MAX_ROWS + 1)
        except Exception:
            # The store is failing: searches go to it (and fail open) until it is back.
            self.unmirrorable[scope] = self._clock() + self._retry_s
            return
        if generation != self._generation:
            return
        if not self.scopes.put(scope, found, dim):
            self.unmirrorable[scope] = self._clock() + self.scopes.reload_s
            return
        self.unmirrorable.pop(scope, None)
        # Own writes that the (bounded-consistency) read may not have seen yet.
        self.scopes.add(scope, self._recent_rows(scope))

    async def _refresh(self, scope: str) -> None:
        found = self.scopes.get(scope)
        if found is None:
            return
        since = found.newest - mirror.REFRESH_OVERLAP_S
        generation = self._generation
        with contextlib.suppress(Exception):
            fresh = await self._store.scope_rows(scope, since, mirror.SCOPE_MAX_ROWS + 1)
            if generation == self._generation:
                self.scopes.add(scope, fresh)

    async def close(self) -> None:
        self._closed = True
        await aiotasks.stop(*self.tasks.values(), quiet=True)
