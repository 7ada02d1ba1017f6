"""A small synchronous client of the Admin gRPC service, for ``synapsectl``."""

from __future__ import annotations

import argparse
import pathlib
from types import TracebackType

import grpc

from protos import enums
from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from synapse_common import call_metadata


def describe_error(exc: BaseException, what: str = "the call") -> str | None:
    """One readable line for a gRPC failure of ``what`` (``cordon gpu-a``); None for
    anything else. A status the Admin service sent (its trailing metadata names the error:
    ``call_metadata.ERROR``) is its refusal of ``what``, said with the service's reason,
    whatever the status: an UNAVAILABLE from a service that cannot store a cordon is
    not a service out of reach."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        if _refused_by_service(exc):
            return f"the Admin service refused {what} ({name}): {details}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach the Admin service: {details}"
        return f"{name}: {details}"
    return None


def _refused_by_service(exc: grpc.RpcError) -> bool:
    trailer = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return any(key == call_metadata.ERROR for key, _ in trailer or ())


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = b"\x08\x01"     # HealthCheckResponse{status: SERVING}


def health_serving(address: str, service: str, timeout_s: float) -> bool:
    """Whether the gRPC server at ``address`` (plaintext) says ``service`` is SERVING on
    the standard health service (open: no key). Its two messages have one field each, so
    they are written here rather than importing the health package's server side."""
    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if len(name) < 128 else b""
    if not request:
        raise ValueError(f"service name too long: {service[:40]}")
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                    response_deserializer=None)
        try:
            answer = check(request, timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(answer == HEALTH_SERVING)


class AdminClient:
    def __init__(self, server: str, token: str | None, tls: bool = False,
                 ca_file: str | None = None, timeout: float = 30.0) -> None:
        if tls:
            ca = pathlib.Path(ca_file).read_bytes() if ca_file else None
            self.channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(ca))
        else:
            self.channel = grpc.insecure_channel(server)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.channel.close()

    def _call(self, method: str, request: object, timeout: float | None = None) -> object:
        fn = getattr(self.stub, method)
        return fn(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def list_nodes(self) -> admin_pb2.ListNodesResponse:
        return self._call("ListNodes", admin_pb2.ListNodesRequest())  # type: ignore[return-value]

    def get_node(self, name: str) -> admin_pb2.NodeDetail:
        return self._call("GetNode", admin_pb2.GetNodeRequest(name=name))  # type: ignore[return-value]

    def cordon(self, name: str, reason: str) -> admin_pb2.NodeDetail:
        return self._call("CordonNode", admin_pb2.CordonNodeRequest(name=name, reason=reason))  # type: ignore[return-value]

    def uncordon(self, name: str) -> admin_pb2.NodeDetail:
        return self._call("UncordonNode", admin_pb2.UncordonNodeRequest(name=name))  # type: ignore[return-value]

    def drain(self, name: str, wait: bool, timeout_s: float,
              grace_s: float) -> admin_pb2.DrainNodeResponse:
        request = admin_pb2.DrainNodeRequest(name=name, wait=wait, timeout_seconds=timeout_s,
                                             grace_seconds=grace_s)
        # A waiting drain may take as long as its own timeout.
        call_timeout = max(self.timeout, timeout_s + 10) if wait else self.timeout
        return self._call("DrainNode", request, call_timeout)  # type: ignore[return-value]

    def list_models(self) -> admin_pb2.ListModelsResponse:
        return self._call("ListModels", admin_pb2.ListModelsRequest())  # type: ignore[return-value]

    def deploy(self, args: argparse.Namespace) -> admin_pb2.DeployModelResponse:
        request = admin_pb2.DeployModelRequest(
            model=args.model, engine=enums.ENGINE_KIND.value(args.engine), nodes=args.node,
            replicas=args.replicas, memory_required_bytes=int(args.memory_gb * 1024**3),
            served_model_names=args.served_model_name, max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            extra_args=args.extra_arg + (["--tensor-parallel-size", str(tp)]
                                         if (tp := args.tensor_parallel_size) else []),
            task=enums.BACKEND_TASK.value(args.task))
        return self._call("DeployModel", request)  # type: ignore[return-value]

    def undeploy(self, model: str, nodes: list[str]) -> admin_pb2.UndeployModelResponse:
        request = admin_pb2.UndeployModelRequest(model=model, nodes=nodes)
        return self._call("UndeployModel", request)  # type: ignore[return-value]

    def invalidate(self, tenant: str | None, model: str | None,
                   everything: bool) -> admin_pb2.InvalidateCacheResponse:
        if tenant:
            request = admin_pb2.InvalidateCacheRequest(tenant=tenant)
        elif model:
            request = admin_pb2.InvalidateCacheRequest(model=model)
        else:
            request = admin_pb2.InvalidateCacheRequest(all=everything)
        return self._call("InvalidateCache", request)  # type: ignore[return-value]

    def stats(self) -> admin_pb2.Stats:
        return self._call("GetStats", admin_pb2.GetStatsRequest())  # type: ignore[return-value]

    def explain(self, model: str, prompt: str, session: str, max_tokens: int,
                tenant: str = "", cache_salt: str = "") -> admin_pb2.ExplainRouteResponse:
        request = admin_pb2.ExplainRouteRequest(model=model, prompt=prompt, session_id=session,
                                                max_tokens=max_tokens, tenant=tenant,
                                                cache_salt=cache_salt)
        return self._call("ExplainRoute", request)  # type: ignore[return-value]

    def usage(self, tenant: str, since_s: float) -> admin_pb2.GetUsageResponse:
        request = admin_pb2.GetUsageRequest(tenant=tenant, since_seconds=since_s)
        return self._call("GetUsage", request)  # type: ignore[return-value]
