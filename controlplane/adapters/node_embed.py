"""Client of the agents' ``Node.Embed`` service (gRPC), one channel per agent address.

Used by ``/v1/embeddings`` when no HTTP embedding backend serves the model but an agent's
in-process embedder does, and by the response cache's :mod:`embedder` (which adds agent
choice and failover on top). Channels are created on first use and kept until
:meth:`NodeEmbedClient.forget` or :meth:`NodeEmbedClient.close`; every call has a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np

from protos.synapse.v1 import node_pb2, node_pb2_grpc


class EmbedError(Exception):
    """The agent could not embed (unreachable, deadline, or an error status)."""


def unpack_rows(data: bytes, dim: int, count: int) -> np.ndarray:
    """Packed little-endian float32 rows → a ``(count, dim)`` array; ValueError if short."""
    if dim <= 0 or len(data) != 4 * dim * count:
        raise ValueError(f"Node.Embed returned {len(data)} bytes for {count} texts of dim {dim}")
    return np.frombuffer(data, dtype="<f4").reshape(count, dim)


class NodeEmbedClient:
    def __init__(self) -> None:
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stub(self, address: str) -> node_pb2_grpc.NodeStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address)
            stub = node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            entry = self._stubs[address] = (channel, stub)
        return entry[1]

    async def embed(self, address: str, model: str, texts: Sequence[str],
                    timeout_s: float) -> tuple[np.ndarray, str]:
        """(vectors as a float32 matrix, embedder id) for ``texts``."""
        request = node_pb2.EmbedRequest(model=model, texts=list(texts), normalize=True)
        try:
            reply = await self._stub(address).Embed(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise EmbedError(f"Node.Embed at {address}: {exc.code().name}: "
                             f"{exc.details()}") from None
        try:
            vectors = unpack_rows(reply.vectors, reply.dim, len(texts))
        except ValueError as exc:
            raise EmbedError(f"Node.Embed at {address}: {exc}") from None
        return vectors, reply.embedder_id or reply.model or model

    def forget(self, address: str) -> None:
        """Close the channel of an agent that left, in the background (a close waits for
        in-flight calls, which must not hold up the caller)."""
        entry = self._stubs.pop(address, None)
        if entry is not None:
            task = asyncio.get_running_loop().create_task(entry[0].close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def addresses(self) -> set[str]:
        return set(self._stubs)

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
