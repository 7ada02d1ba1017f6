"""Fairness settings (issue 18): token limits, budgets, prices, usage, the priority
queue and coalescing."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from synapse_common.settings import Section


class BudgetSettings(Section):
    period: Literal["day", "month"] = Field("day", description="the budget resets at the "
                                            "start of each UTC day or month")
    tokens: int | None = Field(None, ge=1, description="prompt + completion tokens per period")
    cost: float | None = Field(None, gt=0, description="spend per period, in the currency of "
                               "fairness.prices")

    @pydantic.model_validator(mode="after")
    def _one_unit(self) -> BudgetSettings:
        if (self.tokens is None) == (self.cost is None):
            raise ValueError("a budget sets exactly one of tokens or cost")
        return self


class TokenLimitSettings(Section):
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + completion tokens per minute (completion counted "
        "from max_tokens at admission, settled from usage); none = unlimited")
    budget: BudgetSettings | None = Field(None, description="tokens or cost per day / month")


class PriceSettings(Section):
    prompt_per_million: float = Field(0.0, ge=0, description="price of a million prompt tokens")
    completion_per_million: float = Field(0.0, ge=0,
                                          description="price of a million completion tokens")
    cached_prompt_per_million: float | None = Field(
        None, ge=0, description="price of a million prompt tokens the engine had cached "
        "(none = the prompt price)")


class UsageSettings(Section):
    enabled: bool = Field(True, description="account usage per tenant x model x day")
    flush_interval_s: float = Field(1.0, gt=0, description="how often this replica adds its "
                                    "counts to Redis, or without Redis writes usage and "
                                    "budget spends to data_dir (reads may lag by this much)")
    retention_days: int = Field(62, ge=1, le=3660, description="days of usage kept")


class QueueSettings(Section):
    enabled: bool = Field(False, description="hold requests in a fair queue when the chosen "
                          "backends are saturated, instead of sending them on")
    max_queue_wait_s: float = Field(
        0.1, ge=0, description="queue when the prefill the router predicts queued ahead of "
        "the request on the best backend (streamed requests sent there and not yet at their "
        "first token) is above this many seconds, or when its seats are all taken")
    reserved_seats: float = Field(
        0.01, ge=0, lt=1, description="share of each backend's seats (its learned "
        "concurrency limit, rounded up) that only the highest class may take: its requests "
        "find a seat free at once instead of waiting for one to free behind the others")
    deadline_s: float = Field(30.0, gt=0, description="longest a request waits in the queue "
                              "(then 503 with Retry-After)")
    max_waiting: int = Field(10_000, ge=1, description="requests waiting per model at most "
                             "(503 above)")
    max_waiting_per_tenant: int = Field(1000, ge=1, description="requests one tenant may have "
                                        "waiting per model (429 above)")
    classes: list[str] = Field(["interactive", "batch"], min_length=1,
                               description="priority classes, highest first (strict priority)")
    header: str = Field("x-synapse-priority", min_length=1, description="request header "
                        "naming a class, honoured for tenants with priority_header")
    poll_interval_s: float = Field(0.05, gt=0, description="how often a non-empty queue "
                                   "re-reads the predictions when nothing finished")
    max_seat_hold_s: float = Field(
        2.0, ge=0, description="longest the request at the head of a model's queue holds "
        "the seats that free for it (nothing behind it goes) when it needs more than are "
        "free (n > 1, a batch of prompts); then it goes on with one seat free and the "
        "engine queues the rest. 0: a request goes on whenever one seat is free")

    @pydantic.model_validator(mode="after")
    def _hold_within_deadline(self) -> QueueSettings:
        if self.max_seat_hold_s >= self.deadline_s:
            raise ValueError(f"max_seat_hold_s ({self.max_seat_hold_s:g}) is not below "
                             f"deadline_s ({self.deadline_s:g}): a large request would time "
                             "out holding seats instead of going on")
        return self


class FairnessSettings(Section):
    prices: dict[str, PriceSettings] = Field(
        default_factory=dict, description="per model (name or alias): prices for cost "
        "budgets and usage")
    default_completion_tokens: int = Field(
        256, ge=1, description="completion tokens charged at admission when a request sets "
        "no max_tokens (settled from usage)")
    usage: UsageSettings = Field(default_factory=UsageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    coalesce: bool = Field(True, description="identical cacheable requests in flight at once "
                           "wait for the first one and are answered from it")
