"""Speech (WAV streamed back) and transcription (multipart read in chunks) through real
simulators and the official openai client."""

from __future__ import annotations

import hashlib
import io
import pathlib
import wave
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests import harness, uploads
from tests.simulator.conftest import MODEL, Sim, start

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def speech(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--engine", "speech", "--time-scale", "0", name="sim-speech")


@pytest.fixture(scope="module")
def whisper(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--task", "transcription", "--task", "tokenize",
                 "--max-audio-mb", "25", "--time-scale", "0", name="sim-whisper")


def client(sim: Sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture
def wav_file(speech: Sim, tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with client(speech) as c:
        audio = c.audio.speech.create(model=MODEL, voice="alloy", response_format="wav",
                                      input="The quick brown fox jumps")
    path = tmp_path / "speech.wav"
    path.write_bytes(audio.content)
    yield path


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def test_speech_is_a_valid_wav_with_a_tone_per_word(wav_file: pathlib.Path) -> None:
    with wave.open(str(wav_file)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24_000)
        assert w.getnframes() == 5 * 7_200  # five words of 0.3 s at 24 kHz
        assert max(w.readframes(w.getnframes())) > 0  # not silence


def test_speech_streams_with_an_exact_length_and_honours_speed(speech: Sim) -> None:
    with client(speech) as c:
        with c.audio.speech.with_streaming_response.create(
                model=MODEL, voice="echo", input="one two three", response_format="pcm",
                speed=2.0) as resp:
            assert resp.headers["content-type"] == "audio/pcm"
            body = b"".join(resp.iter_bytes())
        assert int(resp.headers["content-length"]) == len(body) == 3 * 3_600 * 2
        with pytest.raises(openai.BadRequestError) as err:
            c.audio.speech.create(model=MODEL, voice="alloy", input="x", response_format="mp3")
        assert err.value.body["param"] == "response_format"  # type: ignore[index]


def test_speech_round_trip_through_transcription(wav_file: pathlib.Path, whisper: Sim) -> None:
    data = wav_file.read_bytes()
    with client(whisper) as c, wav_file.open("rb") as f:
        text = c.audio.transcriptions.create(model=MODEL, file=f)
    assert text.text == f"Simulated transcription of {len(data)} bytes, blake2b {digest(data)}."
    assert text.usage is not None and text.usage.seconds == 2  # type: ignore[union-attr]


async def test_translation_in_verbose_json(whisper: Sim) -> None:
    # by HTTP: the openai client marks translations.create deprecated
    data = b"not a wav file, 32 bytes long..."
    form = aiohttp.FormData({"model": MODEL, "response_format": "verbose_json"})
    form.add_field("file", data, filename="speech.ogg", content_type="audio/ogg")
    async with aiohttp.ClientSession() as session, session.post(
            whisper.url + "/v1/audio/translations", data=form) as resp:
        verbose = await resp.json()
    assert verbose["text"] == f"Simulated translation of 32 bytes, blake2b {digest(data)}."
    # not a WAV: the duration assumes 16 kHz 16-bit mono
    assert verbose["duration"] == pytest.approx(0.001) and verbose["language"] == "en"


def test_transcription_as_text_and_as_a_stream(wav_file: pathlib.Path, whisper: Sim) -> None:
    data = wav_file.read_bytes()
    with client(whisper) as c:
        plain = c.audio.transcriptions.create(model=MODEL, file=("a.wav", data),
                                              response_format="text")
        assert plain == f"Simulated transcription of {len(data)} bytes, blake2b {digest(data)}."
        with pytest.raises(openai.NotFoundError):
            c.audio.transcriptions.create(model="nope", file=("a.wav", data))


async def test_uploads_are_read_in_chunks_never_held_whole(whisper: Sim) -> None:
    url = whisper.url + "/v1/audio/transcriptions"
    before = uploads.proc_kib(whisper.proc.pid, "VmHWM")
    status, body = await uploads.post_audio(url, MODEL, 20 * MIB)
    assert status == 200 and "of 20971520 bytes" in str(body["text"])
    status, body = await uploads.post_audio(url, MODEL, 30 * MIB)
    assert status == 400 and body["error"]["param"] == "audio_filesize_mb"  # type: ignore[index]
    # peak resident memory grew by far less than the 20 MB that was accepted
    assert uploads.proc_kib(whisper.proc.pid, "VmHWM") - before < 8 * 1024


def test_an_oversized_declared_upload_is_refused_before_reading(whisper: Sim) -> None:
    with client(whisper) as c, pytest.raises(openai.BadRequestError) as err:
        c.audio.transcriptions.create(model=MODEL, file=("big.wav", io.BytesIO(
            b"\0" * (27 * MIB))))
    assert "Maximum file size exceeded" in err.value.body["message"]  # type: ignore[index]
