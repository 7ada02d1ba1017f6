"""Judged cache hits kept on disk: one JSON-lines file per tenant, one JSON object a line.

``controlplane.core.cache_feedback`` hands each judged semantic hit here; ``synapsectl
cache calibrate --from-feedback PATH`` reads them back (:func:`files_of`), and each file
can train ``tune-embedder --pairs`` (each line has ``text_a``, ``text_b`` and ``label``
like any pairs file).

Design decisions:

- **One file per tenant**, ``<path>.tenants/<tenant>.jsonl`` beside ``cache.feedback_path``
  (:func:`tenant_file`). Tenants are adversaries and hits cost them nothing: in one
  file shared by all, one tenant judging its own hits over and over pushed every other
  tenant's verdicts out through the rotation, and calibration never saw them. A file
  name is a slug of the tenant's name and 16 hex digits of its sha256, so any name makes
  a valid, distinct file name; each line still names its tenant.
- **Bounded, each tenant by its share**: past its :func:`tenant_lru.share` of
  ``max_bytes`` (over the configured tenants), a tenant's file moves to ``<file>.1``
  (replacing its previous one) and a new file starts, so a tenant keeps at most twice its
  share (or one line, when a line is longer) and all of them about twice ``max_bytes``,
  as one shared file and its ``.1`` did. Only the writer's own lines ever move out.
- **Appends from the whole pod**: every serving process of a pod may take a verdict, so
  each append holds ``flock`` on the tenant's file (and a lock for this process's
  threads) while it checks the size, rotates and writes: two processes never both rotate
  (the second would replace the first's ``.1`` with a nearly empty file). A process that
  opened a file another one rotated meanwhile opens the new one. Appends run in a thread
  (``asyncio.to_thread``); feedback is rare next to requests, so there is no batching.
- **Crash-safe**: nothing is held in memory (a restart starts from the files), each line
  is one ``write`` on a file opened in append mode and each rotation one ``os.replace``.
  A line cut short (a crash or a full disk mid-write) is ended before the next line is
  written, so it costs only itself; the reader skips it.
- **Files of earlier releases** (one file at ``path`` and its ``.1``, every tenant's
  lines in it) are read too and never written again.
- **Private**: each line holds a tenant's query and the cached entry's text, so files
  are created mode 0600 (and folders this makes, 0700), not as the umask says.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pathlib
import re
import threading
from typing import Any, Protocol

from controlplane.core import tenant_lru

MAX_BYTES = 64 * 1024 * 1024
TENANTS_SUFFIX = ".tenants"
SUFFIX = ".jsonl"
SLUG_CHARS = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class Judged(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class JsonlPairs:
    """Appends judged pairs to their tenant's file under ``path``'s tenants' folder, each
    tenant's files bounded by its share of ``max_bytes`` among ``tenants``."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = MAX_BYTES,
                 tenants: int = 1) -> None:
        self.path = pathlib.Path(path)
        self.share = tenant_lru.share(max_bytes, tenants)
        self._lock = threading.Lock()

    async def record(self, pair: Judged) -> None:
        row = pair.to_json()
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        await asyncio.to_thread(self._append, str(row.get("tenant") or ""),
                                line.encode("utf-8"))

    def _append(self, tenant: str, line: bytes) -> None:
        file = tenant_file(self.path, tenant)
        with self._lock:
            for folder in (self.path.parent, file.parent):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            while not self._appended(file, line):
                pass

    def _appended(self, file: pathlib.Path, line: bytes) -> bool:
        """Append ``line`` to ``file`` under its ``flock``; False when it has to be opened
        again (it was rotated, by another process meanwhile or here now)."""
        fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if not _still_at(fd, file):
                return False
            if size and size + len(line) > self.share:
                os.replace(file, rotated(file))
                return False
            os.fchmod(fd, 0o600)    # a file made before this rule, too
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line     # ends a line cut short, which stays on its own
            _write(fd, line)
            return True
        finally:
            os.close(fd)            # and the lock with it

    async def close(self) -> None:
        return None


def tenant_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """The folder of the tenants' files for ``cache.feedback_path`` ``path``."""
    path = pathlib.Path(path)
    return path.with_name(path.name + TENANTS_SUFFIX)


def tenant_file(path: str | os.PathLike[str], tenant: str) -> pathlib.Path:
    """Where ``tenant``'s judged pairs go (any name makes a distinct, valid file name)."""
    slug = _UNSAFE.sub("_", tenant)[:SLUG_CHARS]
    digest = hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]
    return tenant_dir(path) / f"{slug}-{digest}{SUFFIX}"


def rotated(path: pathlib.Path) -> pathlib.Path:
    """Where a file's previous lines go once it is full."""
    return path.with_name(path.name + ".1")


def files_of(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The files holding the verdicts kept at ``path`` (a ``cache.feedback_path``, or its
    tenants' folder), each file's ``.1`` before it: every tenant's, then the single file
    of an earlier release at ``path``. Empty when there is none."""
    path = pathlib.Path(path)
    folder = path if path.is_dir() else tenant_dir(path)
    found: list[pathlib.Path] = []
    if folder.is_dir():
        names = sorted({p.name.removesuffix(".1") for p in folder.iterdir()
                        if p.name.endswith((SUFFIX, SUFFIX + ".1"))})
        for name in names:
            found += _with_rotated(folder / name)
    if folder != path:
        found += _with_rotated(path)
    return found


def _with_rotated(file: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in (rotated(file), file) if p.is_file()]


def _still_at(fd: int, file: pathlib.Path) -> bool:
    """Whether ``file`` still names the file open as ``fd`` (not rotated since)."""
    try:
        now = os.stat(file)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
