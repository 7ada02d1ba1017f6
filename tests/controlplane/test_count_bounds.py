"""A count of tokens or choices a request asks for is an integer of at most
validation.MAX_COUNT on every endpoint, or a 400 naming the field (reviewer-107):
``max_tokens: 1e308`` is an integer to JSON, and it made its tenant's fair-queue tag
infinite, which broke the pod's mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from controlplane import errors
from controlplane.core import anthropic_request, api_calls, validation

MESSAGES = [{"role": "user", "content": "x"}]
CHAT = {"model": "m", "messages": MESSAGES}
COMPLETION = {"model": "m", "prompt": "x"}

CASES: list[tuple[Callable[[dict[str, Any]], object], dict[str, Any], str]] = [
    (validation.chat, CHAT, "max_tokens"),
    (validation.chat, CHAT, "max_completion_tokens"),
    (validation.chat, CHAT, "n"),
    (validation.completions, COMPLETION, "max_tokens"),
    (api_calls.responses, {"model": "m", "input": "x"}, "max_output_tokens"),
    (anthropic_request.to_chat, {"model": "m", "messages": MESSAGES, "max_tokens": 1},
     "max_tokens"),
]


@pytest.mark.parametrize(("parse", "body", "field"), CASES)
@pytest.mark.parametrize("value", [1e308, 2**63, validation.MAX_COUNT + 1])
def test_a_count_past_the_bound_is_a_400_naming_its_field(
        parse: Callable[[dict[str, Any]], object], body: dict[str, Any], field: str,
        value: object) -> None:
    if isinstance(value, float) and parse is not validation.chat \
            and parse is not validation.completions:
        value = int(value)          # the others take no float at all
    with pytest.raises(errors.BadRequest) as info:
        parse({**body, field: value})
    assert info.value.param == field


@pytest.mark.parametrize(("parse", "body", "field"), CASES)
def test_a_count_at_the_bound_is_taken(parse: Callable[[dict[str, Any]], object],
                                       body: dict[str, Any], field: str) -> None:
    parse({**body, field: validation.MAX_COUNT})


@pytest.mark.parametrize(("value", "shown"), [(validation.MAX_COUNT + 1, "2147483648"),
                                             (10**400, "an integer of more than 20 digits")])
def test_the_400_quotes_a_count_exactly_unless_it_is_absurdly_long(value: int,
                                                                   shown: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        validation.chat({**CHAT, "max_tokens": value})
    assert str(info.value).endswith(f"got {shown}")
