"""Tenants sharing a fleet: what the serving path asks at admission, queueing and the end.

One object, :class:`Fairness`, built once from the settings, puts together the parts
that each hold one rule — :mod:`token_limits` (tokens per minute, budgets),
:mod:`pricing`, :mod:`usage_book` (accounting), :mod:`fair_queue` (priority classes and
weighted fair queuing) — and answers the serving path's four questions:

* :meth:`admit` (before routing, after a cache miss): may this request spend its estimate
  (prompt tokens + ``max_tokens`` for each sequence it generates: ``n`` choices, times
  the prompts of a completions batch)? A :class:`token_limits.Charge`, or a 429 naming the
  limit. Cache hits are not admitted: they cost no engine tokens.
* :meth:`must_wait` / :meth:`hold` (after routing): are the chosen backends saturated —
  the best candidate's seats all taken or the prefill queued ahead there above
  ``fairness.queue.max_queue_wait_s`` (:mod:`saturation`, the one rule), or requests of
  the model and of the same or a higher class already waiting — and if so, wait for a
  fair turn.
* :meth:`settle` (when the answer ended): correct the charge to the engine's ``usage``
  and account it per tenant x model x day; a cache hit is accounted as tokens saved.

A stream that ended without the engine's usage (cut by its client or by the engine) is
accounted from an estimate (``usage.estimated``: the prompt's tokens and the content
deltas relayed), counted in the row's ``estimated`` requests. The limiter's charge is not
corrected to it: the estimate is a floor (tokens the engine generated past the cut are
unseen), so the charge keeps its admitted figure, as for any answer of unknown size —
cutting a stream never buys back tokens per minute or budget. A whole answer of a path
that generates but carries no usage (an engine that answered before generating, as a
background response does, or one that reports none) is accounted at the estimate it was
admitted with, counted ``estimated`` too: the figure its charge keeps, rather than a free
request.

A tenant's priority class and weight are its config's (``auth.tenants[].priority``,
``weight``); a request may name another configured class in the ``fairness.queue.header``
header only when its tenant has ``priority_header: true`` (otherwise the header is
ignored, so that a tenant cannot promote itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from controlplane import errors
from controlplane.core import (
    coalesce,
    fair_queue,
    pricing,
    saturation,
    token_limits,
    types,
    usage_book,
)
from controlplane.core import usage as usage_mod


@dataclasses.dataclass(frozen=True, slots=True)
class TenantPolicy:
    tenant: token_limits.ScopeRule | None = None
    models: Mapping[str, token_limits.ScopeRule] = dataclasses.field(default_factory=dict)
    priority: str = "interactive"
    weight: float = 1.0
    priority_header: bool = False

    def rules(self, model: str) -> tuple[token_limits.ScopeRule, ...]:
        own = self.models.get(model)
        if self.tenant is None:
            return (own,) if own is not None else ()
        return (self.tenant, own) if own is not None else (self.tenant,)


DEFAULT_POLICY = TenantPolicy()


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    default_completion_tokens: int = 256


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How a request that was admitted ended."""

    usage: usage_mod.Usage | None   # the engine's, or an estimate (``estimated``)
    answered: bool                  # the backend answered (a byte reached the client)
    failed: bool                    # an error status, or a stream cut mid-way


class TokenObserver:
    """Where accounted tokens go besides the book (metrics); no-op by default."""

    def tokens(self, tenant: str, model: str, kind: str, count: int) -> None:
        return None


class Fairness:
    def __init__(self, policies: Mapping[str, TenantPolicy], limiter: token_limits.TokenLimiter,
                 prices: pricing.PriceTable, book: usage_book.UsageBook | None,
                 gate: fair_queue.Gate | None, options: Options,
                 observer: TokenObserver | None = None,
                 coalescer: coalesce.Coalescer | None = None,
                 saturated: saturation.Saturation | None = None) -> None:
        self.policies = dict(policies)
        self.limiter = limiter
        self.prices = prices
        self.book = book
        self.gate = gate
        self.options = options
        self.coalescer = coalescer      # identical cacheable requests in flight share one
        self.saturation = saturated     # the queue's rule (None: no queue)
        self._observer = observer or TokenObserver()

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, DEFAULT_POLICY)

    # -- admission ------------------------------------------------------------------------

    def completion_estimate(self, max_tokens: int) -> int:
        return max_tokens if max_tokens > 0 else self.options.default_completion_tokens

    async def admit(self, tenant: str, model: str, prompt_tokens: int,
                    max_tokens: int, sequences: int = 1) -> token_limits.Charge:
        """``sequences``: the completions the request generates (``n``, times the prompts
        of a batch), each up to ``max_tokens``; the engine's usage counts them all."""
        completion = self.completion_estimate(max_tokens) * max(1, sequences)
        rules = self.policy(tenant).rules(model)
        cost = self.prices.cost(model, prompt_tokens, completion) if rules else 0.0
        return await self.limiter.admit(tenant, model, rules, prompt_tokens, completion, cost)

    # -- the fair queue -------------------------------------------------------------------

    def priority_of(self, tenant: str, header: str | None) -> tuple[str, float]:
        """The request's class and its tenant's weight."""
        p = self.policy(tenant)
        if header and p.priority_header:
            cls = header.strip()
            if self.gate is not None and cls not in self.gate.classes:
                raise errors.BadRequest(
                    f"priority class {cls!r} is not configured; the classes are "
                    f"{', '.join(self.gate.classes)}", param="priority", code="bad_priority")
            return cls, p.weight
        return p.priority, p.weight

    def must_wait(self, route: types.RouteDecision, cls: str) -> bool:
        """Whether a request of class ``cls`` routed so waits for a fair turn."""
        if self.gate is None:
            return False
        if self.gate.busy(route.model, cls):     # its class or a higher one waits
            return True
        best = route.candidates[0] if route.candidates else None
        return (best is not None and self.saturation is not None
                and self.saturation.saturated(best, self.top(cls), route.prompt.sequences))

    def top(self, cls: str) -> bool:
        """Whether ``cls`` is the highest class (it may take the reserved seats)."""
        return self.gate is None or cls == self.gate.classes[0]

    def room_first(self, route: types.RouteDecision, cls: str) -> types.RouteDecision:
        """``route`` with its best candidate that has room for all of the request's seats
        first, or else (released after holding seats as long as it may) its best with one
        seat free: a request released from the queue takes the seats that freed, not ones
        the router merely ranks higher on a backend that is still full."""
        if self.saturation is None:
            return route
        top, sequences = self.top(cls), route.prompt.sequences
        for need in ((sequences, 1) if sequences > 1 else (1,)):
            for i, v in enumerate(route.candidates):
                if not self.saturation.saturated(v, top, need):
                    if i == 0:
                        return route
                    rest = route.candidates[:i] + route.candidates[i + 1:]
                    return dataclasses.replace(route, candidates=(v, *rest))
        return route

    async def hold(self, route: types.RouteDecision, tenant: str, cls: str, weight: float,
                   tokens: int) -> float:
        """Wait for a fair turn on ``route.model``'s backends; the seconds waited."""
        assert self.gate is not None
        return await self.gate.wait(route.model, tenant, cls, weight, tokens,
                                    route.prompt.sequences)

    def wake(self, model: str) -> None:
        if self.gate is not None:
            self.gate.wake(model)

    # -- the end --------------------------------------------------------------------------

    async def settle(self, charge: token_limits.Charge, tenant: str, model: str,
                     outcome: Outcome) -> None:
        """Correct the charge, then account the request (never raises)."""
        counts = self._counts(model, outcome)
        if outcome.usage is not None and not outcome.usage.estimated:
            used, cost = counts.prompt_tokens + counts.completion_tokens, counts.cost
        elif outcome.answered:                              # answered, counts unknown
            used, cost = charge.prompt_tokens + charge.completion_tokens, charge.cost
        else:                                               # never answered: refund
            used, cost = 0, 0.0
        await self.limiter.settle(charge, used, cost)
        self._account(tenant, model, counts)
        self.wake(model)

    def record(self, tenant: str, model: str, outcome: Outcome) -> None:
        """Account a request that ended: the usage book, the token metrics, and a wake-up
        for the queue. Synchronous, so a request with no charge to correct (no token
        limit or budget) settles without a task of its own."""
        self._account(tenant, model, self._counts(model, outcome))
        self.wake(model)

    def _counts(self, model: str, outcome: Outcome) -> usage_book.Counts:
        u = outcome.usage
        counts = usage_book.Counts(requests=1, errors=int(outcome.failed))
        if u is not None:
            counts.prompt_tokens, counts.completion_tokens = u.prompt_tokens, u.completion_tokens
            counts.cached_tokens = cached = u.cached_tokens or 0
            counts.cost = self.prices.cost(model, u.prompt_tokens, u.completion_tokens, cached)
            counts.estimated = int(u.estimated)
        return counts

    def cache_hit(self, tenant: str, model: str, response: Mapping[str, object]) -> None:
        """Account an answer served from the response cache: the tokens it saved. Its usage
        is the engine's as stored, so each count passes the engine's rule
        (:func:`usage.count_of`) or counts as 0: an out-of-range count would otherwise reach
        the usage rows on every hit."""
        usage = response.get("usage")
        saved = 0
        if isinstance(usage, Mapping):
            saved = _count(usage.get("prompt_tokens")) + _count(usage.get("completion_tokens"))
        self._account(tenant, model, usage_book.Counts(requests=1, cache_hit_tokens=saved))

    def refused(self, tenant: str, model: str) -> None:
        """Account a request refused after admission began (counted as an error)."""
        self._account(tenant, model, usage_book.Counts(requests=1, errors=1))

    def _account(self, tenant: str, model: str, counts: usage_book.Counts) -> None:
        if self.book is not None:
            self.book.record(tenant, model, counts)
        for kind, n in (("prompt", counts.prompt_tokens), ("completion", counts.completion_tokens),
                        ("cached", counts.cached_tokens), ("cache_hit", counts.cache_hit_tokens)):
            if n:
                self._observer.tokens(tenant, model, kind, n)


def _count(value: object) -> int:
    return usage_mod.count_of(value) or 0
