"""A usage flush is idempotent: each batch carries a random id that the store applies
once, so a flush whose store call failed after the store had applied it (an answer lost
to a time-out) is retried without counting twice (controlplane/core/usage_book.py, with
the Redis and SQLite stores)."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

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


class Down:
    """A store that is unreachable."""

    async def add(self, rows: usage_book.PlainRows, batch_id: str) -> None:
        raise ConnectionError("usage store unreachable")

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> usage_book.PlainRows:
        return {}


async def test_pending_counts_are_sent_by_their_reserved_id_only_as_the_spool_file_holds_them(
        store: usage_book.UsageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: the counts waiting behind a failing batch were spooled by the id
    reserved for them and later sent by it grown. Redis applies a batch by chunks cut
    from its content, each marked once, so after the larger version's first chunk a kill
    and a restart sending the smaller version a spool file held (a marker never seen)
    counted it twice. Now that id is sent only with the content the file holds (its
    rewrite failed here: the older version), and what was recorded since by a new id."""
    monkeypatch.setattr(redis_usage, "CHUNK_FIELDS", 2)
    book = usage_book.UsageBook(LostAnswers(store, 2))
    book.record("a", "m", usage_book.Counts(requests=1))
    with pytest.raises(TimeoutError):
        await book.flush()                      # applied, answer lost: unsent
    book.record("b", "m", usage_book.Counts(requests=2))
    with pytest.raises(TimeoutError):
        await book.flush()                      # the unsent batch again; these wait
    first, waiting = book.spooled()
    book.on_disk([first, waiting])              # the spool file holds them
    assert book.pending_rows() == {} and book.spooled() == [first, waiting]
    for tenant in ("b", "c", "d"):
        book.record(tenant, "m", usage_book.Counts(requests=4))
    _, grown = book.spooled()                   # one batch, by the same id, grown
    assert grown.id == waiting.id and len(grown.rows) == 3
    book.on_disk([first, waiting])              # its rewrite failed: the file as it was
    await book.flush()                          # the store is back
    assert book.pending() == {} and book.spooled() == []
    again = usage_book.UsageBook(store)         # a kill before the spool went: a restart
    again.restore([first, waiting])
    await again.flush()
    got = {r.key.tenant: r.counts.requests for r in await again.query()}
    assert got == {"a": 1, "b": 6, "c": 4, "d": 4}
    book.record("a", "m", usage_book.Counts(requests=8))
    (fresh,) = book.spooled()
    assert fresh.id not in (first.id, waiting.id)   # a new pending set, a new id


async def test_a_long_outage_spools_the_waiting_counts_as_one_batch_of_a_row_per_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flush of an outage rewrites the spool with the waiting counts merged into one
    batch by their reserved id (no batch, no rows per flush), so the bound holds rows per
    day, tenant and model; a key the spooled batch holds still counts at the bound."""
    monkeypatch.setattr(usage_book, "PENDING_MAX", 3)
    book = usage_book.UsageBook(Down())
    book.record("x", "m", usage_book.Counts(requests=1))
    with pytest.raises(ConnectionError):
        await book.flush()                      # x: unsent
    ids = set()
    for _ in range(5):
        for tenant in ("a", "b"):
            book.record(tenant, "m", usage_book.Counts(requests=1))
        with pytest.raises(ConnectionError):
            await book.flush()
        spooled = book.spooled()
        book.on_disk(spooled)
        assert [len(b.rows) for b in spooled] == [1, 2]
        ids.add(spooled[1].id)
    assert len(ids) == 1
    book.record("a", "m", usage_book.Counts(requests=1))    # in the spooled batch
    book.record("c", "m", usage_book.Counts(requests=1))    # a new row: beyond the bound
    assert book.dropped == 1
    kept = book.batches()                       # a stop: the file's version, then the rest
    assert [len(b.rows) for b in kept] == [1, 2, 1] and kept[1] == spooled[1]
    store = usage_book.MemoryUsageStore()
    book.store = store
    await book.flush()
    day = usage_book.day_of(clocks.wall())
    assert {k[1]: v["requests"] for k, v in (await store.read([day], None)).items()} == {
        "x": 1, "a": 6, "b": 5}


@pytest.fixture
async def redis_store(redis_server: harness.RedisServer,
                      ) -> AsyncIterator[tuple[redis_usage.RedisUsageStore, Any]]:
    client = redis_limits.connect(redis_server.url)
    yield redis_usage.RedisUsageStore(client, 5.0, 30), client
    await client.aclose()


def _stored(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode().replace(redis_usage.SEP, "/"): v.decode() for k, v in fields.items()}


async def test_a_count_redis_refuses_stops_no_other_and_a_retry_adds_nothing(
        redis_store: tuple[redis_usage.RedisUsageStore, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """Review finding: the script set the batch marker, then an increment errored (a field
    holding 1.5, a count past int64): Redis kept the marker and the increments before the
    error, and the retry, seeing the marker, dropped the rest without a word."""
    store, client = redis_store
    day = "2026-12-07"
    key = f"synapse:usage:{day}"
    await client.hset(key, redis_usage.SEP.join(("odd", "m", "requests")), "1.5")
    await store.add({(day, "big", "m"): {"requests": usage_book.COUNT_MAX}}, "c1")
    rows = {(day, "aaa", "m"): {"requests": 1},
            (day, "odd", "m"): {"requests": 1, "prompt_tokens": 5},
            (day, "big", "m"): {"requests": 1, "errors": 2},
            (day, "zzz", "m"): {"requests": 1, "prompt_tokens": 100, "cost": 0.25}}
    with caplog.at_level(logging.WARNING, "synapse.controlplane.fairness"):
        await store.add(rows, "c2")
        await store.add(rows, "c2")
    assert _stored(await client.hgetall(key)) == {
        "aaa/m/requests": "1", "odd/m/requests": "1.5", "odd/m/prompt_tokens": "5",
        "big/m/requests": str(usage_book.COUNT_MAX), "big/m/errors": "2",
        "zzz/m/requests": "1", "zzz/m/prompt_tokens": "100", "zzz/m/cost": "0.25"}
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'odd'" in warned and "'big'" in warned and day in warned
    assert "'zzz'" not in warned


async def test_a_value_no_store_holds_is_dropped_before_redis_with_a_warning(
        redis_store: tuple[redis_usage.RedisUsageStore, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """A float in an integer kind (a kept file's ``{"requests": 1.5}``) would have left the
    field unusable for every later increment."""
    store, client = redis_store
    day = "2026-12-07"
    with caplog.at_level(logging.WARNING, "synapse.controlplane.fairness"):
        await store.add({(day, "evil", "m"): {"requests": 1.5, "prompt_tokens": 3,
                                              "errors": True, "cost": float("nan")},
                         (day, "b", "m"): {"requests": 2**63}}, "d1")
    assert _stored(await client.hgetall(f"synapse:usage:{day}")) == {
        "evil/m/prompt_tokens": "3"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and all(day in w for w in warned)
    assert "'evil'" in warned[0] and "requests" in warned[0]
    assert "'b'" in warned[3] and "999" not in warned[3]


async def test_a_big_batch_goes_in_chunks_each_applied_once(
        redis_store: tuple[redis_usage.RedisUsageStore, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: one script call of a whole batch (up to PENDING_MAX rows) held
    Redis for about half a second, every other client waiting. A retry after a chunk
    failed sends the same chunks: those stored change nothing."""
    store, client = redis_store
    monkeypatch.setattr(redis_usage, "CHUNK_FIELDS", 2)
    day = "2026-12-07"
    rows = {(day, f"t{i}", "m"): {"requests": 1, "prompt_tokens": i + 1} for i in range(3)}
    real, calls = store._add_once, []

    async def second_fails(**kwargs: Any) -> Any:
        calls.append(kwargs["keys"][0])
        if len(calls) == 2:
            raise TimeoutError("the store's answer did not come in time")
        return await real(**kwargs)
    monkeypatch.setattr(store, "_add_once", second_fails)
    with pytest.raises(TimeoutError):
        await store.add(rows, "big")
    await store.add(rows, "big")
    assert calls == [f"synapse:usage:batch:big.{n}" for n in (0, 1, 0, 1, 2)]
    stored = await store.read([day], None)
    assert stored == {(day, f"t{i}", "m"): {"requests": 1, "prompt_tokens": i + 1}
                      for i in range(3)}
    assert sorted(k.decode() for k in await client.keys("synapse:usage:batch:*")) == [
        f"synapse:usage:batch:big.{n}" for n in range(3)]
