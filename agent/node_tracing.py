"""Traces of the agent's ``Node`` calls (issue 19): one server span per ``Node.Embed``.

The control plane sends its span's W3C ``traceparent`` in the call metadata
(:func:`synapse_common.tracing.grpc_metadata`); :class:`TracingInterceptor` makes the
call's span its child, so an embedding shows up inside the request that asked for it
(under the control plane's ``cache.embed`` or ``/v1/embeddings`` span). The interceptor
is installed only when ``tracing.enabled``: with tracing off the Node server is exactly
what it was. It runs after the token check, so a refused call leaves no span.

Span attributes: ``rpc.system``/``rpc.service``/``rpc.method``, ``rpc.grpc.status_code``,
and for Embed the model, the number of texts and how many came from the embedding cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protos.synapse.v1 import node_pb2
from synapse_common import tracing

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tracer: tracing.Tracing, prefix: str = "/synapse.v1.Node/") -> None:
        self._tracing = tracer
        self._prefix = prefix

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if (handler is None or not method.startswith(self._prefix)
                or handler.unary_unary is None):
            return handler
        behaviour = handler.unary_unary
        service, _, name = method.lstrip("/").partition("/")
        metadata = {k: v for k, v in (details.invocation_metadata or ())
                    if isinstance(v, str)}

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            scope = self._tracing.begin(f"{service.rsplit('.', 1)[-1]}.{name}", metadata, {
                "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
            code = grpc.StatusCode.UNKNOWN
            reply = None
            try:
                reply = await behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK
                return reply
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                attrs = {"rpc.grpc.status_code": code.value[0], **_embed_attributes(request,
                                                                                   reply)}
                scope.end(attrs, None if code == grpc.StatusCode.OK else code.name)

        return handler._replace(unary_unary=traced)


def _embed_attributes(request: Any, reply: Any) -> dict[str, str | int]:
    """Embed's request and reply in a few numbers (nothing for other calls; never raises:
    a trace must not fail the call)."""
    attrs: dict[str, str | int] = {}
    try:
        if isinstance(request, node_pb2.EmbedRequest):
            attrs["synapse.embed.texts"] = len(request.texts)
            attrs["synapse.embed.model"] = request.model
        if isinstance(reply, node_pb2.EmbedResponse):
            attrs["synapse.embed.cached"] = sum(1 for c in reply.cached if c)
    except Exception:   # pragma: no cover - defensive
        return {}
    return attrs
