"""Benchmark: what tracing and the access log cost per request, in the process itself.

``bench/gateway.py --tracing --access-log`` measures the whole control plane; this
measures the pieces, one process, no network, so the off path's cost is visible at all:

* ``off``: the calls the serving path makes for one request with tracing off and no
  client ``traceparent`` — ``forward`` (the middleware), ten ``span`` blocks (auth,
  cache.lookup, cache.l1, cache.l2.probe, cache.embed, cache.l2, route, queue.wait,
  cache.write, and one spare), ``start``/``finish`` (an upstream attempt), ``inject`` and
  ``grpc_metadata``;
* ``off_forwarding``: the same with a client ``traceparent`` forwarded;
* ``on``: the same with the request recorded (a real SDK provider, spans handed to a
  processor that drops them: the cost in the serving process, not the export thread's);
* ``access_log``: one access-log line through the JSON formatter and the redaction filter
  into a file (``/dev/null``), and a line skipped by ``sample_ratio`` 0.

Each figure is the median of ``--repeat`` runs of ``--number`` requests, in microseconds
of this process's CPU time per request (CPU time, not wall time: the machine is shared). Run: ``python -m bench.tracing_overhead``; last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import timeit
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from controlplane.core import access_log
from synapse_common import logs, tracing

SPANS = ("auth", "cache.lookup", "cache.l1", "cache.l2.probe", "cache.embed", "cache.l2",
         "route", "queue.wait", "cache.write", "spare")
PARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


class Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_request(scope_of: Callable[[], tracing.Scope | None]) -> None:
    scope = scope_of()
    for name in SPANS:
        with tracing.span(name):
            pass
    attempt = tracing.start("upstream")
    headers: dict[str, str] = {}
    tracing.inject(headers, attempt)
    tracing.grpc_metadata()
    tracing.finish(attempt)
    if scope is not None:
        scope.end()


def per_request_us(fn: Callable[[], None], number: int, repeat: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)
    return round(statistics.median(runs) / number * 1e6, 3)


def access_line(policy: access_log.Policy) -> Callable[[], None]:
    logger = logging.getLogger(f"bench.access.{policy.sample_ratio}")
    logger.propagate = False
    handler = logging.FileHandler("/dev/null")
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactingFilter(["sk-bench-secret-0123456789"]))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    log = access_log.AccessLog(policy, logger)
    line = access_log.Line("0123456789abcdef00000001", "POST", "/v1/chat/completions", 200,
                           0.0123, tenant="bench", model="llama", served="llama-3.1-8b",
                           cache="miss", backend="static/sim", ttft_s=0.004)
    return lambda: log.write(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    on = tracing.Tracing(provider, provider.get_tracer("bench"))
    n, r = args.number, args.repeat
    result = {
        "bench": "tracing_overhead", "unit": "us per request",
        "off": per_request_us(lambda: one_request(lambda: tracing.forward({})), n, r),
        "off_forwarding": per_request_us(lambda: one_request(lambda: tracing.forward(PARENT)),
                                         n, r),
        "on": per_request_us(lambda: one_request(lambda: on.begin("POST /v1/x", PARENT)),
                             n // 10, r),
        "access_log": per_request_us(access_line(access_log.Policy()), n, r),
        "access_log_sampled_out": per_request_us(
            access_line(access_log.Policy(sample_ratio=0.0)), n, r),
        "spans_per_request": len(SPANS) + 2,
    }
    provider.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
