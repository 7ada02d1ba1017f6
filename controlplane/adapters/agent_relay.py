"""The primary's tee of agent streams to the serving workers of its pod.

Agents dial one gRPC port per pod, the primary's; each serving worker routes with its
own registry, so it must see the same fleet. For every agent stream the primary
accepts, :class:`AgentRelay` opens a ``ControlPlane.Connect`` stream to every worker (its
private unix socket, presenting the same agent token) and forwards what the agent sends:
the worker's servicer is the one the primary runs, so a worker's registry is built by
the same code from the same messages, and the agent's stream ending ends the worker's.

Only the primary commands agents: what a worker sends back (acks, commands) is read and
dropped, and workers run the fleet loop without pushing (:class:`controlplane.core.fleet
.FleetService` ``pushes=False``).

Reports are whole states, not deltas, so a worker that falls behind loses nothing by
missing one: each worker's queue is bounded and a report that finds it full is dropped
(any other message takes the place of the oldest one queued).
A worker that restarts (or is not up yet) is dialled again with a short backoff, and
is sent the node's latest ``Register`` and latest report first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from protos.synapse.v1 import controlplane_pb2, controlplane_pb2_grpc
from synapse_common import aiotasks, call_metadata

log = logging.getLogger("synapse.controlplane.relay")

QUEUE_LIMIT = 64
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

# A restarted worker is dialled again within a second (gRPC's default backoff reaches
# two minutes), and it takes requests only once the relay has delivered the fleet.
CHANNEL = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
           ("grpc.max_reconnect_backoff_ms", 1000))

Message = controlplane_pb2.AgentMessage


class AgentRelay:
    """Opens one :class:`RelayedStream` per agent stream, to every worker socket."""

    def __init__(self, sockets: Sequence[str], token: str | None) -> None:
        self._targets = [f"unix:{path}" for path in sockets]
        self._metadata = call_metadata.metadata(token)

    def open(self, register: Message) -> RelayedStream:
        return RelayedStream(self._targets, self._metadata, register)


class RelayedStream:
    """One agent's stream, copied to every worker until :meth:`close`."""

    def __init__(self, targets: Sequence[str], metadata: tuple[tuple[str, str], ...],
                 register: Message) -> None:
        self._metadata = metadata
        self._register = register
        self._report: Message | None = None
        self._queues: dict[str, asyncio.Queue[Message | None]] = {}
        self._dropped = 0
        self._closed = False
        self._tasks = [asyncio.create_task(self._run(target)) for target in targets]

    def send(self, message: Message) -> None:
        """Forward one agent message to every worker now connected."""
        kind = message.WhichOneof("body")
        if kind == "register":
            self._register = message
        elif kind == "report":
            self._report = message
        for queue in self._queues.values():
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                if kind != "report":    # a re-Register or an ack must get through:
                    queue.get_nowait()  # the oldest message makes room for it
                    queue.put_nowait(message)
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("a worker is not keeping up with agent reports: "
                                "%d dropped (the next report replaces them)", self._dropped)

    async def close(self) -> None:
        """End every worker's copy (their registries mark the node disconnected)."""
        self._closed = True
        for queue in list(self._queues.values()):
            while True:
                try:
                    queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    queue.get_nowait()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=RETRY_MAX_S)
            await aiotasks.stop(*pending, quiet=True)

    async def _run(self, target: str) -> None:
        delay = RETRY_FIRST_S
        while not self._closed:
            queue: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_LIMIT)
            try:
                async with grpc.aio.insecure_channel(target, options=CHANNEL) as channel:
                    await channel.channel_ready()
                    # what the worker must know first; from now on send() adds the rest
                    queue.put_nowait(self._register)
                    if self._report is not None:
                        queue.put_nowait(self._report)
                    self._queues[target] = queue
                    delay = RETRY_FIRST_S
                    stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
                    call = stub.Connect(_drain(queue), metadata=self._metadata)
                    async for _ in call:    # the worker's acks and commands: the
                        pass                # primary alone answers the agent
            except grpc.aio.AioRpcError as exc:
                log.debug("worker stream %s: %s", target, exc.code().name)
            finally:
                self._queues.pop(target, None)
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)


async def _drain(queue: asyncio.Queue[Message | None]) -> AsyncIterator[Message]:
    while (message := await queue.get()) is not None:
        yield message
