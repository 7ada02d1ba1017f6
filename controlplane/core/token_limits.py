"""Token limits and budgets per tenant (and per tenant x model): the rule, in one place.

Two rules per scope (a tenant, or a tenant on one model):

* **Tokens per minute** — a bucket of ``tokens_per_minute`` tokens refilled at
  ``tokens_per_minute / 60`` a second. Admission charges the request's estimate (prompt
  tokens + ``max_tokens``, or ``fairness.default_completion_tokens`` without it) and needs
  the bucket to hold that much (at most a full bucket, so a request larger than the
  minute's allowance still passes once the bucket is full); the bucket may go negative.
  Settlement adds back the estimate minus what the engine's ``usage`` says was used, so
  the bucket ends up charged with the real count; a refund never overfills it.
* **Budget per period** (UTC day or month) — in tokens or in cost (the model's prices).
  Admission refuses once the period's spend has reached the budget and otherwise charges
  the estimate at once, so concurrent requests see each other's estimates and the
  overshoot is at most one request's estimate; settlement corrects the spend to the real
  figure. ``Retry-After`` is the time to the next period.

Charging estimates at admission (instead of leasing reservations) means a replica that
dies between admission and settlement leaves its estimates charged: conservative, and
with no lease to expire. A request that failed before any answer is refunded in full.

Where the state lives is a :class:`TokenStore`: :class:`LocalTokenStore` in this process,
or ``controlplane.adapters.redis_tokens`` (one Lua script per admission and one per
settlement, so limits hold across replicas; the scripts implement exactly the arithmetic
of :class:`LocalTokenStore`, and a test drives both with the same cases). Like the rate
limiter, a failing Redis falls back to the local store: a limiter outage is not an API
outage, and the local store still bounds each replica.

Without Redis the local store is the budgets' only home, and a restart would give every
tenant a fresh budget: its spends are written behind to ``data_dir``
(``controlplane.adapters.usage_db``, by the usage flush loop) and restored at start-up.
The store only says which spends changed (:meth:`LocalTokenStore.changed_spends`) and
takes them back (:meth:`LocalTokenStore.restore_spends`); the arithmetic stays here.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol, cast

from controlplane import errors
from synapse_common import aiotasks
from synapse_common import clock as clocks

Period = Literal["day", "month"]
Unit = Literal["tokens", "cost"]
TPM = "tokens_per_minute"
BUDGET = "budget"


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    period: Period
    limit: float
    unit: Unit


@dataclasses.dataclass(frozen=True, slots=True)
class ScopeRule:
    """The limits of one scope; ``model`` empty = every model of the tenant."""

    tenant: str
    model: str
    tokens_per_minute: int | None = None
    budget: Budget | None = None

    @property
    def key(self) -> str:
        return f"{self.tenant}\x1f{self.model}"

    def describe(self) -> str:
        return (f"tenant {self.tenant!r}" if not self.model
                else f"tenant {self.tenant!r} on model {self.model!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    """One scope's part of an admission: what to check and what to charge."""

    bucket: str                 # the tokens-per-minute bucket's key ("" = no such limit)
    tokens_per_minute: int
    tokens: int                 # the estimate charged to the bucket
    budget_key: str             # the period's spend key ("" = no budget)
    budget_limit: float
    budget_amount: float        # the estimate charged to the budget (tokens or cost)
    budget_ttl_s: float         # seconds to the end of the period
    budget_in_cost: bool = False  # the budget counts cost, not tokens


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""             # TPM | BUDGET
    index: int = -1             # which ask refused


@dataclasses.dataclass(slots=True)
class Charge:
    """What an admission charged, for its settlement."""

    tenant: str
    model: str
    asks: tuple[Ask, ...]
    prompt_tokens: int          # the estimate's parts
    completion_tokens: int
    cost: float
    store: TokenStore | None    # None: nothing was charged
    settled: bool = False

    @property
    def to_correct(self) -> bool:
        """Whether settling it changes a store (something was charged, not yet settled)."""
        return self.store is not None and not self.settled


class TokenStore(Protocol):
    async def admit(self, asks: Sequence[Ask]) -> tuple[bool, float, str, int]:
        """(allowed, retry after seconds, the limit that refused, which ask refused)."""
        ...

    async def settle(self, asks: Sequence[Ask], tokens_delta: Sequence[int],
                     budget_delta: Sequence[float]) -> None: ...


# -- periods (UTC, from a wall clock) ----------------------------------------------------


def period_id(period: Period, wall_s: float) -> str:
    d = datetime.datetime.fromtimestamp(wall_s, datetime.UTC)
    return d.strftime("%Y-%m-%d") if period == "day" else d.strftime("%Y-%m")


def period_left_s(period: Period, wall_s: float) -> float:
    """Seconds from ``wall_s`` to the start of the next period."""
    d = datetime.datetime.fromtimestamp(wall_s, datetime.UTC)
    start = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + datetime.timedelta(days=1)
    else:
        days = calendar.monthrange(d.year, d.month)[1]
        end = start.replace(day=1) + datetime.timedelta(days=days)
    return max(1.0, (end - d).total_seconds())


# -- the local store -----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Bucket:
    level: float
    stamp: float


class LocalTokenStore:
    """The rule held in this process (no Redis, or Redis failing)."""

    def __init__(self, clock: clocks.Clock) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._spent: dict[str, tuple[float, float]] = {}   # key -> (spent, expires at)
        self._changed: set[str] = set()     # spends a copy on disk has not seen yet
        # called when a charge takes a budget's spend to its limit: a copy on disk
        # writes it at once rather than at its next round
        self.on_budget_spent: Callable[[], None] | None = None

    def _level(self, key: str, tpm: int, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(tpm), now)
        b.level = min(float(tpm), b.level + max(0.0, now - b.stamp) * tpm / 60.0)
        b.stamp = now
        return b

    def _spend(self, key: str, now: float) -> float:
        spent, expires = self._spent.get(key, (0.0, 0.0))
        return spent if expires > now else 0.0

    def check(self, asks: Sequence[Ask]) -> Verdict:
        now = self._clock()
        for i, a in enumerate(asks):
            if a.bucket:
                b = self._level(a.bucket, a.tokens_per_minute, now)
                want = min(a.tokens, a.tokens_per_minute)
                if b.level < want:
                    return Verdict(False, (want - b.level) * 60.0 / a.tokens_per_minute, TPM, i)
            if a.budget_key and self._spend(a.budget_key, now) >= a.budget_limit:
                return Verdict(False, a.budget_ttl_s, BUDGET, i)
        spent_up = False
        for a in asks:
            if a.bucket:
                self._buckets[a.bucket].level -= a.tokens
            if a.budget_key:
                self._add(a.budget_key, a.budget_amount, a.budget_ttl_s, now)
                spent_up = spent_up or self._spent[a.budget_key][0] >= a.budget_limit
        if spent_up and self.on_budget_spent is not None:
            self.on_budget_spent()
        return Verdict(True)

    def _add(self, key: str, amount: float, ttl_s: float, now: float) -> None:
        spent, expires = self._spent.get(key, (0.0, 0.0))
        if expires <= now:
            spent, expires = 0.0, now + ttl_s
        self._spent[key] = (spent + amount, expires)
        self._changed.add(key)

    def correct(self, asks: Sequence[Ask], tokens_delta: Sequence[int],
                budget_delta: Sequence[float]) -> None:
        """Apply a settlement: ``tokens_delta`` (estimate - used) back into each bucket,
        ``budget_delta`` (used - estimate) onto each period's spend."""
        now = self._clock()
        spent_up = False
        for a, dt, db in zip(asks, tokens_delta, budget_delta, strict=True):
            if a.bucket:
                b = self._level(a.bucket, a.tokens_per_minute, now)
                b.level = min(float(a.tokens_per_minute), b.level + dt)
            if a.budget_key and a.budget_key in self._spent:
                spent, expires = self._spent[a.budget_key]
                self._spent[a.budget_key] = (max(0.0, spent + db), expires)
                self._changed.add(a.budget_key)
                spent_up = spent_up or spent < a.budget_limit <= spent + db
        if spent_up and self.on_budget_spent is not None:
            self.on_budget_spent()

    def spent(self, key: str) -> float:
        return self._spend(key, self._clock())

    def changed_spends(self, wall_now: float) -> dict[str, tuple[float, float]]:
        """The budget spends changed since the last call (periods not yet ended), each
        key -> (spent, wall-clock end of its period): what a copy on disk has to write.
        Periods that ended are forgotten here."""
        now = self._clock()
        keys, self._changed = self._changed, set()
        out = {}
        for key in keys:
            spent, expires = self._spent.get(key, (0.0, 0.0))
            if expires > now:
                out[key] = (spent, wall_now + (expires - now))
        for key in [k for k, (_, expires) in self._spent.items() if expires <= now]:
            del self._spent[key]
        return out

    def unsaved(self, keys: Iterable[str]) -> None:
        """Spends :meth:`changed_spends` gave that could not be written: give them again."""
        self._changed.update(keys)

    def restore_spends(self, spends: Mapping[str, tuple[float, float]],
                       wall_now: float) -> None:
        """Add spends an earlier run kept (key -> (spent, wall-clock end of its period))."""
        now = self._clock()
        for key, (amount, wall_end) in spends.items():
            if wall_end > wall_now and amount > 0:
                spent = self._spend(key, now)
                self._spent[key] = (spent + amount, now + (wall_end - wall_now))

    async def admit(self, asks: Sequence[Ask]) -> tuple[bool, float, str, int]:
        v = self.check(asks)
        return v.allowed, v.retry_after_s, v.limit, v.index

    async def settle(self, asks: Sequence[Ask], tokens_delta: Sequence[int],
                     budget_delta: Sequence[float]) -> None:
        self.correct(asks, tokens_delta, budget_delta)


# -- the limiter ------------------------------------------------------------------------


class TokenLimiter:
    """Admission and settlement against the rules of a tenant (and the model)."""

    def __init__(self, local: LocalTokenStore, shared: TokenStore | None = None,
                 on_store_error: Callable[[Exception], None] | None = None,
                 wall: clocks.Clock = clocks.wall) -> None:
        self._local = local
        self._shared = shared
        self._on_error = on_store_error
        self._wall = wall

    @property
    def local(self) -> LocalTokenStore:
        """This process's store (the only one without Redis, the fallback with it)."""
        return self._local

    def asks(self, rules: Sequence[ScopeRule], tokens: int, cost: float) -> tuple[Ask, ...]:
        now = self._wall()
        out = []
        for r in rules:
            budget_key, ttl, amount, limit, in_cost = "", 0.0, 0.0, 0.0, False
            if r.budget is not None:
                budget_key = f"{r.key}\x1f{period_id(r.budget.period, now)}"
                if r.budget.unit == "cost":
                    # a spend is in the budget's unit: a budget whose unit changes starts
                    # a spend of its own (tokens read as cost locked a tenant out for the
                    # period; cost read as tokens reset it). Token budgets keep the key
                    # they always had, so their spends outlive an upgrade.
                    budget_key += "\x1fcost"
                ttl = period_left_s(r.budget.period, now)
                in_cost = r.budget.unit == "cost"
                amount = cost if in_cost else float(tokens)
                limit = r.budget.limit
            out.append(Ask(r.key if r.tokens_per_minute else "", r.tokens_per_minute or 0,
                           tokens, budget_key, limit, amount, ttl, in_cost))
        return tuple(out)

    async def admit(self, tenant: str, model: str, rules: Sequence[ScopeRule],
                    prompt_tokens: int, completion_tokens: int, cost: float = 0.0) -> Charge:
        """A charge, or :class:`errors.RateLimited` / :class:`errors.BudgetExceeded`
        naming the limit and its scope."""
        tokens = prompt_tokens + completion_tokens
        if not rules:
            return Charge(tenant, model, (), prompt_tokens, completion_tokens, cost, None)
        asks = self.asks(rules, tokens, cost)
        store: TokenStore = self._local
        verdict: Verdict | None = None
        if self._shared is not None:
            shared = self._shared
            charge = Charge(tenant, model, asks, prompt_tokens, completion_tokens, cost, shared)
            try:
                # outlives the caller's cancellation: the store's script may have charged
                # the estimate before its reply came, with no charge left to settle
                verdict = Verdict(*await aiotasks.outliving(
                    shared.admit(asks),
                    lambda answer: self.settle(charge, 0, 0.0) if answer[0] else None,
                    self._on_error))
                store = shared
            except Exception as exc:  # fall back to this replica's own; counted by caller
                if self._on_error:
                    self._on_error(exc)
        if verdict is None:
            verdict = self._local.check(asks)
        if not verdict.allowed:
            raise refusal(rules[verdict.index], verdict, tokens)
        return Charge(tenant, model, asks, prompt_tokens, completion_tokens, cost, store)

    async def settle(self, charge: Charge, tokens_used: int, cost_used: float) -> None:
        """Correct ``charge`` to what was really used (0, 0 for a request that got no
        answer). Idempotent; never raises."""
        if not charge.to_correct:
            return
        store = cast(TokenStore, charge.store)   # to_correct: a store was charged
        charge.settled = True
        estimate = charge.prompt_tokens + charge.completion_tokens
        if tokens_used == estimate and cost_used == charge.cost:
            return
        tokens_delta = [estimate - tokens_used for _ in charge.asks]
        budget_delta = [cost_used - charge.cost if a.budget_in_cost
                        else float(tokens_used - estimate) for a in charge.asks]
        try:
            await store.settle(charge.asks, tokens_delta, budget_delta)
        except Exception as exc:  # the estimate stays charged: conservative
            if self._on_error:
                self._on_error(exc)


def refusal(rule: ScopeRule, verdict: Verdict, tokens: int) -> errors.SynapseError:
    if verdict.limit == BUDGET and rule.budget is not None:
        b = rule.budget
        amount = f"{b.limit:g} tokens" if b.unit == "tokens" else f"a cost of {b.limit:g}"
        return errors.BudgetExceeded(
            f"{rule.describe()} has used its budget of {amount} per {b.period}; it resets "
            f"in {verdict.retry_after_s:.0f}s", retry_after_s=verdict.retry_after_s,
            limit=BUDGET)
    return errors.RateLimited(
        f"{rule.describe()} is over its limit of {rule.tokens_per_minute} tokens per minute "
        f"(this request counts {tokens}: prompt + max_tokens); retry after "
        f"{verdict.retry_after_s:.2f}s", retry_after_s=verdict.retry_after_s, limit=TPM)
