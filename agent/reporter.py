"""The report stream: one ``ControlPlane.Connect`` bidi stream per control-plane replica.

Decisions:

* Targets are ``control_plane.addresses`` plus every A record of ``control_plane.dns_name``
  (a headless Service), re-resolved every ``dns_refresh_s``: each replica keeps its own
  full view of the node, and a replica that appears later is dialled without a restart. A
  failed lookup keeps the previous set rather than hanging up on every replica.
* With ``control_plane.tls_ca_file`` every stream is TLS, and the control plane's
  certificate must be signed by that CA and name the host dialled. The A records of
  ``dns_name`` are dialled by address, so for them the name checked is ``dns_name``'s
  host (the headless Service's DNS name, which the certificate carries), not the
  replica's pod IP, which changes with every pod.
* Per target: dial (``channel_ready`` with a deadline), ``Register`` first, then a
  ``Report`` every ``report_interval_s`` and at once when :meth:`Reporter.notify` is
  called (every state change); bursts of changes coalesce into one report.
* Each new problem with a control plane (refused, unreachable, a different status) is
  logged once, not at every retry, so a refusal's reason (UNAUTHENTICATED: no or a wrong
  token) shows even after a transient error.
* Reconnect with capped, jittered exponential backoff (:class:`agent.core.backoff.Backoff`),
  reset once a registered stream lasted ``reconnect_max_s``: a control plane that hangs
  up right after every Register is not hammered. Every new session registers again, so
  a restarted control plane rebuilds its view from the agents.
* Keepalive pings every ``keepalive_s`` (also without calls) so a dead peer behind a
  NAT or a vanished pod is detected on a long-lived, mostly idle stream.
* A stream counts as registered once the control plane answers (it acks the first
  report, sent right after ``Register``); one that says nothing for
  :data:`ANSWER_TIMEOUT_S` is given up and dialled again. A refusal was seen, now and
  then under load, never to reach the agent on its stream (neither its read nor its
  status woke up): the agent then sat "connected" to a control plane that did not count
  it, silent, until the stream ended. The next stream is refused in the ordinary way.
* Commands are executed in their own task (a DesiredBackends change may take the stop
  grace period) and each gets a ``CommandAck``; writes on a call are serialised by a
  lock because grpc.aio allows one outstanding write.
* Every wait (reconnect backoff, report interval, DNS refresh) goes through the injected
  :class:`synapse_common.clock.Time`, so tests run them in virtual time.
* On shutdown every stream sends one last report (backends ``stopped``), half-closes,
  and the channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from agent import metrics as agent_metrics
from agent.config import ControlPlaneLink
from agent.core import backoff
from protos.synapse.v1 import controlplane_pb2, controlplane_pb2_grpc
from synapse_common import bearer_token, call_metadata
from synapse_common import clock as clocks

log = logging.getLogger(__name__)
COALESCE_S = 0.05
FINAL_REPORT_TIMEOUT_S = 3.0
STATUS_GRACE_S = 1.0     # for a read to wake up to a stream that already has its status
ANSWER_TIMEOUT_S = 10.0  # for the control plane's first answer (its ack of the first report)

CommandHandler = Callable[[controlplane_pb2.ControlMessage], Awaitable[tuple[bool, str]]]


class Reporter:
    def __init__(self, cfg: ControlPlaneLink, register: Callable[[], controlplane_pb2.Register],
                 report: Callable[[], controlplane_pb2.Report], on_command: CommandHandler,
                 metrics: agent_metrics.Metrics, node: str, *,
                 timing: clocks.Time = clocks.Time(), rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self._time = timing
        self._rng = rng  # the reconnect jitter's source (tests seed it)
        self._register = register
        self._report = report
        self._on_command = on_command
        self._metrics = metrics
        self._node = node
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._events: set[asyncio.Event] = set()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._dns_task: asyncio.Task[None] | None = None
        self._credentials: grpc.ChannelCredentials | None = None
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._live: set[str] = set()  # targets with a registered stream
        self._resolved: dict[str, str] = {}  # dns_name's targets → the host they came from

    # -- public ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.tls_ca_file:
            ca = await asyncio.to_thread(_read_bytes, self.cfg.tls_ca_file)
            self._credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        self._reconcile(set(self.cfg.addresses))
        if self.cfg.dns_name:
            self._dns_task = asyncio.create_task(self._dns_loop(), name="reporter-dns")

    def notify(self) -> None:
        """Something changed: every stream sends a report now."""
        for event in self._events:
            event.set()

    @property
    def targets(self) -> list[str]:
        return sorted(self._tasks)

    async def stop(self) -> None:
        """Send a last report on every stream, then close them all."""
        self._stopping = True
        self._stop_event.set()
        self.notify()
        if self._dns_task is not None:
            self._dns_task.cancel()
        for address, task in self._tasks.items():
            if address not in self._live:
                task.cancel()  # dialling or backing off: nothing to say goodbye on
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=FINAL_REPORT_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in list(self._command_tasks):
            task.cancel()

    # -- targets -----------------------------------------------------------------------
    def _reconcile(self, wanted: set[str]) -> None:
        for address in wanted - set(self._tasks):
            self._tasks[address] = asyncio.create_task(self._dial_forever(address),
                                                       name=f"reporter-{address}")
        for address in set(self._tasks) - wanted:
            log.info("control plane %s is gone from DNS; closing its stream", address)
            self._tasks.pop(address).cancel()

    async def _dns_loop(self) -> None:
        assert self.cfg.dns_name
        host, _, port = self.cfg.dns_name.rpartition(":")
        if not host:
            host, port = self.cfg.dns_name, "50051"
        while True:
            try:
                infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                    host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM), 10)
                resolved = {f"{info[4][0]}:{port}" for info in infos}
                self._resolved = {address: host for address in resolved}
                self._reconcile(set(self.cfg.addresses) | resolved)
            except (OSError, TimeoutError, ValueError) as exc:
                log.warning("cannot resolve %s (keeping %d streams): %s", self.cfg.dns_name,
                            len(self._tasks), exc)
            await self._time.sleep(self.cfg.dns_refresh_s)

    # -- one target --------------------------------------------------------------------
    async def _dial_forever(self, address: str) -> None:
        delays = backoff.Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
        attempt, last = 0, ""  # the problem logged last: each new one is logged once
        gauge = self._metrics.control_plane_connected.labels(self._node, address)
        while not self._stopping:
            registered = False
            began = self._time.monotonic()
            try:
                registered = await self._session(address, gauge)
                if registered and not self._stopping:
                    log.warning("control plane %s closed the stream", address)
            except grpc.aio.AioRpcError as exc:
                last = _warn_once(last, f"control plane {address}: {exc.code().name} "
                                        f"{exc.details()}")
            except bearer_token.TokenFileError as exc:     # names the field, never the token
                last = _warn_once(last, f"control plane {address}: not dialled: {exc}")
            except (TimeoutError, OSError) as exc:
                last = _warn_once(last, f"control plane {address} unreachable: "
                                        + (str(exc) or "not connected within "
                                           f"{self.cfg.connect_timeout_s:g}s"))
            except Exception as exc:    # never a silent end: this task is the only dialler
                last = _warn_once(last, f"control plane {address}: the session failed "
                                        f"({type(exc).__name__}: {exc}); dialling again")
            finally:
                gauge.set(0)
            if registered and self._time.monotonic() - began >= self.cfg.reconnect_max_s:
                attempt, last = 0, ""  # a stream that lasted: start the ladder again
            elif registered:
                last = ""  # cut right after Register: keep backing off, but say so
            if self._stopping:
                return
            await self._time.sleep(delays.delay(attempt), self._stop_event)
            attempt += 1

    def _channel(self, address: str) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", int(self.cfg.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.cfg.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # our own loop does the backoff; keep grpc's internal one short
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self._credentials is not None:
            if address in self._resolved and address not in self.cfg.addresses:
                # an A record of dns_name: the certificate names the Service, not the pod
                options.append(("grpc.ssl_target_name_override", self._resolved[address]))
            return grpc.aio.secure_channel(address, self._credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The token as it is now: ``token_file`` is read again for every stream."""
        return call_metadata.metadata(self.cfg.token_value())

    async def _session(self, address: str, gauge: Any) -> bool:
        """One stream's life; True once Register went out."""
        async with self._channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), self.cfg.connect_timeout_s)
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Connect(metadata=self._metadata())
            lock = asyncio.Lock()
            # bounded too: a stream the control plane refused at once was seen to leave
            # this write waiting, silently, before the answer's timer below had started
            try:
                await asyncio.wait_for(_write(call, lock, controlplane_pb2.AgentMessage(
                    register=self._register())), ANSWER_TIMEOUT_S)
            except TimeoutError:
                raise TimeoutError(f"Register not sent within {ANSWER_TIMEOUT_S:g}s") from None
            event, answered = asyncio.Event(), asyncio.Event()
            self._events.add(event)
            self._live.add(address)
            writer = asyncio.create_task(self._report_loop(call, lock, event))
            reader = asyncio.create_task(self._read_loop(call, lock, answered))
            ended = asyncio.create_task(call.code())   # the stream's status, once it has one
            first: asyncio.Future[float | None] = asyncio.ensure_future(
                self._time.sleep(ANSWER_TIMEOUT_S, answered))
            try:
                done, _ = await asyncio.wait({reader, writer, ended, first},
                                             return_when=asyncio.FIRST_COMPLETED)
                if done == {first}:
                    if not answered.is_set():
                        raise TimeoutError(f"no answer to Register within "
                                           f"{ANSWER_TIMEOUT_S:g}s")
                    gauge.set(1)
                    log.info("registered with control plane %s", address)
                    await asyncio.wait({reader, writer, ended},
                                       return_when=asyncio.FIRST_COMPLETED)
                failed = writer.exception() if writer.done() and not reader.done() else None
                if failed is not None:
                    # A write failed, so the stream is over: say why (a refusal ends it so,
                    # and the read does not always wake up to it).
                    raise failed
                if ended.done() and not reader.done():
                    # The stream has its status, and the read may never wake up to it (a
                    # refusal right after Register went unsaid so): give it a moment, then
                    # end the session with that status.
                    await asyncio.wait({reader}, timeout=STATUS_GRACE_S)
                    if not reader.done():
                        code = ended.result()
                        if code != grpc.StatusCode.OK:
                            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                                                       grpc.aio.Metadata(),
                                                       details=await _details(call))
                        return True
                await reader
            finally:
                self._live.discard(address)
                self._events.discard(event)
                ended.cancel()
                first.cancel()
                call.cancel()
                await _ended(reader, writer)
            return True

    async def _read_loop(self, call: grpc.aio.StreamStreamCall, lock: asyncio.Lock,
                         answered: asyncio.Event) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            answered.set()
            if msg.HasField("ack"):
                continue
            task = asyncio.create_task(self._execute(call, lock, msg))
            self._command_tasks.add(task)
            task.add_done_callback(self._command_tasks.discard)

    async def _report_loop(self, call: grpc.aio.StreamStreamCall, lock: asyncio.Lock,
                           event: asyncio.Event) -> None:
        while True:
            event.clear()
            await _write(call, lock, controlplane_pb2.AgentMessage(report=self._report()))
            if self._stopping:
                await call.done_writing()
                return
            if await self._time.sleep(self.cfg.report_interval_s, event) is not None:
                await self._time.sleep(COALESCE_S)  # woken by a change: let a burst gather

    async def _execute(self, call: grpc.aio.StreamStreamCall, lock: asyncio.Lock,
                       msg: controlplane_pb2.ControlMessage) -> None:
        kind = msg.WhichOneof("body") or "empty"
        try:
            ok, error = await self._on_command(msg)
        except Exception as exc:
            log.exception("command %s (%s) failed", msg.command_id, kind)
            ok, error = False, f"{type(exc).__name__}: {exc}"
        log.info("command %s (%s): %s", msg.command_id, kind, "ok" if ok else error)
        ack = controlplane_pb2.CommandAck(command_id=msg.command_id, ok=ok, error=error)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await _write(call, lock, controlplane_pb2.AgentMessage(command_ack=ack))


async def _details(call: grpc.aio.StreamStreamCall) -> str:
    """The stream's status details, or "" when they do not come within STATUS_GRACE_S."""
    try:
        return await asyncio.wait_for(call.details(), STATUS_GRACE_S)
    except (TimeoutError, asyncio.CancelledError, grpc.aio.AioRpcError):
        return ""


async def _ended(*tasks: asyncio.Task[Any]) -> None:
    """Cancel a session's reader and writer and let them end, but never wait on them longer
    than STATUS_GRACE_S: a read on a stream the control plane refused was seen not to wake
    up even to its cancellation, which left the agent silent and never dialling again."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=STATUS_GRACE_S)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()        # retrieved: never "exception was never retrieved"
        elif not task.done():
            log.debug("a stream's %s did not end within %gs of its cancellation",
                      task.get_name(), STATUS_GRACE_S)


def _warn_once(last: str, problem: str) -> str:
    if problem != last:
        log.warning("%s", problem)
    return problem


async def _write(call: grpc.aio.StreamStreamCall, lock: asyncio.Lock,
                 msg: controlplane_pb2.AgentMessage) -> None:
    async with lock:
        await call.write(msg)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
