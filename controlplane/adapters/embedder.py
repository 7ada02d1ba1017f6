"""Client of the agents' ``Node.Embed`` gRPC: the embeddings behind the semantic cache.

Design decisions:

- The addresses come from a callable (the registry's ready agents that serve the
  embedder model), asked on every call, so nodes that join or leave are picked up
  without a restart. Calls go round-robin over them; an address that fails is skipped
  for ``cooldown_s``, and a call tries the next address only while its deadline allows.
- The calls themselves go through :class:`node_embed.NodeEmbedClient` (one reused
  channel per address, closed on :meth:`close` or when the address leaves the list),
  which presents the node's own key (``key_of``, else ``token``), trusts the
  certificate a node pinned (``pin_of``) when there are no ``credentials``, and names the
  ``tenant`` each call is made for (the
  agent keeps one embedding cache per tenant). Input the agents refuse as too large or
  invalid raises :mod:`controlplane.errors` at once: another agent would refuse it too.
- Vectors arrive as packed little-endian float32 bytes (``dim`` per text) and leave as a
  ``(n, dim)`` numpy array, normalised again here so inner product is cosine even if an
  engine ignored ``normalize``.
- ``embedder_id`` from the response (model + revision) is returned with the vectors; the
  response cache only compares vectors produced by the same embedder.
- :meth:`NodeEmbedder.score_pairs` (``Node.ScorePairs``, the verifier stack's pair
  scorer) chooses agents and fails over the same way. An agent that answers it has no
  scorer is not asked again for ``no_scorer_recheck_s`` (nor counted as failing: it still
  embeds); when every agent says so the answer is ``([], "")``, "no scorer", at once,
  not an error to retry on every lookup. Running out of the deadline raises
  :class:`ScoreTimeout` (a ``TimeoutError`` too), other failures :class:`EmbedUnavailable`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from controlplane.adapters import node_embed
from controlplane.core import types


@dataclasses.dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray       # (n, dim) float32, L2-normalised
    embedder_id: str
    address: str


class EmbedUnavailable(RuntimeError):
    """No agent could embed within the deadline."""


class ScoreTimeout(EmbedUnavailable, TimeoutError):
    """No agent scored the pairs before the deadline."""


class NodeEmbedder:
    def __init__(self, addresses: Callable[[], Sequence[str]], model: str,
                 timeout_s: float = 0.1, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, *,
                 token: str | None = None, no_scorer_recheck_s: float = 30.0,
                 key_of: Callable[[str], str | None] | None = None,
                 credentials: node_embed.Credentials | None = None,
                 pin_of: Callable[[str], types.NodePin | None] | None = None,
                 plain_text: bool = True) -> None:
        self._addresses = addresses
        self._model = model
        self._timeout = timeout_s
        self._cooldown = cooldown_s
        self._clock = clock
        self._client = node_embed.NodeEmbedClient(token, key_of=key_of,
                                                   credentials=credentials, pin_of=pin_of,
                                                   plain_text=plain_text)
        self._bad_until: dict[str, float] = {}
        self._no_scorer_recheck = no_scorer_recheck_s
        self._no_scorer_until: dict[str, float] = {}
        self._next = 0

    async def embed(self, texts: Sequence[str], timeout_s: float | None = None,
                    tenant: str = "") -> Embeddings:
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
                return await self._call(address, texts, remaining, tenant)
            except node_embed.EmbedError as exc:
                self._bad_until[address] = self._clock() + self._cooldown
                last = exc
        detail = str(last) if last else "deadline exceeded"
        raise EmbedUnavailable(f"Node.Embed failed: {detail}")

    async def score_pairs(self, query: str, candidates: Sequence[str],
                          timeout_s: float | None = None, tenant: str = ""
                          ) -> tuple[list[float], str]:
        """(a logit per candidate, scorer id) for the pairs (``query``, candidate); ``([],
        "")`` when no agent has a pair scorer (see the module docstring)."""
        deadline = self._clock() + (timeout_s if timeout_s is not None else self._timeout)
        agents = self._candidates()
        if not agents:
            raise EmbedUnavailable(f"no ready agent serves embedder {self._model!r}")
        now = self._clock()
        scorers = [a for a in agents if self._no_scorer_until.get(a, 0.0) <= now]
        last: Exception | None = None
        for address in scorers:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                return await self._client.score_pairs(address, query, candidates, remaining,
                                                      tenant)
            except node_embed.NoScorer:
                self._no_scorer_until[address] = self._clock() + self._no_scorer_recheck
            except node_embed.EmbedError as exc:
                self._bad_until[address] = self._clock() + self._cooldown
                last = exc
        if last is None and all(self._no_scorer_until.get(a, 0.0) > now for a in agents):
            return [], ""
        if last is None or last_timed_out(last):
            raise ScoreTimeout(f"Node.ScorePairs: {str(last) if last else 'deadline exceeded'}")
        raise EmbedUnavailable(f"Node.ScorePairs failed: {last}")

    async def close(self) -> None:
        await self._client.close()

    def _candidates(self) -> list[str]:
        addresses = [a for a in self._addresses() if a]
        for gone in self._client.addresses() - set(addresses):
            self._client.forget(gone)
        if not addresses:
            return []
        now = self._clock()
        self._next = (self._next + 1) % len(addresses)
        rotated = addresses[self._next:] + addresses[:self._next]
        good = [a for a in rotated if self._bad_until.get(a, 0.0) <= now]
        # If all are cooling down, still try them: a stale verdict must not block forever.
        return good or rotated

    async def _call(self, address: str, texts: Sequence[str], budget_s: float,
                    tenant: str) -> Embeddings:
        vectors, embedder_id = await self._client.embed(address, self._model, texts, budget_s,
                                                        tenant)
        return Embeddings(vectors=normalise(vectors), embedder_id=embedder_id, address=address)


def last_timed_out(exc: Exception) -> bool:
    return isinstance(exc, node_embed.EmbedError) and exc.code == "DEADLINE_EXCEEDED"


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so inner product is cosine."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def unpack(data: bytes, dim: int, count: int) -> np.ndarray:
    """Packed little-endian float32 rows → normalised ``(count, dim)`` array."""
    return normalise(node_embed.unpack_rows(data, dim, count))


def pack(vectors: np.ndarray) -> bytes:
    """The inverse of :func:`unpack` (for servers and tests)."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()

