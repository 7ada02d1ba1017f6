"""Usage accounting per tenant x model x day, in this process and in Redis shared by two
replicas; a failing store keeps the counts for the next flush."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controlplane.adapters import redis_limits, redis_usage
from controlplane.core import usage_book
from tests import harness

DAY1 = datetime.datetime(2026, 3, 14, 23, 0, tzinfo=datetime.UTC).timestamp()
DAY2 = DAY1 + 2 * 3600
T = TypeVar("T")


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def again(call: Callable[[], Awaitable[T]]) -> T:
    """``call``, tried up to three times: the first call after a Redis restart meets a
    pooled connection the old server closed."""
    for _ in range(2):
        try:
            return await call()
        except Exception:
            continue
    return await call()


def counts(**kw: int | float) -> usage_book.Counts:
    return usage_book.Counts(**kw)  # type: ignore[arg-type]


def test_a_row_adds_up_every_kind_of_count() -> None:
    total = counts()
    one = counts(**{kind: i + 1 for i, kind in enumerate(usage_book.KINDS)})
    total.add(one)
    total.add(one)
    assert total.as_dict() == {kind: 2 * (i + 1) for i, kind in enumerate(usage_book.KINDS)}


async def test_rows_per_day_tenant_and_model_with_pending_counts_visible() -> None:
    wall = Wall(DAY1)
    book = usage_book.UsageBook(usage_book.MemoryUsageStore(), wall)
    book.record("a", "m1", counts(requests=1, prompt_tokens=10, completion_tokens=5))
    book.record("a", "m1", counts(requests=1, prompt_tokens=1, completion_tokens=2,
                                  cached_tokens=1, cost=0.5))
    await book.flush()
    book.record("a", "m2", counts(requests=1, cache_hit_tokens=9))
    wall.now = DAY2                                 # past midnight UTC
    book.record("b", "m1", counts(requests=1, errors=1))
    rows = await book.query(since_s=86_400)
    assert [(r.key.day, r.key.tenant, r.key.model) for r in rows] == [
        ("2026-03-14", "a", "m1"), ("2026-03-14", "a", "m2"), ("2026-03-15", "b", "m1")]
    assert rows[0].counts == counts(requests=2, prompt_tokens=11, completion_tokens=7,
                                    cached_tokens=1, cost=0.5)
    assert [r.key.tenant for r in await book.query("b", since_s=3600)] == ["b"]
    assert (await book.query(since_s=60))[0].key.day == "2026-03-15"


async def test_two_replicas_add_up_in_redis_and_survive_a_failed_flush(
        redis_server: harness.RedisServer) -> None:
    clients = [redis_limits.connect(redis_server.url) for _ in range(2)]
    books = [usage_book.UsageBook(redis_usage.RedisUsageStore(c, 2.0, 30), Wall(DAY1))
             for c in clients]
    for i, book in enumerate(books):
        book.record("a", "org/model:v1", counts(requests=1, prompt_tokens=100 + i,
                                                completion_tokens=20, cost=0.25))
        await book.flush()
    rows = await books[0].query("a", since_s=3600)
    assert len(rows) == 1 and rows[0].key.model == "org/model:v1"
    assert rows[0].counts == counts(requests=2, prompt_tokens=201, completion_tokens=40,
                                    cost=0.5)
    redis_server.kill()
    books[1].record("a", "org/model:v1", counts(requests=1, prompt_tokens=7))
    try:
        await books[1].flush()
    except Exception:
        pass
    else:
        raise AssertionError("a flush to a dead Redis should fail")
    redis_server.start()             # a fresh, empty Redis on the same port
    await again(books[1].flush)      # the failed flush's counts were kept
    rows = await again(lambda: books[0].query("a", since_s=3600))
    assert rows[0].counts == counts(requests=1, prompt_tokens=7)
    for c in clients:
        await c.aclose()
