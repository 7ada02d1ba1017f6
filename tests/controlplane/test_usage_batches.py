"""A usage flush is idempotent: each batch carries a random id that the store applies
once, so a flush whose store call failed after the store had applied it (an answer lost
to a time-out) is retried without counting twice (controlplane/core/usage_book.py, with
the Redis and SQLite stores)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Sequence

import pytest

from controlplane.adapters import redis_limits, redis_usage, usage_db
from controlplane.core import usage_book
from synapse_common import clock as clocks
from tests import harness


class LostAnswers:
    """A real store whose first ``lost`` calls apply, then time out (the answer lost)."""

    def __init__(self, inner: usage_book.UsageStore, lost: int) -> None:
        self.inner = inner
        self.lost = lost

    async def add(self, rows: usage_book.PlainRows, *batch_id: str) -> None:
        await self.inner.add(rows, *batch_id)
        if self.lost:
            self.lost -= 1
            raise TimeoutError("the store's answer did not come in time")

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> usage_book.PlainRows:
        return await self.inner.read(days, tenant)


@pytest.fixture(params=["redis", "sqlite", "memory"])
async def store(request: pytest.FixtureRequest,
                tmp_path: pathlib.Path) -> AsyncIterator[usage_book.UsageStore]:
    if request.param == "redis":
        server = harness.RedisServer(tmp_path)
        client = redis_limits.connect(server.url)
        yield redis_usage.RedisUsageStore(client, 2.0, 30)
        await client.aclose()
        server.stop()
    elif request.param == "sqlite":
        db = usage_db.UsageDb(str(tmp_path / usage_db.FILE), 30)
        db.open_now(clocks.wall())
        yield db
        db.close()
    else:
        yield usage_book.MemoryUsageStore()


async def test_a_flush_that_timed_out_after_the_store_applied_it_counts_once(
        store: usage_book.UsageStore) -> None:
    """Review finding: the retried flush was added again (HINCRBY, SQLite's sum)."""
    book = usage_book.UsageBook(LostAnswers(store, 2))
    book.record("a", "m", usage_book.Counts(requests=3, prompt_tokens=10, cost=0.5))
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await book.flush()
    book.record("a", "m", usage_book.Counts(requests=1))     # after: a batch of its own
    assert book.pending()[(usage_book.day_of(clocks.wall()), "a", "m")]["requests"] == 4
    await book.flush()
    assert book.pending() == {}
    (row,) = await book.query("a")
    assert (row.counts.requests, row.counts.prompt_tokens, row.counts.cost) == (4, 10, 0.5)


async def test_recordings_during_a_failing_store_wait_and_are_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_book, "PENDING_MAX", 3)
    book = usage_book.UsageBook(LostAnswers(usage_book.MemoryUsageStore(), 10))
    book.record("a", "m", usage_book.Counts(requests=1))
    book.record("b", "m", usage_book.Counts(requests=1))
    with pytest.raises(TimeoutError):
        await book.flush()      # applied, answer lost: kept as it is
    for tenant in ("a", "c"):
        book.record(tenant, "m", usage_book.Counts(requests=1))
    assert book.dropped == 1    # two unsent rows and one pending are the bound
    with pytest.raises(TimeoutError):
        await book.flush()      # the unsent batch again; the pending ones wait
    assert len(book.batches()) == 2
