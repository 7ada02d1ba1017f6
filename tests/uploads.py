"""Large audio uploads sent chunked (no Content-Length, so a server cannot refuse them
before reading), and the peak-memory probe that shows they were never held whole. Shared
by the simulator's and the control plane's upload tests and by ``bench/api_surface.py``."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

MIB = 1024 * 1024
BOUNDARY = "synapse-test-boundary"


def audio_form(model: str, size: int,
               key: str | None = None) -> tuple[dict[str, str], AsyncIterator[bytes]]:
    """The headers and the streamed multipart body of a transcription request for
    ``model`` whose file is ``size`` bytes (whole MiB)."""

    async def body() -> AsyncIterator[bytes]:
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
               f"{model}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
               "filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
        block = b"\1" * MIB
        for _ in range(size // MIB):
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers, body()


async def post_audio(url: str, model: str, size: int,
                     key: str | None = None) -> tuple[int, Any]:
    """POST :func:`audio_form` to ``url``: the status and the JSON answer."""
    headers, body = audio_form(model, size, key)
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (``VmHWM``: the peak resident set)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")
