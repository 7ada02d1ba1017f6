"""Routing state shared between worker processes: what one worker dispatches shows in its
siblings' ledgers, prefix indexes, sessions and pins; a lost peer's tickets are finished."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from controlplane import metrics as metrics_mod
from controlplane.adapters import l1
from controlplane.core import (
    ledger,
    prefix_index,
    registry,
    response_cache,
    response_pins,
    router,
    served_log,
    tenant_lru,
    types,
)
from controlplane.core import shared_routing as shared
from tests.clock import ManualClock
from tests.controlplane import test_cache_support as cache_support

MODEL = "m"
LONG = "shared context about the quarterly report. " * 200   # ~2,000 tokens


class Worker:
    """One worker process's routing state, wired to the mesh's core as a worker's is."""

    def __init__(self, index: int, clock: ManualClock, incarnation: str = "",
                 forms: response_cache.TieredCache | None = None) -> None:
        reg = registry.Registry(clock, 15.0)
        reg.register(types.NodeInfo("n1"))
        reg.report("n1", [backend("a"), backend("b"), backend("c")])
        self.router = router.Router(router.Params(), reg, ledger.Ledger(clock),
                                    prefix_index.PrefixIndex(200_000))
        self.ledger = self.router.ledger
        self.pins = response_pins.Pins()
        self.served = served_log.ServedLog(100, 3600.0, clock)
        self.sharing = shared.Sharing(self.router, self.pins, index,
                                      incarnation or f"w{index}", self.served, forms)
        self.wakes = 0
        self.sharing.attach(self._wake)

    def _wake(self) -> None:
        self.wakes += 1

    def send(self, *peers: shared.Inbound) -> None:
        """One flush: this worker's events since the last, to each peer's reader."""
        data = self.sharing.take()
        if data is not None:
            for peer in peers:
                peer.feed(data)

    def dispatch(self, text: str, session: str = "", streams: bool = True,
                 system: str = LONG, sequences: int = 1) -> tuple[ledger.Ticket, str]:
        prompt = ask(text, session, streams, system)
        prompt.sequences = sequences
        decision = self.router.route(MODEL, prompt)
        assert decision is not None
        verdict = decision.candidates[0]
        return self.router.dispatched(decision, verdict, prompt), verdict.backend.key


def backend(name: str) -> types.BackendState:
    return types.BackendState(key=f"n1/{name}", node="n1", name=name, url=f"http://{name}",
                              models=(MODEL,), kv_capacity_tokens=100_000, block_size=16)


def ask(text: str, session: str = "", streams: bool = True, system: str = LONG,
        ) -> router.Prompt:
    prompt = router.Prompt.from_messages([{"role": "system", "content": system},
                                          {"role": "user", "content": text}], 64, session)
    prompt.streams = streams
    return prompt


def connected(sender: Worker, receiver: Worker) -> shared.Inbound:
    """``receiver``'s reader of a new connection from ``sender`` (greeting applied)."""
    inbound = receiver.sharing.inbound()
    inbound.feed(sender.sharing.greeting())
    return inbound


def stages(load: ledger.Load) -> tuple[int, int, int]:
    return load.prefill_tokens, load.prefilling, load.decoding


def test_a_dispatch_counts_in_the_siblings_ledger_until_it_finishes() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, key = w0.dispatch("question one")
    w0.send(into_w1)
    own = w0.ledger.load(key)
    assert stages(w1.ledger.load(key)) == stages(own) and own.prefilling == 1
    assert own.prefill_tokens > 1000
    assert w1.ledger.load(key).dispatched == 1

    w0.ledger.first_byte(ticket)
    w0.send(into_w1)
    assert stages(w1.ledger.load(key)) == (0, 0, 1)

    w0.ledger.finish(ticket)
    w0.send(into_w1)
    assert stages(w1.ledger.load(key)) == (0, 0, 0)
    assert into_w1.foreign() == 0 and w0.sharing.in_flight() == 0


def test_a_dispatch_holds_its_sequences_seats_in_the_siblings_ledger() -> None:
    """A sibling's fair queue must see a request of n: 4 take four of the engine's seats,
    as the worker that sent it does (probe 69)."""
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, key = w0.dispatch("four answers", sequences=4)
    w0.send(into_w1)
    assert w0.ledger.load(key).sequences == w1.ledger.load(key).sequences == 4
    w0.ledger.finish(ticket)
    w0.send(into_w1)
    assert w1.ledger.load(key).sequences == 0


def test_a_siblings_load_steers_the_next_request_elsewhere() -> None:
    clock = ManualClock()
    w0, w1, alone = Worker(0, clock), Worker(1, clock), Worker(2, clock)
    into_w1 = connected(w0, w1)
    _, busy = w0.dispatch("a long unique prompt " * 300, system="")
    w0.send(into_w1)
    # a worker that does not hear of it picks the same backend (an exact tie)...
    assert alone.dispatch("another unique prompt " * 300, system="")[1] == busy
    # ...one that does counts the queued prompt there and goes elsewhere
    assert w1.ledger.load(busy).prefilling == 1
    assert w1.dispatch("another unique prompt " * 300, system="")[1] != busy


def test_a_whole_answers_foreign_ticket_turns_to_decoding_at_its_predicted_first_token(
) -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, key = w0.dispatch("batch job", streams=False)
    w0.send(into_w1)
    load = w1.ledger.load(key)
    assert load.blind_prefill_tokens == load.prefill_tokens > 0
    assert ticket.prediction is not None
    clock.now += ticket.prediction.predicted_ttft_s + 1.0
    assert stages(w1.ledger.load(key)) == (0, 0, 1)
    # the whole answer arrives: first byte and end at once
    w0.ledger.first_byte(ticket)
    w0.ledger.finish(ticket)
    w0.send(into_w1)
    assert stages(w1.ledger.load(key)) == (0, 0, 0)


def test_a_prefix_dispatched_by_one_worker_is_a_hit_for_its_sibling() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, key = w0.dispatch("question one")
    w0.ledger.finish(ticket)
    w0.send(into_w1)
    again = w1.router.route(MODEL, ask("another question"))
    assert again is not None
    chosen = again.candidates[0]
    assert chosen.backend.key == key and chosen.cached_tokens > 1500
    assert again.reason.startswith("prefix-hit")


def test_a_session_follows_its_backend_across_workers() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, key = w0.dispatch("hello", session="conversation-7")
    w0.ledger.finish(ticket)
    w0.send(into_w1)
    verdicts, _ = w1.router.verdicts(MODEL, ask("other", "conversation-7"))
    assert [v.backend.key for v in verdicts if v.session_affinity] == [key]


def test_a_responses_pin_is_known_to_every_worker() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    w0.pins.remember("team", "resp_abc", "n1/b")
    w0.send(into_w1)
    assert w1.pins.backend_of("team", "resp_abc") == "n1/b"
    assert w1.pins.backend_of("other", "resp_abc") is None     # kept under its tenant


def test_a_siblings_sessions_and_pins_fill_only_their_own_tenants_share() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    w1.sharing.detach()     # w1 as a pod of two tenants builds it: shares of 2 each
    w1.pins = response_pins.Pins(limit=4, tenants=2)
    w1.router.sessions = tenant_lru.TenantLRU(4, 2)
    w1.sharing = shared.Sharing(w1.router, w1.pins, 1, "w1", w1.served)
    w1.sharing.attach(w1._wake)
    into_w1 = connected(w0, w1)
    w1.pins.remember("victim", "resp_v", "n1/c")
    w1.router.remember_session(router.session_key("victim", "s"), "n1/c")
    for i in range(10):     # a flood from the other tenant, relayed by a sibling
        w0.pins.remember("noisy", f"resp_{i}", "n1/a")
        w0.sharing.session(router.session_key("noisy", f"s{i}"), "n1/a")  # as dispatched
    w0.send(into_w1)
    assert w1.pins.backend_of("victim", "resp_v") == "n1/c"
    assert w1.router.sessions.peek("victim", router.session_key("victim", "s")) == "n1/c"
    assert w1.pins.backend_of("noisy", "resp_9") == "n1/a"
    assert w1.pins.backend_of("noisy", "resp_7") is None       # its own share: 2
    assert len(w1.pins) == 3 and len(w1.router.sessions) == 3


def test_a_cache_hit_can_be_judged_on_any_worker_and_only_once() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1, into_w0 = connected(w0, w1), connected(w1, w0)
    hit = served_log.Served("team", MODEL, "semantic", "how do I reset it?",
                            "how can I reset it?", "ref-1", "scope-1", 0.93, 0.88,
                            "verifier-digest", "minilm@1")
    w0.served.remember("req-1", hit)
    w0.send(into_w1)
    # the feedback reaches the other worker: it knows the hit, for that tenant only
    assert w1.served.take("other", "req-1") is None
    assert w1.served.take("team", "req-1") == hit
    w1.send(into_w0)
    # judged once: the worker that served it has forgotten it too
    assert w0.served.take("team", "req-1") is None
    assert w0.sharing.take() is None and w1.sharing.take() is None     # nothing echoed


def test_applied_events_are_not_echoed_back() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    ticket, _ = w0.dispatch("q", session="s")
    w0.pins.remember("team", "resp_x", "n1/a")
    w0.ledger.first_byte(ticket)
    w0.ledger.finish(ticket)
    w0.send(into_w1)
    assert w1.sharing.take() is None and w1.wakes == 0


def test_a_lost_peers_tickets_are_finished_and_its_restart_starts_afresh() -> None:
    clock = ManualClock()
    w0, w1, w2 = Worker(0, clock), Worker(1, clock), Worker(2, clock)
    from_w0, from_w1 = connected(w0, w2), connected(w1, w2)
    t0, k0 = w0.dispatch("from worker zero " * 300)
    w1.dispatch("from worker one " * 300)
    w1.dispatch("from worker one again " * 300)
    w0.send(from_w0)
    w1.send(from_w1)
    total = sum(w2.ledger.load(k).prefilling for k in ("n1/a", "n1/b", "n1/c"))
    assert total == 3

    from_w1.close()         # worker 1 died: its two requests are gone with it
    assert sum(w2.ledger.load(k).prefilling for k in ("n1/a", "n1/b", "n1/c")) == 1
    assert w2.ledger.load(k0).prefilling == 1
    from_w1.close()         # idempotent
    assert sum(w2.ledger.load(k).in_flight for k in ("n1/a", "n1/b", "n1/c")) == 1

    w1 = Worker(1, clock, incarnation="w1-again")    # restarted: ids start afresh
    again = connected(w1, w2)
    t1, _ = w1.dispatch("restarted worker " * 300)
    assert t1.seq == 0
    w1.send(again)
    assert again.peer == (1, "w1-again") and again.foreign() == 1
    w0.ledger.finish(t0)
    w0.send(from_w0)
    w1.ledger.finish(t1)
    w1.send(again)
    assert sum(w2.ledger.load(k).in_flight for k in ("n1/a", "n1/b", "n1/c")) == 0


def test_a_greeting_brings_the_tickets_in_flight_to_a_new_peer() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    waiting, k_waiting = w0.dispatch("waiting " * 300)
    streaming, k_streaming = w0.dispatch("streaming " * 300)
    w0.ledger.first_byte(streaming)
    done, _ = w0.dispatch("done " * 300)
    w0.ledger.finish(done)
    pending = w0.sharing.take()     # published before the connection was made
    into_w1 = connected(w0, w1)
    assert into_w1.foreign() == 2
    # the same events arriving again right after the greeting count once
    assert pending is not None
    into_w1.feed(pending)
    assert into_w1.foreign() == 2
    loads = [w1.ledger.load(k) for k in {k_waiting, k_streaming}]
    assert sum(load.prefilling for load in loads) == 1
    assert sum(load.decoding for load in loads) == 1
    for ticket in (waiting, streaming):
        w0.ledger.finish(ticket)
    w0.send(into_w1)
    assert sum(load.in_flight for load in loads) == 0


def test_frames_split_anywhere_are_read_whole() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    w0.pins.remember("team", "resp_1", "n1/a")
    w0.pins.remember("team", "resp_2", "n1/b")
    data = w0.sharing.greeting() + (w0.sharing.take() or b"")
    inbound = w1.sharing.inbound()
    for i in range(len(data)):
        inbound.feed(data[i:i + 1])
    assert (w1.pins.backend_of("team", "resp_1"),
            w1.pins.backend_of("team", "resp_2")) == ("n1/a", "n1/b")


def test_a_connection_must_start_with_a_hello_of_this_version() -> None:
    w1 = Worker(1, ManualClock())
    with pytest.raises(shared.FrameError):
        w1.sharing.inbound().feed(shared.frame([(shared.PIN, "team", "resp_1", "n1/a")]))
    with pytest.raises(shared.FrameError):
        w1.sharing.inbound().feed(shared.frame([(shared.HELLO, 99, 0, "x")]))
    with pytest.raises(shared.FrameError):
        w1.sharing.inbound().feed(b"\x00\x00\x00\x03{}}")
    with pytest.raises(shared.FrameError):
        w1.sharing.inbound().feed(b"\xff\xff\xff\xff")
    assert w1.pins.backend_of("team", "resp_1") is None


def test_a_malformed_dispatch_is_refused_before_it_counts_anything() -> None:
    """A dispatch whose last field is not a number raised half-way through the ledger's
    count, leaving its prefill counted forever (probe 77)."""
    w1 = Worker(1, ManualClock())
    inbound = w1.sharing.inbound()
    inbound.feed(shared.frame([(shared.HELLO, shared.VERSION, 0, "x")]))
    with pytest.raises(shared.FrameError):
        inbound.feed(shared.frame([(shared.DISPATCH, 1, "n1/a", 500, 600, True, 0.1, "x")]))
    load = w1.ledger.load("n1/a")
    assert (load.prefill_tokens, load.prefilling, load.sequences) == (0, 0, 0)


def test_without_a_mesh_tickets_carry_no_id_and_nothing_is_collected() -> None:
    clock = ManualClock()
    w0 = Worker(0, clock)
    w0.dispatch("in flight when the mesh closes")
    w0.sharing.detach()
    assert w0.sharing.in_flight() == 0
    ticket, _ = w0.dispatch("q")
    w0.pins.remember("team", "resp_1", "n1/a")
    assert ticket.seq == -1 and w0.sharing.take() is None
    assert w0.ledger.listener is None and w0.router.listener is None


def test_every_worker_learns_the_costs_from_every_workers_answers() -> None:
    clock = ManualClock()
    w0, w1 = Worker(0, clock), Worker(1, clock)
    into_w1 = connected(w0, w1)
    for i in range(40):         # answers w0 saw: 1,000 prompt tokens in 0.5 s each
        w0.router.costs.observe("n1/a", 0.5 + i * 0.001, 0.0, 1000.0, 0.0, 1.0, 20, 0.01)
    w0.send(into_w1)
    learned = w0.router.costs.costs("n1/a")
    assert learned != w1.router.costs.costs("n1/b")              # it moved from the default
    assert w1.router.costs.costs("n1/a") == learned
    assert w1.sharing.take() is None                              # nothing echoed


def tiered_cache() -> response_cache.TieredCache:
    return response_cache.TieredCache(options=response_cache.Options(),
                                      l1=l1.MemoryL1(100, 10**6),
                                      metrics=metrics_mod.Metrics(CollectorRegistry()))


def test_a_stream_form_learnt_on_one_worker_is_known_to_every_worker() -> None:
    clock = ManualClock()
    c0, c1 = tiered_cache(), tiered_cache()
    w0, w1 = Worker(0, clock, forms=c0), Worker(1, clock, forms=c1)
    into_w1 = connected(w0, w1)
    form = {"first": {"object": "chat.completion.chunk", "system_fingerprint": "fp"},
            "finish_with_content": True}
    # What store() does with an answer assembled from a stream: learn, and tell the pod.
    assert c0.learn_form(MODEL, form) and c0.form_listener is not None
    c0.form_listener(MODEL, form)
    w0.send(into_w1)
    assert c1.learn_form(MODEL, form) is False          # already known there
    assert w1.sharing.take() is None                    # and not echoed back
    # The same form again is no news: nothing more goes out.
    assert c0.learn_form(MODEL, form) is False
    w1.sharing.detach()
    assert c1.form_listener is None


async def test_an_invalidation_on_one_worker_voids_its_siblings_stores_in_flight() -> None:
    """The Admin API reaches one process; the others' lookups made before it must not
    store their answers after it, and their copies of answers go too."""
    clock = ManualClock()
    c0, c1 = tiered_cache(), tiered_cache()
    w0, w1 = Worker(0, clock, forms=c0), Worker(1, clock, forms=c1)
    into_w1 = connected(w0, w1)
    heard: list[tuple[str | None, str | None]] = []
    c1.invalidation_listeners.append(lambda tenant, model: heard.append((tenant, model)))
    question = cache_support.chat("What is the capital of France?")
    in_flight = await c1.lookup(question)           # on worker 1, before the invalidation
    assert in_flight.status == "miss"
    await c0.invalidate(tenant="acme")              # asked of worker 0
    w0.send(into_w1)
    assert heard == [("acme", None)]
    c1.store(in_flight, cache_support.answer("the model as it was"))
    await c1.drain()
    assert (await c1.lookup(question)).status == "miss"
    assert w1.sharing.take() is None                # not echoed back
    w0.sharing.detach()
    assert c0.invalidation_publisher is None


def test_every_kind_of_event_has_its_own_letter() -> None:
    kinds = [value for name, value in vars(shared).items()
             if name.isupper() and isinstance(value, str) and len(value) == 1]
    assert len(kinds) >= 10 and len(kinds) == len(set(kinds))
