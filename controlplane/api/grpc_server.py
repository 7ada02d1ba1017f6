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
  (``PERMISSION_DENIED`` otherwise; ``UNAVAILABLE`` while the API server cannot answer,
  or while a review for the same peer address is in flight: whoever can reach the port
  can present tokens, and one place may not take every review place).

Without either every agent is refused, unless ``auth.allow_unauthenticated_agents`` says
otherwise (the settings refuse that combination on a gRPC address other machines can
reach). The first message must be ``Register`` (else ``INVALID_ARGUMENT``). A node that
is up already, or a Node-service address another node that is up registered, is refused
``ALREADY_EXISTS``, and a new node past ``registry.max_nodes``, or past
``registry.max_nodes_per_address`` from the stream's peer address (:func:`peer_origin`:
this host is not counted), ``RESOURCE_EXHAUSTED`` naming the setting
(:mod:`controlplane.core.registry`); the caller is not told which
node holds the address (the control plane's log names it). The keys the agent chose
(``Register.engine_key``, ``node_key``) are what the control plane presents to that
node's engines and Node service; an agent that sent none (an older one) gets the keys
derived from the shared token, only when it authenticated with that token (nothing it
did not hold already). Messages are read defensively (:mod:`controlplane.api
.agent_messages`): a bad Register is ``INVALID_ARGUMENT``, and so is one whose
``node_address`` is not where that node's backends may be: the control plane sends
tenants' texts there (:func:`engine_hosts.address_refusal`, checked after the
credential; a worker leaves it to its primary like the backends' hosts below). A message
over its size limit, a later Register for another node or at such an address, or a
report or Register on a stream a newer one of the node has replaced ends the stream
with a warning.
A node's stream lines (connected, ended, disconnected) and the warnings of a refused
Register or stream are said once a minute per node and kind at most, the first always,
the next with how many were held back, and names past the first so many a minute only
counted (:mod:`synapse_common.log_limit`, :data:`LOG_EVERY_S`): a holder of the agent
token, or a flapping agent, connecting in a loop writes no unbounded log. A held line is
said once its minute has passed, at the next report of any node, if no newer stream line
of its node came (one subject per node), so a node that reconnected within the minute and
stayed up does not show "disconnected" as its last line.

Serving workers: the pod's primary copies each stream it accepted to every worker
(:mod:`controlplane.adapters.agent_relay`) with the keys it decided, and only the
Registers it accepted; a worker's servicer (``relayed``) trusts its primary's decisions
and applies no fallback, review or admission of its own.

A report's backends are marked as the registry takes them when tenants share one's
prefix cache (:func:`controlplane.core.cache_salt.marked`: no engine of its kind takes
the salt, and no document said it does yet, :mod:`controlplane.api.salt_learning`), so
the counts of an agent's ``external`` backend are hidden from its first report on.

A report naming more backends or models than any agent runs
(:func:`agent_messages.report_problem`) ends the stream ``INVALID_ARGUMENT``; a backend
that cannot be taken (:func:`agent_messages.backend_problem`), or whose URL is not at
the node's own address as this stream's peer address shows it nor where
``registry.engine_hosts`` allows, or is a loopback one of an agent on this host outside
the engine port range it registered (:mod:`controlplane.core.engine_hosts`; a worker
leaves that check to its primary), or, with ``registry.node_models``, claims a model its
node may not serve (:mod:`controlplane.core.node_models`: listed for it, or placed on it
by ``DeployModel``; the Register's ``embed_models`` lose such a model the same way), is
taken out of the report before the registry or the workers see it, with one warning per
kind and stream. The
idle upstream connections kept for a backend that leaves the registry (a report no
longer names it, its node's stream ended) are closed, unless another backend shares its
origin.

Then a reader task feeds reports and command acks into the registry and queues an
``Ack`` per report, a pump task moves the node's command outbox onto the stream, and the
stream's end (or error) marks the node disconnected. Protos are converted to core value objects
here and nowhere deeper.

Limits (:func:`start`): ``Connect`` is refused at its headers and Admin calls too
(:mod:`controlplane.api.admin_grpc`), so a caller without a credential never has a
message of its read; what a caller with one may send is capped at
:data:`MAX_RECEIVE_BYTES`, its open calls per connection at
:data:`MAX_CONCURRENT_STREAMS`, and a connection without a call open is closed after
minutes (:mod:`synapse_common.grpc_limits`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import errors
from controlplane.adapters import agent_relay, token_review
from controlplane.api import agent_messages
from controlplane.api import services as services_mod
from controlplane.core import cache_salt, engine_hosts, node_models, registry, types
from protos.synapse.v1 import controlplane_pb2, controlplane_pb2_grpc
from synapse_common import aiotasks, call_metadata, engine_key, grpc_limits, log_limit, tls_files
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.grpc")
# The largest message a legitimate caller sends: an Admin ExplainRoute's prompt of
# admin_grpc.MAX_PROMPT_CHARS characters (up to four bytes each) and its other fields;
# an agent's messages are refused past agent_messages.MAX_MESSAGE_BYTES anyway. The
# receive limit is this or grpc.max_message_bytes, the smaller (sends keep the setting).
MAX_RECEIVE_BYTES = 4 * 1024 * 1024 + 64 * 1024
# Calls open at once on one connection of the gRPC port (synapse_common.grpc_limits): an
# agent holds one Connect stream on its own connection, synapsectl makes one Admin call
# at a time; a proxy that multiplexes more callers opens more connections at the cap.
MAX_CONCURRENT_STREAMS = 128

Registration = Callable[[grpc.aio.Server], str]
Server = grpc.aio.Server
MIN_REPORT_GAP_S = 0.05     # a node's reports applied at most this often (see _read)
# A node's stream lines (connected, ended, disconnected) and the warnings of a refused
# Register or stream are said at most once a minute per node and kind, the first always
# (synapse_common.log_limit): a holder of the agent token, or a flapping agent, that
# connects in a loop cannot write log lines without bound. Names past the first so many
# in a minute are counted in one summary line.
LOG_EVERY_S = 60.0
STREAM_LOG_NAMES = 100      # new names per minute whose stream lines are said
REFUSAL_LOG_NAMES = 20      # new names per minute whose refusals are said


def status_code(exc: errors.SynapseError) -> grpc.StatusCode:
    """The gRPC status for one of our errors (the same hierarchy as HTTP)."""
    return grpc.StatusCode[exc.grpc_code]


async def abort(context: grpc.aio.ServicerContext, exc: errors.SynapseError) -> None:
    """End the call with ``exc``'s status, its code in the trailing metadata
    (``call_metadata.ERROR``): a client can tell the service's refusal (an UNAVAILABLE
    because the intent cannot be stored, ...) from a service it did not reach."""
    await context.abort(status_code(exc), exc.message, trailing_metadata=(
        (call_metadata.ERROR, str(exc.code or call_metadata.REFUSED)),))


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
        msg.desired_backends.retry.extend(cmd.retry)
    else:
        msg.evict_embeddings.model = cmd.model
    return msg


# -- ControlPlane.Connect ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Caller:
    """Who opened a Connect stream: ``node`` None may register as any node (the shared
    token, or none when unauthenticated agents are allowed, or the pod's primary
    relaying a stream it accepted); ``fallback`` the keys an agent that chose none gets
    (those its credential implies); ``decided``: the primary's registry admitted it."""

    node: str | None
    fallback: agent_messages.Keys | None
    decided: bool = False


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServicer):
    """``relayed``: a serving worker's servicer, on the pod's private socket, where only
    the primary connects, copying streams it accepted with the keys it decided
    (:func:`agent_messages.as_decided`): the worker trusts those and adds none."""

    def __init__(self, svc: services_mod.Services,
                 relay: agent_relay.AgentRelay | None = None,
                 reviewer: token_review.TokenReviewer | None = None, *,
                 relayed: bool = False, sleep: clocks.Sleep = clocks.sleep) -> None:
        self._svc = svc
        self._sleep = sleep
        self._relay = relay     # the primary of several workers: copy each stream to them
        self._reviewer = None if relayed else reviewer
        self._reviewing: set[str] = set()     # peers with a review in flight
        self._relayed = relayed
        self._stream_log = log_limit.PerKey(log, svc.clock, "node stream lines",
                                            every_s=LOG_EVERY_S, new_keys=STREAM_LOG_NAMES)
        self._refusal_log = log_limit.PerKey(log, svc.clock, "refusals of nodes",
                                             every_s=LOG_EVERY_S, new_keys=REFUSAL_LOG_NAMES)
        self._engine_hosts = engine_hosts.Allowed.parse(svc.settings.registry.engine_hosts)
        self._claims = node_models.Claims.parse(svc.settings.registry.node_models)
        auth = svc.settings.auth
        self._token = call_metadata.TokenCheck(auth.agent_token_value)
        shared = agent_messages.Keys(engine_key.derive(auth.agent_token_value),
                                     auth.agent_token_value)
        self._shared = (_Caller(node=None, fallback=None, decided=True) if relayed
                        else _Caller(node=None, fallback=shared))
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
            peer = _peer_host(context.peer())
            try:
                if peer in self._reviewing:     # one at a time per address: a flood from
                    raise token_review.ReviewUnavailable(   # one place takes one place
                        "a review for this address is in flight already")
                self._reviewing.add(peer)
                try:
                    node = await self._reviewer.node_of(token)
                finally:
                    self._reviewing.discard(peer)
            except token_review.ReviewUnavailable as exc:
                await abort(context, errors.Unavailable(
                    f"cannot verify the agent's credential now: {exc}"))
                return None
            if node is not None:
                return _Caller(node=node, fallback=None)
        elif self._open:
            return _Caller(node=None, fallback=None, decided=self._relayed)
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
        problem = agent_messages.register_problem(first)
        if problem is not None:
            await abort(context, errors.BadRequest(problem))
            return
        name = first.register.node_name
        if caller.node is not None and name != caller.node:
            await abort(context, errors.Forbidden(
                f"this credential belongs to node {caller.node!r}: it cannot register as "
                f"node {name!r}"))
            return
        peer = _peer_host(context.peer())
        problem = self._address_problem(first.register, peer)
        if problem is not None:
            await abort(context, errors.BadRequest(problem))
            return
        reg = self._svc.registry
        warned: set[str] = set()       # what this stream was warned of already
        self._drop_refused_embedders(first.register, warned)
        info = agent_messages.node_info(first.register, caller.fallback)
        try:
            stream_id = reg.register(info, decided=caller.decided,
                                     origin=None if caller.decided else peer_origin(peer))
        except registry.NodeLive:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, (
                f"node {name!r} is connected already; a second stream is let in once the "
                "first has been silent for registry.node_down_after_s"))
            return
        except registry.AddressTaken as exc:
            # The holder's name is for the operator: the caller learns only that the
            # address is taken (a name it could not otherwise see would say who runs where).
            self._refusal_log.log(
                logging.WARNING, ("address", name), "node %s refused: node %s, which is up, "
                "registered its Node-service address %r", name, exc.holder, info.address,
                extra={"node": name})
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, (
                f"another node, which is up, registered the Node-service address "
                f"{info.address!r}"))
            return
        except registry.OriginFull:
            self._refusal_log.log(logging.WARNING, ("origin", name), "node %s refused: its "
                                  "address %s holds registry.max_nodes_per_address nodes "
                                  "already", name, peer, extra={"node": name})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                "this address holds registry.max_nodes_per_address nodes already (raise it "
                "on the control plane for more agents behind one NAT or proxy)"))
            return
        except registry.TooManyNodes:
            self._refusal_log.log(logging.WARNING, ("full", name), "node %s refused: the "
                                  "registry holds registry.max_nodes nodes already", name,
                                  extra={"node": name})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "the registry holds registry.max_nodes nodes already")
            return
        self._stream_log.log(logging.INFO, ("connected", name), "node %s connected (agent %s)",
                             name, info.agent_version, extra={"node": name}, subject=name)
        out: asyncio.Queue[controlplane_pb2.ControlMessage | None] = asyncio.Queue()
        copy = (self._relay.open(agent_messages.as_decided(first, info))
                if self._relay is not None else None)
        ended: list[_Ended] = []
        tasks = [asyncio.create_task(self._read(name, stream_id, caller, info,
                                                request_iterator, out, copy, ended, peer,
                                                warned)),
                 asyncio.create_task(self._pump(name, stream_id, out))]
        self._svc.metrics.agent_streams.inc()
        try:
            while (msg := await out.get()) is not None:
                yield msg
            if ended and ended[0].code is not None:
                await context.abort(ended[0].code, str(ended[0]))
        finally:
            await aiotasks.stop(*tasks, quiet=True)
            if copy is not None:
                await copy.close()
            gone = self._urls_of(name) if reg.current(name, stream_id) else set()
            reg.disconnect(name, stream_id)
            self._close_unused(gone, leaving=name)
            self._svc.metrics.agent_streams.dec()
            self._stream_log.log(logging.INFO, ("disconnected", name), "node %s disconnected",
                                 name, extra={"node": name}, subject=name)

    async def _read(self, name: str, stream_id: int, caller: _Caller, info: types.NodeInfo,
                    messages: AsyncIterator[controlplane_pb2.AgentMessage],
                    out: asyncio.Queue[controlplane_pb2.ControlMessage | None],
                    copy: agent_relay.RelayedStream | None, ended: list[_Ended],
                    peer: str, warned: set[str]) -> None:
        """``info``: the node as it registered; its engine key and engine port range
        hold for its reports until a later Register on the same stream names others. The
        copy to the workers gets reports and acks as they come, and a Register only once
        this process accepted it, with the keys decided here, and a report without the
        backends left out here. Why the stream ends, when the control plane ends it, goes
        into ``ended`` (the status the agent is told). ``peer``: the stream's peer host,
        where the node's backends must be (:mod:`controlplane.core.engine_hosts`);
        ``warned``: the kinds of refusal this stream was warned of already.

        Reports and later Registers are applied at most once per
        :data:`MIN_REPORT_GAP_S` (one gap for both): one that comes sooner waits (gRPC's
        flow control then holds the agent back), so an agent sending either in a loop
        cannot have the registry, and every view built on it, remade at the rate it
        writes; an agent reports every few seconds and on changes."""
        reg = self._svc.registry
        clock = self._svc.clock
        key, ports = info.engine_key, info.engine_ports
        next_report = clock()
        try:
            async for msg in messages:
                if msg.ByteSize() > agent_messages.MAX_MESSAGE_BYTES:
                    raise _Ended(f"a message of {msg.ByteSize()} bytes (at most "
                                 f"{agent_messages.MAX_MESSAGE_BYTES})")
                kind = msg.WhichOneof("body")
                if kind in ("report", "register"):     # each remakes the registry's views
                    if (wait := next_report - clock()) > 0:
                        await self._sleep(wait)
                    next_report = clock() + MIN_REPORT_GAP_S
                if kind == "report":
                    rep = msg.report
                    problem = agent_messages.report_problem(rep)
                    if problem is not None:
                        raise _Ended(problem, grpc.StatusCode.INVALID_ARGUMENT)
                    agent_messages.finite_gpu_samples(rep)
                    self._leave_out_refused(name, rep, warned, peer, ports)
                    users = self._svc.sharers()
                    backends = [cache_salt.marked(agent_messages.backend_state(name, b, key),
                                                  users) for b in rep.backends]
                    before = self._urls_of(name)
                    if not reg.report(name, backends, draining=rep.draining, details=rep,
                                      stream_id=stream_id):
                        raise _Ended("a newer stream of the node took over")
                    self._close_unused(before - {b.url for b in backends})
                    self._stream_log.catch_up()     # a report comes every few seconds
                    self._refusal_log.catch_up()
                    out.put_nowait(controlplane_pb2.ControlMessage(ack=controlplane_pb2.Ack(
                        sequence=rep.sequence, replica=self._svc.replica)))
                elif kind == "command_ack":
                    reg.ack(msg.command_ack.command_id, msg.command_ack.ok,
                            msg.command_ack.error)
                elif kind == "register":
                    msg = self._register_again(name, stream_id, caller, msg, peer, warned)
                    key = msg.register.engine_key or None
                    ports = agent_messages.engine_ports(msg.register)
                if copy is not None:
                    copy.send(msg)
        except _Ended as exc:
            self._refusal_log.log(logging.WARNING, ("ended", name), "stream of node %s "
                                  "ended: %s", name, exc, extra={"node": name})
            ended.append(exc)
        except grpc.aio.AioRpcError as exc:
            self._stream_log.log(logging.INFO, ("ended", name), "stream of node %s ended: %s",
                                 name, exc.code().name, extra={"node": name}, subject=name)
        except Exception:
            log.exception("stream of node %s failed", name)
        finally:
            out.put_nowait(None)

    def _address_problem(self, r: controlplane_pb2.Register, peer: str) -> str | None:
        """Why ``r``'s Node-service address is not one the node may name
        (:func:`engine_hosts.address_refusal`; None: it may, or it named none). A worker
        leaves that to its primary, which sees the agent's address."""
        if self._relayed or not r.node_address:
            return None
        why = engine_hosts.address_refusal(r.node_address, peer, self._engine_hosts)
        return f"node_address: {why}" if why is not None else None

    def _leave_out_refused(self, name: str, rep: controlplane_pb2.Report,
                           warned: set[str], peer: str,
                           ports: tuple[int, int] | None) -> None:
        """Take out of ``rep`` the backends that cannot be taken
        (:func:`agent_messages.backend_problem`) or are at a host the node may not name
        (:func:`engine_hosts.refusal`, with the engine port range ``ports`` the node
        registered; a worker leaves that to its primary, which sees
        the agent's address), so that neither the registry nor the workers' copy gets
        them: not routed, probed or scraped. One warning per kind of refusal and stream
        (a report comes every few seconds)."""
        refused = []
        for i, b in enumerate(rep.backends):
            why = agent_messages.backend_problem(b)
            kind = "name"
            if why is None and not self._relayed:
                why = engine_hosts.refusal(b.url, peer, self._engine_hosts, ports)
                kind = "host"
            if why is None and not self._relayed:
                why = self._model_refusal(name, b.models)
                kind = "model"
            if why is not None:
                refused.append((i, kind, why))
        for _, kind, why in refused:
            if kind not in warned:
                warned.add(kind)
                self._refusal_log.log(
                    logging.WARNING, (kind, name), "node %s reported %s: that backend is "
                    "left out (said once per stream)", name, why, extra={"node": name})
        for i, _, _ in reversed(refused):
            del rep.backends[i]

    def _model_refusal(self, name: str, models: Sequence[str]) -> str | None:
        """Why a backend of node ``name`` serving ``models`` is one it may not report
        (:mod:`controlplane.core.node_models`; None: it may, or the check is off)."""
        if not self._claims.checked:
            return None
        placed = node_models.placed_models(self._svc.fleet.intent.get(name).desired)
        refused = self._claims.refused(name, models, placed)
        if not refused:
            return None
        return (f"a backend serving model {refused[0]!r}, which registry.node_models does "
                "not list for it and the control plane did not place on it")

    def _drop_refused_embedders(self, r: controlplane_pb2.Register,
                                warned: set[str]) -> None:
        """Take out of ``r`` the ``embed_models`` its node may not serve
        (:mod:`controlplane.core.node_models`): ``Node.Embed`` is sent tenants' texts for
        them. One warning per stream; a worker takes the Register its primary trimmed."""
        if self._relayed or not self._claims.checked:
            return
        refused = set(self._claims.refused(r.node_name, r.embed_models))
        if not refused:
            return
        kept = [m for m in r.embed_models if m not in refused]
        del r.embed_models[:]
        r.embed_models.extend(kept)
        if "embed" not in warned:
            warned.add("embed")
            self._refusal_log.log(
                logging.WARNING, ("embed", r.node_name), "node %s registered an embedder for "
                "model %r, which registry.node_models does not list for it: not used (said "
                "once per stream)", r.node_name, sorted(refused)[0],
                extra={"node": r.node_name})

    def _urls_of(self, name: str) -> set[str]:
        view = self._svc.registry.node(name)
        return {b.url for b in view.backends} if view is not None else set()

    def _close_unused(self, urls: set[str], leaving: str | None = None) -> None:
        """Close the idle upstream connections kept for ``urls``, the backends that
        left the registry (or the node ``leaving`` took away), unless another backend
        still uses their origin: a report's backends come and go, their sockets must
        not stay."""
        if not urls:
            return
        keep = [b.url for b, _ in self._svc.registry.all_backends() if b.node != leaving
                or b.source != "agent"]
        self._svc.upstream.close_idle(urls, keep)

    def _register_again(self, name: str, stream_id: int, caller: _Caller,
                        msg: controlplane_pb2.AgentMessage, peer: str,
                        warned: set[str]) -> controlplane_pb2.AgentMessage:
        """A later Register on a node's stream: the same node, refreshed (anything else,
        a stream a newer one of the node replaced, or a Node-service address the node may
        not name, ends the stream); returns what the workers are sent (the keys decided
        here)."""
        problem = agent_messages.register_problem(msg)
        if problem is None and msg.register.node_name != name:
            problem = f"a Register for node {msg.register.node_name!r} on this node's stream"
        problem = problem or self._address_problem(msg.register, peer)
        if problem is not None:
            raise _Ended(problem)
        if not self._svc.registry.current(name, stream_id):
            # Refreshed on its own stream only: admitted again here, the node would be
            # connected under a stream id no stream holds (never disconnected, never
            # forgotten to make room, its origin not counted).
            raise _Ended("a newer stream of the node took over")
        self._drop_refused_embedders(msg.register, warned)
        info = agent_messages.node_info(msg.register, caller.fallback)
        try:
            self._svc.registry.register(info, stream_id, decided=caller.decided)
        except registry.AddressTaken as exc:
            raise _Ended(f"its Register named the address of node {exc.holder!r}") from None
        return agent_messages.as_decided(msg, info)

    async def _pump(self, name: str, stream_id: int,
                    out: asyncio.Queue[controlplane_pb2.ControlMessage | None]) -> None:
        """Moves the node's commands onto this stream while it is the node's current one;
        a command it takes after a newer stream took over goes back for that one's pump,
        and this stream ends."""
        reg = self._svc.registry
        outbox = reg.outbox(name)
        while True:
            cid, cmd = await outbox.get()
            if not reg.current(name, stream_id):
                outbox.put_nowait((cid, cmd))
                out.put_nowait(None)
                return
            out.put_nowait(command_message(cid, cmd))


def peer_origin(host: str) -> str | None:
    """Where a stream from peer ``host`` (:func:`_peer_host`) comes from, as
    ``registry.max_nodes_per_address`` counts it: an IPv4 address, an IPv6 address's /64
    (one machine or site is commonly given a whole /64); None for this host (a loopback
    address, a unix socket), which is not counted."""
    if host.startswith("unix"):
        return None
    where = engine_hosts.canonical(host)
    if isinstance(where, str):
        return where
    if where.is_loopback:
        return None
    if isinstance(where, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((where, 64), strict=False))
    return str(where)


def _peer_host(peer: str) -> str:
    """The address of a gRPC peer without its port ("ipv4:10.0.0.5:41234" → "10.0.0.5",
    "ipv6:%5B::1%5D:41234" → "::1"); a zone id stays ("fe80::1%eth0", which
    :func:`engine_hosts.canonical` drops), any other peer (``unix:…``) is kept whole.
    grpc percent-encodes an IPv6 peer's brackets (and the ``%`` of its zone id), so
    the text is decoded first: undecoded, ``%5B::1%5D`` reads as a name, and an IPv6
    agent's own address as nobody's."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]")
    return peer


class _Ended(Exception):
    """Why the control plane ends an agent's stream (a log line's text); ``code``: the
    status the agent is told (None: the stream just ends)."""

    def __init__(self, why: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(why)
        self.code = code


def control_plane(svc: services_mod.Services, relay: agent_relay.AgentRelay | None = None,
                  *, relayed: bool = False) -> Registration:
    """``relayed``: a serving worker's, which only its pod's primary reaches."""
    review = svc.settings.auth.agent_review
    reviewer = token_review.TokenReviewer(review) if review and not relayed else None

    def register(server: grpc.aio.Server) -> str:
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(  # type: ignore[no-untyped-call]
            ControlPlaneServicer(svc, relay, reviewer, relayed=relayed), server)
        return str(controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name)
    return register


# -- the server -------------------------------------------------------------------------


def _credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """Read again when the files change (a renewal needs no restart)."""
    return tls_files.server_credentials(cert_file, key_file,
                                        "grpc.tls_cert_file / grpc.tls_key_file")


async def start(host: str, port: int | None, registrations: Sequence[Registration], *,
                max_message_bytes: int = 8 * 1024 * 1024, tls_cert_file: str | None = None,
                tls_key_file: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a server with the given services plus health and reflection; (server, port).

    ``port`` None: ``host`` is a whole address, such as ``unix:/path`` (port 0 returned).
    An address another process holds is an :class:`OSError`: grpc's default
    ``SO_REUSEPORT`` would otherwise let two control planes share a port silently, each
    taking some of the agents' connections."""
    options = [("grpc.so_reuseport", 0),
               ("grpc.max_receive_message_length", min(max_message_bytes, MAX_RECEIVE_BYTES)),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.keepalive_time_ms", 30_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
               ("grpc.keepalive_permit_without_calls", 1),
               # a whole address is a serving worker's private socket, over which the
               # primary's relay carries a copy of every agent's stream: no stream cap
               *grpc_limits.server_options(None if port is None else MAX_CONCURRENT_STREAMS)]
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
