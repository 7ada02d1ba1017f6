"""The agent's gRPC server: ``synapse.v1.Node`` plus ``grpc.health.v1`` and reflection.

Authentication: every method of the Node service, present and future, needs this node's
own key (:mod:`agent.node_keys`, sent to the control plane in ``Register``) or the agent
token (the agent's ``control_plane.token``, which the control plane holds as
``auth.agent_token``) as ``authorization: Bearer <token>`` metadata. :class:`TokenGuard`,
an interceptor in front of the whole service, checks it in constant time
(:mod:`synapse_common.call_metadata`); anything else ends UNAUTHENTICATED before the servicer
runs, and before any of the request is read: the refusal answers the call's headers, so a
caller without the token cannot make the agent hold a message (up to
:data:`MAX_RECEIVE_BYTES`) it sends slowly or never finishes. An agent without a token refuses every Node call, unless ``grpc.allow_unauthenticated``
says otherwise. Health and reflection stay open: kubelet's gRPC probes carry no metadata,
and neither service returns any data.

Tenant: the control plane names the tenant a call is made for in its metadata, and the
embedding cache is partitioned by it
(:mod:`agent.embedding.service`). The name is trusted only on a call that presented the
token; a call let in by ``allow_unauthenticated`` could claim any tenant, so it bypasses
the cache.

Errors map through one table (:data:`STATUS`) from the :mod:`agent.embedding.errors` tree
to gRPC codes: INVALID_ARGUMENT for bad input (flagged ``too-large`` in the trailing
metadata when a size limit was exceeded, so the control plane can answer 413), NOT_FOUND for a model this agent does not serve, UNAVAILABLE when the
embedder is loading, down or failing (the control plane then fails open or tries another
agent), RESOURCE_EXHAUSTED when the queue in front of the model is full. Anything
unexpected is logged with its traceback and returned as INTERNAL with a generic message.

``ScorePairs`` (the pair scorer, :mod:`agent.embedding.pair_scorer`) maps through the same
table, with one more code: FAILED_PRECONDITION when this agent has no pair scorer, or it
is loading or failed to load (the details say which); the control plane then goes on
without it. Texts are never logged, by either method.

The health service reports ``synapse.v1.Node`` SERVING only when an embedder is
configured and loaded; the overall service ("") is SERVING while the process runs.

TLS (``grpc.tls_cert_file`` and ``tls_key_file``, or ``grpc.tls_self_signed``: a pair
made at start and kept in memory, :mod:`agent.node_certificate`): the port then serves
TLS alone — the Node calls carry tenants' texts, which must not cross the network in the
clear, and the control plane verifies the certificate against its ``grpc.node_ca_file``
(or against the self-signed certificate this agent sent in ``Register``, pinned for its
address), so a stand-in on the network is not handed them. Health stays on the same port, over TLS: there is no
plaintext port beside it. Kubelet's gRPC probe does not speak TLS, so a deployment with
TLS probes the agent's ``/healthz`` on its metrics port instead (the chart does); a
second, plaintext health port would be one more listener to guard for a check
``/healthz`` already answers (both say the process is up). The pair is loaded with
:mod:`ssl` first, so a file that cannot be read, is no PEM, or a key that does not match
its certificate stops the start with an :class:`OSError` naming the setting, not at the
first handshake.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.embedding import errors, pair_scorer, service
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from synapse_common import call_metadata, grpc_limits, tls_files

log = logging.getLogger(__name__)
MAX_RECEIVE_BYTES = 8 * 1024 * 1024   # see NodeServer: the largest admitted call is a few MB
# Node calls open at once on one connection (synapse_common.grpc_limits): a control-plane
# process sends all of its Embed/ScorePairs calls to this agent over one connection, as
# many at once as the embedding queue (embedder.queue_max_texts) may admit one-text calls;
# past the cap they wait in the caller's channel instead of being refused.
MAX_CONCURRENT_STREAMS = 1024
NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name

STATUS: dict[type[errors.EmbedError], grpc.StatusCode] = {
    # first: it is also an EmbedderUnavailable, and the first match wins
    pair_scorer.ScorerUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownModel: grpc.StatusCode.NOT_FOUND,
    errors.EmbedderUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

Observe = Callable[[str, float], None]


def status_for(exc: errors.EmbedError) -> grpc.StatusCode:
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class TokenGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped in the stubs
    """Lets a Node call through only with the agent token (or when explicitly allowed).

    A refused call is counted by its method's hook (``observers``, by method name such as
    ``"ScorePairs"``; ``observe`` for the others)."""

    def __init__(self, check: call_metadata.TokenCheck, allow_unauthenticated: bool,
                 observe: Observe, observers: Mapping[str, Observe] | None = None) -> None:
        self._check = check
        self._open = allow_unauthenticated and not check.configured
        self._prefix = f"/{NODE_SERVICE}/"
        reason = ("missing or invalid agent token" if check.configured else
                  "this agent has no token (control_plane.token) and refuses Node calls")

        def refusal(hook: Observe) -> grpc.RpcMethodHandler:
            # A request-streaming handler is called on the call's headers, before any
            # message arrives, and never reads one: the refusal goes out at once and no
            # request is buffered for a caller without the token. A unary handler would
            # first wait for the whole message (up to MAX_RECEIVE_BYTES), however long
            # its sender takes. The kind suits every method: the caller sees a status.
            async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
                hook(grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            return grpc.stream_unary_rpc_method_handler(refuse)

        self._refusal = refusal(observe)
        self._refusals = {self._prefix + name: refusal(hook)
                          for name, hook in (observers or {}).items()}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if (not details.method.startswith(self._prefix) or self._open
                or self._check.accepts(details.invocation_metadata)):
            return await continuation(details)
        return self._refusals.get(details.method, self._refusal)


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, embeddings: service.EmbeddingService | None, observe: Observe,
                 tenant_trusted: bool, scorer: pair_scorer.PairScorer | None = None,
                 observe_scores: Observe = lambda code, seconds: None) -> None:
        self._service = embeddings
        self._observe = observe
        self._tenant_trusted = tenant_trusted
        self._scorer = scorer
        self._observe_scores = observe_scores

    async def Embed(self, request: node_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> node_pb2.EmbedResponse:
        # Observed before the status goes out, as ScorePairs is (see there).
        start = time.perf_counter()
        try:
            outcome = await self._embed(request, context)
        except asyncio.CancelledError:
            self._observe(grpc.StatusCode.CANCELLED.name, time.perf_counter() - start)
            raise
        if isinstance(outcome, node_pb2.EmbedResponse):
            self._observe(grpc.StatusCode.OK.name, time.perf_counter() - start)
            return outcome
        code, details, trailer = outcome
        self._observe(code.name, time.perf_counter() - start)
        await context.abort(code, details, trailer)
        raise AssertionError("context.abort returned")  # it raises AbortError

    async def _embed(self, request: node_pb2.EmbedRequest, context: grpc.aio.ServicerContext,
                     ) -> node_pb2.EmbedResponse | tuple[grpc.StatusCode, str, Any]:
        """The answer, or the status code, details and trailing metadata to end with."""
        if self._service is None:
            return (grpc.StatusCode.UNAVAILABLE,
                    "no embedder is configured on this agent (embedder.kind: none)", ())
        tenant = (call_metadata.tenant_from(context.invocation_metadata())
                  if self._tenant_trusted else None)
        try:
            result = await self._service.embed(request.model, list(request.texts),
                                               request.normalize, tenant)
        except errors.EmbedError as exc:
            trailer = (((call_metadata.ERROR, call_metadata.TOO_LARGE),)
                       if isinstance(exc, errors.TooLarge) else ())
            return status_for(exc), str(exc), trailer
        except Exception:
            log.exception("Embed failed")
            return grpc.StatusCode.INTERNAL, "internal error while embedding", ()
        return node_pb2.EmbedResponse(model=result.model, dim=result.dim,
                                      vectors=result.vectors, cached=result.cached,
                                      embedder_id=result.embedder_id)

    async def ScorePairs(self, request: node_pb2.ScorePairsRequest,
                         context: grpc.aio.ServicerContext) -> node_pb2.ScorePairsResponse:
        # Observed before the status goes out (not in a finally after abort, which runs
        # once the caller already has its answer), so the count is there when it reads it.
        start = time.perf_counter()
        try:
            outcome = await self._score_pairs(request)
        except asyncio.CancelledError:
            self._observe_scores(grpc.StatusCode.CANCELLED.name, time.perf_counter() - start)
            raise
        if isinstance(outcome, node_pb2.ScorePairsResponse):
            self._observe_scores(grpc.StatusCode.OK.name, time.perf_counter() - start)
            return outcome
        code, details = outcome
        self._observe_scores(code.name, time.perf_counter() - start)
        await context.abort(code, details)
        raise AssertionError("context.abort returned")  # it raises AbortError

    async def _score_pairs(self, request: node_pb2.ScorePairsRequest
                           ) -> node_pb2.ScorePairsResponse | tuple[grpc.StatusCode, str]:
        """The answer, or the status code and details to end the call with."""
        if self._scorer is None:
            return grpc.StatusCode.FAILED_PRECONDITION, "no pair scorer on this agent"
        try:
            scores, scorer_id = await self._scorer.score(request.query, list(request.candidates))
        except errors.EmbedError as exc:
            return status_for(exc), str(exc)
        except Exception as exc:
            # its type and where it was raised, not its message: that could quote a text
            log.error("ScorePairs failed: %s\n%s", type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            return grpc.StatusCode.INTERNAL, "internal error while scoring pairs"
        return node_pb2.ScorePairsResponse(scores=scores.tolist(), scorer_id=scorer_id)


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """The Node port's TLS credentials, read again when the files change
    (:mod:`synapse_common.tls_files`); :class:`OSError` naming ``grpc.tls_cert_file`` /
    ``tls_key_file`` when the files cannot be read or are not a certificate and its key."""
    return tls_files.server_credentials(cert_file, key_file,
                                        "grpc.tls_cert_file / grpc.tls_key_file")


class NodeServer:
    """Owns the grpc.aio server; ``port`` is the bound port (also when 0 was asked).

    A Node call must present ``token`` (this node's own key, :mod:`agent.node_keys`) or
    ``shared`` (the agent token, when the agent holds one: its holder may register as
    any node anyway); without either, Node calls are refused unless
    ``allow_unauthenticated``. TLS: ``tls_pair`` (key, certificate) as PEM bytes held in
    memory (:mod:`agent.node_certificate`), else the ``tls_cert_file``/``tls_key_file``
    pair, else plain text.
    """

    def __init__(self, embeddings: service.EmbeddingService | None, host: str, port: int,
                 observe: Observe = lambda code, seconds: None, *, token: str | None = None,
                 shared: str | None = None, allow_unauthenticated: bool = False,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 scorer: pair_scorer.PairScorer | None = None,
                 observe_scores: Observe = lambda code, seconds: None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 tls_pair: tuple[bytes, bytes] | None = None) -> None:
        check = call_metadata.TokenCheck(token, shared)
        self.server = grpc.aio.server(
            interceptors=[TokenGuard(check, allow_unauthenticated, observe,
                                     {"ScorePairs": observe_scores}), *interceptors],
            # No SO_REUSEPORT (grpc's default): a port another process holds is an
            # error, not a port two agents share silently.
            options=[("grpc.so_reuseport", 0),
                     # the largest call the limits admit (an Embed of 2,048 texts, 1 M
                     # characters in all) is a few MB: a bigger message is refused
                     # before it is buffered (and a call without the token is refused
                     # before any of its message is read: TokenGuard)
                     ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                     *grpc_limits.server_options(MAX_CONCURRENT_STREAMS)])
        node_pb2_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            NodeServicer(embeddings, observe, tenant_trusted=check.configured, scorer=scorer,
                         observe_scores=observe_scores), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (NODE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        tls = (grpc.ssl_server_credentials([tls_pair]) if tls_pair is not None
               else server_credentials(tls_cert_file, tls_key_file)
               if tls_cert_file and tls_key_file else None)
        self.tls = tls is not None
        try:
            self.port = (self.server.add_secure_port(f"{host}:{port}", tls) if tls is not None
                         else self.server.add_insecure_port(f"{host}:{port}"))
        except RuntimeError:  # grpc's way of saying EADDRINUSE / EACCES
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind the Node gRPC server to {host}:{port} "
                          "(address in use or not available)")

    async def start(self, embedder_ready: bool) -> None:
        await self.server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        await self.health.set(NODE_SERVICE, serving if embedder_ready else not_serving)

    async def set_embedder_ready(self, ready: bool) -> None:
        await self.health.set(NODE_SERVICE, health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
