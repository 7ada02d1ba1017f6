"""The HTTP client to backends: one aiohttp ``ClientSession`` for the process.

One session with a tuned connector, so connections to each backend are kept alive and
reused (a new TCP connection per request would cost more than all of Synapse's own
work). Time limits: a connect timeout, a first-byte timeout around the wait for the
response head (504 when it passes), and a per-read timeout for the body so a stream that
goes silent is cut (``http.upstream_idle_timeout_s``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

# Errors that mean "this backend did not answer": the caller may try the next one.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
    ConnectionError, OSError)


# Everything a backend call can fail with (time-outs included), for one ``except``.
FAILURES: tuple[type[BaseException], ...] = (TimeoutError, aiohttp.ClientError, *CONNECT_ERRORS)


class FirstByteTimeout(Exception):
    """The backend sent no response head within the first-byte timeout."""


class UpstreamClient:
    def __init__(self, connect_timeout_s: float, first_byte_timeout_s: float,
                 idle_timeout_s: float) -> None:
        self._first_byte_timeout_s = first_byte_timeout_s
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s,
            sock_read=max(first_byte_timeout_s, idle_timeout_s))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=2048, limit_per_host=0, ttl_dns_cache=300,
                                         keepalive_timeout=60.0)
        # auto_decompress off: bodies pass through byte for byte with their encoding.
        # No cookie jar: backends are not browsers' sites, and filtering a jar costs
        # time on every request.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"), raise_for_status=False,
            cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   first_byte_timeout_s: float | None = None) -> aiohttp.ClientResponse:
        """POST and return once the response head arrived; the caller must release it."""
        limit = first_byte_timeout_s or self._first_byte_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self.session.post(url, data=body, headers=headers)
        except TimeoutError:
            raise FirstByteTimeout(f"no response from {url} within {limit:g}s") from None

    async def get(self, url: str, timeout_s: float,
                  headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s):
            async with self.session.get(url, headers=headers) as resp:
                return resp.status, await resp.read()
