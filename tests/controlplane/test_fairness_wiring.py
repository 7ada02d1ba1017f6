"""The usage flush's failures reach the operator's log (controlplane/api/fairness_wiring.py):
a warning at the first, then one at most every few minutes with how many failed since."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pytest

from controlplane.api import fairness_wiring
from controlplane.api import services as services_mod
from controlplane.core import usage_book
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t


class RefusingStore:
    """A usage store that refuses every write, as SQLite refused a count past int64."""

    async def add(self, rows: Mapping[tuple[str, str, str], usage_book.Plain],
                  batch_id: str) -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> Mapping[tuple[str, str, str], usage_book.Plain]:
        return {}


async def test_a_failing_usage_flush_warns_at_once_and_then_once_every_few_minutes(
        caplog: pytest.LogCaptureFixture) -> None:
    """Probe finding: a flush failing for every tenant, forever, was a debug line only."""
    clock = ManualClock(1000.0)
    svc = services_mod.build(t.settings(), clock=clock)
    fair = fairness_wiring.get(svc)
    assert fair.book is not None
    fair.book.store = RefusingStore()
    fair.book.record("a", "m", usage_book.Counts(requests=1))
    failures = fairness_wiring.FlushFailures(svc.clock)

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.DEBUG, "synapse.controlplane.fairness"):
        for _ in range(10):
            await fairness_wiring._flush(svc, fair, None, failures)
            clock.now += 1.0
        assert len(warned()) == 1
        assert "usage flush" in warned()[0] and "OverflowError" in warned()[0]
        clock.now += fairness_wiring.FLUSH_WARN_EVERY_S
        await fairness_wiring._flush(svc, fair, None, failures)
    assert len(warned()) == 2 and "9 more failed since the last warning" in warned()[1]
    assert svc.metrics.registry.get_sample_value("synapse_usage_flush_failures_total") == 11
    assert fair.book.pending()      # kept for the next flush, as before
