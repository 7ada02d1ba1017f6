"""Audio uploads (``multipart/form-data``) re-encoded for the backend, and their size rule
(pure).

The control plane never holds an upload whole: it reads the client's form part by part,
keeps the small fields (each at most :data:`FIELD_MAX` bytes), and streams the file to
the backend as it arrives, in a form of its own (:class:`Form`) whose ``model`` field
names the routed model. Only when the file comes before the ``model`` field (which
routing needs) is it spooled — to a temporary file on disk, never to memory.

:class:`Meter` is the one size rule: the file may be at most ``http.max_audio_bytes``;
a ``Content-Length`` above that plus :data:`FORM_OVERHEAD` is refused before a byte is
read, a chunked upload as soon as its running count passes the limit (413 either way).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator

from controlplane import errors

CHUNK = 64 * 1024
FIELD_MAX = 64 * 1024
FORM_OVERHEAD = 64 * 1024      # boundaries, part headers and the small fields
FIELDS_MAX = 64                # small fields in one form
_SAFE = str.maketrans({'"': "%22", "\r": "", "\n": ""})


def too_large(limit: int, detail: str) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(f"the audio upload is {detail}; the limit is {limit} bytes "
                                  "(http.max_audio_bytes)", code="upload_too_large")


def check_length(content_length: int | None, limit: int) -> None:
    """413 at once when the declared body cannot hold a file within ``limit``."""
    if content_length is not None and content_length > limit + FORM_OVERHEAD:
        raise too_large(limit, f"{content_length} bytes")


class Meter:
    """The running size of the file; 413 as soon as it passes the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        if self.count > self.limit:
            raise too_large(self.limit, f"over {self.limit} bytes (at least {self.count})")


@dataclasses.dataclass
class Form:
    """The form sent upstream: fields, then the file, then fields that followed it."""

    boundary: str = dataclasses.field(default_factory=lambda: "synapse-" + secrets.token_hex(12))

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def field(self, name: str, value: str) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                f'name="{name.translate(_SAFE)}"\r\n\r\n').encode() + value.encode() + b"\r\n"

    def fields(self, items: list[tuple[str, str]]) -> Iterator[bytes]:
        for name, value in items:
            yield self.field(name, value)

    def file_head(self, name: str, filename: str, content_type: str) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                f'name="{name.translate(_SAFE)}"; filename="{filename.translate(_SAFE)}"\r\n'
                f"Content-Type: {content_type.translate(_SAFE)}\r\n\r\n").encode()

    @staticmethod
    def file_end() -> bytes:
        return b"\r\n"

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()
