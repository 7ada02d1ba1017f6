"""A hostile engine for the line-bound tests: it answers one path with a first event,
then bytes without a line break until it has sent ``total`` of them or the control plane
closes the connection (:class:`EndlessLine`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from tests.controlplane import cp_testing as t

PIECE = b"x" * (64 << 10)


class EndlessLine:
    def __init__(self, path: str, first: bytes, total: int) -> None:
        self.path, self.first, self.total = path, first, total
        self.sent = 0
        self.cut_off = False

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self.first)
        try:
            while self.sent < self.total:
                await resp.write(PIECE)
                self.sent += len(PIECE)
        except (ConnectionError, asyncio.CancelledError):
            self.cut_off = True
            raise
        request.transport.close()  # type: ignore[union-attr]
        return resp

    @contextlib.asynccontextmanager
    async def served(self) -> AsyncIterator[str]:
        """The engine's URL while it serves (with a healthy ``/health``)."""
        async def healthy(_request: web.Request) -> web.Response:
            return web.json_response({})
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_post(self.path, self._answer)
        app.router.add_get("/health", healthy)
        async with t.served(app) as url:
            yield url
