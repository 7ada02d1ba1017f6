"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: multipart uploads
streamed to a backend of task ``transcription`` without ever being held whole.

The client's form is read part by part (aiohttp's ``MultipartReader`` over the request
stream). Small fields before the file are kept (``model`` is needed to authorise and
route); then, once routed, the form is sent upstream re-encoded (``core.upload.Form``,
``model`` naming the routed model) with the file streamed chunk by chunk as it arrives
from the client, the fields that follow it after it. When the file comes before
``model``, it is spooled to a temporary file on disk (never memory) until the fields
after it are read.

Sizes (``http.max_audio_bytes``, ``core.upload``): a ``Content-Length`` that cannot fit
is refused 413 before a byte is read; a chunked upload as soon as its count passes the
limit, then the connection is closed. The small fields, which are kept in memory, are
bounded together too (at most ``upload.FIELDS_MAX`` of them, ``upload.FORM_OVERHEAD``
bytes in all; 400 beyond), not only one by one: otherwise a chunked upload of endless
fields would be held to its last byte. Each read from the client must arrive within
``http.body_timeout_s`` of the previous one (408 otherwise), not the whole upload.
A body that is not the multipart form its Content-Type says (no boundary, a wrong one,
cut short before the closing one) is a 400 (:func:`malformed`), and each small field is
held to the rules of a JSON body (``validation.form_field``).
Retries before the first byte go to another backend only while the body can be produced
again (nothing of the file sent yet, or spooled).

The tenant's rate-limit permit is taken before the form is read, as on every JSON path
(``serving.acquire``): reading a form may spool up to ``http.max_audio_bytes`` to disk, and
a tenant at its limit must be refused (429) before that, not after. The permit is released
on every way out, a bad form included.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Any

from aiohttp import BodyPartReader, ClientSession, MultipartReader, http_exceptions, web

from controlplane import errors
from controlplane.adapters import upload_client
from controlplane.api import calls, context, fairness, relay, serving
from controlplane.core import api_calls, upload, validation
from controlplane.core import router as router_mod
from synapse_common import tasks


@dataclasses.dataclass
class FilePart:
    name: str
    filename: str
    content_type: str
    part: BodyPartReader | None = None     # streamed from the client
    spool: IO[bytes] | None = None         # or read back from disk


class Source:
    """The upstream body: fields, the file (from the client or the spool), the fields
    after it, the end. Implements ``upload_client.BodySource``."""

    def __init__(self, reader: MultipartReader, meter: upload.Meter, idle_s: float,
                 max_n: int = validation.MAX_N) -> None:
        self.reader = reader
        self.meter = meter
        self.idle_s = idle_s
        self.max_n = max_n
        self.form = upload.Form()
        self.fields: list[tuple[str, str]] = []
        self.after: list[tuple[str, str]] = []
        self.file: FilePart | None = None
        self.started = False
        self.error: errors.SynapseError | None = None
        self._field_count = 0
        self._field_bytes = 0
        self._names: set[str] = set()

    @property
    def replayable(self) -> bool:
        return not self.started or (self.file is not None and self.file.spool is not None)

    def field(self, name: str) -> str | None:
        return next((v for k, v in (*self.fields, *self.after) if k == name), None)

    def set_field(self, name: str, value: str) -> None:
        self.fields = [(k, v) for k, v in self.fields if k != name] + [(name, value)]
        self.after = [(k, v) for k, v in self.after if k != name]

    async def _next(self) -> BodyPartReader | None:
        part = await self._read(self.reader.next())
        if part is not None and not isinstance(part, BodyPartReader):
            raise errors.BadRequest("nested multipart bodies are not supported",
                                    code="invalid_upload")
        return part

    async def _read(self, awaitable: Any) -> Any:
        """One read from the client's form: 408 when it stalls, 400 when aiohttp's reader
        finds the form malformed (:func:`malformed`)."""
        try:
            async with asyncio.timeout(self.idle_s):
                return await awaitable
        except TimeoutError:
            raise errors.RequestTimeout(f"the upload stalled for {self.idle_s:g}s "
                                        "(http.body_timeout_s)") from None
        except MALFORMED:
            raise malformed() from None

    async def _text(self, part: BodyPartReader) -> str:
        self._field_count += 1
        if self._field_count > upload.FIELDS_MAX:
            raise errors.BadRequest(f"a form may hold at most {upload.FIELDS_MAX} fields "
                                    "besides the file", code="invalid_upload")
        name = part.name or ""
        if name in self._names and not name.endswith("[]"):
            # A field after the file is read once the file has gone on: a second
            # ``model`` there reached the backend after routing, metering and the
            # allow-list had taken the first (a model the tenant may not use, billed as
            # the one it may). Only the API's array fields (``name[]``) repeat.
            raise errors.BadRequest(f"{name}: a form field may be given once", param=name,
                                    code="invalid_upload")
        self._names.add(name)
        data = bytearray()
        while chunk := await self._read(part.read_chunk(upload.CHUNK)):
            data += chunk
            if len(data) > upload.FIELD_MAX:
                raise errors.BadRequest(f"{part.name}: a form field may hold at most "
                                        f"{upload.FIELD_MAX} bytes", param=part.name,
                                        code="invalid_upload")
            self._field_bytes += len(chunk)
            if self._field_bytes > upload.FORM_OVERHEAD:
                raise errors.BadRequest(f"the form's fields may hold at most "
                                        f"{upload.FORM_OVERHEAD} bytes together",
                                        param=part.name, code="invalid_upload")
        text = data.decode("utf-8", "replace")
        validation.form_field(part.name or "", text, self.max_n)
        return text

    async def read_head(self) -> None:
        """The fields before the file; the file itself only when ``model`` is not yet
        known (then spooled), with the fields after it."""
        while (part := await self._next()) is not None:
            if part.filename is None:
                (self.after if self.file else self.fields).append(
                    (part.name or "", await self._text(part)))
                continue
            if self.file is not None:     # one upload per request, as OpenAI's API takes
                raise errors.BadRequest("a form may hold one file part", param=part.name,
                                        code="invalid_upload")
            self.file = FilePart(part.name or "file", part.filename,
                                 part.headers.get("Content-Type", "application/octet-stream"),
                                 part)
            if self.field("model") is not None:
                return
            self.file.spool = await self._spool(part)
            self.file.part = None
        if self.file is None:
            raise errors.BadRequest("file: an audio file part is required", param="file",
                                    code="missing_field")

    async def _spool(self, part: BodyPartReader) -> IO[bytes]:
        spool = tempfile.TemporaryFile()     # closed by close(), or below
        try:
            while chunk := await self._read(part.read_chunk(upload.CHUNK)):
                self.meter.add(len(chunk))
                spool.write(chunk)       # page cache: no wait worth a thread per chunk
        except BaseException:
            spool.close()
            raise
        return spool

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._body():
                yield piece
        except errors.SynapseError as exc:
            self.error = exc
            raise
        except (ConnectionError, OSError, ValueError) as exc:
            self.error = errors.BadRequest(f"the upload broke off: {type(exc).__name__}",
                                           code="invalid_upload")
            raise

    async def _body(self) -> AsyncIterator[bytes]:
        assert self.file is not None
        for piece in self.form.fields(self.fields):
            yield piece
        f = self.file
        yield self.form.file_head(f.name, f.filename, f.content_type)
        if f.spool is not None:
            f.spool.seek(0)
            while chunk := f.spool.read(upload.CHUNK):
                yield chunk
        else:
            assert f.part is not None
            self.started = True
            while chunk := await self._read(f.part.read_chunk(upload.CHUNK)):
                self.meter.add(len(chunk))
                yield chunk
            while (part := await self._next()) is not None:
                self.after.append((part.name or "", await self._text(part)))
        yield self.form.file_end()
        for piece in self.form.fields(self.after):
            yield piece
        yield self.form.end()

    def close(self) -> None:
        if self.file is not None and self.file.spool is not None:
            self.file.spool.close()


# What aiohttp's multipart reader raises for a body that is not the form its Content-Type
# says: ValueError (no boundary or a wrong one, a body that ends before the closing one,
# a part's bad Content-Length), RuntimeError (a bad ``_charset_`` part), BadHttpMessage
# (a part with too many headers).
MALFORMED = (ValueError, RuntimeError, http_exceptions.BadHttpMessage)


def malformed() -> errors.BadRequest:
    """The 400 for a body aiohttp's multipart reader refused. aiohttp's own message is not
    shown: it quotes a line of the client's body, of any length."""
    return errors.BadRequest(
        "the body is not valid multipart/form-data: its Content-Type must name a boundary "
        "(of at most 70 characters), and every part must start with that boundary and the "
        "form end with it", code="invalid_upload")


def client(request: web.Request) -> ClientSession:
    svc = request.app[context.SERVICES]
    if svc.upload_session is None:
        svc.upload_session = upload_client.session()
    return svc.upload_session


async def close_client(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the upload client session lives as long as the app."""
    yield
    svc = app[context.SERVICES]
    session, svc.upload_session = svc.upload_session, None
    if session is not None:
        await session.close()


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _upload(request, "/v1/audio/transcriptions")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _upload(request, "/v1/audio/translations")


async def _open(request: web.Request) -> Source:
    svc = request.app[context.SERVICES]
    h = svc.settings.http
    upload.check_length(request.content_length, h.max_audio_bytes)
    if not request.content_type.startswith("multipart/form-data"):
        raise errors.BadRequest("send the audio as multipart/form-data with a file part",
                                param="file", code="invalid_upload")
    try:
        reader = await request.multipart()
    except ValueError:       # no boundary, or one over 70 characters
        raise malformed() from None
    source = Source(reader, upload.Meter(h.max_audio_bytes), h.body_timeout_s, h.max_n)
    await source.read_head()
    return source


async def _upload(request: web.Request, path: str) -> web.StreamResponse:
    tenant = calls.authenticate(request)
    # The permit before a byte of the body: reading the form may spool the file to disk.
    permit = await serving.acquire(request, tenant)
    source: Source | None = None
    try:
        source = await _open(request)
        model = source.field("model")
        if not model:
            raise errors.BadRequest("model: is required (GET /v1/models lists the models)",
                                    param="model", code="missing_field")
        front = calls.Front(tenant, {}, b"", api_calls.Call(tasks.TRANSCRIPTION, model),
                            permit)
    except BaseException:
        serving.release_later(request, permit)
        if source is not None:
            source.close()
        raise
    try:
        return await _send(request, front, source, path)    # releases the permit
    finally:
        source.close()


async def _send(request: web.Request, front: calls.Front, source: Source,
                path: str) -> web.StreamResponse:
    svc = request.app[context.SERVICES]
    try:
        front.canonical = serving.resolve_model(request, front.tenant, front.call.model)
        prompt = front.prompt = router_mod.Prompt.from_text("", 0, "", exact=False)
        await fairness.admit(request, front.tenant.name, front.canonical, prompt, 1)
        route = await calls.route(request, front, tasks.TRANSCRIPTION)
        source.set_field("model", route.model)
        dispatcher = copy.copy(svc.dispatcher)     # the same policy, this upload's transport
        dispatcher.transport = upload_client.UploadTransport(
            client(request), source, source.form.content_type,
            svc.settings.http.upstream_idle_timeout_s)
        resp = await relay.forward(request, route, prompt, b"", path, relay.Shape(),
                                   dispatcher=dispatcher)
        front.failed = False
        return resp
    finally:
        calls.finish(request, front)
