"""When the fair queue holds requests: a backend whose seats are all taken (the limit
learned from the engine's own reports) or whose streamed prefill queue is above the
bound; whole answers in flight, whose first token is never seen, are bounded by seats and
never mistaken for a prefill queue."""

from __future__ import annotations

import dataclasses
import random

from controlplane.core import (
    fairness,
    ledger,
    prefix_index,
    pricing,
    registry,
    router,
    saturation,
    token_limits,
    types,
)
from tests.clock import ManualClock

MODEL = "m"
BOUND_S = 0.1
_words = random.Random(18)


def fleet() -> tuple[router.Router, registry.Registry, saturation.Saturation]:
    reg = registry.Registry(ManualClock(), 15.0)  # reports never age
    reg.register(types.NodeInfo("n1"))
    r = router.Router(router.Params(prefill_s_per_token=0.0001, learn_costs=False), reg,
                      ledger.Ledger(ManualClock()), prefix_index.PrefixIndex(10_000))
    report(reg, running=0, waiting=0)
    return r, reg, saturation.Saturation(r.ledger, BOUND_S)


def report(reg: registry.Registry, running: int, waiting: int, restarts: int = 0) -> None:
    reg.report("n1", [types.BackendState(
        key="n1/e", node="n1", name="e", url="http://e", models=(MODEL,), running=running,
        waiting=waiting, restarts=restarts, kv_capacity_tokens=10**6, block_size=16)])


def send(r: router.Router, tokens: int, streams: bool, sequences: int = 1) -> ledger.Ticket:
    # unique four-digit words (one token each): nothing cached, every token to prefill
    prompt = router.Prompt.from_text(" ".join(str(_words.randrange(1000, 10_000))
                                              for _ in range(tokens)), 16)
    prompt.streams = streams
    prompt.sequences = sequences
    decision = r.route(MODEL, prompt)
    assert decision is not None
    return r.dispatched(decision, decision.candidates[0], prompt)


def room(r: router.Router, sat: saturation.Saturation) -> bool:
    verdicts, _ = r.verdicts(MODEL, router.Prompt.from_text("", 0, exact=False))
    return sat.room(verdicts)


def test_whole_answers_in_flight_are_not_a_prefill_queue() -> None:
    r, _, sat = fleet()
    for _ in range(50):     # 100k prompt tokens past their prefill, answers not streamed
        send(r, 2000, streams=False)
    assert room(r, sat)
    ticket = send(r, 2000, streams=True)    # 0.2 s of prefill nobody has seen start yet
    assert not room(r, sat)
    r.ledger.first_byte(ticket)
    assert room(r, sat)


def test_the_seat_limit_is_learned_from_two_reports_at_the_limit() -> None:
    r, reg, sat = fleet()
    tickets = [send(r, 10, streams=False) for _ in range(3)]
    # One report with requests waiting is a step's arrivals, not the limit.
    report(reg, running=1, waiting=2)
    assert room(r, sat) and sat.seats("n1/e") is None
    report(reg, running=2, waiting=1)       # still ramping up
    assert room(r, sat) and sat.seats("n1/e") is None
    report(reg, running=2, waiting=1)       # the same report again teaches nothing
    assert room(r, sat) and sat.seats("n1/e") is None
    report(reg, running=3, waiting=1)
    room(r, sat)
    report(reg, running=3, waiting=2)       # held at 3 with a queue: the limit
    assert not room(r, sat) and sat.seats("n1/e") == 3
    r.ledger.finish(tickets[0])             # a seat frees: room before the next report
    assert room(r, sat)


def test_the_limit_does_not_ratchet_down_and_a_restart_forgets_it() -> None:
    r, reg, sat = fleet()
    report(reg, running=8, waiting=1)
    room(r, sat)
    report(reg, running=8, waiting=2)
    assert room(r, sat) and sat.seats("n1/e") == 8
    # Held at the limit by the queue, reports find a request just sent and a seat just
    # freed: the limit stays.
    report(reg, running=7, waiting=1)
    room(r, sat)
    report(reg, running=7, waiting=2)
    room(r, sat)
    assert sat.seats("n1/e") == 8
    report(reg, running=7, waiting=2, restarts=1)
    room(r, sat)
    assert sat.seats("n1/e") is None


def test_a_configured_seat_count_is_used_as_given_and_never_probed_past() -> None:
    r, reg, sat = fleet()
    seat_count = 3
    reg.report("n1", [types.BackendState(
        key="n1/e", node="n1", name="e", url="http://e", models=(MODEL,), running=0,
        waiting=0, kv_capacity_tokens=10**6, block_size=16, max_num_seqs=seat_count)])
    tickets = [send(r, 10, streams=False) for _ in range(seat_count - 1)]
    assert room(r, sat)
    tickets.append(send(r, 10, streams=False))
    assert not room(r, sat)         # full before any report says so
    for running, waiting in ((3, 0), (3, 0), (3, 0)):   # full, nobody waiting: no probe
        reg.report("n1", [types.BackendState(
            key="n1/e", node="n1", name="e", url="http://e", models=(MODEL,),
            running=running, waiting=waiting, kv_capacity_tokens=10**6, block_size=16,
            max_num_seqs=seat_count)])
        assert not room(r, sat)
    r.ledger.finish(tickets[0])
    assert room(r, sat)


def test_a_request_of_several_sequences_takes_as_many_seats() -> None:
    """n: 8, or a completions batch of 8 prompts, is 8 sequences the engine runs at once:
    counted as one request, it left 7 of 8 seats looking free to the queue, which sent
    more and let them wait in the engine's FIFO queue (probe 69)."""
    r, reg, sat = fleet()
    reg.report("n1", [types.BackendState(
        key="n1/e", node="n1", name="e", url="http://e", models=(MODEL,), running=0,
        waiting=0, kv_capacity_tokens=10**6, block_size=16, max_num_seqs=8)])
    batch = send(r, 10, streams=False, sequences=6)
    assert room(r, sat)                     # two seats left
    one = send(r, 10, streams=True)
    assert room(r, sat)
    send(r, 10, streams=True)
    assert not room(r, sat)                 # 6 + 1 + 1 sequences: every seat taken
    r.ledger.finish(one)
    assert room(r, sat)
    send(r, 10, streams=False, sequences=2)
    assert not room(r, sat)
    r.ledger.finish(batch)                  # its six seats free at once
    assert room(r, sat)


def test_a_request_goes_on_only_where_all_its_seats_are_free() -> None:
    """A request of many sequences let on because one seat was free overfilled the engine
    (15 of 16 taken, a batch of 256 let on: 271 in flight), and a lower class's batch took
    the seats kept for the highest (probe 77). An empty backend takes any request: one
    larger than the whole limit would otherwise never go (the fair queue bounds how long
    it holds seats: test_fair_queue)."""
    r, reg, _ = fleet()
    sat = saturation.Saturation(r.ledger, BOUND_S, reserve=0.25)
    reg.report("n1", [types.BackendState(
        key="n1/e", node="n1", name="e", url="http://e", models=(MODEL,), running=0,
        waiting=0, kv_capacity_tokens=10**6, block_size=16, max_num_seqs=16)])
    verdicts, _ = r.verdicts(MODEL, router.Prompt.from_text("", 0, exact=False))
    assert sat.room(verdicts, sequences=256)        # nothing in flight: it goes
    tickets = [send(r, 10, streams=True) for _ in range(15)]
    assert sat.room(verdicts) and not sat.room(verdicts, sequences=2)
    r.ledger.finish(tickets.pop())
    assert sat.room(verdicts, sequences=2) and not sat.room(verdicts, sequences=3)
    for t in tickets[8:]:
        r.ledger.finish(t)                          # 8 of 16 taken, 4 of them reserved
    assert sat.room(verdicts, top=False, sequences=4)
    assert not sat.room(verdicts, top=False, sequences=5)
    assert sat.room(verdicts, top=True, sequences=8)


def test_each_learned_or_forgotten_limit_is_reported_once() -> None:
    r, reg, _ = fleet()
    seen: list[tuple[str, int | None]] = []
    sat = saturation.Saturation(r.ledger, BOUND_S,
                                on_seats=lambda key, seats: seen.append((key, seats)))
    for running, waiting, restarts in ((0, 0, 0), (8, 1, 0), (8, 2, 0), (7, 2, 0), (8, 3, 0),
                                       (8, 3, 1)):
        report(reg, running=running, waiting=waiting, restarts=restarts)
        room(r, sat)
    assert seen == [("n1/e", 8), ("n1/e", None)]


def test_other_replicas_requests_waiting_count_against_the_seats() -> None:
    r, reg, sat = fleet()
    r.ledger.finish(send(r, 10, streams=False))     # prompts of 10 tokens on average
    report(reg, running=4, waiting=1)
    room(r, sat)
    report(reg, running=4, waiting=2)
    assert room(r, sat)         # four seats, two requests of others waiting
    report(reg, running=4, waiting=4)
    assert not room(r, sat)     # four of others waiting: as many as the seats
    mine = [send(r, 10, streams=False) for _ in range(3)]
    report(reg, running=4, waiting=1)
    assert room(r, sat)         # three of ours in flight, one seat left
    mine.append(send(r, 10, streams=False))
    assert not room(r, sat)


def test_a_verdict_without_basis_compares_its_whole_queue_wait() -> None:
    r, _, sat = fleet()
    verdicts, _ = r.verdicts(MODEL, router.Prompt.from_text("", 0, exact=False))
    v = dataclasses.replace(verdicts[0], basis=None, queue_wait_s=BOUND_S * 2)
    assert sat.saturated(v)


def test_a_released_request_goes_to_a_backend_with_a_free_seat() -> None:
    reg = registry.Registry(ManualClock(), 15.0)
    reg.register(types.NodeInfo("n1"))
    r = router.Router(router.Params(prefill_s_per_token=0.0001, learn_costs=False), reg,
                      ledger.Ledger(ManualClock()), prefix_index.PrefixIndex(10_000))

    def both(running: int, waiting: int) -> None:
        reg.report("n1", [types.BackendState(
            key=f"n1/{n}", node="n1", name=n, url=f"http://{n}", models=(MODEL,),
            running=running, waiting=waiting, kv_capacity_tokens=10**6, block_size=16)
            for n in ("a", "b")])

    sat = saturation.Saturation(r.ledger, BOUND_S)
    fair = fairness.Fairness({}, token_limits.TokenLimiter(token_limits.LocalTokenStore(
        ManualClock())), pricing.PriceTable({}), None, None, fairness.Options(),
        saturated=sat)
    for running, waiting in ((2, 1), (2, 2)):   # two seats each, learned
        both(running, waiting)
        room(r, sat)
    both(0, 0)
    prompt = router.Prompt.from_text("1234 5678", 16)
    prompt.streams = False
    route = r.route(MODEL, prompt)
    assert route is not None
    full = route.candidates[0].backend.key
    for _ in range(2):          # fill the router's first choice
        r.dispatched(route, route.candidates[0], prompt)
    r.dispatched(route, route.candidates[1], prompt)
    # The router may still rank the full backend first (tied predictions rotate); the
    # released request goes where a seat is free.
    again = fair.room_first(route, "interactive")
    assert again.candidates[0].backend.key != full
    assert fair.room_first(again, "interactive") is again


def test_lower_classes_leave_the_reserved_seats_to_the_highest() -> None:
    r, reg, _ = fleet()
    sat = saturation.Saturation(r.ledger, BOUND_S, reserve=0.05)
    for running, waiting in ((40, 1), (40, 2)):     # a limit of 40 seats, 2 reserved
        report(reg, running, waiting)
        room(r, sat)
    report(reg, running=30, waiting=0)
    for _ in range(38):
        send(r, 10, streams=False)
    verdicts, _ = r.verdicts(MODEL, router.Prompt.from_text("", 0, exact=False))
    assert not sat.room(verdicts, top=False) and sat.room(verdicts, top=True)
    send(r, 10, streams=False)
    send(r, 10, streams=False)
    assert not sat.room(verdicts, top=True)


def test_a_limit_learned_too_low_grows_by_probing_and_settles_at_the_engines() -> None:
    r, reg, sat = fleet()
    engine = 64                 # the engine's real limit; a ramp-up taught 8
    report(reg, running=8, waiting=3)
    room(r, sat)
    report(reg, running=8, waiting=4)
    room(r, sat)
    assert sat.seats("n1/e") == 8
    tickets: list[ledger.Ticket] = []
    waiting_seen = []
    for i in range(60):         # reports of an engine fed as far as the queue allows
        if i % 2 and len(tickets) >= engine:    # now and then a request ends
            r.ledger.finish(tickets.pop(0))
        while room(r, sat):
            tickets.append(send(r, 10, streams=False))
        running = min(len(tickets), engine)
        report(reg, running=running, waiting=len(tickets) - running)
        waiting_seen.append(len(tickets) - running)
        room(r, sat)
    assert sat.seats("n1/e") == engine
    # Held there: at most a few requests ever wait inside the engine.
    assert max(waiting_seen[-20:]) <= 4, waiting_seen


def test_a_limit_seen_twice_is_no_longer_probed_past() -> None:
    r, reg, sat = fleet()
    report(reg, running=8, waiting=1)
    room(r, sat)
    report(reg, running=8, waiting=2)       # learned: 8
    room(r, sat)
    report(reg, running=8, waiting=3)       # held at 8 again with a queue: confirmed
    room(r, sat)
    tickets = [send(r, 10, streams=False) for _ in range(8)]
    for waiting in (0, 0, 0):    # full, nobody waiting: before, each let more on
        report(reg, running=8, waiting=waiting)
        report(reg, running=7, waiting=0)
        report(reg, running=8, waiting=waiting)
        assert not room(r, sat)
    assert sat.seats("n1/e") == 8
    r.ledger.finish(tickets[0])
    assert room(r, sat)
