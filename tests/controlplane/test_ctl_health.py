"""``ctl_client.health_serving``, the check ``synapse up`` waits on for the agent's
embedder (its Node service is SERVING only once the model is loaded), against a real
gRPC health service."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane import ctl_client
from synapse_common.ports import free_port

NODE = "synapse.v1.Node"


def test_serving_only_when_the_service_says_so() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        assert not ctl_client.health_serving(address, NODE, 5)      # unknown service
        checker.set(NODE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not ctl_client.health_serving(address, NODE, 5)
        checker.set(NODE, health_pb2.HealthCheckResponse.SERVING)
        assert ctl_client.health_serving(address, NODE, 5)
    finally:
        server.stop(None)
    assert not ctl_client.health_serving(f"127.0.0.1:{free_port()}", NODE, 1)
