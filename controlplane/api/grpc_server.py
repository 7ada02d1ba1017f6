"""The control plane's gRPC server: ``ControlPlane.Connect``, health, reflection.

One ``grpc.aio`` server on the same event loop as the HTTP API. Services are added as
*registrations* — a function that adds a servicer to the server and returns its full
service name — so the Admin service is one more entry in the list passed to
:func:`start` (health status and reflection then cover it too).

``Connect``: a registered node is sent every tenant's prompts, so the call must carry
``auth.agent_token`` as ``authorization: Bearer <token>`` metadata, checked in constant
time (:mod:`synapse_common.call_metadata`), else ``UNAUTHENTICATED``. Without a token
configured every agent is refused, unless ``auth.allow_unauthenticated_agents`` says
otherwise (the settings refuse that combination on a gRPC address other machines can
reach). The first message must be ``Register`` (else ``INVALID_ARGUMENT``);
then a reader task feeds reports and command acks into the registry and queues an
``Ack`` per report, a pump task moves the node's command outbox onto the stream, and the
stream's end (or error) marks the node disconnected. Protos are converted to core value objects
here and nowhere deeper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import errors
from controlplane.adapters import agent_relay
from controlplane.api import services as services_mod
from controlplane.core import types, upstream_kinds
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


def backend_state(node: str, b: common_pb2.BackendState,
                  engine_key: str | None = None) -> types.BackendState:
    """``engine_key`` (:mod:`synapse_common.engine_key`) goes with every request to an
    engine the agent started; an ``external`` one is not the agent's to key."""
    engine = enums.ENGINE_KIND.name(b.engine)
    return types.BackendState(
        key=f"{node}/{b.name}", node=node, name=b.name, url=_base_url(b.url),
        models=tuple(b.models),
        task="embed" if b.task == common_pb2.BACKEND_TASK_EMBED else "generate",
        tasks=frozenset(b.tasks), engine=engine,
        api_key=engine_key if engine != "external" else None,
        phase=_phase(b.phase), source="agent", waiting=b.num_requests_waiting,
        running=b.num_requests_running, kv_usage=b.kv_cache_usage,
        kv_capacity_tokens=b.kv_capacity_tokens, block_size=b.kv_block_size,
        prefix_hit_rate=b.prefix_cache_hit_rate, restarts=b.restarts,
        metrics_ok=b.metrics_ok, max_num_seqs=b.max_num_seqs)


def node_info(r: controlplane_pb2.Register) -> types.NodeInfo:
    ports = r.engine_port_range
    return types.NodeInfo(name=r.node_name, address=r.node_address,
                          agent_version=r.agent_version, embed_models=tuple(r.embed_models),
                          labels=dict(r.labels), gpu_count=len(r.gpus),
                          engine_ports=(ports.first, ports.last)
                          if r.HasField("engine_port_range") else None)


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
                 relay: agent_relay.AgentRelay | None = None) -> None:
        self._svc = svc
        self._relay = relay     # the primary of several workers: copy each stream to them
        auth = svc.settings.auth
        self._token = call_metadata.TokenCheck(auth.agent_token_value)
        self._engine_key = engine_key.derive(auth.agent_token_value)
        self._open = auth.allow_unauthenticated_agents and not self._token.configured
        if self._token.configured:
            self._refusal = ("missing or invalid agent token (auth.agent_token on the control "
                             "plane, control_plane.token on the agent)")
        else:
            self._refusal = ("this control plane has no auth.agent_token: agents cannot "
                             "register (or set auth.allow_unauthenticated_agents: true)")
            if not self._open:
                log.warning("no auth.agent_token is set: no agent can register")

    def _agent_allowed(self, context: grpc.aio.ServicerContext) -> bool:
        """A registered node receives every tenant's prompts: only agents holding
        ``auth.agent_token`` may register (or any, when explicitly allowed)."""
        return self._open or self._token.accepts(context.invocation_metadata())

    async def Connect(self, request_iterator: AsyncIterator[controlplane_pb2.AgentMessage],
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[controlplane_pb2.ControlMessage]:
        if not self._agent_allowed(context):
            await abort(context, errors.Unauthorized(self._refusal))
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
        reg = self._svc.registry
        stream_id = reg.register(node_info(first.register))
        log.info("node %s connected (agent %s)", name, first.register.agent_version,
                 extra={"node": name})
        out: asyncio.Queue[controlplane_pb2.ControlMessage | None] = asyncio.Queue()
        copy = self._relay.open(first) if self._relay is not None else None
        tasks = [asyncio.create_task(self._read(name, request_iterator, out, copy)),
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

    async def _read(self, name: str, messages: AsyncIterator[controlplane_pb2.AgentMessage],
                    out: asyncio.Queue[controlplane_pb2.ControlMessage | None],
                    copy: agent_relay.RelayedStream | None) -> None:
        reg = self._svc.registry
        try:
            async for msg in messages:
                if copy is not None:
                    copy.send(msg)
                kind = msg.WhichOneof("body")
                if kind == "report":
                    rep = msg.report
                    reg.report(name, [backend_state(name, b, self._engine_key)
                                      for b in rep.backends],
                               draining=rep.draining, details=rep)
                    out.put_nowait(controlplane_pb2.ControlMessage(ack=controlplane_pb2.Ack(
                        sequence=rep.sequence, replica=self._svc.replica)))
                elif kind == "command_ack":
                    reg.ack(msg.command_ack.command_id, msg.command_ack.ok,
                            msg.command_ack.error)
                elif kind == "register" and msg.register.node_name == name:
                    reg.register(node_info(msg.register))
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


def control_plane(svc: services_mod.Services,
                  relay: agent_relay.AgentRelay | None = None) -> Registration:
    def register(server: grpc.aio.Server) -> str:
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(  # type: ignore[no-untyped-call]
            ControlPlaneServicer(svc, relay), server)
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
