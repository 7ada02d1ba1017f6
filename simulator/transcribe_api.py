"""Transcription (``--task transcription``): ``POST /v1/audio/transcriptions`` and
``/v1/audio/translations``, multipart uploads, as vLLM serves Whisper (and Speaches /
faster-whisper-server serve the same OpenAI shape).

The upload is read part by part and the file in chunks (:data:`CHUNK`): never held
whole, so a large upload costs this process one chunk of memory. Like vLLM, a file over
``max_audio_mb`` (vLLM's ``VLLM_MAX_AUDIO_CLIP_FILESIZE_MB``, 25) is refused 400
``Maximum file size exceeded`` (``param: audio_filesize_mb``) — when the request's
``Content-Length`` already says so, before reading it.

The "transcript" is derived from the bytes, so a test can check that the file arrived
intact: ``Simulated transcription of N bytes, blake2b H.`` (``translation`` for the
translations route), H the 16-hex-digit blake2b digest (``digest_size=8``) of the file.
Duration comes from the WAV header, or assumes 16 kHz 16-bit mono for other formats.

Fields: ``file`` (required), ``model``, ``language`` (default ``en``), ``prompt``,
``response_format`` (``json`` default → ``{"text", "usage": {"type": "duration",
"seconds"}}``; ``text`` → the text as ``text/plain``; ``verbose_json`` → duration,
language, one segment), ``stream`` (vLLM's SSE: ``transcription.chunk`` objects, a
final chunk with ``finish_reason: "stop"``, a usage chunk with ``stream_include_usage``,
``data: [DONE]``). Latency: the audio's seconds x :data:`REAL_TIME_FACTOR` x time scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import uuid
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from simulator import audio, errors, protocol
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks
from synapse_common import tokens

CHUNK = 64 * 1024
MAX_FIELD_BYTES = 64 * 1024
MIB = 1024 * 1024
REAL_TIME_FACTOR = 0.01
FORMATS = ("json", "text", "verbose_json")


@dataclasses.dataclass
class Upload:
    size: int = 0
    digest: str = ""
    head: bytes = b""
    seen_file: bool = False
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


class TranscribeApi:
    def __init__(self, settings: SimulatorSettings, served: list[str]) -> None:
        self.settings = settings
        self.served = served
        self.limit = int(settings.max_audio_mb * MIB)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/audio/transcriptions", self.transcriptions),
                web.post("/v1/audio/translations", self.translations)]

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "transcription", "trsc-")

    async def translations(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "translation", "trsl-")

    async def read(self, request: web.Request) -> Upload:
        """The upload's fields and the file's size and digest, read in chunks."""
        if request.content_length is not None and request.content_length > self.limit + MIB:
            raise _too_large(request.content_length)  # the form's overhead is far below 1 MiB
        if not request.content_type.startswith("multipart/"):
            raise errors.BadRequest("expected multipart/form-data with a file part.",
                                    param="file")
        reader = await request.multipart()
        upload = Upload()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise errors.BadRequest("nested multipart bodies are not supported.")
            if part.name == "file":
                await self._read_file(part, upload)
            elif part.name:
                upload.fields[part.name] = await _field(part)
        if not upload.seen_file:
            raise errors.BadRequest("file: Field required", param="file")
        return upload

    async def _read_file(self, part: BodyPartReader, upload: Upload) -> None:
        digest = hashlib.blake2b(digest_size=8)
        while chunk := await part.read_chunk(CHUNK):
            upload.size += len(chunk)
            if upload.size > self.limit:
                raise _too_large(upload.size)
            if len(upload.head) < audio.HEADER_BYTES:
                upload.head += chunk[:audio.HEADER_BYTES - len(upload.head)]
            digest.update(chunk)
        upload.digest = digest.hexdigest()
        upload.seen_file = True

    async def _answer(self, request: web.Request, task: str,
                      prefix: str) -> web.StreamResponse:
        upload = await self.read(request)
        f = upload.fields
        model = protocol.served_model(f.get("model") or None, self.served)
        fmt = f.get("response_format") or "json"
        protocol.check_format(fmt, FORMATS)
        seconds = audio.duration_s(upload.head, upload.size)
        delay = seconds * REAL_TIME_FACTOR * self.settings.time_scale
        if delay > 0:
            await clocks.sleep(delay)
        text = f"Simulated {task} of {upload.size} bytes, blake2b {upload.digest}."
        rid = prefix + uuid.uuid4().hex
        if f.get("stream", "").lower() == "true":
            return await _stream(request, rid, model, text,
                                 f.get("stream_include_usage", "").lower() == "true")
        if fmt == "text":
            return web.Response(text=text, content_type="text/plain")
        if fmt == "verbose_json":
            return _json(_verbose(text, seconds, f.get("language") or "en", task))
        return _json({"text": text, "usage": {"type": "duration",
                                               "seconds": math.ceil(seconds)}})


async def _field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise errors.BadRequest(f"form field {part.name} is too long.", param=part.name)
    return data.decode("utf-8", "replace")


def _too_large(size: int) -> errors.BadRequest:
    return errors.BadRequest(f"Maximum file size exceeded ({size / MIB:.1f} MB)",
                             param="audio_filesize_mb")


def _verbose(text: str, seconds: float, language: str, task: str) -> dict[str, Any]:
    segment = {"id": 0, "avg_logprob": -0.1, "compression_ratio": 1.0, "end": seconds,
               "no_speech_prob": 0.0, "seek": 0, "start": 0.0, "temperature": 0.0,
               "text": text, "tokens": tokens.tokenize(text)}
    return {"duration": seconds, "language": language, "text": text, "segments": [segment],
            "words": None, **({"task": task} if task == "translation" else {})}


async def _stream(request: web.Request, rid: str, model: str, text: str,
                  include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    head = {"id": rid, "object": "transcription.chunk", "created": int(time.time()),
            "model": model}
    pieces = text.split(" ")
    for i, word in enumerate(pieces):
        last = i == len(pieces) - 1
        choice: dict[str, Any] = {"delta": {"content": word if i == 0 else " " + word}}
        if last:
            choice.update(finish_reason="stop", stop_reason=None)
        await response.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
    if include_usage:
        n = tokens.count_tokens(text)
        usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
        await response.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage})
                             + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
