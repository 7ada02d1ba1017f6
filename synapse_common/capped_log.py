"""A log file capped in size, the one rule for the logs Synapse writes from its children's
output: when a write would take the file past ``max_bytes`` it is renamed ``<name>.1``
(replacing the one before) and a new file started, so a log takes at most twice its cap
on disk and the newest lines are always in ``<name>``. Files are 0600
(:mod:`synapse_common.private_files`): logs name tenants and requests.

A write the disk refuses (full, over quota, a file too large) loses its lines instead of
raising: every writer here pumps a child's output, and a pump that stopped would leave
the child blocked on a full pipe. The file is reopened on the next write (the lost
lines' buffer closed with the old one), so the log resumes once there is room.

Used by ``synapse up`` for its control plane's and agent's output
(:mod:`controlplane.embedded`) and by the agent for its engines' logs
(``agent.process.LogSink``, ``supervisor.log_max_bytes``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import IO

from synapse_common import private_files

MAX_BYTES = 10 * 1024 * 1024


class CappedFile:
    """Appends to ``path``; rotates to ``<path>.1`` when a write would pass the cap."""

    def __init__(self, path: pathlib.Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._closed = False
        self._file: IO[bytes] | None = None
        self._size = 0
        self._open()

    def _open(self) -> IO[bytes]:
        self._file = private_files.append(self.path)
        self._size = os.fstat(self._file.fileno()).st_size
        return self._file

    def write(self, chunk: bytes) -> None:
        """Write ``chunk``; what does not fit goes to a new file, cut after the last whole
        line that fits (in the middle of a line only when none does). Lost, not raised,
        when the disk refuses it."""
        if self._closed:
            raise ValueError(f"write to closed log {self.path}")
        try:
            self._write(chunk)
        except OSError:
            self._drop()

    def _write(self, chunk: bytes) -> None:
        file = self._file if self._file is not None else self._open()
        while chunk:
            room = self.max_bytes - self._size
            if room <= 0 or (len(chunk) > room and self._size and b"\n" not in chunk[:room]):
                file = self._rotate()
                continue
            cut = len(chunk) if len(chunk) <= room else (chunk.rfind(b"\n", 0, room) + 1
                                                          or room)
            file.write(chunk[:cut])
            self._size += cut
            chunk = chunk[cut:]
        file.flush()

    def _rotate(self) -> IO[bytes]:
        self._drop()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        return self._open()

    def _drop(self) -> None:
        """Close the file, losing what its buffer still holds (the disk refused it)."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def close(self) -> None:
        self._closed = True
        self._drop()
