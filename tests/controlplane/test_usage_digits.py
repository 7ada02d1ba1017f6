"""The engine's token counts as engines write them (plain digits, read without the
whole-number regex) and at the edges of :func:`controlplane.core.usage.from_tail`'s rule:
the cap, leading zeros, spaces, a whole number written with a fraction, a repeated name."""

from __future__ import annotations

import pytest

from controlplane.core import usage


@pytest.mark.parametrize(("raw", "count"), [
    (b"2147483647", 2147483647),        # the cap itself, in as many digits as it has
    (b"2147483648", None),              # one more
    (b"9999999999", None),
    (b"000000000000017", 17),           # leading zeros beyond the cap's digits
    (b" 17 ", 17),
    (b"17.0", 17),
    (b"0", 0),
])
def test_a_count_as_engines_write_it_and_at_its_edges(raw: bytes, count: int | None) -> None:
    found = usage.from_tail(b'{"usage":{"prompt_tokens":%s,"completion_tokens":1}}' % raw)
    assert found == (None if count is None else usage.Usage(count, 1, None))


def test_a_count_over_the_cap_is_no_usage_even_when_a_later_one_repeats_its_name() -> None:
    assert usage.from_tail(b'{"usage":{"prompt_tokens":9999999999,"prompt_tokens":5,'
                           b'"completion_tokens":1}}') is None
    assert usage.from_tail(b'{"usage":{"prompt_tokens":7,"prompt_tokens":5,'
                           b'"completion_tokens":1}}') == usage.Usage(5, 1, None)
