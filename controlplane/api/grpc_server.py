"""The control plane's gRPC server: ``ControlPlane.Connect``, health, reflection.

One ``grpc.aio`` server on the same event loop as the HTTP API. Services are added as
*registrations* — a function that adds a servicer to the server and returns its full
service name — so the Admin service is one more entry in the list passed to
:func:`start` (health status and reflection then cover it too).

``Connect``: a registered node is sent every tenant's prompts, so the call must carry a
credential as ``authorization: Bearer <token>`` metadata, else ``UNAUTHENTICATED``:

* ``auth.agent_token``, the shared token (checked in constant time,
  :mod:`synapse_common.call_metadata`): its holder may register as any node;
* with ``auth.agent_review``, a Kubernetes service-account token of an agent's pod, which
  the API server vouches for and binds to the node the pod runs on
  (:mod:`controlplane.adapters.token_review`): its holder may register as that node only
  (``PERMISSION_DENIED`` otherwise; ``UNAVAILABLE`` while the API server cannot answer).

Without either every agent is refused, unless ``auth.allow_unauthenticated_agents`` says
otherwise (the settings refuse that combination on a gRPC address other machines can
reach). The first message must be ``Register`` (else ``INVALID_ARGUMENT``). A node that
is up already, or a Node-service address another node that is up registered, is refused
``ALREADY_EXISTS`` and a new node past ``registry.max_nodes``
``RESOURCE_EXHAUSTED`` (:mod:`controlplane.core.registry`). The keys the agent chose
(``Register.engine_key``, ``node_key``) are what the control plane presents to that
node's engines and Node service; an agent that sent none (an older one) gets the keys
derived from the shared token, only when it authenticated with that token (nothing it
did not hold already). Reports are read defensively: a report over
:data:`MAX_REPORT_BYTES` ends the stream (with a warning), shares and rates are
clamped to [0, 1] (a NaN counts as the worst case) and counts to sane bounds, so no
report can win a routing comparison by being nonsense.

Then a reader task feeds reports and command acks into the registry and queues an
``Ack`` per report, a pump task moves the node's command outbox onto the stream, and the
stream's end (or error) marks the node disconnected. Protos are converted to core value objects
here and nowhere deeper.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import errors
from controlplane.adapters import agent_relay, token_review
from controlplane.api import services as services_mod
from controlplane.core import registry, types, upstream_kinds
from protos import enums
from protos.synapse.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from synapse_common import aiotasks, call_metadata, engine_key

log = logging.getLogger("synapse.controlplane.grpc")

Registration = Callable[[grpc.aio.Server], str]
Server = grpc.aio.Server


def status_code(exc: errors.SynapseError) -> grpc.StatusCode:
    """The gRPC status for one of our errors (the same hierarchy as HTTP)."""
    return grpc.StatusCode[exc.grpc_code]


async def abort(context: grpc.aio.ServicerContext, exc: errors.SynapseError) -> None:
    await context.abort(status_code(exc), exc.message)


# -- proto → core -----------------------------------------------------------------------


def _phase(value: int) -> types.Phase:
    return cast(types.Phase, enums.BACKEND_PHASE.name(value))  # the enum names are exactly the Phase literals


def _base_url(url: str) -> str:
    return upstream_kinds.base_url(url)


MAX_REPORT_BYTES = 1024 * 1024     # a real report is a few KB per backend
MAX_KV_TOKENS = 1 << 40             # more KV cache than any machine holds
MAX_SEQS = 1 << 20


def _share(x: float, worst: float) -> float:
    """A share or rate in [0, 1]; ``worst`` for a NaN."""
    return worst if math.isnan(x) else min(1.0, max(0.0, x))


def backend_state(node: str, b: common_pb2.BackendState,
                  engine_key: str | None = None) -> types.BackendState:
    """``engine_key`` (the node's own, see the module docstring) goes with every request
    to an engine the agent started; an ``external`` one is not the agent's to key."""
    engine = enums.ENGINE_KIND.name(b.engine)
    return types.BackendState(
        key=f"{node}/{b.name}", node=node, name=b.name, url=_base_url(b.url),
        models=tuple(b.models),
        task="embed" if b.task == common_pb2.BACKEND_TASK_EMBED else "generate",
        tasks=frozenset(b.tasks), engine=engine,
        api_key=engine_key if engine != "external" else None,
        phase=_phase(b.phase), source="agent", waiting=b.num_requests_waiting,
        running=b.num_requests_running, kv_usage=_share(b.kv_cache_usage, worst=1.0),
        kv_capacity_tokens=min(b.kv_capacity_tokens, MAX_KV_TOKENS),
        block_size=b.kv_block_size,
        prefix_hit_rate=_share(b.prefix_cache_hit_rate, worst=0.0), restarts=b.restarts,
        metrics_ok=b.metrics_ok, max_num_seqs=min(b.max_num_seqs, MAX_SEQS))


def _finite_gpu_samples(rep: controlplane_pb2.Report) -> None:
    """Drop a GPU reading that is not a finite number (placement and views compare them)."""
    for gpu in rep.gpus:
        for field in ("utilization_percent", "memory_utilization_percent",
                      "temperature_celsius", "power_watts", "power_limit_watts"):
            if gpu.HasField(field) and not math.isfinite(getattr(gpu, field)):
                gpu.ClearField(field)


def node_info(r: controlplane_pb2.Register, fallback: _Keys | None = None) -> types.NodeInfo:
    """``fallback``: the keys for an agent that chose none (see the module docstring)."""
    ports = r.engine_port_range
    return types.NodeInfo(name=r.node_name, address=r.node_address,
                          agent_version=r.agent_version, embed_models=tuple(r.embed_models),
                          labels=dict(r.labels), gpu_count=len(r.gpus),
                          engine_ports=(ports.first, ports.last)
                          if r.HasField("engine_port_range") else None,
                          engine_key=r.engine_key or (fallback.engine if fallback else None),
                          node_key=r.node_key or (fallback.node if fallback else None))


@dataclasses.dataclass(frozen=True)
class _Keys:
    engine: str | None = dataclasses.field(repr=False)
    node: str | None = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class _Caller:
    """Who opened a Connect stream: ``node`` None may register as any node (the shared
    token, or none when unauthenticated agents are allowed); ``fallback`` the keys an
    agent that chose none gets (those its credential implies)."""

    node: str | None
    fallback: _Keys | None


def command_message(cid: str, cmd: types.Command) -> controlplane_pb2.ControlMessage:
    msg = controlplane_pb2.ControlMessage(command_id=cid)
    if cmd.kind == "drain":
        msg.drain.grace_seconds = cmd.grace_seconds
    elif cmd.kind == "undrain":
        msg.undrain.SetInParent()
    elif cmd.kind == "desired_backends":
        msg.desired_backends.SetInParent()
        for spec in cmd.backends:
            json_format.ParseDict(dict(spec), msg.desired_backends.backends.add())
    else:
        msg.evict_embeddings.model = cmd.model
    return msg


# -- ControlPlane.Connect ---------------------------------------------------------------


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, svc: services_mod.Services,
                 relay: agent_relay.AgentRelay | None = None,
                 reviewer: token_review.TokenReviewer | None = None) -> None:
        self._svc = svc
        self._relay = relay     # the primary of several workers: copy each stream to them
        self._reviewer = reviewer
        auth = svc.settings.auth
        self._token = call_metadata.TokenCheck(auth.agent_token_value)
        shared = _Keys(engine_key.derive(auth.agent_token_value), auth.agent_token_value)
        self._shared = _Caller(node=None, fallback=shared)
        self._open = (auth.allow_unauthenticated_agents and not self._token.configured
                      and reviewer is None)
        if self._token.configured or reviewer is not None:
            self._refusal = ("missing or invalid agent credential (auth.agent_token or a "
                             "service-account token auth.agent_review accepts on the "
                             "control plane; control_plane.token or token_file on the agent)")
        else:
            self._refusal = ("this control plane has no auth.agent_token: agents cannot "
                             "register (or set auth.allow_unauthenticated_agents: true)")
            if not self._open:
                log.warning("no auth.agent_token is set: no agent can register")

    async def _caller(self, context: grpc.aio.ServicerContext) -> _Caller | None:
        """Who may register on this stream (None: nobody; the call is aborted)."""
        metadata = context.invocation_metadata()
        if self._token.accepts(metadata):
            return self._shared
        token = call_metadata.bearer(metadata)
        if self._reviewer is not None and token is not None:
            try:
                node = await self._reviewer.node_of(token)
            except token_review.ReviewUnavailable as exc:
                await abort(context, errors.Unavailable(
                    f"cannot verify the agent's credential now: {exc}"))
                return None
            if node is not None:
                return _Caller(node=node, fallback=None)
        elif self._open:
            return _Caller(node=None, fallback=None)
        await abort(context, errors.Unauthorized(self._refusal))
        return None

    async def Connect(self, request_iterator: AsyncIterator[controlplane_pb2.AgentMessage],
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[controlplane_pb2.ControlMessage]:
        caller = await self._caller(context)
        if caller is None:
            return
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "register" or not first.register.node_name:
            await abort(context, errors.BadRequest(
                "the first message on Connect must be Register with a node_name"))
            return
        name = first.register.node_name
        if caller.node is not None and name != caller.node:
            await abort(context, errors.Forbidden(
                f"this credential belongs to node {caller.node!r}: it cannot register as "
                f"node {name!r}"))
            return
        reg = self._svc.registry
        info = node_info(first.register, caller.fallback)
        try:
            stream_id = reg.register(info)
        except registry.NodeLive:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, (
                f"node {name!r} is connected already; a second stream is let in once the "
                "first has been silent for registry.node_down_after_s"))
            return
        except registry.AddressTaken as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, (
                f"node {exc.holder!r}, which is up, registered the Node-service address "
                f"{info.address!r}"))
            return
        except registry.TooManyNodes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "the registry holds registry.max_nodes nodes already")
            return
        log.info("node %s connected (agent %s)", name, first.register.agent_version,
                 extra={"node": name})
        out: asyncio.Queue[controlplane_pb2.ControlMessage | None] = asyncio.Queue()
        copy = self._relay.open(first) if self._relay is not None else None
        tasks = [asyncio.create_task(self._read(name, stream_id, caller, info.engine_key,
                                                request_iterator, out, copy)),
                 asyncio.create_task(self._pump(name, out))]
        self._svc.metrics.agent_streams.inc()
        try:
            while (msg := await out.get()) is not None:
                yield msg
        finally:
            await aiotasks.stop(*tasks, quiet=True)
            if copy is not None:
                await copy.close()
            reg.disconnect(name, stream_id)
            self._svc.metrics.agent_streams.dec()
            log.info("node %s disconnected", name, extra={"node": name})

    async def _read(self, name: str, stream_id: int, caller: _Caller, key: str | None,
                    messages: AsyncIterator[controlplane_pb2.AgentMessage],
                    out: asyncio.Queue[controlplane_pb2.ControlMessage | None],
                    copy: agent_relay.RelayedStream | None) -> None:
        """``key``: the node's engine key as it registered (a later Register on the
        same stream may name another: the engines it reports next carry that one)."""
        reg = self._svc.registry
        try:
            async for msg in messages:
                if msg.ByteSize() > MAX_REPORT_BYTES:
                    raise _Oversized(f"a message of {msg.ByteSize()} bytes (at most "
                                     f"{MAX_REPORT_BYTES})")
                if copy is not None:
                    copy.send(msg)
                kind = msg.WhichOneof("body")
                if kind == "report":
                    rep = msg.report
                    _finite_gpu_samples(rep)
                    reg.report(name, [backend_state(name, b, key) for b in rep.backends],
                               draining=rep.draining, details=rep)
                    out.put_nowait(controlplane_pb2.ControlMessage(ack=controlplane_pb2.Ack(
                        sequence=rep.sequence, replica=self._svc.replica)))
                elif kind == "command_ack":
                    reg.ack(msg.command_ack.command_id, msg.command_ack.ok,
                            msg.command_ack.error)
                elif kind == "register" and msg.register.node_name == name:
                    info = node_info(msg.register, caller.fallback)
                    key = info.engine_key
                    reg.register(info, stream_id)
        except (_Oversized, registry.AddressTaken) as exc:
            why = (f"its Register named the address of node {exc.holder!r}"
                   if isinstance(exc, registry.AddressTaken) else str(exc))
            log.warning("stream of node %s ended: %s", name, why, extra={"node": name})
        except grpc.aio.AioRpcError as exc:
            log.info("stream of node %s ended: %s", name, exc.code().name)
        except Exception:
            log.exception("stream of node %s failed", name)
        finally:
            out.put_nowait(None)

    async def _pump(self, name: str,
                    out: asyncio.Queue[controlplane_pb2.ControlMessage | None]) -> None:
        outbox = self._svc.registry.outbox(name)
        while True:
            cid, cmd = await outbox.get()
            out.put_nowait(command_message(cid, cmd))


class _Oversized(Exception):
    """An agent message over :data:`MAX_REPORT_BYTES`."""


def control_plane(svc: services_mod.Services,
                  relay: agent_relay.AgentRelay | None = None) -> Registration:
    review = svc.settings.auth.agent_review
    reviewer = token_review.TokenReviewer(review) if review is not None else None

    def register(server: grpc.aio.Server) -> str:
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(  # type: ignore[no-untyped-call]
            ControlPlaneServicer(svc, relay, reviewer), server)
        return str(controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name)
    return register


# -- the server -------------------------------------------------------------------------


def _credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    with open(key_file, "rb") as k, open(cert_file, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


async def start(host: str, port: int | None, registrations: Sequence[Registration], *,
                max_message_bytes: int = 8 * 1024 * 1024, tls_cert_file: str | None = None,
                tls_key_file: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a server with the given services plus health and reflection; (server, port).

    ``port`` None: ``host`` is a whole address, such as ``unix:/path`` (port 0 returned).
    An address another process holds is an :class:`OSError`: grpc's default
    ``SO_REUSEPORT`` would otherwise let two control planes share a port silently, each
    taking some of the agents' connections."""
    options = [("grpc.so_reuseport", 0),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.keepalive_time_ms", 30_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
               ("grpc.keepalive_permit_without_calls", 1)]
    server = grpc.aio.server(options=options)
    names = [register(server) for register in registrations]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    address = host if port is None else f"{host}:{port}"
    try:
        if tls_cert_file and tls_key_file:
            bound = server.add_secure_port(address, _credentials(tls_cert_file, tls_key_file))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:    # grpc's way of saying EADDRINUSE / EACCES
        bound = -1
    if bound < 0 or (bound == 0 and port is not None):
        raise OSError(f"cannot bind the gRPC server to {address} (address in use or not "
                      "available)")
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    await server.start()
    for name in [*names, ""]:
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
