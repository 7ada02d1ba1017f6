"""Metric helpers: vLLM's bucket rule, cumulative histograms, the collector's exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from simulator import metrics, scheduler
from simulator.config import ProfileSettings


def test_one_two_five_buckets_match_vllm() -> None:
    assert metrics.one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def test_histogram_is_cumulative_with_inf() -> None:
    hist = metrics.Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        hist.observe(v)
    assert hist.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert hist.count == 4 and hist.sum == 3.65


def test_exposition_reflects_scheduler_state() -> None:
    profile = ProfileSettings(num_gpu_blocks=10, block_size=4)
    sched = scheduler.Scheduler(profile, lambda: 0.0)
    sched.add(scheduler.Seq("a", 8, [], 3))
    sched.add(scheduler.Seq("b", 8, [], 3))
    sched.schedule()
    m = metrics.VllmMetrics(sched, "m", profile, 1024)
    text = m.render().decode()
    values = {(s.name, s.labels.get("finished_reason")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("vllm:num_requests_running", None)] == 2
    assert values[("vllm:kv_cache_usage_perc", None)] == 0.4
    assert values[("vllm:request_success_total", "abort")] == 0


def test_tei_exposition_parses() -> None:
    tei = metrics.TeiMetrics()
    tei.request_count["single"] += 1
    tei.failure("validation")
    tei.duration.observe(0.01)
    names = {s.name for f in text_string_to_metric_families(tei.render().decode())
             for s in f.samples}
    assert {"te_request_count_total", "te_request_failure_total",
            "te_request_duration_count", "te_queue_size"} <= names
