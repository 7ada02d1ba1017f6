"""The tracing facade's rules: nothing happens outside a recorded request, W3C context in
and out, what outlives a request stays out of its trace, and the settings' precedence over
the OTEL_* variables. (Export over OTLP: tests/controlplane/test_tracing.py.)"""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from synapse_common import settings as settings_mod
from synapse_common import tracing
from synapse_common.tracing import TracingSettings

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def recorder() -> tuple[tracing.Tracing, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return tracing.Tracing(provider, provider.get_tracer("test")), memory


def test_outside_a_request_every_call_is_a_no_op() -> None:
    with tracing.span("x") as span:
        assert span is None
    assert tracing.start("y") is None
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert headers == {} and tracing.grpc_metadata() == ()


@pytest.mark.parametrize(("parent", "forwarded"), [
    (PARENT, True),
    (PARENT.upper(), False),                                        # W3C: lower-case hex
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),   # zero trace id
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),   # version ff
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),
])
def test_with_tracing_off_only_a_valid_traceparent_is_forwarded(parent: str,
                                                                forwarded: bool) -> None:
    scope = tracing.forward({"traceparent": parent, "tracestate": "a=1,b=2"})
    assert (scope is not None) == forwarded
    headers: dict[str, str] = {}
    tracing.inject(headers)
    if scope is not None:
        assert headers == {"traceparent": parent, "tracestate": "a=1,b=2"}
        assert tracing.grpc_metadata() == (("traceparent", parent), ("tracestate", "a=1,b=2"))
        with tracing.span("not recorded") as span:
            assert span is None
        scope.end()
    else:
        assert headers == {}
    assert tracing.grpc_metadata() == ()


def test_spans_nest_under_the_clients_parent_and_calls_name_their_span() -> None:
    traced, memory = recorder()
    scope = traced.begin("POST /v1/x", {"traceparent": PARENT})
    with tracing.span("cache.lookup") as lookup:
        assert lookup is not None
        with tracing.span("cache.l1"):
            pass
    attempt = tracing.start("upstream", {"synapse.attempt": 0})
    headers: dict[str, str] = {}
    tracing.inject(headers, attempt)
    tracing.finish(attempt, error="status 500")
    scope.end({"http.response.status_code": 502}, error="status 502")
    spans = {s.name: s for s in memory.get_finished_spans()}
    root = spans["POST /v1/x"]
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert spans["cache.l1"].parent.span_id == spans["cache.lookup"].context.span_id
    assert spans["upstream"].parent.span_id == root.context.span_id
    assert headers["traceparent"] == (f"00-{scope.trace_id}-"
                                      f"{spans['upstream'].context.span_id:016x}-01")
    assert root.status.status_code.name == "ERROR"
    assert tracing.start("after the request") is None


async def test_a_task_outliving_its_request_adds_nothing_to_the_trace() -> None:
    traced, memory = recorder()
    ended = asyncio.Event()
    seen: list[object] = []

    async def writer_loop() -> None:        # e.g. a cache writer started by a request
        await ended.wait()
        with tracing.span("late") as span:
            seen.append(span)
        seen.append(tracing.grpc_metadata())

    scope = traced.begin("POST /v1/x", {})
    task = asyncio.get_running_loop().create_task(writer_loop())
    scope.end()
    ended.set()
    await task
    assert seen == [None, ()]
    assert [s.name for s in memory.get_finished_spans()] == ["POST /v1/x"]


def test_settings_and_the_otel_variables() -> None:
    off = tracing.TracingSettings()
    on = tracing.TracingSettings(enabled=True, endpoint="http://127.0.0.1:1")
    assert tracing.setup(off, "svc", environ={}) is None
    assert tracing.setup(on, "svc", environ={"OTEL_SDK_DISABLED": "true"}) is None
    names = []
    for cfg, env in ((on, {}), (on, {"OTEL_SERVICE_NAME": "from-env"}),
                     (on.model_copy(update={"service_name": "from-config"}),
                      {"OTEL_SERVICE_NAME": "from-env"})):
        traced = tracing.setup(cfg, "svc", "replica-1", environ=env)
        assert traced is not None
        attrs = traced.provider.resource.attributes
        names.append((attrs["service.name"], attrs["service.instance.id"]))
        traced.shutdown()
    assert names == [("svc", "replica-1"), ("from-env", "replica-1"),
                     ("from-config", "replica-1")]
    with pytest.raises(settings_mod.ConfigError, match=r"tracing\.sampling_ratio"):
        settings_mod.validate(Holder, {"tracing": {"sampling_ratio": 1.5}})


class Holder(settings_mod.Section):
    tracing: TracingSettings = TracingSettings()
