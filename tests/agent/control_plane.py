"""A real gRPC ``ControlPlane`` server standing in for the control plane in agent tests.

Synchronous (thread pool), so tests that block on ``wait_until`` do not starve it.
Records every ``AgentMessage`` per stream, acks every report as the control plane does
(the agent counts a stream registered once it is answered), and can push commands to
connected agents.
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures

import grpc

from protos.synapse.v1 import controlplane_pb2, controlplane_pb2_grpc
from synapse_common import call_metadata

_CLOSE = object()


class Recorder(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streams: list[list[controlplane_pb2.AgentMessage]] = []
        self.bearers: list[str | None] = []     # the token each stream presented
        self._outboxes: list[queue.Queue[object]] = []

    def Connect(self, request_iterator, context):
        messages: list[controlplane_pb2.AgentMessage] = []
        outbox: queue.Queue[object] = queue.Queue()
        with self.lock:
            self.streams.append(messages)
            self.bearers.append(call_metadata.bearer(context.invocation_metadata()))
            self._outboxes.append(outbox)

        def read() -> None:
            try:
                for msg in request_iterator:
                    with self.lock:
                        messages.append(msg)
                    if msg.HasField("report"):
                        outbox.put(controlplane_pb2.ControlMessage(ack=controlplane_pb2.Ack(
                            sequence=msg.report.sequence, replica="recorder")))
            except grpc.RpcError:
                pass
            outbox.put(_CLOSE)

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                item = outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _CLOSE:
                return
            yield item

    def send(self, command: controlplane_pb2.ControlMessage) -> None:
        with self.lock:
            for box in self._outboxes:
                box.put(command)

    def all(self) -> list[controlplane_pb2.AgentMessage]:
        with self.lock:
            return [m for s in self.streams for m in s]

    def registers(self) -> list[controlplane_pb2.Register]:
        return [m.register for m in self.all() if m.HasField("register")]

    def reports(self) -> list[controlplane_pb2.Report]:
        return [m.report for m in self.all() if m.HasField("report")]

    def acks(self) -> list[controlplane_pb2.CommandAck]:
        return [m.command_ack for m in self.all() if m.HasField("command_ack")]

    def last_backend(self, name: str):
        for report in reversed(self.reports()):
            for backend in report.backends:
                if backend.name == name:
                    return backend
        return None


class ControlPlaneServer:
    """``start()`` binds (port 0 the first time, the same port after a restart)."""

    def __init__(self) -> None:
        self.port = 0
        self.recorder = Recorder()
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(self.recorder, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None
