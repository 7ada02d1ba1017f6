"""The router's accuracy and learned costs as metrics, from its settled-request reports.

:func:`recorder` returns the observer that ``services.build`` registers with
:meth:`controlplane.core.router.Router.add_observer`. Per backend it records how far the
predicted TTFT was from the observed one (streamed answers), how far the predicted cached
tokens were from what the engine reported, both totals (their ratio is the prefix
index's agreement with the engine), and the costs the router now uses for the backend.
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane import metrics as metrics_mod
from controlplane.core import types

BIAS_WEIGHT = 0.05  # weight of the newest answer in the TTFT bias (about the last 20)


class _Children:
    """One backend's metric children. The bias and the learned costs are gauges read at
    scrape time from the newest observation (nothing to update per request)."""

    __slots__ = ("cached_error", "predicted", "reported", "ttft_error")

    def __init__(self, m: metrics_mod.Metrics, backend: str,
                 latest: dict[str, types.RouteObservation], bias: dict[str, float]) -> None:
        self.ttft_error = metrics_mod.fast(m.route_ttft_error.labels(backend))
        self.cached_error = metrics_mod.fast(m.route_cached_error.labels(backend))
        self.predicted = metrics_mod.fast(m.route_cached_tokens.labels(backend, "predicted"))
        self.reported = metrics_mod.fast(m.route_cached_tokens.labels(backend, "reported"))
        m.route_ttft_bias.labels(backend).set_function(lambda: bias.get(backend, 0.0))
        m.route_prefill_cost.labels(backend).set_function(
            lambda: latest[backend].prefill_s_per_token)
        m.route_decode_cost.labels(backend).set_function(
            lambda: latest[backend].decode_s_per_step)
        m.route_overhead.labels(backend).set_function(lambda: latest[backend].overhead_s)


def recorder(m: metrics_mod.Metrics) -> Callable[[types.RouteObservation], None]:
    children: dict[str, _Children] = {}
    latest: dict[str, types.RouteObservation] = {}
    bias: dict[str, float] = {}

    def record(obs: types.RouteObservation) -> None:
        backend = obs.backend
        latest[backend] = obs
        c = children.get(backend)
        if c is None:
            c = children[backend] = _Children(m, backend, latest, bias)
        if obs.observed_ttft_s is not None:
            error = obs.observed_ttft_s - obs.predicted_ttft_s
            c.ttft_error.observe(abs(error))
            last = bias.get(backend)
            bias[backend] = error if last is None else last + BIAS_WEIGHT * (error - last)
        if obs.reported_cached_tokens is not None:
            c.cached_error.observe(abs(obs.predicted_cached_tokens - obs.reported_cached_tokens))
            c.predicted.inc(obs.predicted_cached_tokens)
            c.reported.inc(obs.reported_cached_tokens)

    return record
