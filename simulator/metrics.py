"""Every metric the simulator exports, with vLLM V1 / TEI names and labels.

vLLM mode (names and buckets from vLLM ``v1/metrics/loggers.py``, compared with
``shared/reference/vllm_metrics_sample.txt``): every series carries ``model_name`` (the
first served name) and ``engine="0"``; counters are exposed as ``*_total`` plus
``*_created``; ``vllm:cache_config_info`` is vLLM's info-as-gauge (value 1) whose labels
are the cache config (``block_size``, ``num_gpu_blocks``, …) and ``engine`` — without
``model_name``, exactly as vLLM emits it, so scrapers written against the simulator also
work against vLLM. The exposition is rendered by ``prometheus_client`` from a collector
that reads the scheduler's plain counters at scrape time, so the serving path pays
nothing per request for counters and gauges; histograms are tiny local objects observed
once per request (and once per token for inter-token latency).

TEI mode: ``te_*`` names as text-embeddings-inference's metrics exporter writes them
(counters without ``_total``), rendered by hand because ``prometheus_client`` would add
the suffix.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from simulator import scheduler as sched
from simulator.config import ProfileSettings

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TEI_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TEI_LENGTH_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def one_two_five_buckets(maximum: int) -> tuple[float, ...]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50 … up to ``maximum``."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > maximum:
                return tuple(out)
            out.append(float(value))
        exponent += 1


class Histogram:
    """A cumulative-on-export histogram: ``observe`` is one bisect and two adds."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_fmt(bound), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


def _fmt(value: float) -> str:
    return repr(float(value))


class VllmMetrics(Collector):
    """The vLLM exposition for one scheduler."""

    def __init__(self, scheduler: sched.Scheduler, model_name: str,
                 profile: ProfileSettings, max_model_len: int) -> None:
        self.scheduler = scheduler
        self.labels = {"model_name": model_name, "engine": "0"}
        self.profile = profile
        self.created = time.time()
        # The engine's own clock: modelled step durations plus idle time (scaled), so a
        # bench can measure throughput in simulated time whatever the host's load adds.
        self.simulated_seconds = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference = Histogram(REQUEST_LATENCY_BUCKETS)
        token_buckets = one_two_five_buckets(max_model_len)
        self.prompt_len = Histogram(token_buckets)
        self.generation_len = Histogram(token_buckets)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    def observe_finished(self, seq: sched.Seq) -> None:
        """Per-request histograms, once a sequence ends."""
        if seq.finished is None:
            return
        self.e2e.observe(seq.finished - seq.arrival)
        if seq.admitted is not None:
            self.queue.observe(seq.admitted - seq.arrival)
            self.inference.observe(seq.finished - seq.admitted)
            if seq.first_token is not None:
                self.prefill.observe(seq.first_token - seq.admitted)
                self.decode.observe(seq.finished - seq.first_token)
        if seq.first_token is not None:
            self.prompt_len.observe(seq.num_prompt_tokens)
            self.generation_len.observe(seq.num_generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield from self._counters()
        yield from self._histograms()
        yield self._cache_config()

    def _gauges(self) -> Iterator[Metric]:
        s = self.scheduler
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             len(s.running)),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             len(s.waiting)),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             s.pool.usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=list(self.labels))
            g.add_metric(list(self.labels.values()), float(value))
            yield g

    def _counters(self) -> Iterator[Metric]:
        c = self.scheduler.counters
        for name, doc, value in (
            ("vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", c.prefix_queries),
            ("vllm:prefix_cache_hits",
             "Prefix cache hits, in terms of number of cached tokens.", c.prefix_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             c.preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             c.generation_tokens),
        ):
            m = CounterMetricFamily(name, doc, labels=list(self.labels))
            m.add_metric(list(self.labels.values()), float(value), created=self.created)
            yield m
        clock = CounterMetricFamily(
            "simulator:simulated_seconds", "Simulated seconds elapsed on the engine's own "
            "clock (modelled step durations plus idle time), not counting host delays "
            "(simulator only).", labels=list(self.labels))
        clock.add_metric(list(self.labels.values()), self.simulated_seconds,
                         created=self.created)
        yield clock
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*self.labels, "finished_reason"])
        for reason, value in sorted(c.finished.items()):
            success.add_metric([*self.labels.values(), reason], float(value),
                               created=self.created)
        yield success

    def _histograms(self) -> Iterator[Metric]:
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             self.ttft),
            ("vllm:inter_token_latency_seconds",
             "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:e2e_request_latency_seconds",
             "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds",
             "Histogram of time spent in WAITING phase for request.", self.queue),
            ("vllm:request_prefill_time_seconds",
             "Histogram of time spent in PREFILL phase for request.", self.prefill),
            ("vllm:request_decode_time_seconds",
             "Histogram of time spent in DECODE phase for request.", self.decode),
            ("vllm:request_inference_time_seconds",
             "Histogram of time spent in RUNNING phase for request.", self.inference),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
             self.prompt_len),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.",
             self.generation_len),
        ):
            m = HistogramMetricFamily(name, doc, labels=list(self.labels))
            m.add_metric(list(self.labels.values()), hist.cumulative(), hist.sum)
            yield m

    def _cache_config(self) -> Metric:
        p = self.profile
        info = {"block_size": str(p.block_size), "cache_dtype": "auto",
                "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9",
                "num_cpu_blocks": "None", "num_gpu_blocks": str(p.num_gpu_blocks),
                "prefix_caching_hash_algo": "builtin", "engine": "0"}
        g = GaugeMetricFamily("vllm:cache_config_info",
                              "Information of the LLMEngine CacheConfig", labels=list(info))
        g.add_metric(list(info.values()), 1.0)
        return g


class TeiMetrics:
    """TEI's ``te_*`` series, rendered by hand (TEI counters carry no ``_total``)."""

    def __init__(self) -> None:
        self.request_count = {"single": 0, "batch": 0}
        self.request_success = {"single": 0, "batch": 0}
        self.request_failure: dict[str, int] = {}
        self.embed_count = 0
        self.queue_size = 0
        self.batch_current_size = 0
        self.duration = Histogram(TEI_DURATION_BUCKETS)
        self.input_length = Histogram(TEI_LENGTH_BUCKETS)

    def failure(self, kind: str) -> None:
        self.request_failure[kind] = self.request_failure.get(kind, 0) + 1

    def render(self) -> bytes:
        lines: list[str] = []
        self._counter(lines, "te_request_count", "method", self.request_count)
        self._counter(lines, "te_request_success", "method", self.request_success)
        self._counter(lines, "te_request_failure", "err", self.request_failure)
        lines += ["# TYPE te_embed_count counter", f"te_embed_count {self.embed_count}"]
        lines += ["# TYPE te_queue_size gauge", f"te_queue_size {self.queue_size}"]
        lines += ["# TYPE te_batch_current_size gauge",
                  f"te_batch_current_size {self.batch_current_size}"]
        self._histogram(lines, "te_request_duration", self.duration)
        self._histogram(lines, "te_request_input_length", self.input_length)
        return ("\n".join(lines) + "\n").encode()

    @staticmethod
    def _counter(lines: list[str], name: str, label: str, values: dict[str, int]) -> None:
        lines.append(f"# TYPE {name} counter")
        lines += [f'{name}{{{label}="{key}"}} {value}' for key, value in sorted(values.items())]

    @staticmethod
    def _histogram(lines: list[str], name: str, hist: Histogram) -> None:
        lines.append(f"# TYPE {name} histogram")
        cumulative = hist.cumulative()
        lines += [f'{name}_bucket{{le="{le}"}} {int(n)}' for le, n in cumulative]
        lines += [f"{name}_sum {hist.sum}", f"{name}_count {int(cumulative[-1][1])}"]
