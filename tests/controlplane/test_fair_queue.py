"""The fair queue: strict priority between classes, weighted fair shares by tokens between
tenants, bounds, deadlines, and release one freed slot at a time."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import errors
from controlplane.core import fair_queue
from tests.clock import ManualClock
from tests.controlplane.fair_queue_testing import (
    MODEL,
    Fleet,
    cancel,
    gate_for,
    request,
    settle_until,
    stopped_clock_gate,
)


async def free_one(gate: fair_queue.Gate, fleet: Fleet) -> None:
    before = len(fleet.released)
    fleet.free += 1
    gate.wake(MODEL)
    await settle_until(lambda: len(fleet.released) > before, "a release")


async def test_an_interactive_request_takes_the_next_slot_ahead_of_a_batch_flood() -> None:
    fleet = Fleet(free=2)
    gate = gate_for(fleet)
    tasks = [asyncio.create_task(request(gate, fleet, f"batch-{i}", "noisy", "batch"))
             for i in range(40)]
    await settle_until(lambda: len(fleet.released) == 2 and gate.depth(MODEL) == 38,
                       "the fleet to fill up")
    quiet = asyncio.create_task(request(gate, fleet, "quiet", "quiet", "interactive"))
    await settle_until(lambda: gate.depth(MODEL) == 39, "the quiet request to queue")
    assert fleet.released == ["batch-0", "batch-1"]
    await free_one(gate, fleet)
    # One slot freed: it went to the interactive request, not to the 38 batch ones queued
    # before it; and only one request was released for one slot.
    assert fleet.released[2:] == ["quiet"]
    for _ in range(38):
        await free_one(gate, fleet)
    assert fleet.released[3:] == [f"batch-{i}" for i in range(2, 40)]
    await asyncio.gather(*tasks, quiet)
    await gate.close()


async def test_a_new_head_with_room_for_its_class_goes_without_waiting_for_a_poll() -> None:
    class Reserved(Fleet):
        """No room for batch requests; seats kept for interactive ones."""

        def room(self, model: str, cls: str, sequences: int = 1) -> bool:
            return cls == "interactive" and self.free >= sequences

    fleet = Reserved(free=1)
    gate = gate_for(fleet, poll_interval_s=3600.0)
    flood = [asyncio.create_task(request(gate, fleet, f"batch-{i}", "noisy", "batch"))
             for i in range(5)]
    await settle_until(lambda: gate.depth(MODEL) == 5, "the flood to queue")
    # The pump sleeps until a request ends or an hour passes; neither happens here.
    await asyncio.wait_for(request(gate, fleet, "quiet", "quiet"), 10)
    assert fleet.released == ["quiet"] and gate.depth(MODEL) == 5
    await cancel(*flood)
    await gate.close()


async def test_tenants_in_one_class_share_by_tokens_and_weight() -> None:
    fleet = Fleet(free=0)
    gate = gate_for(fleet)
    tasks = [asyncio.create_task(request(gate, fleet, "heavy", "heavy", weight=3.0))
             for _ in range(60)]
    tasks += [asyncio.create_task(request(gate, fleet, "light", "light", weight=1.0))
              for _ in range(60)]
    tasks += [asyncio.create_task(request(gate, fleet, "big", "big", tokens=400))
              for _ in range(10)]
    await settle_until(lambda: gate.depth(MODEL) == 130, "everyone to queue")
    for _ in range(50):
        await free_one(gate, fleet)
    got = {name: fleet.released.count(name) for name in ("heavy", "light", "big")}
    # weight 3 gets three times the tokens of weight 1; 400-token requests a quarter
    # as many requests as 100-token ones of the same weight
    assert got["heavy"] == pytest.approx(3 * got["light"], abs=2)
    assert got["big"] == pytest.approx(got["light"] / 4, abs=1)
    await cancel(*tasks)
    await gate.close()


async def test_a_quiet_tenant_goes_next_even_behind_a_deep_flood_of_its_class() -> None:
    fleet = Fleet(free=0)
    gate = gate_for(fleet)
    flood = [asyncio.create_task(request(gate, fleet, "noisy", "noisy")) for _ in range(50)]
    await settle_until(lambda: gate.depth(MODEL) == 50, "the flood to queue")
    await free_one(gate, fleet)
    quiet = asyncio.create_task(request(gate, fleet, "quiet", "quiet"))
    await settle_until(lambda: gate.depth(MODEL) == 50, "the quiet request to queue")
    await free_one(gate, fleet)
    assert fleet.released == ["noisy", "quiet"]
    await cancel(*flood, quiet)
    await gate.close()


async def test_bounds_refuse_at_once_with_the_right_status() -> None:
    fleet = Fleet(free=0)
    gate = gate_for(fleet, max_waiting=5, max_waiting_per_tenant=3)
    waiting = [asyncio.create_task(request(gate, fleet, "a", "a")) for _ in range(3)]
    await settle_until(lambda: gate.depth(MODEL) == 3, "three to queue")
    with pytest.raises(errors.QueueFull) as full:
        await gate.wait(MODEL, "a", "interactive", 1.0, 10)
    assert full.value.http_status == 429 and full.value.envelope()["error"]["code"] == \
        "queue_full" and "Retry-After" in full.value.headers()
    waiting += [asyncio.create_task(request(gate, fleet, "b", "b")) for _ in range(2)]
    await settle_until(lambda: gate.depth(MODEL) == 5, "five to queue")
    with pytest.raises(errors.QueueTimeout) as over:
        await gate.wait(MODEL, "c", "interactive", 1.0, 10)
    assert over.value.http_status == 503
    with pytest.raises(errors.BadRequest):
        await gate.wait(MODEL, "c", "bulk", 1.0, 10)
    await cancel(*waiting)
    assert gate.depth(MODEL) == 0           # cancelled waiters leave the queue
    await gate.close()


async def test_a_request_waits_no_longer_than_its_deadline() -> None:
    clock = ManualClock()
    fleet = Fleet(free=0)
    gate = gate_for(fleet, clock, deadline_s=30.0)
    with pytest.raises(errors.QueueTimeout) as err:
        await gate.wait(MODEL, "t", "batch", 1.0, 100)
    assert 30.0 <= clock.now < 30.5
    assert err.value.http_status == 503 and err.value.headers()["Retry-After"]
    assert err.value.envelope()["error"]["code"] == "queue_timeout"
    await gate.close()


async def test_models_queue_apart() -> None:
    fleet = Fleet(free=0)
    opts = fair_queue.Options(poll_interval_s=0.01)
    gate = fair_queue.Gate(opts, lambda model, cls, seats: model == "free-model")
    blocked = asyncio.create_task(gate.wait("busy-model", "t", "interactive", 1.0, 10))
    await settle_until(lambda: gate.depth("busy-model") == 1, "the busy model to queue")
    await gate.wait("free-model", "t", "interactive", 1.0, 10)  # not behind the other
    assert gate.busy("busy-model") and not gate.busy("free-model")
    await cancel(blocked)
    await gate.close()
    assert fleet.free == 0


async def test_a_higher_class_does_not_queue_behind_lower_classes_only() -> None:
    opts = fair_queue.Options(poll_interval_s=0.01)
    gate = fair_queue.Gate(opts, lambda model, cls, seats: cls == "interactive")
    batch = asyncio.create_task(gate.wait("m", "noisy", "batch", 1.0, 10))
    await settle_until(lambda: gate.depth("m") == 1, "the batch request to queue")
    assert gate.busy("m") and gate.busy("m", "batch")
    assert not gate.busy("m", "interactive")    # strict priority: it would go first anyway
    await cancel(batch)
    assert not gate.busy("m", "batch")
    await gate.close()


async def test_the_head_is_released_when_there_is_room_for_all_its_seats() -> None:
    """``room`` is asked for the head's own seats (n x a batch's prompts): a batch of eight
    waits while three seats are free, and goes when eight are. Sent on at one free seat,
    it overfilled the engine, whose FIFO then started its sequences ahead of requests the
    queue had put before them (probe 77)."""
    fleet = Fleet(free=3)
    gate = gate_for(fleet)
    batch = asyncio.create_task(request(gate, fleet, "batch", "t", sequences=8))
    await asyncio.sleep(0.05)
    assert fleet.released == []
    fleet.free = 8
    gate.wake(MODEL)
    await asyncio.wait_for(batch, 5)
    assert fleet.released == ["batch"] and fleet.free == 0
    await gate.close()


async def test_a_head_short_of_seats_holds_those_that_free_and_nothing_behind_it_goes(
        ) -> None:
    """Freed seats gather for a large head instead of each going to a small request
    behind it (a stream of which would pass it for ever)."""
    clock = ManualClock()
    fleet = Fleet(free=0)
    gate = stopped_clock_gate(fleet, clock, hold_s=10.0)
    big = asyncio.create_task(request(gate, fleet, "big", "a", sequences=4))
    await settle_until(lambda: gate.depth(MODEL) == 1, "the large request to queue")
    small = [asyncio.create_task(request(gate, fleet, f"small-{i}", "b")) for i in range(3)]
    await settle_until(lambda: gate.depth(MODEL) == 4, "the small ones to queue")
    for _ in range(3):
        fleet.free += 1
        clock.now += 3.0
        gate.wake(MODEL)
        await asyncio.sleep(0.02)
    assert fleet.released == [], "three seats of four free: nothing goes"
    fleet.free += 1
    gate.wake(MODEL)
    await asyncio.wait_for(big, 5)
    await settle_until(lambda: len(fleet.released) == 1, "the release")
    assert fleet.released == ["big"] and fleet.free == 0
    await cancel(*small)
    await gate.close()


async def test_a_head_short_of_seats_goes_with_one_free_after_holding_them_its_time(
        ) -> None:
    """Other workers and replicas may fill every seat that frees, so the holding is
    bounded: after ``max_seat_hold_s`` from the first time it found a seat free the head
    goes (the engine queues the rest); time before that is not counted, and 0 sends it on
    at once, as before the rule."""
    clock = ManualClock()
    fleet = Fleet(free=0)
    gate = stopped_clock_gate(fleet, clock, hold_s=3.0)
    big = asyncio.create_task(request(gate, fleet, "big", "a", sequences=4))
    await settle_until(lambda: gate.depth(MODEL) == 1, "the large request to queue")
    clock.now += 20.0                   # nothing free: not holding yet
    fleet.free = 1
    gate.wake(MODEL)
    await asyncio.sleep(0.02)
    clock.now += 2.9
    await asyncio.sleep(0.02)
    assert not big.done()
    clock.now += 0.1
    await asyncio.wait_for(big, 5)
    assert fleet.released == ["big"] and fleet.free == -3
    await gate.close()

    fleet = Fleet(free=1)
    gate = stopped_clock_gate(fleet, clock, hold_s=0.0)
    await asyncio.wait_for(request(gate, fleet, "big", "a", sequences=4), 5)
    assert fleet.released == ["big"]
    await gate.close()
