"""Stand-in agents for the control plane's ``Node`` client: a test's ``NodeServicer``
served by a real grpc.aio server on 127.0.0.1 (a free port), so the client and the cache's
embedder adapter are tested over the wire, not against a mock.

One home for the serving part: each test module keeps only its own servicer (how its
stand-in answers), and its ``serve`` fixture is ``async with node_testing.agents(Agent)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

import grpc

from protos.synapse.v1 import node_pb2_grpc

P = ParamSpec("P")
S = TypeVar("S", bound=node_pb2_grpc.NodeServicer)

# A hostile stand-in may answer far more than an honest agent would (a vector of a
# dimension past the client's bound): the server must be able to send it.
_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


@contextlib.asynccontextmanager
async def agents(make: Callable[P, S]) -> AsyncIterator[Callable[P, Awaitable[tuple[str, S]]]]:
    """A starter of stand-in agents: each call builds a servicer with ``make(...)``, serves
    it on a free port and returns (its address, the servicer); all stop when the block
    ends."""
    servers: list[grpc.aio.Server] = []

    async def start(*args: P.args, **kwargs: P.kwargs) -> tuple[str, S]:
        servicer = make(*args, **kwargs)
        server = grpc.aio.server(options=_OPTIONS)
        node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(0)
