"""Client of the agents' ``Node.Embed`` gRPC: the embeddings behind the semantic cache.

Design decisions:

- The addresses come from a callable (the registry's ready agents that serve the
  embedder model), asked on every call, so nodes that join or leave are picked up
  without a restart. Calls go round-robin over them; an address that fails is skipped
  for ``cooldown_s``, and a call tries the next address only while its deadline allows.
- One ``grpc.aio`` channel per address, reused (channels are costly to build, cheap to
  keep), closed on :meth:`close` or when the address disappears from the list.
- Vectors arrive as packed little-endian float32 bytes (``dim`` per text) and leave as a
  ``(n, dim)`` numpy array, normalised again here so inner product is cosine even if an
  engine ignored ``normalize``.
- ``embedder_id`` from the response (model + revision) is returned with the vectors; the
  response cache only compares vectors produced by the same embedder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from protos.synapse.v1 import node_pb2, node_pb2_grpc


@dataclasses.dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray       # (n, dim) float32, L2-normalised
    embedder_id: str
    address: str


class EmbedUnavailable(RuntimeError):
    """No agent could embed within the deadline."""


class NodeEmbedder:
    def __init__(self, addresses: Callable[[], Sequence[str]], model: str,
                 timeout_s: float = 0.1, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._addresses = addresses
        self._model = model
        self._timeout = timeout_s
        self._cooldown = cooldown_s
        self._clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._bad_until: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._next = 0

    async def embed(self, texts: Sequence[str], timeout_s: float | None = None) -> Embeddings:
        deadline = self._clock() + (timeout_s if timeout_s is not None else self._timeout)
        candidates = self._candidates()
        if not candidates:
            raise EmbedUnavailable(f"no ready agent serves embedder {self._model!r}")
        last: Exception | None = None
        for address in candidates:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                return await self._call(address, texts, remaining)
            except (grpc.aio.AioRpcError, ValueError) as exc:
                self._bad_until[address] = self._clock() + self._cooldown
                last = exc
        detail = _describe(last) if last else "deadline exceeded"
        raise EmbedUnavailable(f"Node.Embed failed: {detail}")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _candidates(self) -> list[str]:
        addresses = [a for a in self._addresses() if a]
        for gone in set(self._channels) - set(addresses):
            # An agent that left: close its channel in the background (a close waits for
            # in-flight calls, which must not hold up this one).
            task = asyncio.get_running_loop().create_task(self._channels.pop(gone).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if not addresses:
            return []
        now = self._clock()
        self._next = (self._next + 1) % len(addresses)
        rotated = addresses[self._next:] + addresses[:self._next]
        good = [a for a in rotated if self._bad_until.get(a, 0.0) <= now]
        # If all are cooling down, still try them: a stale verdict must not block forever.
        return good or rotated

    async def _call(self, address: str, texts: Sequence[str], budget_s: float) -> Embeddings:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        stub = node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
        reply = await stub.Embed(
            node_pb2.EmbedRequest(model=self._model, texts=list(texts), normalize=True),
            timeout=budget_s)
        return Embeddings(vectors=unpack(reply.vectors, reply.dim, len(texts)),
                          embedder_id=reply.embedder_id or reply.model or self._model,
                          address=address)


def unpack(data: bytes, dim: int, count: int) -> np.ndarray:
    """Packed little-endian float32 rows → normalised ``(count, dim)`` array."""
    if dim <= 0 or len(data) != 4 * dim * count:
        raise ValueError(f"Node.Embed returned {len(data)} bytes for {count} texts of dim {dim}")
    vectors = np.frombuffer(data, dtype="<f4").reshape(count, dim).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def pack(vectors: np.ndarray) -> bytes:
    """The inverse of :func:`unpack` (for servers and tests)."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
