"""Usage counts a control plane could not store when it stopped, or could not store yet
while its store fails, kept on its disk until a later run has stored them.

A replica adds its pending usage counts to the shared store (Redis, or ``usage.sqlite``)
every few seconds (``core.usage_book``), in batches each with a random id that the store
applies at most once. When it stops while the store is unreachable, the counts not yet
stored would end with the process: requests served and never billed. Instead :func:`keep`
writes its unsent batches, with their ids, to a file beside
``<data_dir>/usage_pending.jsonl``, and the next start takes them back (:func:`take`) and
sends them, by the same ids, with its first flush.

Design decisions:

- **Exactly once, by the batch id.** A batch may have reached the store although its call
  failed (an answer lost to a time-out), and a file may be taken again after its batches
  were stored (the process was killed before deleting it, or the folder is read-only and
  it cannot be deleted at all). Both are harmless: the store ignores an id it applied
  (for as long as it remembers ids, the usage retention). So nothing here has to order a
  rename before a send, and a kill at any point loses at most what was recorded since
  the last flush that reached the store (never what a kept file holds).
- **A file per stop.** :func:`keep` writes ``usage_pending.jsonl.kept-<UTC time>-<pid>-
  <random>`` (one JSON object, format 2: ``{"format": 2, "batches": [{"id", "rows"}]}``,
  fsynced, written under a temporary name, removed on any error, and renamed whole, the
  folder fsynced then so that the name outlives a power loss before any file it replaces
  is deleted):
  the workers of a pod stopping together never share a file, and a start never takes a
  file still being written.
- **A spool while the store fails.** A stop's file alone left a hard kill (``kill -9``,
  the OOM killer, a lost node) during a long outage losing every batch the outage left
  unsent. So while a flush fails, the process also keeps its unsent batches in its own
  :class:`Spool` file (same format and writer), rewritten only when they changed and
  deleted once the store took them; a clean stop's file replaces it. It is taken back
  like a stop's file, but never while its process lives (it holds it locked). The
  process sends a batch id it spooled only with the content the file holds
  (:meth:`Spool.holds`, ``UsageBook.on_disk``): Redis marks a batch by chunks cut from
  its content, so two versions of one id could both count.
- **Older files.** A file of the first format (one JSON list of rows per line, as in a
  ``usage_pending.jsonl`` an older release appended to, or a ``.sending`` one a kill left
  behind) has no ids: it is read as one batch whose id is the hash of the file's bytes,
  so the same file taken again (a folder where it cannot be deleted) counts once. If
  such a file had been stored, wholly or partly, before (a kill during the flush that
  carried it), its rows count twice once — the old behaviour — and every later send of
  them is by id.
- **Held while pending.** :func:`take` holds each file under an exclusive ``flock`` for as
  long as its batches are pending in this process (the kernel drops the lock when the
  process dies, even by ``kill -9``), so two starting workers never take the same file;
  a file whose holder died is taken by the next start. :meth:`Carried.settle` deletes a
  file once all its batches are stored; a file that cannot be deleted (a read-only
  folder) is logged once as an ERROR and let go: the next start sends the same ids, which
  count nothing. Nothing done after :func:`take` raises.
- A line that does not parse, a batch or row that is malformed, and a value no store
  can hold (:func:`usage_book.storable`), is skipped alone and counted: the other rows
  and batches of the file are kept. A file that holds no usable row is deleted when it
  is read.
- Private: the files name tenants and their usage, so they are made 0600 (and a folder
  it has to make, 0700).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.core import usage_book
from controlplane.core.usage_book import COUNT_MAX, Batch

FILE = "usage_pending.jsonl"
FORMAT = 2
log = logging.getLogger("synapse.controlplane.fairness")

Rows = Mapping[tuple[str, str, str], Mapping[str, int | float]]   # (day, tenant, model) ->
Summed = dict[tuple[str, str, str], dict[str, int | float]]


def keep(path: str | os.PathLike[str], batches: Sequence[Batch]) -> pathlib.Path:
    """Write ``batches`` (ids and rows) to a new file beside ``path`` (named after it) and
    return its name (raises ``OSError`` when it cannot, leaving no file behind)."""
    base = pathlib.Path(path)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = base.with_name(f"{base.name}.kept-{stamp}-{os.getpid()}-{secrets.token_hex(4)}")
    _write(target, batches, hold=False)
    return target


def _write(target: pathlib.Path, batches: Sequence[Batch], hold: bool) -> int:
    """Write ``batches`` to ``target`` whole: fsynced under a temporary name no start
    takes, then renamed over it. With ``hold``, the file is locked (``flock``) before it
    has its name, and the returned descriptor keeps it locked; otherwise it is closed (-1).
    Raises ``OSError``, leaving no temporary file behind."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    writing = target.with_name(f".{target.name}.writing-{secrets.token_hex(4)}")
    text = json.dumps({"format": FORMAT, "batches": [
        {"id": b.id, "rows": [[*key, dict(counts)] for key, counts in b.rows.items()]}
        for b in batches]}) + "\n"
    fd = os.open(writing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hold:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(writing, target)
    except BaseException:
        _close(fd)
        with contextlib.suppress(OSError):
            os.unlink(writing)
        raise
    _sync_folder(target.parent)
    if hold:
        return fd
    _close(fd)
    return -1


class Spool:
    """This process's own file of the usage it has not stored while the store fails, so
    that a hard kill (``kill -9``, the OOM killer) in a long outage loses only what was
    recorded since the last flush, as when the store is up, and not every batch the
    outage left unsent.

    Named ``usage_pending.jsonl.spool-<pid>-<random>`` (a pid reused by a later container
    start never names the same file), the same format as a stop's file, and taken by
    :func:`take` at the next start like one. It is held under an exclusive ``flock`` for
    as long as this process owns it (locked before it gets its name, so there is no moment
    a sibling worker starting could take it); the kernel drops the lock when the process
    dies, and the next start takes it. Each write replaces the whole file
    (:func:`_write`), and only when what it would hold changed, so an outage with no
    traffic writes nothing. A file started after one was deleted or let go gets a fresh
    name: one let go (it could not be deleted) may be held by a sibling worker that took
    it and deletes it by name once stored, which would delete a live spool written over
    that name."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._base = pathlib.Path(path)
        self.name = self._fresh_name()
        self._named_a_file = False             # a file had this name (never reused)
        self._fd = -1                          # the file's, locked; -1 when there is none
        self._held: list[Batch] = []           # what the file holds

    def __bool__(self) -> bool:
        return self._fd >= 0

    def write(self, batches: Sequence[Batch]) -> bool:
        """Make the file hold ``batches`` (none: delete it); False when it held them
        already. Raises ``OSError`` (the file as it was, or none)."""
        batches = list(batches)
        if not batches:
            return self.clear()
        if self._fd >= 0 and batches == self._held:
            return False
        if self._fd < 0 and self._named_a_file:     # a new file: never over one let go
            self.name, self._named_a_file = self._fresh_name(), False
        fd = _write(self.name, batches, hold=True)
        _close(self._fd)                       # the file it replaced
        self._fd, self._held, self._named_a_file = fd, batches, True
        return True

    def _fresh_name(self) -> pathlib.Path:
        return self._base.with_name(
            f"{self._base.name}.spool-{os.getpid()}-{secrets.token_hex(4)}")

    def holds(self) -> list[Batch]:
        """The batches the file holds as this process wrote it (none: no file, or one
        let go)."""
        return list(self._held)

    def clear(self) -> bool:
        """Delete the file (its batches are stored, or kept in another file); False when
        there was none. Raises ``OSError`` when it cannot be deleted: then it is let go
        (unlocked), for a later start that sends its ids again, which count nothing."""
        if self._fd < 0:
            return False
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        except OSError:
            self.release()
            raise
        self.release()
        return True

    def release(self) -> None:
        """Let the file go as it is, for a later start (never raises)."""
        _close(self._fd)
        self._fd, self._held = -1, []


@dataclasses.dataclass(slots=True)
class _Held:
    fd: int                     # open and locked
    name: str
    ids: set[str]


class Carried:
    """The batches an earlier run kept, taken back by this process, and the files that
    hold them (held locked until :meth:`settle` deletes them or :meth:`release`)."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.unreadable = 0         # lines and values that could not be read
        self._held: list[_Held] = []

    def __bool__(self) -> bool:
        return bool(self._held)

    def ids(self) -> set[str]:
        """The batch ids the held files hold (on disk already)."""
        return {ident for held in self._held for ident in held.ids}

    @property
    def rows(self) -> Summed:
        """The rows of every batch, summed (for reports and tests)."""
        out: Summed = {}
        for batch in self.batches:
            _sum_into(out, [[*key, dict(counts)] for key, counts in batch.rows.items()])
        return out

    def settle(self, unsent: Iterable[str] = ()) -> None:
        """Delete the files none of whose batch ids is in ``unsent`` (all stored, or kept
        in a newer file); never raises (a file that cannot be deleted: one ERROR, let
        go, and sent again by id at the next start)."""
        waiting = set(unsent)
        kept: list[_Held] = []
        for held in self._held:
            if held.ids & waiting:
                kept.append(held)
                continue
            try:
                os.unlink(held.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("usage kept in %s is stored but the file cannot be deleted (%s): "
                          "the next start sends it again, and the store counts it once",
                          held.name, exc)
            _close(held.fd)
        self._held = kept

    def done(self) -> None:
        """Every batch is stored (or kept in a newer file): delete the files."""
        self.settle()

    def release(self) -> None:
        """Let the files go as they are, for a later start (never raises)."""
        for held in self._held:
            _close(held.fd)
        self._held = []


def take(path: str | os.PathLike[str]) -> Carried:
    """The batches kept beside ``path`` (by :func:`keep`, or in ``path`` itself by an
    older release) that no live process holds; their files held by this process. When it
    raises, it holds nothing."""
    base = pathlib.Path(path)
    carried = Carried()
    try:
        names = sorted(os.listdir(base.parent))
    except FileNotFoundError:
        return carried
    try:
        for name in names:
            if name == base.name or name.startswith(base.name + "."):
                _take_one(str(base.with_name(name)), carried)
    except BaseException:
        carried.release()
        raise
    carried.settle(b.id for b in carried.batches)     # files with nothing usable go
    return carried


def _take_one(name: str, carried: Carried) -> None:
    """Add the file ``name`` to ``carried`` if no live process holds it."""
    fd = _hold(name)
    if fd is None:
        return
    try:
        batches, unreadable = _read(fd)
    except BaseException:
        _close(fd)
        raise
    carried.unreadable += unreadable
    carried.batches += batches
    carried._held.append(_Held(fd, name, {b.id for b in batches}))


def _hold(name: str) -> int | None:
    """``name`` opened and locked, or None when a live process holds it or it went (taken
    and deleted by another start meanwhile)."""
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


def _read(fd: int) -> tuple[list[Batch], int]:
    """The batches of one file (format 2: with their ids; the first format: its rows
    summed as one batch whose id is the hash of the file's bytes), and how many lines,
    batches, rows and values were unreadable (each skipped alone)."""
    batches: list[Batch] = []
    old: Summed = {}
    unreadable = 0
    with os.fdopen(os.dup(fd), "rb") as fh:
        content = fh.read()
    for line in content.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            found = data.get("batches")
            listed: list[Any] = found if isinstance(found, list) else [found]
            for b in listed:
                try:
                    ident = _checked_id(b["id"])
                    rows: Summed = {}
                    unreadable += _sum_into(rows, b["rows"])
                except (ValueError, TypeError, KeyError):
                    unreadable += 1
                    continue
                if rows:
                    batches.append(Batch(ident, rows))
        else:
            try:
                unreadable += _sum_into(old, data)
            except (ValueError, TypeError, KeyError):
                unreadable += 1
    if old:
        # The same file always gives the same id, so one that cannot be deleted (a
        # read-only folder) and is taken at every start counts once.
        batches.append(Batch(hashlib.blake2b(content, digest_size=16).hexdigest(), old))
    return batches, unreadable


def _checked_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ValueError("bad batch id")
    return value


def _sum_into(out: Summed, rows: Any) -> int:
    """Add ``rows`` (a list of ``[day, tenant, model, {kind: value}]``) to ``out``; how
    many rows and values were skipped (malformed, or not storable: each alone). Raises
    ``TypeError`` when ``rows`` is not a list."""
    if not isinstance(rows, list):
        raise TypeError("rows are not a list")
    skipped = 0
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[3], dict)
                and all(isinstance(part, str) for part in row[:3])):
            skipped += 1
            continue
        day, tenant, model, counts = row
        clean, dropped = usage_book.storable_rows({(day, tenant, model): counts})
        skipped += dropped
        for key, plain in clean.items():
            summed = out.setdefault(key, {})
            for kind, value in plain.items():
                summed[kind] = min(summed.get(kind, 0) + value, COUNT_MAX)
    return skipped


def _sync_folder(folder: pathlib.Path) -> None:
    """Make the names in ``folder`` durable (its files' own contents are fsynced apart):
    a file renamed into place, then the files it replaces deleted, must not lose its name
    to a power loss. Never raises: the file has its name already, and a caller told
    otherwise would believe it still holds the old content. A folder the file system
    cannot sync (``EINVAL``) is left as it is; another error is a warning."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        log.warning("folder %s could not be opened to sync it (%s): a power loss may "
                    "lose the usage file just written there", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            log.warning("folder %s could not be synced (%s): a power loss may lose the "
                        "usage file just written there", folder, exc)
    finally:
        _close(fd)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
