"""Two control-plane workers joined by their mesh route as one: a request in flight on one
worker counts on the other, so their requests do not pile on the same backend."""

from __future__ import annotations

import asyncio
import pathlib

from controlplane.api import worker_wiring
from tests import harness
from tests.controlplane import cp_testing as t


def in_flight(cp: t.RunningCP) -> int:
    return sum(load.in_flight for load in cp.services.ledger.snapshot().values())


async def ask(cp: t.RunningCP, text: str) -> object:
    async with cp.client() as client:
        return await client.chat.completions.create(
            model=t.MODEL, messages=[{"role": "user", "content": text}], stream=True)


async def test_a_request_in_flight_on_one_worker_steers_the_others(
        directory: pathlib.Path) -> None:
    async with t.backends(("a", "hang"), ("b", "hang")) as (a, b):
        s = t.settings(upstreams=[t.upstream("a", a.url), t.upstream("b", b.url)],
                       router={"policy": "least_loaded"})
        async with t.running(s) as w0, t.running(s) as w1:
            meshes = [worker_wiring.attach_mesh(cp.services, directory, i, 2)
                      for i, cp in enumerate((w0, w1))]
            pins0, pins1 = w0.services.response_pins, w1.services.response_pins
            assert pins0 is not None and pins1 is not None
            for mesh in meshes:
                await mesh.start()
            asks: list[asyncio.Task[object]] = []
            try:
                await harness.until(lambda: all(m.hearing_from() for m in meshes), 10,
                                    "the workers to join")
                asks.append(asyncio.create_task(ask(w0, "first")))
                await harness.until(lambda: in_flight(w1) == 1, 10,
                                    "worker 1 to see worker 0's request")
                asks.append(asyncio.create_task(ask(w1, "second")))
                await harness.until(lambda: len(a.bodies) + len(b.bodies) == 2, 10,
                                    "both requests to reach a backend")
                # each worker's least-loaded choice saw the other's request
                assert (len(a.bodies), len(b.bodies)) == (1, 1)
                assert in_flight(w0) == in_flight(w1) == 2

                pins0.remember("a", "resp_1", "b")
                await harness.until(lambda: pins1.backend_of("a", "resp_1") == "b", 10,
                                    "worker 1 to learn worker 0's pin")
            finally:
                for task in asks:
                    task.cancel()
                await asyncio.gather(*asks, return_exceptions=True)
            # the clients gave up: both requests settle, on both workers
            await harness.until(lambda: in_flight(w0) == in_flight(w1) == 0, 10,
                                "the requests to settle everywhere")
            for mesh in meshes:
                await mesh.close()
