"""Client of the agents' ``Node.Embed`` service (gRPC), one channel per agent address.

Used by ``/v1/embeddings`` when no HTTP embedding backend serves the model but an agent's
in-process embedder does, and available to the response cache. Channels are created on
first use and kept; every call has a deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from protos.synapse.v1 import node_pb2, node_pb2_grpc


class EmbedError(Exception):
    """The agent could not embed (unreachable, deadline, or an error status)."""


class NodeEmbedClient:
    def __init__(self) -> None:
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub]] = {}

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
        vectors = np.frombuffer(reply.vectors, dtype="<f4")
        if reply.dim == 0 or vectors.size != reply.dim * len(texts):
            raise EmbedError(f"Node.Embed at {address} returned {vectors.size} values for "
                             f"{len(texts)} texts of dimension {reply.dim}")
        return vectors.reshape(len(texts), reply.dim), reply.embedder_id

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
