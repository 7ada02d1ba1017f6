"""What ``grpc.max_connection_idle_ms`` closes, as :mod:`synapse_common.grpc_limits` relies
on: a connection with no call open, never one carrying a quiet open stream (an agent's
``Connect``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from synapse_common import grpc_limits


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                ) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def test_idle_means_no_call_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_limits, "CONNECTION_IDLE_MS", 300)
    server = grpc.aio.server(options=grpc_limits.server_options(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(_echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def sent() -> AsyncIterator[bytes]:
        while (message := await outgoing.get()) is not None:
            yield message

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/t.Echo/Echo")(sent())
            await outgoing.put(b"a")
            assert await asyncio.wait_for(call.read(), 5) == b"a"
            await asyncio.sleep(1.2)        # quiet, four times the idle limit
            await outgoing.put(b"b")
            assert await asyncio.wait_for(call.read(), 5) == b"b"
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await outgoing.put(None)
            assert await call.code() == grpc.StatusCode.OK
            for _ in range(50):     # no call open: the server closes the connection
                if channel.get_state() != grpc.ChannelConnectivity.READY:
                    break
                await asyncio.sleep(0.1)
            assert channel.get_state() != grpc.ChannelConnectivity.READY
    finally:
        await server.stop(0)
