"""The worker mesh over real unix sockets: workers started in any order find each other,
share their dispatches, forget a sibling that stops and take it back when it restarts, and
drop a sibling that stops reading instead of buffering for it without end."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.adapters import worker_mesh
from tests import harness
from tests.clock import ManualClock
from tests.controlplane.test_shared_routing import Worker, ask

BACKENDS = ("n1/a", "n1/b", "n1/c")



class Pod:
    """Worker processes of one pod, in one event loop: each its own routing state and mesh."""

    def __init__(self, directory: pathlib.Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.clock = ManualClock()
        self.workers: dict[int, Worker] = {}
        self.meshes: dict[int, worker_mesh.Mesh] = {}

    async def start(self, index: int, **options: float) -> Worker:
        worker = self.workers[index] = Worker(index, self.clock, f"w{index}-{id(self)}")
        mesh = self.meshes[index] = worker_mesh.Mesh(
            worker.sharing, self.directory, index, self.count,
            **{"retry_s": 0.005, "max_retry_s": 0.05, **options})  # type: ignore[arg-type]
        await mesh.start()
        return worker

    async def stop(self, index: int) -> None:
        await self.meshes.pop(index).close()
        del self.workers[index]

    async def close(self) -> None:
        for index in list(self.meshes):
            await self.stop(index)

    def joined(self) -> bool:
        """Every running worker sends to and hears from every other running one."""
        running = set(self.meshes)
        return all(mesh.sending_to() == running - {i} and mesh.hearing_from() == running - {i}
                   for i, mesh in self.meshes.items())


@pytest.fixture
async def pod(directory: pathlib.Path) -> AsyncIterator[Pod]:
    pods = Pod(directory, 3)
    yield pods
    await pods.close()


async def until(condition: Callable[[], bool], what: str = "the mesh to settle") -> None:
    await harness.until(condition, 10.0, what)


def prefilling(worker: Worker) -> int:
    return sum(worker.ledger.load(k).prefilling for k in BACKENDS)


def in_flight(worker: Worker) -> int:
    return sum(worker.ledger.load(k).in_flight for k in BACKENDS)


async def test_workers_started_in_any_order_share_their_dispatches(pod: Pod) -> None:
    w2 = await pod.start(2)
    w0 = await pod.start(0)
    w1 = await pod.start(1)
    await until(pod.joined)

    ticket, key = w0.dispatch("question one")
    await until(lambda: w1.ledger.load(key).prefilling == w2.ledger.load(key).prefilling == 1)
    w0.ledger.first_byte(ticket)
    await until(lambda: w1.ledger.load(key).decoding == w2.ledger.load(key).decoding == 1)
    w0.ledger.finish(ticket)
    await until(lambda: in_flight(w1) == in_flight(w2) == 0)

    # the prompt's prefix is now a hit on the same backend for worker 1's next request
    again = w1.router.route("m", ask("another question"))
    assert again is not None
    assert again.candidates[0].backend.key == key and again.candidates[0].cached_tokens > 0

    w2.pins.remember("team", "resp_1", "n1/c")
    await until(lambda: w0.pins.backend_of("team", "resp_1") == w1.pins.backend_of("team", "resp_1")
                == "n1/c")


async def test_a_sibling_that_stops_is_forgotten_and_taken_back_when_it_restarts(
        pod: Pod) -> None:
    w0 = await pod.start(0)
    w1 = await pod.start(1)
    await pod.start(2)
    await until(pod.joined)
    w1.dispatch("worker one's request " * 300)
    await until(lambda: prefilling(w0) == 1)

    await pod.stop(1)                       # worker 1 dies with a request in flight
    await until(lambda: prefilling(w0) == 0 and pod.joined())
    waiting, _ = w0.dispatch("sent while worker one is down " * 300)
    streaming, _ = w0.dispatch("streaming while worker one is down " * 300)
    w0.ledger.first_byte(streaming)

    w1 = await pod.start(1)                 # its successor: fresh state, same socket path
    await until(pod.joined)
    # the greeting told it what worker 0 has in flight
    await until(lambda: prefilling(w1) == 1 and in_flight(w1) == 2)
    ticket, _ = w1.dispatch("the restarted worker's request " * 300)
    await until(lambda: prefilling(w0) == 2)
    for own in (waiting, streaming):
        w0.ledger.finish(own)
    w1.ledger.finish(ticket)
    await until(lambda: all(in_flight(w) == 0 for w in pod.workers.values()))


async def test_a_closed_mesh_removes_its_socket_and_its_siblings_forget_it(
        pod: Pod) -> None:
    w0 = await pod.start(0)
    w1 = await pod.start(1)
    await until(pod.joined)
    w0.dispatch("q " * 300)
    await until(lambda: prefilling(w1) == 1)
    path = pod.meshes[0].path
    await pod.stop(0)
    assert not path.exists()
    await until(lambda: prefilling(w1) == 0 and pod.meshes[1].hearing_from() == set())


async def test_a_sibling_that_stops_reading_is_dropped_not_buffered_for(
        directory: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    connections: list[asyncio.StreamWriter] = []

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)      # accepts, never reads (its loop "stalled")

    server = await asyncio.start_unix_server(
        stuck, str(worker_mesh.socket_path(directory, 1)))
    caplog.set_level(logging.WARNING, "synapse.controlplane.mesh")
    pod = Pod(directory, 2)
    w0 = await pod.start(0, max_buffer=64 * 1024)
    try:
        await until(lambda: pod.meshes[0].sending_to() == {1})
        hashes = list(range(2**40, 2**40 + 10_000))
        async with asyncio.timeout(10):
            while len(connections) < 2:     # dropped, then connected again
                w0.sharing.prefix("n1/a", hashes, 0, 0)
                await asyncio.sleep(0)
        # one connection at a time: the second came only once the first was dropped
        assert pod.meshes[0].sending_to() == {1}
        assert "worker 1 is not reading" in caplog.text
    finally:
        await pod.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


def test_a_socket_path_too_long_is_refused_up_front() -> None:
    w0 = Worker(0, ManualClock())
    with pytest.raises(ValueError, match="too long"):
        worker_mesh.Mesh(w0.sharing, "/tmp/" + "d" * 120, 0, 2)
    with pytest.raises(ValueError, match="not in"):
        worker_mesh.Mesh(w0.sharing, "/tmp", 2, 2)


async def test_a_sibling_that_introduces_itself_is_told_at_once_not_after_the_wait(
        directory: pathlib.Path) -> None:
    # Worker 0 starts alone, with a wait between tries far longer than the test: only the
    # sibling's own connection (its hello) can make worker 0 try its socket again.
    pods = Pod(directory, 2)
    try:
        w0 = await pods.start(0, retry_s=30.0, max_retry_s=30.0)
        await asyncio.sleep(0.05)       # worker 0's first try failed: it waits
        assert pods.meshes[0].sending_to() == set()
        w1 = await pods.start(1)
        assert await pods.meshes[1].wait_joined(5.0)
        assert pods.meshes[0].joined()
        w0.dispatch("question one")
        await until(lambda: prefilling(w1) == 1, "worker 0's dispatch to reach worker 1")
    finally:
        await pods.close()


async def test_wait_joined_says_false_when_a_sibling_never_comes(
        directory: pathlib.Path) -> None:
    pods = Pod(directory, 2)
    try:
        await pods.start(0)
        assert not await pods.meshes[0].wait_joined(0.1)
    finally:
        await pods.close()
