"""Operator intent in ``<data_dir>/fleet_intent.json``: the store without Redis, and the
file format the Redis store's local copy (:mod:`controlplane.adapters.intent_copy`) uses.

Without ``redis.url`` the intent (cordons, drains, deployed engines: ``core.intent``) used
to live in the process's memory, so any restart (an OOM, an upgrade) silently un-cordoned
every node. :class:`FileIntentStore` keeps it in the data directory instead, with the
same compare-and-set as the Redis store (``FleetIntent.update`` relies on it).

**Format.** One JSON object: node name → that node's intent as JSON text (what
:class:`~controlplane.core.intent.IntentStore` passes around). Both stores read and write
it through :func:`read` and :func:`write` only, so a Redis copy can be picked up as the
intent when Redis is dropped from the config.

**Who writes.** Without Redis the control plane runs as one process:
``controlplane.workers.why_one`` refuses ``http.workers`` above one, since intent, limits
and usage would split between processes. Two processes can still meet on one file (a
rolling update onto the same volume, two control planes started from one directory), so
every operation holds an exclusive ``flock`` on a lock file beside it and reads the file
afresh: a compare-and-set compares against what is on disk, never a cached copy, and two
writers are serialised like two Redis clients (the Redis store's copy takes the same
lock). A file system without working ``flock`` (some NFS set-ups) loses that guarantee,
not the single-process one. The lock file is opened without following a symlink.

**Durability.** Every change is written whole to a temporary file (mode 0600: it names
nodes and what runs on them), flushed to disk, renamed over the file, and the folder is
flushed too, so a crash leaves the old file or the new one; the temporary file such a
crash leaves is removed by the next start. Once the rename is done the change is
reported stored even if flushing the folder fails (a WARNING says so): every reader
already sees it, and a refusal would have the operator retry what is there. The file is
small (a record per node) and changes only when an operator acts, so reading it on each
call, off the event loop, costs nothing that matters.

**Damage.** A file that is not what this module writes (cut short by a full disk, edited
by hand, not UTF-8) is renamed aside (``fleet_intent.json.damaged-<UTC time>``) with an
error line naming both paths, and the store starts empty: never a crash, and the damaged file is
kept for whoever wants to rebuild the intent from it. A file that cannot be read at all
(permissions, I/O) is an outage like Redis down: the load fails (the fleet keeps what it
applied) and a change is refused as not stored durably. A file that is a JSON object of
node name → text but holds a record that is not a node's intent is not damaged as a
whole: this module never parses records, and the core skips that one node with an error
line, applies the others, and replaces the record at the node's next change
(``core.intent``), the same rule as for a bad record in Redis. The file is left as it is
so the record can be mended by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import glob
import json
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger("synapse.controlplane.fleet")

FILE = "fleet_intent.json"
T = TypeVar("T")


class Damaged(ValueError):
    """The file holds something this module does not write."""


def read(path: pathlib.Path) -> dict[str, str] | None:
    """The records in ``path``; None when there is no file. Raises :class:`Damaged` for a
    file that is not the format, OSError when it cannot be read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:    # UnicodeDecodeError is a ValueError
        raise Damaged(f"not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise Damaged("not a JSON object of node name -> intent text")
    return data


def write(path: pathlib.Path, records: dict[str, str]) -> None:
    """Replace ``path`` with ``records`` atomically and durably (mode 0600); OSError when
    it cannot. Call it holding :func:`locked`."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))   # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(records, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _fsync_folder(path.parent)
    except OSError as exc:
        # The new file is in place and every reader sees it: reporting the change as not
        # stored would have the operator retry what is there. Only a power cut before the
        # folder reaches the disk could bring back the old file.
        log.warning("%s is written, but flushing its folder to disk failed (%s): a power "
                    "cut now could bring back the previous intent", path, exc)


def _fsync_folder(folder: pathlib.Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path: pathlib.Path) -> str:
    return f".{path.name}.tmp-"


def remove_stale_temps(path: pathlib.Path) -> None:
    """Remove temporary files of :func:`write` that a crash left beside ``path`` (between
    the write and the rename). Call it holding :func:`locked`: no write is under way then."""
    # Also the names the first release used: ".<name>." and mkstemp's eight characters.
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.tmp-.+|\.{name}\.[a-z0-9_]{{8}}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if not ours.fullmatch(stale.name):
            continue
        try:
            stale.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted write: %s", stale, exc)
            continue
        log.info("removed %s, left by an interrupted write of %s", stale, path.name)


def lock_file(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (see the module docstring). The lock file is
    never followed through a symlink: one planted there would create its target."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_file(path),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)     # released when fd closes
        yield
    finally:
        os.close(fd)


def read_or_set_aside(path: pathlib.Path) -> dict[str, str]:
    """The records in ``path`` (none without a file); a damaged file is set aside with an
    error line and reads as empty. Call it holding :func:`locked`."""
    try:
        return read(path) or {}
    except Damaged as exc:
        kept = set_aside(path)
        log.error("the operator intent in %s is damaged (%s): kept as %s, starting with "
                  "no cordons, drains or deployed engines; re-apply them with synapsectl",
                  path, exc, kept)
        return {}


def set_aside(path: pathlib.Path) -> pathlib.Path:
    """Rename a damaged ``path`` to a name of its own beside it; returns the new path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, target)
    return target


class FileIntentStore:
    """The intent store of a control plane without Redis (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.lock_path = lock_file(self.path)
        self._started = False       # stale temporary files removed

    async def load(self) -> dict[str, str]:
        return await self._run(self._records)

    async def get(self, node: str) -> str | None:
        return (await self.load()).get(node)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        def cas() -> bool:
            records = self._records()
            if records.get(node) != expected:
                return False
            records[node] = text
            write(self.path, records)
            return True
        return await self._run(cas)

    async def close(self) -> None:
        pass

    async def _run(self, operation: Callable[[], T]) -> T:
        def run_locked() -> T:
            with locked(self.path):
                if not self._started:
                    remove_stale_temps(self.path)
                    self._started = True
                return operation()
        return await asyncio.to_thread(run_locked)

    def _records(self) -> dict[str, str]:
        return read_or_set_aside(self.path)
