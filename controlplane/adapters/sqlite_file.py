"""A private SQLite file in ``data_dir``: the one home of the rules that the L1 journal
(:mod:`controlplane.adapters.l1_journal`) and the usage file
(:mod:`controlplane.adapters.usage_db`) follow alike.

- **Private.** Both hold tenants' data (cached answers, usage): the file is made mode 0600
  before SQLite writes to it (its ``-wal`` and ``-shm`` files take the database file's
  mode; files made before this rule are tightened too), and a directory it has to create
  is made 0700. Under the usual umask they were 0644 and 0755, readable by every local
  user.
- **Damaged.** A file that is not a database, or a malformed one (``SQLITE_NOTADB``,
  ``SQLITE_CORRUPT``), is moved to ``<path>.corrupt-<UTC time>`` (its ``-wal`` and
  ``-shm`` beside it, with the same name so that SQLite opens the copy with them) and a
  new one started: kept, it would fail every write until an operator deleted it. Each
  copy gets a name of its own (a counter after the time when that name is taken, as the
  Milvus Lite store's copies and ``fleet_intent.json.damaged-<UTC time>`` do): a second
  damage never overwrites the copy of the first, which an operator may still be studying.
  The adapters may not import each other, so that naming is written here too. A name is
  claimed by a hard link, which fails when the name exists, and only then is the file
  unlinked from its own name: processes started together that all find the same damaged
  file (the workers of one pod) cannot pick the same name, where a check then a rename
  let a second one rename a fresh file over the first one's copy. Where the file system
  has no hard links, a rename after the check is the fallback.
- **One recovery at a time.** Processes that find the same damaged file together take
  turns: the recovery (set aside, start a new file) runs under an exclusive ``flock`` on
  ``<path>.lock`` (made 0600 beside it), and under it the name is checked to still be the
  file (``st_dev``, ``st_ino``) this process opened and found damaged. When another
  process has already replaced it, the new file is opened, not moved aside too: a name
  alone let one worker move another's fresh database aside while that one wrote to it.
  Where the lock file cannot be made (a read-only directory) recovery goes on unlocked.
- **Locked.** Any other failure (another process holding it locked) leaves the file alone:
  it belongs to a live process. The caller decides what it does without it.
- **Read-only.** A file that cannot be written (a read-only disk or file) is opened
  read-only (``mode=ro``), or, when SQLite cannot even take its read locks there, as an
  unchanging file (``immutable=1``).

What each file does in those cases (what it warns, what it keeps in memory) stays with
its own module: this one opens, says how it opened (:func:`open_recovering`), and applies
a batch of writes in one transaction (:func:`transaction`; connections are autocommit).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import itertools
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
UNWRITABLE_ERRNO = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
UNWRITABLE_SQLITE = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN})
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP})
SUFFIXES = ("", "-wal", "-shm")
WAL_RETRY_S = 0.01

Warn = Callable[[BaseException], None]

log = logging.getLogger("controlplane.adapters.sqlite_file")

Identity = tuple[int, int]      # (st_dev, st_ino)
_opened: dict[str, Identity] = {}   # path → the file this process last opened there


def damaged(exc: BaseException) -> bool:
    """The file is not a database, or a malformed one: only such a file is set aside
    (a locked one belongs to a live process)."""
    return isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorcode in DAMAGED


def unwritable(exc: BaseException) -> bool:
    """The file cannot be opened for writing (read-only disk or file)."""
    if isinstance(exc, sqlite3.DatabaseError):
        return exc.sqlite_errorcode in UNWRITABLE_SQLITE
    return isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNO


def open_private(path: str, schema: Sequence[str], busy_timeout_s: float) -> sqlite3.Connection:
    """``path`` read-write (made private first), in WAL mode, its ``schema`` statements
    run. Autocommit: the caller opens its own transactions."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        opened = os.fstat(fd)
    finally:
        os.close(fd)
    _opened[os.path.abspath(path)] = (opened.st_dev, opened.st_ino)
    for made in (path + suffix for suffix in SUFFIXES):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(made, 0o600)   # files made before this rule, too
    db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False,
                         isolation_level=None)
    try:
        _switch_to_wal(db, busy_timeout_s)
        db.execute("PRAGMA synchronous=NORMAL")
        for statement in schema:
            db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


def _switch_to_wal(db: sqlite3.Connection, busy_timeout_s: float) -> None:
    """``journal_mode=WAL``, retried for up to ``busy_timeout_s`` while the file is busy:
    SQLite answers "locked" at once, without waiting, to a connection that switches the
    mode of a new file while another connection switches it too (the workers of one pod
    starting on a new or just recovered file)."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(WAL_RETRY_S)


def transaction(db: sqlite3.Connection,
                statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
    """``statements`` applied in one transaction on an autocommit connection: all or none."""
    db.execute("BEGIN")
    try:
        for sql, args in statements:
            db.execute(sql, args)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def set_aside(path: str) -> str:
    """Move a damaged ``path`` (and its ``-wal`` and ``-shm``) to a name of its own, never
    one in use (claimed as the module docstring says), logged; returns that name."""
    for copy in _aside_names(path):
        if not _taken(copy) and move_to(path, copy):
            break
    log.warning("damaged SQLite file %s moved to %s", path, copy)
    return copy


def aside_name(path: str) -> str:
    """The first name :func:`set_aside` would try now (a name in use is never tried)."""
    return next(name for name in _aside_names(path) if not _taken(name))


def _aside_names(path: str) -> Iterator[str]:
    """``<path>.corrupt-<UTC time>``, then with a counter after the time."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    yield f"{path}.corrupt-{stamp}"
    for n in itertools.count(1):
        yield f"{path}.corrupt-{stamp}-{n}"


def _taken(name: str) -> bool:
    return any(os.path.lexists(name + suffix) for suffix in SUFFIXES)


def move_to(path: str, copy: str) -> bool:
    """``path`` and its companions moved to ``copy``; False, nothing moved, when another
    process took one of ``copy``'s names first."""
    try:
        return _link_all(path, copy)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    if _taken(copy):
        return False
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, copy + suffix)
    return True


def _link_all(path: str, copy: str) -> bool:
    """Each of ``path``'s files linked under ``copy``'s names, then unlinked from its own
    (unless another process has put a new file there meanwhile); False, the links made
    undone, when one of the names exists. Any other failure undoes them and raises."""
    linked: list[tuple[str, os.stat_result]] = []
    try:
        for suffix in SUFFIXES:
            try:
                os.link(path + suffix, copy + suffix, follow_symlinks=False)
            except FileNotFoundError:
                continue
            linked.append((suffix, os.lstat(copy + suffix)))
    except BaseException as exc:
        for suffix, _ in linked:
            os.unlink(copy + suffix)
        if isinstance(exc, FileExistsError):
            return False
        raise
    for suffix, moved in linked:
        _unlink_if_same(path + suffix, moved)
    return True


def _unlink_if_same(name: str, moved: os.stat_result) -> None:
    """Remove ``name`` when it is still the file that was linked aside."""
    try:
        now = os.lstat(name)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (moved.st_dev, moved.st_ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def open_read_only(path: str, probe: str, busy_timeout_s: float) -> sqlite3.Connection:
    """``path`` read as it is, or as an unchanging file when SQLite cannot take its read
    locks there. ``probe``: a table read to prove the connection works (SQLite opens
    lazily); the last failure is raised when neither way reads it."""
    base = "file:" + urllib.parse.quote(os.path.abspath(path))
    failure: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        db = sqlite3.connect(f"{base}?{mode}", uri=True, timeout=busy_timeout_s,
                             check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"SELECT count(*) FROM {probe}").fetchone()
        except sqlite3.Error as exc:
            db.close()
            failure = exc
            continue
        return db
    assert failure is not None
    raise failure


def open_recovering(path: str, schema: Sequence[str], probe: str, busy_timeout_s: float, *,
                    warn_set_aside: Warn, warn_read_only: Warn,
                    ) -> tuple[sqlite3.Connection, bool]:
    """``path`` opened by the rules above: the connection, and whether it is read-only.
    ``warn_set_aside`` is called before a damaged file is moved, ``warn_read_only`` once
    an unwritable one is open, each with the failure that led there. A locked file (or any
    failure the rules do not cover) raises, the file left alone."""
    try:
        return open_private(path, schema, busy_timeout_s), False
    except (OSError, sqlite3.DatabaseError) as exc:
        if damaged(exc):
            return reopen_set_aside(path, schema, busy_timeout_s, exc, warn_set_aside), False
        if unwritable(exc) and os.path.exists(path):
            db = open_read_only(path, probe, busy_timeout_s)
            warn_read_only(exc)
            return db, True
        raise


def reopen_set_aside(path: str, schema: Sequence[str], busy_timeout_s: float,
                     why: BaseException, warn: Warn) -> sqlite3.Connection:
    """A damaged ``path`` (``why`` says so) set aside after ``warn``, and a new one opened;
    one process at a time, and only while the name is still the file this process found
    damaged (module docstring)."""
    found = _opened.get(os.path.abspath(path))
    with _recovery_lock(path):
        if found is None or _identity(path) == found:
            warn(why)
            set_aside(path)
        return open_private(path, schema, busy_timeout_s)


def _identity(path: str) -> Identity | None:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return None
    return now.st_dev, now.st_ino


@contextlib.contextmanager
def _recovery_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` while held; none when that file cannot
    be made (a read-only directory): recovery then goes on as without the lock."""
    try:
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("no recovery lock beside %s (%s): recovering unlocked", path, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)    # releases the lock
