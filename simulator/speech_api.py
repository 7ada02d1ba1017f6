"""Speech mode (``--engine speech``): ``POST /v1/audio/speech`` as OpenAI-compatible
text-to-speech servers serve it (openedai-speech, Speaches, Kokoro-FastAPI; vLLM 0.32
itself has no speech route).

Request ``{"model", "input", "voice", "response_format", "speed"}``; the answer is the
audio itself, streamed as it is "synthesised": a valid WAV (``audio/wav``, 24 kHz 16-bit
mono, the header first with the exact length) or raw ``pcm`` (the same samples,
``audio/pcm``). Other formats (mp3, opus, aac, flac) are answered 400: the simulator
does not encode them, and it answers WAV when ``response_format`` is absent (OpenAI's
default would be mp3). The sound is one tone per word (``simulator.audio``).

Latency: each word's audio is written after ``its seconds x`` :data:`REAL_TIME_FACTOR`
``x time_scale``, so a long text streams over time like a real synthesiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator import audio, errors, protocol
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks

REAL_TIME_FACTOR = 0.05
MAX_INPUT_CHARS = 4096  # OpenAI's limit
FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}


class SpeechApi:
    def __init__(self, settings: SimulatorSettings, served: list[str], tasks: list[str],
                 started: int) -> None:
        self.settings = settings
        self.served = served
        self.tasks = tasks
        self.started = started

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/audio/speech", self.speech), web.get("/v1/models", self.models)]

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.started,
                 "owned_by": "synapse-simulator", "tasks": self.tasks} for name in self.served]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    def _check(self, body: Mapping[str, Any]) -> tuple[str, str, str, float]:
        protocol.check_served(protocol.model_name(body), self.served)
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise errors.BadRequest("input must be a non-empty string.", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise errors.BadRequest(f"input must be at most {MAX_INPUT_CHARS} characters.",
                                    param="input")
        fmt = body.get("response_format") or "wav"
        protocol.check_format(fmt, FORMATS)
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float) \
                or not 0.25 <= speed <= 4.0:
            raise errors.BadRequest("speed must be a number from 0.25 to 4.0.", param="speed")
        voice = body.get("voice") or "alloy"
        if not isinstance(voice, str):
            raise errors.BadRequest("voice must be a string.", param="voice")
        return text, fmt, voice, float(speed)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        text, fmt, voice, speed = self._check(protocol.parse_body(await request.read()))
        words = text.split()
        per_word = audio.word_samples(speed)
        size = per_word * len(words) * 2 + (audio.HEADER_BYTES if fmt == "wav" else 0)
        response = web.StreamResponse(headers={"Content-Type": FORMATS[fmt]})
        response.content_length = size
        await response.prepare(request)
        if fmt == "wav":
            await response.write(audio.wav_header(per_word * len(words)))
        delay = per_word / audio.SAMPLE_RATE * REAL_TIME_FACTOR * self.settings.time_scale
        for word in words:
            if delay > 0:
                await clocks.sleep(delay)
            await response.write(audio.tone(word, voice, per_word))
        await response.write_eof()
        return response
