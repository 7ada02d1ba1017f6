"""Judged cache hits kept on disk: one JSON object per line, appended by one replica.

``controlplane.core.cache_feedback`` hands each judged semantic hit here; ``synapsectl
cache calibrate --from-feedback FILE`` reads the file back (and ``tune-embedder --pairs``
can train on it: each line has ``text_a``, ``text_b`` and ``label`` like any pairs file).

Design decisions:

- Appends run in a thread (``asyncio.to_thread``), one at a time under a lock, each line
  written whole with one ``write`` on a file opened in append mode; feedback is rare next
  to requests, so there is no batching.
- Bounded: past ``max_bytes`` the file moves to ``<path>.1`` (replacing the previous
  one) and a new file starts, so at most twice ``max_bytes`` are kept; calibration reads
  both.
- One file per replica: a file is never shared between processes (point each replica's
  ``cache.feedback_path`` at its own volume and hand every file to the calibration).
- Private: each line holds a tenant's query and the cached entry's text, so the file is
  created mode 0600 (and a directory it has to create, 0700), not as the umask says.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import threading
from typing import Any, Protocol

MAX_BYTES = 64 * 1024 * 1024


class Judged(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class JsonlPairs:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int = MAX_BYTES) -> None:
        self.path = pathlib.Path(path)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    async def record(self, pair: Judged) -> None:
        line = json.dumps(pair.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
        await asyncio.to_thread(self._append, line.encode("utf-8"))

    def _append(self, line: bytes) -> None:
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                if self.path.stat().st_size + len(line) > self._max_bytes:
                    os.replace(self.path, rotated(self.path))
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)    # a file made before this rule, too
            with os.fdopen(fd, "ab") as fh:
                fh.write(line)

    async def close(self) -> None:
        return None


def rotated(path: pathlib.Path) -> pathlib.Path:
    """Where the previous lines go once the file is full."""
    return path.with_name(path.name + ".1")
