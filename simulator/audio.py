"""Simulated audio: a WAV (16-bit PCM, mono) made of one tone per word, and reading the
little of a WAV header that transcription needs.

Speech is deterministic: each word of the input is :data:`WORD_S` seconds (divided by
``speed``) of a sine tone whose pitch is a function of the word and the voice, with short
fades so words are audible as separate notes. The length of the whole file is known
before the first sample, so the header is exact and the body can be streamed word by
word.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np

SAMPLE_RATE = 24_000  # OpenAI's text-to-speech output rate
WORD_S = 0.3
FADE_S = 0.02
AMPLITUDE = 0.3 * 32767
HEADER_BYTES = 44
ASSUMED_BYTE_RATE = 32_000  # 16 kHz 16-bit mono: the duration of a non-WAV upload


def wav_header(num_samples: int, rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte RIFF header of a mono 16-bit PCM file of ``num_samples`` samples."""
    data = num_samples * 2
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data))


def _pitch(word: str, voice: str) -> float:
    digest = hashlib.blake2b(f"{voice}\x00{word}".encode(), digest_size=4).digest()
    return 220.0 + int.from_bytes(digest, "little") % 660


def word_samples(speed: float, rate: int = SAMPLE_RATE) -> int:
    return max(1, int(rate * WORD_S / speed))


def tone(word: str, voice: str, samples: int, rate: int = SAMPLE_RATE) -> bytes:
    """``samples`` samples of the word's tone, little-endian int16."""
    t = np.arange(samples, dtype=np.float64) / rate
    wave = np.sin(2 * np.pi * _pitch(word, voice) * t) * AMPLITUDE
    fade = min(int(FADE_S * rate), samples // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    return wave.astype("<i2").tobytes()


@dataclasses.dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    bits: int
    byte_rate: int


def wav_info(head: bytes) -> WavInfo | None:
    """The format of a canonical WAV file from its first bytes, or None if it is not one."""
    if len(head) < 36 or head[:4] != b"RIFF" or head[8:12] != b"WAVE" or head[12:16] != b"fmt ":
        return None
    _, _, channels, rate, byte_rate, _, bits = struct.unpack("<IHHIIHH", head[16:36])
    return WavInfo(rate, channels, bits, byte_rate) if byte_rate > 0 else None


def duration_s(head: bytes, size: int) -> float:
    """Seconds of audio in an upload of ``size`` bytes that begins with ``head``."""
    info = wav_info(head)
    if info is None:
        return size / ASSUMED_BYTE_RATE
    return max(0, size - HEADER_BYTES) / info.byte_rate
