"""Usage counts a control plane could not store when it stopped, kept on its disk until
a later run has stored them.

A replica adds its pending usage counts to the shared store (Redis) every few seconds
(``core.usage_book``). When it stops while the store is unreachable, the counts not yet
stored would end with the process: requests served and never billed. Instead
:func:`keep` writes them to a file beside ``<data_dir>/usage_pending.jsonl``, and the next
start takes them back (:func:`take`) as pending counts, stored with its first flush.

Design decisions:

- **A file per stop.** :func:`keep` writes ``usage_pending.jsonl.kept-<UTC time>-<pid>-
  <random>`` (one JSON line, fsynced, written under another name and renamed whole): the
  workers of a pod stopping together never share a file, and a start never takes a file
  still being written. A ``usage_pending.jsonl`` an older release appended to is taken
  too.
- **Held, not deleted, until stored.** :func:`take` opens each file and holds an exclusive
  ``flock`` on it for as long as its rows are pending in this process (the kernel drops
  the lock when the process dies, even by ``kill -9`` or the OOM killer); it deletes
  nothing. A start takes only the files nobody holds, so when several processes start
  together exactly one gets each file, and a file whose holder died is taken by the next
  start: a run killed while the store is still down loses none of the carried-over rows.
  :meth:`Carried.done` deletes the files once a flush has stored their rows.
- **At most once, never twice.** The store's additions are not idempotent (``HINCRBY``),
  so a file must never be added twice. Just before the flush that carries its rows, a
  file is renamed ``<name>.sending`` (:meth:`Carried.sending`); after it stored them it
  is deleted, after it failed it gets its name back (:meth:`Carried.unsent`). A start that
  finds a ``.sending`` file nobody holds cannot know whether its flush reached the store,
  so it drops the file with an ERROR naming how many rows went (:attr:`Carried.dropped`).
  The rows are thus lost only when the process dies during the one store call that
  carries them (at most the store's time budget), and counted twice never. The same
  order holds at a stop whose flush failed: the rows are marked, written to a new file,
  then the old files deleted.
- A line that does not parse, and a value no store can hold (not a finite number from 0
  to ``COUNT_MAX``), is skipped and counted; a file that holds no usable row is deleted
  when it is read.
- Private: the files name tenants and their usage, so they are made 0600 (and a folder
  it has to make, 0700).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import pathlib
import secrets
from collections.abc import Mapping

from controlplane.core.usage_book import COUNT_MAX

FILE = "usage_pending.jsonl"
SENDING = ".sending"            # a file whose rows a flush is storing (or stored)

Rows = Mapping[tuple[str, str, str], Mapping[str, int | float]]   # (day, tenant, model) ->
Summed = dict[tuple[str, str, str], dict[str, int | float]]


def keep(path: str | os.PathLike[str], rows: Rows) -> pathlib.Path:
    """Write ``rows`` to a new file beside ``path`` (named after it) and return its name
    (raises ``OSError`` when it cannot)."""
    base = pathlib.Path(path)
    base.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    unique = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
    target = base.with_name(f"{base.name}.kept-{unique}")
    writing = base.with_name(f".{base.name}.writing-{unique}")  # no start takes this name
    line = json.dumps([[*key, dict(counts)] for key, counts in rows.items()]) + "\n"
    fd = os.open(writing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(writing, target)
    return target


class Carried:
    """The rows an earlier run kept, taken back by this process, and the files that hold
    them (held locked until :meth:`done` or :meth:`release`)."""

    def __init__(self) -> None:
        self.rows: Summed = {}
        self.unreadable = 0         # lines and values that could not be read
        self.dropped = 0            # rows of ``.sending`` files dropped (maybe stored)
        self._held: list[tuple[int, str]] = []      # (locked descriptor, current name)

    def __bool__(self) -> bool:
        return bool(self._held)

    def sending(self) -> bool:
        """Mark the files as being stored (before the flush that carries their rows);
        whether there was any to mark."""
        self._held = [(fd, _renamed(name, name + SENDING)) for fd, name in self._held]
        return bool(self._held)

    def unsent(self) -> None:
        """The flush failed: the files are pending again."""
        self._held = [(fd, _renamed(name, name.removesuffix(SENDING)))
                      for fd, name in self._held]

    def done(self) -> None:
        """Their rows are stored (or kept in a newer file): delete the files."""
        for _, name in self._held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        self.release()

    def release(self) -> None:
        """Let the files go as they are, for a later start."""
        for fd, _ in self._held:
            os.close(fd)
        self._held = []


def take(path: str | os.PathLike[str]) -> Carried:
    """The rows kept beside ``path`` (by :func:`keep`, or in ``path`` itself by an older
    release) that no live process holds, summed; their files held by this process."""
    base = pathlib.Path(path)
    carried = Carried()
    try:
        names = sorted(os.listdir(base.parent))
    except FileNotFoundError:
        return carried
    for name in names:
        if name == base.name or name.startswith(base.name + "."):
            _take_one(str(base.with_name(name)), carried)
    if not carried.rows:
        carried.done()      # nothing usable in them
    return carried


def _take_one(name: str, carried: Carried) -> None:
    """Add the file ``name`` to ``carried`` if no live process holds it (a ``.sending``
    one is read only to count what it drops, and deleted)."""
    fd = _hold(name)
    if fd is None:
        return
    rows, unreadable = _read(fd)
    if name.endswith(SENDING):
        carried.dropped += len(rows)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        os.close(fd)
        return
    carried.unreadable += unreadable
    for key, counts in rows.items():
        row = carried.rows.setdefault(key, {})
        for kind, value in counts.items():
            row[kind] = min(row.get(kind, 0) + value, COUNT_MAX)
    carried._held.append((fd, name))


def _hold(name: str) -> int | None:
    """``name`` opened and locked, or None when a live process holds it or it went (taken
    and renamed or deleted by another start meanwhile)."""
    try:
        fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(name).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _read(fd: int) -> tuple[Summed, int]:
    """The rows of one file, summed, and how many lines and values could not be read."""
    rows: Summed = {}
    unreadable = 0
    with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
        for line in fh:
            try:
                for day, tenant, model, counts in json.loads(line):
                    row = rows.setdefault((str(day), str(tenant), str(model)), {})
                    for kind, value in counts.items():
                        if _storable(value):
                            row[str(kind)] = min(row.get(str(kind), 0) + value, COUNT_MAX)
                        else:
                            unreadable += 1
            except (ValueError, TypeError, AttributeError):
                unreadable += 1
    return rows, unreadable


def _renamed(old: str, new: str) -> str:
    """``old`` renamed ``new``; the name it has now (``old`` when renaming failed: the
    rows then stay pending, at worst counted again by a start after a crash)."""
    try:
        os.rename(old, new)
    except OSError:
        return old
    return new


def _storable(value: object) -> bool:
    """A count or cost every store can hold: a finite number from 0 to ``COUNT_MAX``.
    Anything else (a file written before engines' counts were bounded, or edited by hand)
    would make every later flush to the store fail, the good rows with it."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= COUNT_MAX)
