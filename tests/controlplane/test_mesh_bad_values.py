"""The pod's mesh holds against a value it cannot take (reviewer-107): a number that is not
finite is never sent, one of the fair queue's events a sibling cannot take is skipped (its
connection, and the tickets it brought, are kept), a number too large for a float is a
malformed frame like any other, and a sibling of another release is refused with one
warning and tried again ever more slowly, not 20 times a second."""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib

import pytest

from controlplane.adapters import worker_mesh
from controlplane.core import shared_routing as shared
from tests.clock import ManualClock
from tests.controlplane.test_seat_holding import Queues
from tests.controlplane.test_shared_routing import Worker
from tests.controlplane.test_worker_mesh import Pod


def test_a_number_that_is_not_finite_is_never_sent(caplog: pytest.LogCaptureFixture) -> None:
    w0 = Worker(0, ManualClock())
    s0 = shared.Sharing(w0.router, w0.pins, 0, "a", queues=Queues())
    s0.attach(lambda: None)
    with caplog.at_level(logging.ERROR, "synapse.controlplane.mesh"):
        s0.tagged("m", 0, "mallory", 100.0, math.inf)
        s0.head("m", 0, math.nan, 1.0, 0)
        s0.clocked("m", 0, -math.inf)
        s0.shifted("m", 0, "mallory", math.inf)
    assert s0.take() is None        # orjson would have written null
    assert len(caplog.records) == 4


def test_a_queue_event_a_sibling_cannot_take_is_skipped_not_its_connection() -> None:
    """An unreadable tag (null: what orjson made of inf) dropped the connection, which
    finished every ticket the sender had in flight here, and the greeting of every
    reconnection replayed it."""
    w0, w1 = Worker(0, ManualClock()), Worker(1, ManualClock())
    receiver = Queues()
    s1 = shared.Sharing(w1.router, w1.pins, 1, "b", queues=receiver)
    s1.attach(lambda: None)
    inbound = s1.inbound()
    inbound.feed(w0.sharing.greeting())
    w0.dispatch("question one")
    inbound.feed(w0.sharing.take() or b"")
    assert inbound.foreign() == 1
    inbound.feed(shared.frame([(shared.TAG, "m", 0, "mallory", None, 1.0)]))
    inbound.apply([[shared.HEAD, "m", 0, 10**400, 1.0, 0],    # decoded: past any frame
                   [shared.HEAD, "m", 0, 1.0, 1.0],             # which request: not said
                   [shared.HEAD, "m", 0, 1.0, 1.0, "7"],
                   [shared.SHIFT, "m", "x", "mallory", 1.0],
                   [shared.CLOCK, "m", 0, 5.0]])
    assert inbound.foreign() == 1 and inbound.skipped == 5
    assert receiver.told == [("clocked", "m", 0, 5.0)]


def test_a_number_too_large_for_a_float_is_a_malformed_frame() -> None:
    w1 = Worker(1, ManualClock())
    inbound = w1.sharing.inbound()
    inbound.apply([[shared.HELLO, shared.VERSION, 0, "x"]])
    with pytest.raises(shared.FrameError):
        inbound.apply([[shared.DISPATCH, 1, "n1/a", 10, 10, True, 10**400, 1]])
    assert inbound.foreign() == 0


async def test_a_sibling_of_another_release_is_refused_once_and_tried_ever_more_slowly(
        directory: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mid rolling restart a worker of the next release says another mesh version: each
    connection it makes is refused at once. It reconnected every retry_s (the wait was
    reset by each connection that opened), and each refusal was a warning."""
    waits: list[float] = []

    async def sleep(seconds: float | None, wakeup: asyncio.Event | None = None) -> None:
        waits.append(seconds or 0.0)
        await asyncio.sleep(0.001)

    pods = Pod(directory, 2)
    try:
        with caplog.at_level(logging.DEBUG, "synapse.controlplane.mesh"):
            await pods.start(0)
            newer = Worker(1, pods.clock, "newer")
            newer.sharing.greeting = lambda: shared.frame(  # type: ignore[method-assign]
                [(shared.HELLO, shared.VERSION + 1, 1, "newer")])
            mesh = worker_mesh.Mesh(newer.sharing, directory, 1, 2, retry_s=0.01,
                                    max_retry_s=1.0, sleep=sleep)
            await mesh.start()
            try:
                for _ in range(500):
                    if len(waits) >= 4:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await mesh.close()
    finally:
        await pods.close()
    assert len(waits) >= 4 and waits[0] < waits[1] < waits[2] < waits[3], waits
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) >= 4
    assert [r.levelno for r in refused].count(logging.WARNING) == 1
