"""The floor of a Python gateway, for ``bench/gateway.py``: what proxying costs in Python
before any feature.

One uvloop process: an ``asyncio.Protocol`` server parsing requests with ``httptools``
(the parser Synapse's upstream client uses) and Synapse's own upstream client
(:class:`controlplane.adapters.upstream.UpstreamClient`) to the backend. No
authentication, routing, metrics, limits or cache: every request goes to the one
upstream, its answer is relayed (a whole body with its length; an event stream chunk by
chunk, chunked). ``GET /health`` answers locally (the bench's readiness check).

It is the yardstick between nginx (the floor of any proxy) and Synapse: Synapse's CPU per
request minus this one's is what its features and aiohttp cost. It is a bench fixture,
not a gateway: it trusts its input and handles one upstream.

Run: ``python bench/python_floor.py PORT UPSTREAM_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys

import httptools

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from controlplane.adapters import upstream  # noqa: E402

_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Floor(asyncio.Protocol):
    """One client connection: requests parsed, each relayed in turn (HTTP/1.1, in order)."""

    def __init__(self, client: upstream.UpstreamClient, base: str) -> None:
        self._client = client
        self._base = base
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._queue: asyncio.Queue[tuple[bytes, bytes, dict[str, str], bytes]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        self._queue.put_nowait((method, self._url, self._headers, b"".join(self._body)))
        self._url, self._headers, self._body = b"", {}, []

    async def _serve(self) -> None:
        while True:
            method, url, headers, body = await self._queue.get()
            await self._relay(method, url, headers, body)

    async def _relay(self, method: bytes, url: bytes, headers: dict[str, str],
                     body: bytes) -> None:
        out = self._transport
        assert out is not None
        if url == b"/health":
            out.write(_HEALTH)
            return
        fwd = {"Content-Type": headers.get("content-type", "application/json")}
        resp = await self._client.send(method.decode(), self._base + url.decode(), body, fwd)
        try:
            head = b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\n" % (
                resp.status, (resp.header("content-type") or "").encode("latin-1"))
            if resp.content_type != "text/event-stream":
                data = await resp.read()
                out.write(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
                return
            out.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            while (chunk := await resp.next_chunk()) is not None:
                out.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            out.write(b"0\r\n\r\n")
        finally:
            resp.close()


async def serve(port: int, base: str) -> None:
    """Serve until SIGTERM or SIGINT (handled by the loop: uvloop, idle in its poll, would
    never run a Python signal handler)."""
    client = upstream.UpstreamClient(5.0, 60.0, 60.0)
    await client.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Floor(client, base.rstrip("/")),
                                      "127.0.0.1", port)
    async with server:
        await stop.wait()
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="port to listen on (127.0.0.1)")
    parser.add_argument("upstream", help="the backend's base URL, e.g. http://127.0.0.1:8000")
    args = parser.parse_args()
    common.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
