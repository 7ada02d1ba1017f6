"""Token limits and budgets: the rule in this process, the same rule in Redis shared by two
replicas, settlement from usage, and the errors a client sees."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence

import pytest

from controlplane import errors
from controlplane.adapters import redis_limits, redis_tokens
from controlplane.core import token_limits
from tests import harness
from tests.clock import ManualClock

NOON = datetime.datetime(2026, 3, 14, 12, 0, tzinfo=datetime.UTC).timestamp()
TPM = token_limits.ScopeRule("t", "", tokens_per_minute=600)
TOKENS_BUDGET = token_limits.ScopeRule("t", "", budget=token_limits.Budget("day", 1000,
                                                                           "tokens"))


def local(clock: ManualClock, wall: float = NOON) -> token_limits.TokenLimiter:
    return token_limits.TokenLimiter(token_limits.LocalTokenStore(clock), wall=lambda: wall)


async def test_tokens_per_minute_charges_the_estimate_and_refills() -> None:
    clock = ManualClock()
    limiter = local(clock)
    await limiter.admit("t", "m", [TPM], 200, 300)       # 500 of 600
    with pytest.raises(errors.RateLimited) as err:
        await limiter.admit("t", "m", [TPM], 100, 100)   # needs 200, 100 left
    assert err.value.limit == "tokens_per_minute"
    assert err.value.retry_after_s == pytest.approx(10.0)   # 100 tokens at 10/s
    assert "600 tokens per minute" in err.value.message and "'t'" in err.value.message
    assert err.value.http_status == 429 and err.value.headers()["Retry-After"] == "10"
    clock.now = 10.0
    await limiter.admit("t", "m", [TPM], 100, 100)


async def test_settlement_refunds_what_usage_did_not_use() -> None:
    clock = ManualClock()
    limiter = local(clock)
    charge = await limiter.admit("t", "m", [TPM], 100, 500)   # 600: the whole bucket
    with pytest.raises(errors.RateLimited):
        await limiter.admit("t", "m", [TPM], 10, 10)
    await limiter.settle(charge, 150, 0.0)      # the engine used 150 of the 600
    await limiter.admit("t", "m", [TPM], 200, 200)
    await limiter.settle(charge, 150, 0.0)      # settling twice changes nothing
    with pytest.raises(errors.RateLimited):
        await limiter.admit("t", "m", [TPM], 10, 50)


async def test_a_request_larger_than_the_minute_passes_on_a_full_bucket() -> None:
    clock = ManualClock()
    limiter = local(clock)
    await limiter.admit("t", "m", [TPM], 1000, 200)  # more than a minute's worth
    with pytest.raises(errors.RateLimited) as err:
        await limiter.admit("t", "m", [TPM], 1, 1)
    # the bucket is 600 in debt: 602 tokens to wait for at 10 tokens/s
    assert err.value.retry_after_s == pytest.approx(60.2)


async def test_budget_refuses_once_spent_and_resets_with_the_period() -> None:
    clock = ManualClock()
    limiter = local(clock)
    await limiter.admit("t", "m", [TOKENS_BUDGET], 500, 400)
    await limiter.admit("t", "m", [TOKENS_BUDGET], 50, 50)   # 1000 spent: at the budget
    with pytest.raises(errors.BudgetExceeded) as err:
        await limiter.admit("t", "m", [TOKENS_BUDGET], 1, 1)
    envelope = err.value.envelope()["error"]
    assert err.value.http_status == 429 and envelope["code"] == "budget_exceeded"
    assert "budget of 1000 tokens per day" in envelope["message"]
    assert err.value.headers()["Retry-After"] == str(12 * 3600)  # to UTC midnight
    tomorrow = local(clock, NOON + 86_400)
    tomorrow._local = limiter._local                            # same store, next day
    await tomorrow.admit("t", "m", [TOKENS_BUDGET], 1, 1)


async def test_cost_budget_uses_the_charges_cost_and_settles_it() -> None:
    clock = ManualClock()
    limiter = local(clock)
    rule = token_limits.ScopeRule("t", "m", budget=token_limits.Budget("month", 1.0, "cost"))
    charge = await limiter.admit("t", "m", [rule], 100, 100, cost=0.9)
    await limiter.settle(charge, 100, 0.2)                  # really cost 0.2
    await limiter.admit("t", "m", [rule], 100, 100, cost=0.7)  # 0.9 spent now
    await limiter.admit("t", "m", [rule], 100, 100, cost=0.7)  # 0.9 < 1.0: still allowed
    with pytest.raises(errors.BudgetExceeded) as err:
        await limiter.admit("t", "m", [rule], 1, 1, cost=0.01)
    assert "on model 'm'" in err.value.message and "per month" in err.value.message


async def test_a_budget_whose_unit_changes_starts_a_spend_of_its_own() -> None:
    """A spend is kept in its budget's unit (and, without Redis, across restarts): read
    in another unit, a spend of tokens refused a request of a small cost until the month
    ended, and a cost spend read as tokens reset the budget."""
    clock = ManualClock()
    limiter = local(clock)
    tokens = token_limits.ScopeRule("t", "m", budget=token_limits.Budget("month", 30_000,
                                                                         "tokens"))
    cost = token_limits.ScopeRule("t", "m", budget=token_limits.Budget("month", 50.0, "cost"))
    await limiter.admit("t", "m", [tokens], 10_000, 10_000)
    await limiter.admit("t", "m", [cost], 1, 1, cost=0.02)     # the same tenant and model
    await limiter.admit("t", "m", [cost], 1, 1, cost=45.0)
    await limiter.admit("t", "m", [tokens], 1, 1)              # 20,002 of 30,000
    # a token budget's spend keeps the key it had before units were told apart
    assert [a.budget_key for a in limiter.asks([tokens], 1, 0.0)] == ["t\x1fm\x1f2026-03"]


async def test_redis_limits_hold_across_two_replicas_and_fall_back(
        redis_server: harness.RedisServer) -> None:
    failures: list[Exception] = []
    clients = [redis_limits.connect(redis_server.url) for _ in range(2)]
    replicas = [token_limits.TokenLimiter(
        token_limits.LocalTokenStore(ManualClock()), redis_tokens.RedisTokenStore(c, 1.0),
        failures.append, wall=lambda: NOON) for c in clients]
    both = [TPM, TOKENS_BUDGET]
    first = await replicas[0].admit("t", "m", both, 200, 300)
    with pytest.raises(errors.RateLimited) as err:       # the other replica sees the charge
        await replicas[1].admit("t", "m", both, 100, 100)
    assert err.value.limit == "tokens_per_minute" and 9.5 < err.value.retry_after_s <= 10.5
    await replicas[0].settle(first, 100, 0.0)            # 400 refunded, visible to both
    second = await replicas[1].admit("t", "m", both, 200, 200)
    await replicas[1].settle(second, 400, 0.0)
    # budget: 100 + 400 spent of 1000; another replica's 500 reaches it
    await replicas[0].admit("t", "other", [TOKENS_BUDGET], 250, 250)
    with pytest.raises(errors.BudgetExceeded):
        await replicas[1].admit("t", "m", [TOKENS_BUDGET], 1, 1)
    assert not failures
    redis_server.kill()
    # Redis gone: each replica limits on its own instead of failing the request
    await replicas[0].admit("t", "m", both, 1, 1)
    assert failures
    for c in clients:
        await c.aclose()


async def test_local_and_redis_stores_agree_on_the_same_cases(
        redis_server: harness.RedisServer) -> None:
    client = redis_limits.connect(redis_server.url)
    shared = redis_tokens.RedisTokenStore(client, 1.0, prefix="synapse:agree:")
    store = token_limits.LocalTokenStore(ManualClock())
    rules = [TPM, token_limits.ScopeRule("t", "m", tokens_per_minute=10_000,
                                         budget=token_limits.Budget("day", 700, "tokens"))]
    limiter = token_limits.TokenLimiter(store, wall=lambda: NOON)
    cases = [(100, 100), (100, 100), (50, 50), (100, 100), (1, 1), (500, 500)]
    for prompt, completion in cases:
        asks = limiter.asks(rules, prompt + completion, 0.0)
        mine = store.check(asks)
        theirs = token_limits.Verdict(*await shared.admit(asks))
        assert (mine.allowed, mine.limit, mine.index) == (theirs.allowed, theirs.limit,
                                                          theirs.index)
    await client.aclose()


class _SlowStore:
    """A shared token store whose reply comes when the test says, after its script has
    charged the estimate (as Redis's runs before its reply reaches the caller)."""

    def __init__(self) -> None:
        self.reply = asyncio.Event()
        self.charged = 0

    async def admit(self, asks: Sequence[token_limits.Ask]) -> tuple[bool, float, str, int]:
        self.charged += asks[0].tokens
        await self.reply.wait()
        return True, 0.0, "", 0

    async def settle(self, asks: Sequence[token_limits.Ask], tokens_delta: Sequence[int],
                     budget_delta: Sequence[float]) -> None:
        self.charged -= tokens_delta[0]


async def test_an_admission_cancelled_while_the_store_decides_charges_nothing() -> None:
    """The client went away while the store's answer was on its way: the estimate it
    charged is taken back once the answer comes (before, it stayed charged against the
    tenant's minute and budget: no charge existed to settle)."""
    store = _SlowStore()
    limiter = token_limits.TokenLimiter(token_limits.LocalTokenStore(ManualClock()), store,
                                        wall=lambda: NOON)
    asking = asyncio.create_task(limiter.admit("t", "m", [TPM], 100, 200))
    await harness.until(lambda: store.charged == 300, 5, "the store's script ran")
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    store.reply.set()
    await harness.until(lambda: store.charged == 0, 5, "the estimate taken back")
