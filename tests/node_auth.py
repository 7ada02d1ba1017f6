"""Channels to an agent's ``Node`` service that present the agent token on every call, as
the control plane does (``authorization: Bearer <token>``, plus the tenant when given).

Tests that call ``Node.Embed`` directly use these instead of a bare channel, so each call
is authenticated without every call site passing metadata.
"""

from __future__ import annotations

import collections
from typing import Any

import grpc

from synapse_common import call_metadata
from tests import fleet

TOKEN = fleet.AGENT_TOKEN


def metadata(token: str | None = TOKEN, tenant: str | None = None
             ) -> list[tuple[str, str | bytes]]:
    md: list[tuple[str, str | bytes]] = list(call_metadata.metadata(token))
    if tenant is not None:
        md.append(call_metadata.tenant(tenant))
    return md


class _Details(collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                     "compression")), grpc.ClientCallDetails):
    pass


class _SyncAuth(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, extra: list[tuple[str, str | bytes]]) -> None:
        self._extra = extra

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        md = [*(details.metadata or ()), *self._extra]
        return continuation(_Details(details.method, details.timeout, md, details.credentials,
                                     details.wait_for_ready, details.compression), request)


class _AioAuth(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, extra: list[tuple[str, str | bytes]]) -> None:
        self._extra = extra

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        md = grpc.aio.Metadata(*(details.metadata or ()), *self._extra)
        new = grpc.aio.ClientCallDetails(details.method, details.timeout, md,
                                         details.credentials, details.wait_for_ready)
        return await continuation(new, request)


def channel(address: str, token: str | None = TOKEN, tenant: str | None = None) -> grpc.Channel:
    """A blocking channel whose unary calls carry the token (and tenant)."""
    return grpc.intercept_channel(grpc.insecure_channel(address),
                                  _SyncAuth(metadata(token, tenant)))


def aio_channel(address: str, token: str | None = TOKEN,
                tenant: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel whose unary calls carry the token (and tenant)."""
    return grpc.aio.insecure_channel(address,
                                     interceptors=[_AioAuth(metadata(token, tenant))])
