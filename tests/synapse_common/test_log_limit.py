"""Lines a peer can repeat at will are said once per interval per key, and names it
invents are said up to a budget, the rest counted in one summary line."""

from __future__ import annotations

import logging

import pytest

from synapse_common import log_limit
from tests.clock import ManualClock

log = logging.getLogger("synapse.test.log_limit")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


def test_a_key_is_said_first_then_once_per_interval_with_the_count_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0)
    caplog.set_level(logging.INFO, logger=log.name)
    for _ in range(3):
        said.log(logging.INFO, "a", "node %s up", "a")
    said.log(logging.INFO, "b", "node %s up", "b")          # another key: its own first
    assert lines(caplog) == ["node a up", "node b up"]
    clock.now += 59.0
    said.log(logging.INFO, "a", "node %s up", "a")
    assert lines(caplog) == []
    clock.now += 1.0
    said.log(logging.INFO, "a", "node %s up", "a")
    assert lines(caplog) == ["node a up (3 more held back)"]


def test_invented_names_past_the_budget_are_counted_in_one_summary(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0, new_keys=2, max_keys=3)
    caplog.set_level(logging.INFO, logger=log.name)
    for i in range(10):
        said.log(logging.WARNING, f"n{i}", "node %s refused", f"n{i}")
    assert lines(caplog) == ["node n0 refused", "node n1 refused"]
    clock.now += 60.0
    for i in range(10, 15):
        said.log(logging.WARNING, f"n{i}", "node %s refused", f"n{i}")
    assert lines(caplog) == ["8 test lines of other names held back in the last 60s (the "
                             "first 2 names each are said)",
                             "node n10 refused", "node n11 refused"]


def test_at_most_max_keys_are_remembered_the_oldest_forgotten_into_the_summary(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0, max_keys=1)
    caplog.set_level(logging.INFO, logger=log.name)
    said.log(logging.INFO, "a", "node %s up", "a")
    said.log(logging.INFO, "a", "node %s up", "a")          # held back for a
    said.log(logging.INFO, "b", "node %s up", "b")          # a is forgotten
    said.log(logging.INFO, "a", "node %s up", "a")          # a first line again
    assert lines(caplog) == ["node a up", "node b up", "node a up"]
    clock.now += 60.0
    said.log(logging.INFO, "c", "node %s up", "c")
    assert lines(caplog) == ["1 test lines of other names held back in the last 60s (the "
                             "first 100 names each are said)", "node c up"]
