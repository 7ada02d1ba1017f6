"""The in-pod mesh between the control plane's worker processes, over unix sockets.

With ``http.workers`` = N, each worker (index i in [0, N)) listens on
``<directory>/mesh-<i>.sock`` and connects to every sibling's socket; what a worker's
router records (:mod:`controlplane.core.shared_routing`) goes out on its own connections,
what it receives comes in on the connections its siblings made to it. So each connection
carries one direction, and its end means exactly one thing to the receiver: what that
sender told it is void (its foreign tickets are finished). The directory is private to
the pod's processes (mode 0700, made by the process that starts the workers), so a
connection is trusted to be a sibling; a frame is still only data (no pickle).

Siblings start at slightly different times and one may die and be restarted: a worker
keeps trying each sibling's socket (from :data:`RETRY_S`, doubling to
:data:`MAX_RETRY_S`) until it answers, and again whenever the connection ends; a sibling
that introduces itself on its own connection is tried at once, not at the end of the
wait (a new worker is then heard and told within a turn or two, not up to a second
later, while it may already be serving). Its first frame on every connection replays its
tickets in flight. A stale socket file left by a dead worker is replaced when its
successor starts. :meth:`Mesh.wait_joined` is what a new worker awaits before it takes
requests: until it both hears and tells every sibling, it would route blind to theirs.

Publishing never blocks and never waits: the core collects events, and the mesh flushes
them once per event-loop turn (``loop.call_soon``) to every connected sibling with
asyncio transports, which buffer what the socket does not take at once. A sibling that
falls behind — its event loop stalled, its buffer here past ``max_buffer`` bytes — has
its connection dropped rather than the buffer grown without limit: the sibling then
treats this worker as lost (finishes its tickets), and the reconnection that follows
replays the tickets still in flight, so the sibling's view heals once it reads again.
Events published while a sibling is not connected are not kept for it: tickets come back
with the greeting, and prefix inserts, sessions and pins are hints relearned from the
next dispatches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
from typing import cast

from controlplane.core import shared_routing
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.mesh")

RETRY_S = 0.05          # first wait before trying a sibling's socket again
MAX_RETRY_S = 1.0       # the longest wait between tries
MAX_BUFFER = 16 * 1024 * 1024    # bytes waiting for one sibling before it is dropped
SUN_PATH_MAX = 107      # a unix socket's path, in bytes, on Linux (108 with its NUL)


def socket_path(directory: pathlib.Path, index: int) -> pathlib.Path:
    return directory / f"mesh-{index}.sock"


class Mesh:
    """Worker ``index`` of ``count``, sharing ``sharing``'s events with its siblings.

    ``await start()`` listens and begins connecting; ``await close()`` stops both, drops
    every connection (the siblings finish this worker's tickets) and removes the socket.
    """

    def __init__(self, sharing: shared_routing.Sharing, directory: pathlib.Path | str,
                 index: int, count: int, *, max_buffer: int = MAX_BUFFER,
                 retry_s: float = RETRY_S, max_retry_s: float = MAX_RETRY_S,
                 sleep: clocks.Sleep = clocks.sleep) -> None:
        if not 0 <= index < count:
            raise ValueError(f"worker index {index} is not in [0, {count})")
        self._directory = pathlib.Path(directory)
        longest = socket_path(self._directory, count - 1)
        if len(os.fsencode(longest)) > SUN_PATH_MAX:
            raise ValueError(f"{longest}: too long for a unix socket ({SUN_PATH_MAX} bytes)")
        self._sharing = sharing
        self.index = index
        self.count = count
        self._max_buffer = max_buffer
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._sleep = sleep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._out: dict[int, asyncio.WriteTransport] = {}      # sibling index -> ours to it
        self._in: set[_Incoming] = set()
        self._kicks: dict[int, asyncio.Event] = {}     # sibling index -> "try it now"
        self._refused: set[str] = set()     # hellos of another version, logged once each

    @property
    def path(self) -> pathlib.Path:
        return socket_path(self._directory, self.index)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        path = self.path
        path.unlink(missing_ok=True)     # a dead predecessor's socket
        self._server = await loop.create_unix_server(lambda: _Incoming(self), str(path))
        self._inode = path.stat().st_ino
        self._sharing.attach(self._wake)
        siblings = [peer for peer in range(self.count) if peer != self.index]
        self._kicks = {peer: asyncio.Event() for peer in siblings}
        self._tasks = [asyncio.create_task(self._keep_connected(peer),
                                           name=f"mesh {self.index}->{peer}")
                       for peer in siblings]

    async def close(self) -> None:
        self._sharing.detach()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            self._server.close()
        for incoming in list(self._in):
            incoming.lost()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:  # not a successor's socket
                    self.path.unlink()

    # -- state, for health and tests ------------------------------------------------------

    def sending_to(self) -> set[int]:
        """The siblings this worker's events reach now (connected to their sockets)."""
        return set(self._out)

    def hearing_from(self) -> set[int]:
        """The siblings connected to this worker and introduced (their hello read)."""
        return {i.inbound.peer[0] for i in self._in if i.inbound.peer is not None}

    def joined(self) -> bool:
        """Whether this worker tells and hears every sibling."""
        siblings = set(range(self.count)) - {self.index}
        return self.sending_to() == siblings and self.hearing_from() == siblings

    async def wait_joined(self, within_s: float, poll_s: float = 0.02) -> bool:
        """Wait until :meth:`joined`; False when ``within_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not self.joined():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    # -- sending ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        data = self._sharing.take()
        if data is None:
            return
        for peer, transport in list(self._out.items()):
            if transport.is_closing():
                continue
            if transport.get_write_buffer_size() > self._max_buffer:
                log.warning("mesh: worker %d is not reading (over %d bytes waiting); "
                            "dropping its connection", peer, self._max_buffer)
                transport.abort()
                continue
            transport.write(data)

    async def _keep_connected(self, peer: int) -> None:
        """Connect to ``peer`` and stay connected: retry until its socket answers, and
        again whenever the connection ends."""
        assert self._loop is not None
        path = str(socket_path(self._directory, peer))
        delay = self._retry_s
        while True:
            try:
                transport, outgoing = await self._loop.create_unix_connection(
                    lambda: _Outgoing(self._loop), path)
            except OSError:         # not started yet, or a dead worker's socket
                await self._pause(peer, delay)
                delay = min(self._max_retry_s, delay * 2)
                continue
            connected_at = self._loop.time()
            self._kicks[peer].clear()
            transport.write(self._sharing.greeting())
            self._out[peer] = transport
            log.info("mesh: worker %d sending to worker %d", self.index, peer)
            try:
                await outgoing.closed
            finally:
                if self._out.get(peer) is transport:
                    del self._out[peer]
                transport.abort()
            log.info("mesh: worker %d lost its connection to worker %d", self.index, peer)
            # A connection that ends at once was likely refused (a sibling of another
            # release, mid rolling restart): back off as from a socket that does not
            # answer, rather than reconnect every RETRY_S.
            if self._loop.time() - connected_at >= self._max_retry_s:
                delay = self._retry_s
            else:
                delay = min(self._max_retry_s, delay * 2)
            await self._pause(peer, delay)

    async def _pause(self, peer: int, delay: float) -> None:
        """Wait ``delay`` before trying ``peer`` again, or less if it introduced itself."""
        kick = self._kicks[peer]
        await self._sleep(delay, kick)
        kick.clear()

    def _introduced(self, peer: int) -> None:
        """Sibling ``peer`` connected and said who it is: if this worker is not telling
        it anything, try its socket now."""
        kick = self._kicks.get(peer)
        if kick is not None and peer not in self._out:
            kick.set()


class _Outgoing(asyncio.Protocol):
    """This worker's connection to a sibling: written to, never read."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        assert loop is not None
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Incoming(asyncio.Protocol):
    """A sibling's connection to this worker: its frames are applied as they come."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.inbound = mesh._sharing.inbound()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._mesh._in.add(self)

    def data_received(self, data: bytes) -> None:
        introduced = self.inbound.peer is not None
        try:
            self.inbound.feed(data)
        except shared_routing.Refused as exc:
            refused = self._mesh._refused
            level = logging.DEBUG if exc.hello in refused else logging.WARNING
            if len(refused) < 64:
                refused.add(exc.hello)
            log.log(level, "mesh: worker %d refused a connection (logged once per sibling "
                    "process): %s", self._mesh.index, exc)
            self.lost()
            return
        except shared_routing.FrameError as exc:
            log.warning("mesh: worker %d dropped a connection from %s: %s",
                        self._mesh.index, self.inbound.peer, exc)
            self.lost()
            return
        if not introduced and self.inbound.peer is not None:
            self._mesh._introduced(self.inbound.peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        """Void everything this sibling told through this connection, and end it."""
        if self in self._mesh._in:
            self._mesh._in.discard(self)
            if self.inbound.peer is not None:
                log.info("mesh: worker %d lost worker %d (%s)", self._mesh.index,
                         *self.inbound.peer)
        self.inbound.close()
        if self._transport is not None:
            self._transport.abort()
