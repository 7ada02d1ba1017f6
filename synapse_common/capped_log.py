"""A log file capped in size, the one rule for the logs Synapse writes from its children's
output: when a write would take the file past ``max_bytes`` it is renamed ``<name>.1``
(replacing the one before) and a new file started, so a log takes at most twice its cap
on disk and the newest lines are always in ``<name>``. Files are 0600
(:mod:`synapse_common.private_files`): logs name tenants and requests.

Used by ``synapse up`` for its control plane's and agent's output
(:mod:`controlplane.embedded`); the agent's engine logs (``agent.process.LogSink``,
``supervisor.log_max_bytes``) follow the same rule with the same default.
"""

from __future__ import annotations

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
        self._file: IO[bytes] = private_files.append(path)
        self._size = os.fstat(self._file.fileno()).st_size

    def write(self, chunk: bytes) -> None:
        """Write ``chunk``; what does not fit goes to a new file, cut after the last whole
        line that fits (in the middle of a line only when none does)."""
        while chunk:
            room = self.max_bytes - self._size
            if room <= 0 or (len(chunk) > room and self._size and b"\n" not in chunk[:room]):
                self._rotate()
                continue
            cut = len(chunk) if len(chunk) <= room else (chunk.rfind(b"\n", 0, room) + 1
                                                          or room)
            self._file.write(chunk[:cut])
            self._size += cut
            chunk = chunk[cut:]
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = private_files.append(self.path)
        self._size = 0

    def close(self) -> None:
        self._file.close()
