"""The transport for uploads: a request body streamed to the backend as it is produced.

:class:`controlplane.adapters.upstream.UpstreamClient` sends bodies the control plane
holds whole (JSON); an audio upload must never be held whole, so its request goes out
with ``Transfer-Encoding: chunked`` from an async iterator, through an aiohttp
``ClientSession`` (which writes the body while waiting for the answer's head and waits
for the socket to drain between chunks: back-pressure both ways). It implements
:class:`controlplane.core.transport.Transport` for one request (:class:`UploadTransport`
wraps the body's source), so :mod:`controlplane.core.dispatch` routes, retries and
accounts it like any other request.

Rules:

* **One body, one try** unless the source can be replayed (:attr:`BodySource.replayable`:
  nothing of the file consumed yet, or the file spooled to disk). A second attempt
  with a consumed body is refused with an error that is not retried.
* **Errors** are :mod:`controlplane.errors` classes, with messages that name no address
  (aiohttp's own name the host and port): connect failures ``UpstreamConnectError``, a
  broken answer ``UpstreamReadError``, no head within the first-byte limit
  ``UpstreamTimeout``. A body the source stopped (the upload went over its limit) raises
  the source's own error (413).
* Bodies pass through undecoded (``auto_decompress`` off); an answer no transport relays
  (:data:`controlplane.core.transport.NOT_RELAYED`, an encoded body) is an
  ``UpstreamProtocolError``, and a redirect is never followed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp

from controlplane import errors
from controlplane.core import transport


class BodySource(Protocol):
    error: errors.SynapseError | None   # why the source stopped (the upload's 413)

    @property
    def replayable(self) -> bool:
        """Whether the body can be produced again from its start."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None))


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return type(exc).__name__


class StreamedResponse:
    """A backend's answer (its head has arrived), read as it arrives."""

    def __init__(self, resp: aiohttp.ClientResponse, read_timeout_s: float) -> None:
        self._resp = resp
        self._read_timeout_s = read_timeout_s

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> list[tuple[str, str]]:
        return list(self._resp.headers.items())

    def header(self, name: str) -> str | None:
        return self._resp.headers.get(name)

    @property
    def content_type(self) -> str:
        return self._resp.content_type.lower()

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def read_some(self, limit: int) -> bytes:
        return (await self.next_chunk() or b"")[:limit]

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        try:
            async with asyncio.timeout(timeout_s or self._read_timeout_s):
                chunk = await self._resp.content.readany()
        except TimeoutError:
            raise errors.UpstreamReadError(
                "the backend sent nothing within the read timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.UpstreamReadError(
                f"the backend broke off its answer: {_why(exc)}") from exc
        return chunk or None

    def close(self) -> None:
        self._resp.close()


class UploadTransport:
    """One upload's transport: every ``send`` streams ``source`` (its ``body`` argument,
    the JSON path's, is ignored)."""

    def __init__(self, client: aiohttp.ClientSession, source: BodySource,
                 content_type: str, read_timeout_s: float) -> None:
        self._client = client
        self._source = source
        self._content_type = content_type
        self._read_timeout_s = read_timeout_s
        self._tries = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float | None = None) -> StreamedResponse:
        self._tries += 1
        if self._tries > 1 and not self._source.replayable:
            raise errors.with_status(502, "the backend failed after the upload had begun; "
                                     "it was not sent again to another backend",
                                     code="upload_not_retried")
        sent = {**headers, "Content-Type": self._content_type, "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._client.request(method, url, data=self._source.chunks(),
                                                  headers=sent, allow_redirects=False)
        except TimeoutError:
            self._stopped()
            raise errors.UpstreamTimeout(f"no response within {timeout_s:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            self._stopped()
            raise errors.UpstreamConnectError(f"cannot connect: {_why(exc.os_error)}") \
                from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._stopped()
            raise errors.UpstreamReadError(
                f"the upload to the backend failed: {_why(exc)}") from exc
        if resp.status in transport.NOT_RELAYED or transport.encoded(
                resp.headers.get("Content-Encoding")):
            resp.close()
            raise errors.UpstreamProtocolError(
                f"the backend answered the upload with status {resp.status}, which is never "
                "relayed" if resp.status in transport.NOT_RELAYED else
                "the backend answered the upload with an encoded body (Content-Encoding), "
                "which was not asked for")
        return StreamedResponse(resp, self._read_timeout_s)

    def _stopped(self) -> None:
        """A failure caused by the source itself (over the limit) is the client's."""
        if self._source.error is not None:
            raise self._source.error
