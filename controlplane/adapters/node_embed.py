"""Client of the agents' ``Node`` service (gRPC: ``Embed``, ``ScorePairs``), one channel per
agent address.

Used by ``/v1/embeddings`` when no HTTP embedding backend serves the model but an agent's
in-process embedder does, and by the response cache's :mod:`embedder` (which adds agent
choice and failover on top). Channels are created on first use and kept until
:meth:`NodeEmbedClient.forget` or :meth:`NodeEmbedClient.close`; every call has a deadline.

Design decisions:

- Every call presents the key of the node called (the one its agent chose and sent in
  ``Register``, :mod:`agent.node_keys`) and names the tenant it is made for; the agent
  partitions its
  embedding cache by that tenant (:mod:`synapse_common.call_metadata`).
- Failures map through one table (:func:`error_for`): a call over the agent's size
  limits becomes :class:`errors.PayloadTooLarge` (413), other bad input
  :class:`errors.BadRequest` (400) — the same on every agent, so not retried elsewhere;
  anything else is :class:`EmbedError` (the caller may try another agent). No message
  names an agent's address: it may reach a client. The address stays on
  :attr:`EmbedError.address` for logs.
- Only vectors and the embedder id leave this module: the agent's per-text ``cached``
  flags are dropped here and never reach a response, a header or a log.
- ``ScorePairs`` (the agent's cross-encoder, "pair scorer", for the cache's verifier
  stack) shares the channel, token, tenant metadata, deadline and error table; an agent
  without a scorer answers FAILED_PRECONDITION, which becomes :class:`NoScorer` (an
  :class:`EmbedError` the caller need not retry on that agent soon). At most
  ``MAX_PAIRS`` candidates per call (the agents' limit): more is refused here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from controlplane import errors
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from synapse_common import call_metadata, tracing
from synapse_common import pair_scorer as pair_scorer_file

MAX_PAIRS = pair_scorer_file.MAX_PAIRS     # candidates per Node.ScorePairs call


class EmbedError(Exception):
    """The agent could not embed (unreachable, deadline, refused, or an error status)."""

    def __init__(self, message: str, *, address: str = "", code: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.code = code


class NoScorer(EmbedError):
    """The agent has no pair scorer (``Node.ScorePairs`` answered FAILED_PRECONDITION)."""


def unpack_rows(data: bytes, dim: int, count: int) -> np.ndarray:
    """Packed little-endian float32 rows → a ``(count, dim)`` array; ValueError if short."""
    if dim <= 0 or len(data) != 4 * dim * count:
        raise ValueError(f"Node.Embed returned {len(data)} bytes for {count} texts of dim {dim}")
    return np.frombuffer(data, dtype="<f4").reshape(count, dim)


def error_for(exc: grpc.aio.AioRpcError, address: str, method: str = "Embed") -> Exception:
    """Our exception for a failed ``Node.Embed`` / ``Node.ScorePairs`` call (see the module
    docstring)."""
    code, details = exc.code(), exc.details() or ""
    what = "embedder" if method == "Embed" else "pair scorer"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        trailer = dict(exc.trailing_metadata() or ())
        if trailer.get(call_metadata.ERROR) == call_metadata.TOO_LARGE:
            return errors.PayloadTooLarge(f"input is over the {what}'s limits: {details}",
                                          param="input")
        verb = "embedded" if method == "Embed" else "scored"
        return errors.BadRequest(f"input cannot be {verb}: {details}", param="input")
    if code == grpc.StatusCode.FAILED_PRECONDITION and method == "ScorePairs":
        return NoScorer(f"Node.ScorePairs: no pair scorer: {details}", address=address,
                        code=code.name)
    return EmbedError(f"Node.{method}: {code.name}: {details}", address=address,
                      code=code.name)


class NodeEmbedClient:
    """``key_of``: the bearer key of the agent at an address (the registry's
    ``node_key_at``: each node's own key, which goes to no other address); without it
    every call presents ``token``."""

    def __init__(self, token: str | None = None, *,
                 key_of: Callable[[str], str | None] | None = None) -> None:
        self._token = token
        self._key_of = key_of
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _auth(self, address: str) -> tuple[tuple[str, str], ...]:
        return call_metadata.metadata(self._key_of(address) if self._key_of is not None
                                      else self._token)

    def _stub(self, address: str) -> node_pb2_grpc.NodeStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address)
            stub = node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            entry = self._stubs[address] = (channel, stub)
        return entry[1]

    async def embed(self, address: str, model: str, texts: Sequence[str], timeout_s: float,
                    tenant: str = "") -> tuple[np.ndarray, str]:
        """(vectors as a float32 matrix, embedder id) for ``texts``, made for ``tenant``."""
        request = node_pb2.EmbedRequest(model=model, texts=list(texts), normalize=True)
        metadata = (*self._auth(address), call_metadata.tenant(tenant), *tracing.grpc_metadata())
        try:
            reply = await self._stub(address).Embed(request, timeout=timeout_s,
                                                    metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_for(exc, address) from None
        try:
            vectors = unpack_rows(reply.vectors, reply.dim, len(texts))
        except ValueError as exc:
            raise EmbedError(f"Node.Embed: {exc}", address=address) from None
        return vectors, reply.embedder_id or reply.model or model

    async def score_pairs(self, address: str, query: str, candidates: Sequence[str],
                          timeout_s: float, tenant: str = "") -> tuple[list[float], str]:
        """(one logit per candidate, scorer id) for the pairs (``query``, candidate)."""
        if not 0 < len(candidates) <= MAX_PAIRS:
            raise errors.BadRequest(f"between 1 and {MAX_PAIRS} candidates can be scored "
                                    f"at once, not {len(candidates)}", param="input")
        request = node_pb2.ScorePairsRequest(query=query, candidates=list(candidates))
        metadata = (*self._auth(address), call_metadata.tenant(tenant), *tracing.grpc_metadata())
        try:
            reply = await self._stub(address).ScorePairs(request, timeout=timeout_s,
                                                         metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_for(exc, address, "ScorePairs") from None
        scores = list(reply.scores)
        if len(scores) != len(candidates) or not all(math.isfinite(x) for x in scores):
            raise EmbedError(f"Node.ScorePairs: {len(scores)} scores (finite: "
                             f"{all(math.isfinite(x) for x in scores)}) for "
                             f"{len(candidates)} candidates", address=address)
        if not reply.scorer_id:
            raise EmbedError("Node.ScorePairs: the answer names no scorer", address=address)
        return scores, reply.scorer_id

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
