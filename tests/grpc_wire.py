"""What a gRPC server shows on the wire, for tests of its limits: the HTTP/2 SETTINGS it
sends first (read with a raw socket: no gRPC client exposes them), and the status a call
gets that sends its headers and never a message (which no unary stub can do)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Sequence

import grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = 4
MAX_CONCURRENT_STREAMS = 3


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def server_settings(host: str, port: int) -> dict[int, int]:
    """The server's first SETTINGS frame, by setting id (blocking; a few ms on loopback)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(PREFACE + b"\x00\x00\x00" + bytes([SETTINGS, 0]) + b"\x00" * 4)
        while True:
            head = _exactly(sock, 9)
            length = int.from_bytes(head[:3], "big")
            payload = _exactly(sock, length)
            if head[3] == SETTINGS and not head[4] & 1:        # not an ACK
                return {key: value for key, value in
                        (struct.unpack(">HI", payload[i:i + 6]) for i in range(0, length, 6))}


async def headers_only(address: str, method: str,
                       metadata: Sequence[tuple[str, str]] = (),
                       timeout_s: float = 3.0) -> grpc.StatusCode:
    """The status of a call to ``method`` (a path, ``/pkg.Service/Method``) that sends its
    headers and then nothing: DEADLINE_EXCEEDED if the server waits for the message."""
    never = asyncio.Event()

    async def nothing() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_unary(method, request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        try:
            await call(nothing(), metadata=tuple(metadata), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK
