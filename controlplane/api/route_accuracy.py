"""The router's accuracy and learned costs as metrics, from its settled-request reports.

:func:`recorder` returns the observer that ``services.build`` registers with
:meth:`controlplane.core.router.Router.add_observer`. Per backend it records how far the
predicted TTFT was from the observed one (streamed answers), how far the predicted cached
tokens were from what the engine reported, both totals (their ratio is the prefix
index's agreement with the engine), and the costs the router now uses for the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controlplane import metrics as metrics_mod
from controlplane.core import types

BIAS_WEIGHT = 0.05  # weight of the newest answer in the TTFT bias (about the last 20)


class _Children:
    __slots__ = ("bias", "cached_error", "decode", "overhead", "predicted", "prefill",
                 "reported", "ttft_error")

    def __init__(self, m: metrics_mod.Metrics, backend: str) -> None:
        self.ttft_error = m.route_ttft_error.labels(backend)
        self.bias: Any = m.route_ttft_bias.labels(backend)
        self.cached_error = m.route_cached_error.labels(backend)
        self.predicted = m.route_cached_tokens.labels(backend, "predicted")
        self.reported = m.route_cached_tokens.labels(backend, "reported")
        self.prefill = m.route_prefill_cost.labels(backend)
        self.decode = m.route_decode_cost.labels(backend)
        self.overhead = m.route_overhead.labels(backend)


def recorder(m: metrics_mod.Metrics) -> Callable[[types.RouteObservation], None]:
    children: dict[str, _Children] = {}
    bias: dict[str, float] = {}
    costs: dict[str, tuple[float, float, float]] = {}

    def record(obs: types.RouteObservation) -> None:
        c = children.get(obs.backend)
        if c is None:
            c = children[obs.backend] = _Children(m, obs.backend)
        if obs.observed_ttft_s is not None:
            error = obs.observed_ttft_s - obs.predicted_ttft_s
            c.ttft_error.observe(abs(error))
            last = bias.get(obs.backend)
            bias[obs.backend] = error if last is None else last + BIAS_WEIGHT * (error - last)
            c.bias.set(bias[obs.backend])
        if obs.reported_cached_tokens is not None:
            c.cached_error.observe(abs(obs.predicted_cached_tokens - obs.reported_cached_tokens))
            c.predicted.inc(obs.predicted_cached_tokens)
            c.reported.inc(obs.reported_cached_tokens)
        now = (obs.prefill_s_per_token, obs.decode_s_per_step, obs.overhead_s)
        if costs.get(obs.backend) != now:  # they move only when a median does
            costs[obs.backend] = now
            c.prefill.set(now[0])
            c.decode.set(now[1])
            c.overhead.set(now[2])

    return record
