"""A real OTLP/gRPC trace receiver for tests and benchmarks.

It implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` — the service
an OpenTelemetry collector listens on at :4317 — on a grpc.aio server on a free port, so
the processes under test export to it exactly as they would to a collector. Spans are kept
as :class:`Span` rows (hex ids, plain attributes, event names, the exporting service).

``python -m tests.otlp --port N`` runs it on its own and only counts spans (benchmarks
point a traced control plane at it without weighing on the load generator's process).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import time
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from tests import harness


@dataclasses.dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str          # "" for a root
    kind: int
    attributes: dict[str, Any]
    events: tuple[str, ...]
    status_code: int        # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


def _value(v: common_pb2.AnyValue) -> Any:
    field = v.WhichOneof("value")
    return getattr(v, field) if field else None


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterable[Span]:
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield Span(str(resource.get("service.name", "")), s.name, s.trace_id.hex(),
                           s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                           {a.key: _value(a.value) for a in s.attributes},
                           tuple(e.name for e in s.events), s.status.code,
                           s.start_time_unix_nano, s.end_time_unix_nano)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[Span] = []
        self.count = 0
        self.exports = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.exports += 1
        if not self.keep:       # counting only: no decoding (benchmarks)
            self.count += sum(len(ss.spans) for rs in request.resource_spans
                              for ss in rs.scope_spans)
        for span in spans_of(request) if self.keep else ():
            self.count += 1
            self.spans.append(span)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self, port: int = 0) -> str:
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    # -- reading ----------------------------------------------------------------------------

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, trace_id: str, names: Iterable[str], within: float = 30.0
                       ) -> list[Span]:
        """The trace's spans once every name in ``names`` has arrived."""
        wanted = set(names)
        await harness.until(lambda: wanted <= {s.name for s in self.trace(trace_id)}, within,
                            f"spans {sorted(wanted)} of trace {trace_id}")
        return self.trace(trace_id)


def by_name(spans: Iterable[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


async def _serve(port: int) -> None:
    receiver = Receiver(keep=False)
    await receiver.start(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    await stop.wait()
    print(f"received {receiver.count} spans in {receiver.exports} exports over "
          f"{time.monotonic() - started:.0f}s", flush=True)
    await receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="count the spans an OTLP exporter sends")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
