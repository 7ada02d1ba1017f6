"""controlplane.metrics.fast: the serving path's cheaper updates show the same figures on
/metrics as prometheus_client's own."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane import metrics


def _exposition(update: str) -> bytes:
    """The text format after the same updates, made through the children (``plain``) or
    through their fast forms (``fast``)."""
    registry = CollectorRegistry()
    m = metrics.Metrics(registry)
    wrap = metrics.fast if update == "fast" else (lambda child: child)
    tokens = wrap(m.tokens.labels("acme", "llama", "prompt"))
    duration = wrap(m.request_duration.labels("llama", "miss", "/v1/chat/completions"))
    for n in (1, 5, 0, 120):
        tokens.inc(n)
    # every bucket edge, between the edges, beyond the last, and a NaN (in no bucket)
    for amount in (*metrics.LATENCY_BUCKETS, 0.0, 0.0007, 0.003, 7.5, 500.0, math.nan):
        duration.observe(amount)
    return b"\n".join(line for line in generate_latest(registry).splitlines()
                      if not line.startswith(b"#") and b"_created" not in line)


def test_fast_updates_expose_what_the_children_do() -> None:
    assert _exposition("fast") == _exposition("plain")


def test_a_fast_counter_refuses_a_negative_amount_as_the_child_does() -> None:
    m = metrics.Metrics(CollectorRegistry())
    counter = metrics.fast(m.tokens.labels("acme", "llama", "prompt"))
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)


def test_a_gauge_child_is_returned_as_it_is() -> None:
    m = metrics.Metrics(CollectorRegistry())
    child = m.queue_depth.labels("interactive", "acme")
    assert metrics.fast(child) is child
