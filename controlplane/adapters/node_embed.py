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
- **An answer is checked before it is believed** (a node may be compromised, and the
  Node calls rotate over every agent): ``Node.Embed`` vectors must all be finite and of
  unit length (every call asks ``normalize``, and the agents honour it) or zero (an
  agent leaves a vector its embedder made zero as it is: there is no direction to keep,
  and a tenant's ``/v1/embeddings`` gets it as any embedder answers it; in the cache
  its inner product with anything is zero, never a hit), with a dimension
  of at most ``MAX_EMBED_DIM`` that, when the model asked for or the embedder id's name is in
  ``KNOWN_DIMS``, is that embedder's; ``Node.ScorePairs`` logits must be finite and within
  ``MAX_PAIR_LOGIT``. Anything else is an :class:`EmbedError` like an agent error (the
  caller tries another agent; the cache goes on without it), logged as a warning naming
  the agent at most once per ``warn_interval_s`` per address. A vector of another
  dimension would otherwise reach the L2 store, whose collection takes the dimension of
  its first write, and a logit far beyond any cross-encoder's would make any candidate a
  hit.
- TLS (:class:`Credentials`, from ``grpc.node_ca_file`` and ``grpc.node_server_name``):
  every channel is then TLS, verified with that CA alone, so an agent serving plain text
  or a certificate the CA did not sign is never sent a tenant's text (the call fails
  UNAVAILABLE, an :class:`EmbedError`: the cache fails open). Agents are dialled at the
  pod IP they advertise, which no certificate can name in advance, so the name checked is
  ``server_name`` when set. There is no fallback to plain text.
- Pinned certificates (``pin_of``, the registry's ``node_pin_at``): a node whose agent
  registered the certificate it made at start (``grpc.tls_self_signed``) is dialled with
  TLS whose only root is that certificate, checking the DNS name it carries, so only the
  process holding that agent's in-memory key can answer at its address: not another
  agent (each has a key of its own), not a stand-in. Pins count only without
  ``credentials``: where a CA vouches for the agents, a certificate a registration brought
  must not replace it (whoever holds the agent token could otherwise register a node at
  an address of its own with a certificate of its own, and be sent texts the CA would
  have kept from it). A node without a pin, or every node under a CA, follows
  ``credentials`` (CA-signed TLS, else plain text, which ``plain_text=False``,
  ``grpc.node_tls_required``, refuses: such a node is not called).
  Channels are kept per address *and* pin: an agent that restarts registers a new
  certificate, and the next call dials a new channel pinned to it (the old one is
  closed), never one that trusts the certificate before; a pin is looked up by the
  address dialled, so it is presented to no other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from controlplane import errors
from controlplane.core import types, verifier
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from synapse_common import call_metadata, tracing
from synapse_common import pair_scorer as pair_scorer_file

MAX_PAIRS = pair_scorer_file.MAX_PAIRS     # candidates per Node.ScorePairs call
# The dimension of an embedder's vectors, by the model name asked of Node.Embed or the name
# its embedder id starts with (before "@"): all-MiniLM-L6-v2, as the agents run it (tuned
# or not: a tuning's adapter is square) or as TEI names it, answers with 384. The agents'
# name is synapse_common.embedder_tuning.BASE_NAME, not imported: that module reaches torch.
KNOWN_DIMS = {"sentence-transformers/all-MiniLM-L6-v2": 384, "minilm-l6-v2": 384}
# The largest vector Node.Embed may answer, for any caller: above any text embedder's. It
# is not the cache's bound (l2.schema.MAX_INDEX_DIM, the dimensions an L2 collection is
# made for): Node.Embed also serves tenants' /v1/embeddings, whose models may be larger
# than any the cache indexes, so a vector between the two is a tenant's answer, never a
# collection.
MAX_EMBED_DIM = 16_384
UNIT_TOLERANCE = 1e-3       # |norm - 1| allowed of a normalised row: float32 rounding
MAX_PAIR_LOGIT = verifier.MAX_PAIR_LOGIT    # beyond it, an answer is not a logit
WARN_INTERVAL_S = 60.0

log = logging.getLogger("synapse.controlplane.node_embed")


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


def expected_dim(model: str, embedder_id: str) -> int | None:
    """The dimension the vectors of ``model`` / ``embedder_id`` have, when known."""
    return KNOWN_DIMS.get(model) or KNOWN_DIMS.get(embedder_id.split("@", 1)[0])


def check_vectors(vectors: np.ndarray, model: str, embedder_id: str) -> None:
    """ValueError unless ``vectors`` are what an honest embedder of ``model`` answers
    (see the module docstring). The message does not repeat what the node sent."""
    dim = vectors.shape[-1]
    expected = expected_dim(model, embedder_id)
    if dim > MAX_EMBED_DIM or (expected is not None and dim != expected):
        raise ValueError(f"vectors of dimension {dim}, expected "
                         f"{expected or f'at most {MAX_EMBED_DIM}'}")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("vectors that are not all finite")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=-1)
    if not np.all((norms == 0.0) | (np.abs(norms - 1.0) <= UNIT_TOLERANCE)):
        raise ValueError("vectors not of unit length (normalize was asked)")


def check_logits(scores: Sequence[float]) -> None:
    """ValueError unless ``scores`` are finite logits within ``MAX_PAIR_LOGIT``."""
    if not all(math.isfinite(x) and abs(x) <= MAX_PAIR_LOGIT for x in scores):
        raise ValueError(f"scores that are not finite or beyond ±{MAX_PAIR_LOGIT:g}: not "
                         "logits")


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


@dataclasses.dataclass(frozen=True)
class Credentials:
    """How Node channels are secured: the PEM CA bundle that signed the agents'
    certificates and the name those certificates carry (None: the dialled host)."""

    root_certificates: bytes
    server_name: str | None = None

    @classmethod
    def load(cls, ca_file: str | None, server_name: str | None) -> Credentials | None:
        """From ``grpc.node_ca_file`` / ``node_server_name``; None without a CA file (plain
        text). A ValueError naming ``grpc.node_ca_file`` when it cannot be read or holds
        no PEM certificate (grpc itself would only fail at the first handshake)."""
        if not ca_file:
            return None
        try:
            ssl.create_default_context(cafile=ca_file)
            with open(ca_file, "rb") as f:
                pem = f.read()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"grpc.node_ca_file: cannot load {ca_file} as PEM CA "
                             f"certificates ({exc.strerror or type(exc).__name__})") from None
        return cls(pem, server_name)

    def channel(self, address: str) -> grpc.aio.Channel:
        options = ((("grpc.ssl_target_name_override", self.server_name),)
                   if self.server_name else ())
        return grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=self.root_certificates),
            options=options)


def pinned_channel(address: str, pin: types.NodePin) -> grpc.aio.Channel:
    """A TLS channel to ``address`` that trusts ``pin``'s certificate alone and checks
    the name it carries (the agent is dialled at an IP its certificate does not name)."""
    return grpc.aio.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=pin.certificate),
        options=(("grpc.ssl_target_name_override", pin.name),))


class NodeEmbedClient:
    """``key_of``: the bearer key of the agent at an address (the registry's
    ``node_key_at``: each node's own key, which goes to no other address); without it
    every call presents ``token``. ``pin_of``: the certificate pinned for an address (the
    registry's ``node_pin_at``), used only without ``credentials``, which otherwise make
    every channel TLS verified by their CA (none and no pin: plain text, unless
    ``plain_text`` is False: then such an agent is not called)."""

    def __init__(self, token: str | None = None, *,
                 key_of: Callable[[str], str | None] | None = None,
                 credentials: Credentials | None = None,
                 pin_of: Callable[[str], types.NodePin | None] | None = None,
                 plain_text: bool = True, clock: Callable[[], float] = time.monotonic,
                 warn_interval_s: float = WARN_INTERVAL_S) -> None:
        self._token = token
        self._key_of = key_of
        self._credentials = credentials
        self._pin_of = pin_of
        self._plain_text = plain_text
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub,
                                     types.NodePin | None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._warn_interval = warn_interval_s
        self._warned: dict[str, float] = {}

    def _refused(self, address: str, method: str, reason: ValueError) -> EmbedError:
        """The error for an answer out of the rules, warned about once per interval per
        agent (the log names the agent; the error, which may reach a client, does not)."""
        now = self._clock()
        last = self._warned.get(address)
        if last is None or now - last >= self._warn_interval:
            self._warned[address] = now
            log.warning("Node.%s answer of the agent at %s refused: %s", method, address,
                        reason)
        return EmbedError(f"Node.{method}: answer refused: {reason}", address=address,
                          code="REFUSED")

    def _auth(self, address: str) -> tuple[tuple[str, str], ...]:
        return call_metadata.metadata(self._key_of(address) if self._key_of is not None
                                      else self._token)

    def _stub(self, address: str, method: str) -> node_pb2_grpc.NodeStub:
        """The stub of the channel to ``address`` as its node registered it now (see the
        module docstring); :class:`EmbedError` when it may not be called."""
        pin = (self._pin_of(address) if self._pin_of is not None and self._credentials is None
               else None)
        entry = self._stubs.get(address)
        if entry is not None and entry[2] != pin:
            self.forget(address)            # the agent restarted with a new certificate
            entry = None
        if entry is None:
            if pin is not None:
                channel = pinned_channel(address, pin)
            elif self._credentials is not None:
                channel = self._credentials.channel(address)
            elif self._plain_text:
                channel = grpc.aio.insecure_channel(address)
            else:
                raise EmbedError(f"Node.{method}: the agent registered no certificate and "
                                 "grpc.node_tls_required refuses plain text",
                                 address=address, code="UNAVAILABLE")
            stub = node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            entry = self._stubs[address] = (channel, stub, pin)
        return entry[1]

    async def embed(self, address: str, model: str, texts: Sequence[str], timeout_s: float,
                    tenant: str = "") -> tuple[np.ndarray, str]:
        """(vectors as a float32 matrix, embedder id) for ``texts``, made for ``tenant``."""
        request = node_pb2.EmbedRequest(model=model, texts=list(texts), normalize=True)
        metadata = (*self._auth(address), call_metadata.tenant(tenant), *tracing.grpc_metadata())
        try:
            reply = await self._stub(address, "Embed").Embed(request, timeout=timeout_s,
                                                             metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_for(exc, address) from None
        try:
            vectors = unpack_rows(reply.vectors, reply.dim, len(texts))
        except ValueError as exc:
            raise EmbedError(f"Node.Embed: {exc}", address=address) from None
        embedder_id = reply.embedder_id or reply.model or model
        try:
            check_vectors(vectors, model, embedder_id)
        except ValueError as exc:
            raise self._refused(address, "Embed", exc) from None
        return vectors, embedder_id

    async def score_pairs(self, address: str, query: str, candidates: Sequence[str],
                          timeout_s: float, tenant: str = "") -> tuple[list[float], str]:
        """(one logit per candidate, scorer id) for the pairs (``query``, candidate)."""
        if not 0 < len(candidates) <= MAX_PAIRS:
            raise errors.BadRequest(f"between 1 and {MAX_PAIRS} candidates can be scored "
                                    f"at once, not {len(candidates)}", param="input")
        request = node_pb2.ScorePairsRequest(query=query, candidates=list(candidates))
        metadata = (*self._auth(address), call_metadata.tenant(tenant), *tracing.grpc_metadata())
        try:
            stub = self._stub(address, "ScorePairs")
            reply = await stub.ScorePairs(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_for(exc, address, "ScorePairs") from None
        scores = list(reply.scores)
        if len(scores) != len(candidates):
            raise EmbedError(f"Node.ScorePairs: {len(scores)} scores (one per pair expected) "
                             f"for {len(candidates)} candidates", address=address)
        try:
            check_logits(scores)
        except ValueError as exc:
            raise self._refused(address, "ScorePairs", exc) from None
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
        for channel, _, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
