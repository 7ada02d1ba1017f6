"""Costs learned, not assumed: each backend's prefill, decode and first-token costs from
its settled requests (times from an injected clock), robust to outliers, and the router's
accuracy reported to its observers (the metrics)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from controlplane import metrics
from controlplane.api import route_accuracy
from controlplane.core import costs, ledger, prefix_index, registry, router, types, usage
from tests.clock import ManualClock

MODEL = "m"
CONFIGURED_PREFILL = 0.00012
CONFIGURED_DECODE = 0.02


class Engine:
    """What a backend really costs: TTFT = overhead + prefill_s_per_token * uncached."""

    def __init__(self, prefill: float, decode: float, overhead: float = 0.01) -> None:
        self.prefill, self.decode, self.overhead = prefill, decode, overhead


def fleet(*names: str) -> tuple[router.Router, ManualClock, list[types.RouteObservation]]:
    clock = ManualClock()
    reg = registry.Registry(ManualClock(), 15.0)  # reports never age
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", [types.BackendState(key=f"n1/{n}", node="n1", name=n, url=f"http://{n}",
                                         models=(MODEL,), kv_capacity_tokens=10**6,
                                         block_size=16) for n in names])
    r = router.Router(router.Params(prefill_s_per_token=CONFIGURED_PREFILL,
                                    decode_s_per_step=CONFIGURED_DECODE),
                      reg, ledger.Ledger(clock), prefix_index.PrefixIndex(200_000))
    seen: list[types.RouteObservation] = []
    r.add_observer(seen.append)
    return r, clock, seen


def serve(r: router.Router, clock: ManualClock, engine: Engine, prompt_tokens: int,
          backend: int = 0, slow: float = 1.0, output: int = 17) -> types.RouteObservation:
    """One streamed request, alone on the backend, that takes ``slow`` times its cost."""
    # four digits are one token of the approximation: a unique prompt of that many tokens
    prompt = router.Prompt.from_text(" ".join(str(random.randrange(1000, 10_000))
                                              for _ in range(prompt_tokens)), output)
    decision = r.route(MODEL, prompt)
    assert decision is not None
    verdict = sorted(decision.candidates, key=lambda v: v.backend.key)[backend]
    ticket = r.dispatched(decision, verdict, prompt)
    clock.now += slow * (engine.overhead + engine.prefill * prompt.tokens)
    ticket.streamed = True
    r.ledger.first_byte(ticket)
    clock.now += (output - 1) * engine.decode
    r.ledger.finish(ticket)
    ticket.usage = usage.Usage(prompt.tokens, output, 0)
    obs = r.observe(ticket)
    assert obs is not None
    return obs


def test_a_backend_starts_from_the_configured_constants() -> None:
    r, _, _ = fleet("a")
    c = r.costs.costs("n1/a")
    assert (c.prefill_s_per_token, c.decode_s_per_step, c.overhead_s) == \
        (CONFIGURED_PREFILL, CONFIGURED_DECODE, 0.0)


def test_costs_converge_to_what_the_engine_takes() -> None:
    r, clock, seen = fleet("a")
    engine = Engine(prefill=0.0005, decode=0.031)
    random.seed(1)
    for _ in range(60):
        serve(r, clock, engine, random.choice([40, 60, 800, 1600, 2400]))
    c = r.costs.costs("n1/a")
    assert abs(c.prefill_s_per_token / engine.prefill - 1) < 0.05
    assert abs(c.decode_s_per_step / engine.decode - 1) < 0.05
    assert abs(c.overhead_s - engine.overhead) < 0.005
    last = serve(r, clock, engine, 2000)
    assert last.observed_ttft_s is not None
    assert abs(last.predicted_ttft_s / last.observed_ttft_s - 1) < 0.05
    assert seen[0].observed_ttft_s is not None and \
        seen[0].predicted_ttft_s < 0.5 * seen[0].observed_ttft_s  # the constant was wrong


def test_outliers_barely_move_the_learned_costs() -> None:
    r, clock, _ = fleet("a")
    engine = Engine(prefill=0.0005, decode=0.031)
    random.seed(2)
    for _ in range(40):
        serve(r, clock, engine, 1600)
    before = r.costs.costs("n1/a").prefill_s_per_token
    for i in range(40):  # one request in five stalls for 20 times its cost
        serve(r, clock, engine, 1600, slow=20.0 if i % 5 == 0 else 1.0)
    after = r.costs.costs("n1/a").prefill_s_per_token
    assert abs(after / before - 1) < 0.1


def test_a_lasting_slowdown_is_learned_within_a_window() -> None:
    r, clock, _ = fleet("a")
    engine = Engine(prefill=0.0005, decode=0.031)
    for _ in range(40):
        serve(r, clock, engine, 1600)
    slower = Engine(prefill=0.001, decode=0.031)
    for _ in range(costs.WINDOW):
        serve(r, clock, slower, 1600)
    assert abs(r.costs.costs("n1/a").prefill_s_per_token / slower.prefill - 1) < 0.05


def test_a_heterogeneous_fleet_is_scored_by_each_backends_own_cost() -> None:
    r, clock, _ = fleet("fast", "slow")
    fast, slow = Engine(0.0005, 0.03), Engine(0.001, 0.06)
    for _ in range(20):
        serve(r, clock, fast, 1600, backend=0)
        serve(r, clock, slow, 1600, backend=1)
    prompt = router.Prompt.from_text("unique " * 2000, 8)
    decision = r.route(MODEL, prompt)
    assert decision is not None
    by = {v.backend.name: v for v in decision.candidates}
    assert decision.candidates[0].backend.name == "fast"
    assert abs(by["slow"].prefill_s / by["fast"].prefill_s - 2) < 0.1
    assert by["slow"].cost_samples == 20


def test_whole_answers_and_failed_attempts_teach_no_ttft() -> None:
    r, clock, seen = fleet("a")
    prompt = router.Prompt.from_text("hello " * 300, 8)
    decision = r.route(MODEL, prompt)
    assert decision is not None
    failed = r.dispatched(decision, decision.candidates[0], prompt)
    r.ledger.finish(failed)  # connect error: never answered
    assert r.observe(failed) is None
    whole = r.dispatched(decision, decision.candidates[0], prompt)
    clock.now += 5.0
    r.ledger.first_byte(whole)  # the whole answer at once: not a TTFT
    r.ledger.finish(whole)
    whole.usage = usage.from_tail(b'{"choices":[],"usage":{"prompt_tokens":310,'
                                  b'"completion_tokens":8,"total_tokens":318,'
                                  b'"prompt_tokens_details":{"cached_tokens":288}}}')
    obs = r.observe(whole)
    assert obs is not None and obs.observed_ttft_s is None
    assert (obs.reported_cached_tokens, obs.reported_prompt_tokens) == (288, 310)
    assert r.costs.costs("n1/a").prefill_s_per_token == CONFIGURED_PREFILL
    assert seen == [obs]


def test_usage_is_read_from_a_streams_last_bytes() -> None:
    tail = (b'data: {"id":"x","choices":[{"delta":{"content":"!"}}],"usage":null}\n\n'
            b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":2011,"total_tokens":2043,'
            b'"completion_tokens":32,"prompt_tokens_details":{"cached_tokens":1920}}}\n\n'
            b'data: [DONE]\n\n')
    assert usage.from_tail(tail) == usage.Usage(2011, 32, 1920)
    assert usage.from_tail(b'{"usage":{"prompt_tokens":5,"completion_tokens":1}}') == \
        usage.Usage(5, 1, None)
    assert usage.from_tail(b"data: [DONE]\n\n") is None


def test_observations_become_accuracy_metrics() -> None:
    m = metrics.Metrics(CollectorRegistry())
    record = route_accuracy.recorder(m)
    record(types.RouteObservation("n1/a", "approximate", 0.5, 0.7, 1024, 1152, 2000, 2011,
                                  0.0005, 0.03, 0.01))
    record(types.RouteObservation("n1/a", "approximate", 0.5, None, 0, None, 10, None,
                                  0.0005, 0.03, 0.01))

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"backend": "n1/a", **labels})

    assert value("synapse_route_prediction_error_ttft_seconds_count") == 1
    assert abs((value("synapse_route_prediction_error_ttft_seconds_sum") or 0) - 0.2) < 1e-9
    assert abs((value("synapse_route_prediction_error_ttft_bias_seconds") or 0) - 0.2) < 1e-9
    assert value("synapse_route_prediction_error_cached_tokens_sum") == 128
    assert value("synapse_route_cached_tokens_total", source="predicted") == 1024
    assert value("synapse_route_cached_tokens_total", source="reported") == 1152
    assert value("synapse_route_learned_prefill_seconds_per_token") == 0.0005


def _busy_fast_vs_idle_slow(noisy: bool) -> str:
    """Backend "fast" is faster per token but has two streams in flight; "slow" is idle.
    Which one gets a unique prompt, when the predictions were (not) noisy so far."""
    r, clock, _ = fleet("fast", "slow")
    fast, slow = Engine(0.0005, 0.01), Engine(0.0006, 0.01)
    for i in range(20):
        jitter = (3.0 if i % 2 else 0.2) if noisy else 1.0
        serve(r, clock, fast, 1600, backend=0, slow=jitter)
        serve(r, clock, slow, 1600, backend=1, slow=jitter)
    for _ in range(2):
        warm = router.Prompt.from_text("busy " * 8, 8)
        decision = r.route(MODEL, warm)
        assert decision is not None
        held = next(v for v in decision.candidates if v.backend.name == "fast")
        r.ledger.first_byte(r.dispatched(decision, held, warm))  # decoding, not finished
    decision = r.route(MODEL, router.Prompt.from_text("unique " * 1000, 8))
    assert decision is not None
    return decision.candidates[0].backend.name


def test_differences_within_the_predictions_own_error_go_to_the_less_loaded_backend() -> None:
    assert _busy_fast_vs_idle_slow(noisy=False) == "fast"
    assert _busy_fast_vs_idle_slow(noisy=True) == "slow"
