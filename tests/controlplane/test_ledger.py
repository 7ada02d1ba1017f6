"""The in-flight ledger: a streamed prompt waits for prefill until its first byte; a whole
answer's prompt until the time predicted for its first token, then counts as decoding."""

from __future__ import annotations

from controlplane.core import ledger
from tests.clock import ManualClock


def test_a_streamed_prompt_waits_for_prefill_until_its_first_byte() -> None:
    clock = ManualClock()
    book = ledger.Ledger(clock)
    ticket = book.dispatch("b", 500, 600, streams=True, expect_s=0.5)
    clock.now = 10.0          # no guess for a stream: its first byte says when
    load = book.load("b")
    assert (load.prefill_tokens, load.prefilling, load.decoding) == (500, 1, 0)
    book.first_byte(ticket)
    assert (load.prefill_tokens, load.prefilling, load.decoding) == (0, 0, 1)
    book.finish(ticket)
    assert (load.prefill_tokens, load.prefilling, load.decoding) == (0, 0, 0)


def test_a_whole_answer_counts_as_decoding_once_past_its_predicted_first_token() -> None:
    clock = ManualClock()
    book = ledger.Ledger(clock)
    early = book.dispatch("b", 300, 300, streams=False, expect_s=0.5)
    late = book.dispatch("b", 200, 200, streams=False, expect_s=2.0)
    load = book.load("b")
    assert (load.prefill_tokens, load.blind_prefill_tokens, load.prefilling) == (500, 500, 2)
    clock.now = 0.5
    load = book.load("b")
    assert (load.prefill_tokens, load.blind_prefill_tokens) == (200, 200)
    assert (load.prefilling, load.decoding) == (1, 1)
    # its answer arrives whole: first byte and end, counted once
    book.first_byte(early)
    book.finish(early)
    assert (load.prefilling, load.decoding) == (1, 0)
    clock.now = 5.0
    assert book.load("b").prefill_tokens == 0
    book.finish(late)
    load = book.load("b")
    assert (load.prefill_tokens, load.blind_prefill_tokens) == (0, 0)
    assert (load.prefilling, load.decoding, load.in_flight) == (0, 0, 0)


def test_a_whole_answer_that_fails_before_its_predicted_first_token_leaves_no_trace() -> None:
    clock = ManualClock()
    book = ledger.Ledger(clock)
    ticket = book.dispatch("b", 300, 300, streams=False, expect_s=1.0)
    book.finish(ticket)         # refused at once: never answered
    clock.now = 2.0             # its due time passes after it ended
    load = book.load("b")
    assert (load.prefill_tokens, load.blind_prefill_tokens) == (0, 0)
    assert (load.prefilling, load.decoding) == (0, 0)


def test_ended_answers_do_not_pile_up_while_waiting_for_their_due_time() -> None:
    book = ledger.Ledger(ManualClock())
    for _ in range(1000):
        book.finish(book.dispatch("b", 10, 10, streams=False, expect_s=3600.0))
    assert len(book._blind["b"]) <= 65


def test_a_request_holds_as_many_seats_as_the_sequences_it_generates() -> None:
    """A chat of n: 4 or a completions batch of 4 prompts runs four sequences on the
    engine, each one of its max_num_seqs seats (probe 69)."""
    book = ledger.Ledger(ManualClock())
    batch = book.dispatch("b", 100, 100, streams=False, sequences=4)
    single = book.dispatch("b", 100, 100)
    load = book.load("b")
    assert (load.in_flight, load.sequences) == (2, 5)
    book.first_byte(batch)
    assert (load.in_flight, load.sequences) == (2, 5)
    book.finish(batch)
    book.finish(batch)          # idempotent: released once
    assert (load.in_flight, load.sequences) == (1, 1)
    book.finish(single)         # never answered: released all the same
    assert (load.in_flight, load.sequences) == (0, 0)
