"""The price table (``fairness.prices``): what a request costs, for cost budgets and usage.

Prices are per million tokens, per canonical model; a model without a price costs 0 (a
cost budget then only counts priced models). Prompt tokens the engine took from its
prefix cache are priced at ``cached_prompt_per_million`` when it is set, as providers
bill them; at admission nothing is known to be cached, so the estimate is the dearer one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

MILLION = 1_000_000.0


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    prompt: float = 0.0             # per million prompt tokens
    completion: float = 0.0         # per million completion tokens
    cached_prompt: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(max(0, cached_tokens), prompt_tokens)
        cached_price = self.prompt if self.cached_prompt is None else self.cached_prompt
        return ((prompt_tokens - cached) * self.prompt + cached * cached_price
                + completion_tokens * self.completion) / MILLION


FREE = Price()


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)

    def __bool__(self) -> bool:
        return bool(self._prices)

    def price(self, model: str) -> Price:
        return self._prices.get(model, FREE)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0) -> float:
        if not self._prices:
            return 0.0
        return self.price(model).cost(prompt_tokens, completion_tokens, cached_tokens)
