"""Files only their owner may read: logs and journals that can hold tenants' text."""

from __future__ import annotations

import os
from typing import IO


def append(path: str | os.PathLike[str]) -> IO[bytes]:
    """``path`` opened to append bytes, made 0600 if new (not as the umask says)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
