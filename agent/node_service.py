"""The agent's gRPC server: ``synapse.v1.Node`` plus ``grpc.health.v1`` and reflection.

Errors map through one table (:data:`STATUS`) from the :mod:`agent.embedding` error tree
to gRPC codes: INVALID_ARGUMENT for bad input, NOT_FOUND for a model this agent does
not serve, UNAVAILABLE when the embedder is loading, down or failing (the control
plane then fails open or tries another agent). Anything unexpected is logged with its
traceback and returned as INTERNAL with a generic message.

The health service reports ``synapse.v1.Node`` SERVING only when an embedder is
configured and loaded; the overall service ("") is SERVING while the process runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent import embedding
from protos.synapse.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)
NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name

STATUS: dict[type[embedding.EmbedError], grpc.StatusCode] = {
    embedding.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    embedding.UnknownModel: grpc.StatusCode.NOT_FOUND,
    embedding.EmbedderUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: embedding.EmbedError) -> grpc.StatusCode:
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, service: embedding.EmbeddingService | None,
                 observe: Callable[[str, float], None]) -> None:
        self._service = service
        self._observe = observe

    async def Embed(self, request: node_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> node_pb2.EmbedResponse:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._embed(request, context)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._observe(code.name, time.perf_counter() - start)

    async def _embed(self, request: node_pb2.EmbedRequest,
                     context: grpc.aio.ServicerContext) -> node_pb2.EmbedResponse:
        if self._service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no embedder is configured on this agent (embedder.kind: none)")
        assert self._service is not None
        try:
            result = await self._service.embed(request.model, list(request.texts),
                                               request.normalize)
        except embedding.EmbedError as exc:
            await context.abort(status_for(exc), str(exc))
        except Exception:
            log.exception("Embed failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error while embedding")
        return node_pb2.EmbedResponse(model=result.model, dim=result.dim,
                                      vectors=result.vectors, cached=result.cached,
                                      embedder_id=result.embedder_id)


class NodeServer:
    """Owns the grpc.aio server; ``port`` is the bound port (also when 0 was asked)."""

    def __init__(self, service: embedding.EmbeddingService | None, host: str, port: int,
                 observe: Callable[[str, float], None] = lambda code, seconds: None) -> None:
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ])
        node_pb2_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            NodeServicer(service, observe), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (NODE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc's way of saying EADDRINUSE / EACCES
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind the Node gRPC server to {host}:{port} "
                          "(address in use or not available)")

    async def start(self, embedder_ready: bool) -> None:
        await self.server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        await self.health.set(NODE_SERVICE, serving if embedder_ready else not_serving)

    async def set_embedder_ready(self, ready: bool) -> None:
        await self.health.set(NODE_SERVICE, health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
