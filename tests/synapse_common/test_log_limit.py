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


def test_a_held_line_is_said_by_catch_up_once_due_without_a_next_line_of_its_key(
        caplog: pytest.LogCaptureFixture) -> None:
    """A node that went down and came back within the interval, then stayed up: its
    newest held line is said once the interval passes, not left until its next event
    (the log would show it down while it is up)."""
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0)
    caplog.set_level(logging.INFO, logger=log.name)
    said.log(logging.INFO, "a", "node %s state %s", "a", "up")
    said.log(logging.INFO, "b", "node %s state %s", "b", "up")
    clock.now += 10.0
    said.log(logging.INFO, "a", "node %s state %s", "a", "down")
    said.log(logging.WARNING, "a", "node %s state %s", "a", "up again")
    assert lines(caplog) == ["node a state up", "node b state up"]
    clock.now += 49.0
    said.catch_up()
    assert lines(caplog) == []                              # not due yet
    clock.now += 1.0
    said.catch_up()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "node a state up again (1 more held back)")]
    caplog.clear()
    said.catch_up()
    said.log(logging.INFO, "b", "node %s state %s", "b", "up")     # b held nothing: said
    assert lines(caplog) == ["node b state up"]
    said.log(logging.INFO, "a", "node %s state %s", "a", "down")   # a was said just now
    assert lines(caplog) == []


def test_log_says_the_due_held_lines_of_other_keys_first(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0)
    caplog.set_level(logging.INFO, logger=log.name)
    said.log(logging.INFO, "a", "node %s up", "a")
    said.log(logging.INFO, "a", "node %s up", "a")
    clock.now += 60.0
    said.log(logging.INFO, "b", "node %s up", "b")
    assert lines(caplog) == ["node a up", "node a up", "node b up"]


def test_only_the_newest_held_line_of_a_subject_is_caught_up(
        caplog: pytest.LogCaptureFixture) -> None:
    """A node that went down and up twice within the interval, then stayed up: its held
    'down' line is due after its held 'up' line, but a newer line of the node came, so it
    is not said (its count goes with the next 'down' line): the last line says 'up'."""
    clock = ManualClock()
    said = log_limit.PerKey(log, clock, "test lines", every_s=60.0)
    caplog.set_level(logging.INFO, logger=log.name)

    def event(at: float, state: str) -> None:
        clock.now = at
        said.log(logging.INFO, state, "node a %s", state, subject="a")

    for at, state in ((0, "up"), (5, "down"), (10, "up"), (15, "down"), (20, "up")):
        event(at, state)
    for at in range(21, 200, 5):        # the node reports every few seconds
        clock.now = at
        said.catch_up()
    assert lines(caplog) == ["node a up", "node a down", "node a up (1 more held back)"]
    event(300, "down")
    assert lines(caplog) == ["node a down (1 more held back)"]
