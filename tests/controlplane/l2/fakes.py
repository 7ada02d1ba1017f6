"""Test doubles behind the L2 index's seams: an in-memory store and hand-driven time.

``FakeStore`` implements ``controlplane.core.l2.store.Store`` over a list (exact search,
like Milvus' FLAT index) and answers with ``rows.Candidate``, as the Milvus store does; a
call can be held until the test lets it go (``hold``), or made to fail (``fail``).
``ManualTime`` is one clock for wall, monotonic and sleep: a sleep returns only when the
test moves time past its end (``await time.advance(s)``), so intervals are driven, never
waited for.
"""

from __future__ import annotations

import asyncio
import collections

import numpy as np

from controlplane.core.l2 import rows, timing


def unit(seed: int, dim: int = 64) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def row(scope: str, seed: int, tenant: str = "acme", model: str = "m") -> rows.Row:
    return rows.Row(scope=scope, tenant=tenant, model=model, vector=unit(seed),
                    ref=f"ref-{scope}-{seed}", text=f"text {seed}")


class ManualTime:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    @property
    def time(self) -> timing.Time:
        return timing.Time(wall=self, monotonic=self, sleep=self.sleep)

    @property
    def sleeping(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + max(0.0, seconds), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on, wake every sleep that ends by then, let the woken tasks run."""
        await self.settle()           # tasks started just now reach their sleep first
        self.now += seconds
        due = [f for end, f in self._sleepers if end <= self.now]
        self._sleepers = [(end, f) for end, f in self._sleepers if end > self.now]
        for future in due:
            if not future.done():
                future.set_result(None)
        await self.settle()

    @staticmethod
    async def settle() -> None:
        """Let ready tasks run until they wait again (on a sleep or on I/O)."""
        for _ in range(10):
            await asyncio.sleep(0)


class FakeStore:
    def __init__(self, exclusive: bool = False) -> None:
        self.exclusive = exclusive
        self.records: list[rows.Record] = []
        self.dim: int | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.held: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    def hold(self, call: str) -> asyncio.Event:
        """The next calls of ``call`` wait until the returned event is set."""
        self.held[call] = asyncio.Event()
        return self.held[call]

    async def _enter(self, call: str) -> None:
        self.calls[call] += 1
        if call in self.held:
            await self.held[call].wait()
        if call in self.fail:
            raise ConnectionError(f"{call} failed")

    async def open(self) -> int | None:
        await self._enter("open")
        return self.dim

    async def create(self, dim: int) -> None:
        await self._enter("create")
        self.dim = self.dim or dim

    async def insert(self, records) -> None:
        await self._enter("insert")
        self.records.extend(records)

    def _live(self, scope: str, since: float | None) -> list[rows.Record]:
        return [r for r in self.records
                if r.scope == scope and (since is None or r.created_at >= since)]

    async def search(self, scope, vector, top_k, min_created_at) -> list[rows.Candidate]:
        await self._enter("search")
        found = [rows.Candidate(r.ref, r.text, r.vector, float(r.vector @ vector), r.created_at)
                 for r in self._live(scope, min_created_at)]
        return sorted(found, key=lambda f: -f.similarity)[:top_k]

    async def exists(self, scope, min_created_at) -> bool:
        await self._enter("exists")
        return bool(self._live(scope, min_created_at))

    async def scope_rows(self, scope, since, limit) -> list[rows.Candidate]:
        await self._enter("scope_rows")
        return [rows.Candidate(r.ref, r.text, r.vector, 0.0, r.created_at)
                for r in self._live(scope, since)][:limit]

    async def newest_per_scope(self) -> dict[str, float]:
        await self._enter("newest_per_scope")
        newest: dict[str, float] = {}
        for r in self.records:
            newest[r.scope] = max(newest.get(r.scope, -1.0), r.created_at)
        return newest

    async def delete(self, tenant, model) -> int:
        await self._enter("delete")
        return self._remove(lambda r: (tenant is None or r.tenant == tenant)
                            and (model is None or r.model == model))

    async def delete_ref(self, ref) -> int:
        await self._enter("delete_ref")
        return self._remove(lambda r: r.ref == ref)

    async def delete_older(self, before) -> int:
        await self._enter("delete_older")
        return self._remove(lambda r: r.created_at < before)

    def _remove(self, doomed) -> int:
        before = len(self.records)
        self.records = [r for r in self.records if not doomed(r)]
        return before - len(self.records)

    async def flush(self) -> None:
        await self._enter("flush")

    def warm_up(self) -> None:
        self.calls["warm_up"] += 1

    async def close(self) -> None:
        self.calls["close"] += 1
