"""The in-process L1's copy on disk (SQLite in ``data_dir``), so a restart keeps it.

Why: in embedded mode (no Redis) L1 lives in the control plane's memory, and the L2 rows
in the Milvus Lite file point into it. Without a copy on disk a restart would keep every
semantic row and lose every response they point to: no semantic entry would be servable
again. The journal makes the in-process L1 as durable as the Lite file beside it.

- **Write-behind.** ``put`` / ``delete`` / ``delete_matching`` only queue; one task applies
  the queue in one transaction at most every ``flush_interval_s`` (and ``close`` applies
  the rest), so the serving path never waits for the disk. A crash loses at most the last
  interval's writes — cache entries, which the next miss writes again.
- **Read once.** ``load`` (or ``load_now``, before the process serves) returns the live
  entries at start-up, oldest write first, and deletes the expired ones; reads never
  touch the disk afterwards.
- **Durable on demand.** ``flush`` applies the queue now, in order with the write-behind
  (one flush at a time): an invalidation awaits it, so a process killed right after one
  does not bring the invalidated entries back at its restart. ``flush_now`` is its blocking
  form for a process not serving yet (no event loop: ops queued then wait for it).
- **Damaged, locked or read-only** (the rules of :mod:`controlplane.adapters.sqlite_file`,
  shared with the usage file). A file that is not a database, or a malformed one, is
  moved to ``<path>.corrupt-<UTC time>`` and a new journal started (a copy of its own
  each time: an earlier copy is never overwritten). Any other failure to open or read
  it (another process holding it locked) leaves the file alone: one warning, and the
  journal is off for this run (L1 starts empty and is not kept). A file that cannot be
  written (a read-only disk) is opened read-only: its entries are restored, and changes
  are not kept (one warning).
- **Checked when read back.** Each entry is written with a checksum (BLAKE2b over its key,
  tenant, model, value and expiry, each field length-prefixed), kept in a table of its
  own (``l1_digest``) written in the same transaction. ``load`` drops an entry
  whose checksum does not match, with one warning per load naming how many went (and
  deletes it from the file): a byte changed on disk (a failing disk, a hand edit) inside
  a stored answer was served as a hit with the altered text. A dropped entry is a miss,
  which writes it again. The check runs only there: reads never touch the disk after the
  load, and the checksum is computed by the write-behind thread, off the serving path.
  It detects damage, not forgery (whoever can write the file can write a checksum too;
  the file is private for that). Entries an older release wrote have no checksum: they
  are taken as they are once (that release served them unchecked too) and given their
  checksum in the same load, rather than emptying every cache at the upgrade; a file
  opened read-only keeps them unchecked.
- **A rollback keeps writing.** The ``l1`` table is the one the release before the
  checksums made, column for column: that release inserts without naming columns, and a
  column added to it would fail every one of its writes after a rollback. Two triggers
  keep ``l1_digest`` true to ``l1`` whoever writes it: an insert (or a replace) or a
  delete of an entry deletes its checksum, which this release then writes after its own
  insert. An entry a rolled-back release wrote is therefore one without a checksum, taken
  as an older release's entry (above), never dropped as damaged. A file with the
  checksum column an unreleased build added to ``l1`` is read as it is (the column
  ignored).
- Expiry times are wall-clock seconds (a monotonic clock does not survive a restart).
- Every SQLite call runs in a thread, one at a time (one connection, one lock).
- **Private** (:mod:`controlplane.adapters.sqlite_file` too). It holds every tenant's
  cached answers: the file is made mode 0600 before SQLite writes to it (its ``-wal`` and
  ``-shm`` files take the database file's mode), and a directory it has to create is made
  0700. Under the usual umask they were 0644 and 0755, readable by every local user,
  whenever ``synapse controlplane`` ran with a ``data_dir`` that ``synapse up`` had not
  made (only ``synapse up`` tightens its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sqlite3
import threading
from typing import Any

from controlplane.adapters import sqlite_file
from synapse_common import aiotasks
from synapse_common import clock as clocks

SCHEMA = ("CREATE TABLE IF NOT EXISTS l1 (skey TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
          "model TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL NOT NULL)")
DIGESTS = (
    "CREATE TABLE IF NOT EXISTS l1_digest (skey TEXT PRIMARY KEY, digest BLOB NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS l1_digest_put AFTER INSERT ON l1 "
    "BEGIN DELETE FROM l1_digest WHERE skey = NEW.skey; END",
    "CREATE TRIGGER IF NOT EXISTS l1_digest_gone AFTER DELETE ON l1 "
    "BEGIN DELETE FROM l1_digest WHERE skey = OLD.skey; END")
SCHEMAS = (SCHEMA, *DIGESTS)
log = logging.getLogger("synapse.cache")
MATCH = "DELETE FROM l1 WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR model = ?2)"
PUT = "INSERT OR REPLACE INTO l1 (skey, tenant, model, value, expires_at) VALUES (?, ?, ?, ?, ?)"
PUT_DIGEST = "INSERT OR REPLACE INTO l1_digest (skey, digest) VALUES (?, ?)"
DIGEST_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Saved:
    skey: str
    tenant: str
    model: str
    value: bytes
    expires_at: float       # wall-clock seconds


class SqliteJournal:
    def __init__(self, path: str, flush_interval_s: float = 1.0,
                 sleep: clocks.Sleep = clocks.sleep, busy_timeout_s: float = 5.0) -> None:
        """``busy_timeout_s``: how long a call waits for a lock another process holds."""
        self.path = path
        self._busy_timeout = busy_timeout_s
        self._interval = flush_interval_s
        self._sleep = sleep
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()     # batches reach the disk in the order queued
        self._closed = False
        self._read_only = False             # opened read-only: changes are not kept
        self._off = False                   # could not be opened: not used this run

    @property
    def idle(self) -> bool:
        """Nothing queued and no write-behind scheduled or running."""
        return not self._ops and (self._task is None or self._task.done())

    async def load(self, now: float) -> list[Saved]:
        """The live entries, oldest write first (expired ones are deleted)."""
        return await asyncio.to_thread(self._load_sync, now)

    def load_now(self, now: float) -> list[Saved]:
        """:meth:`load`, blocking: for a process that has not begun serving yet."""
        return self._load_sync(now)

    def put(self, saved: Saved) -> None:
        self._queue(PUT, (saved,))      # its checksum is computed by the write-behind

    def delete(self, skey: str) -> None:
        self._queue("DELETE FROM l1 WHERE skey = ?", (skey,))

    def delete_matching(self, tenant: str | None, model: str | None) -> None:
        self._queue(MATCH, (tenant, model))

    async def flush(self) -> None:
        """Apply everything queued now (after any flush already under way)."""
        async with self._flushing:
            ops, self._ops = self._ops, []
            if ops:
                await asyncio.to_thread(self._apply_sync, ops)

    def flush_now(self) -> None:
        """:meth:`flush`, blocking: for a process that has not begun serving yet."""
        ops, self._ops = self._ops, []
        if ops:
            self._apply_sync(ops)

    async def close(self) -> None:
        self._closed = True
        await aiotasks.stop(self._task, quiet=True)
        await self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _queue(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._off or self._read_only:
            return
        self._ops.append((sql, args))
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:    # not serving yet: left for flush_now or the next flush
            return
        self._task = loop.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await self._sleep(self._interval)
        try:
            await self.flush()
        except Exception as exc:    # the entries stay in memory; only the copy lags
            log.warning("cache L1 journal %s: write failed: %s: %s", self.path,
                        type(exc).__name__, exc)

    def _connect(self) -> sqlite3.Connection:
        """The journal's connection, opened at first use (see the module's docstring for
        a damaged, locked or read-only file)."""
        if self._db is None:
            try:
                self._db, read_only = sqlite_file.open_recovering(
                    self.path, SCHEMAS, "l1", self._busy_timeout,
                    warn_set_aside=self._warn_set_aside, warn_read_only=self._warn_read_only)
            except Exception as exc:
                self._stop(exc)
                raise
            if read_only:
                self._read_only = True
                self._ops.clear()
        return self._db

    def _connect_set_aside(self, why: BaseException) -> None:
        try:
            self._db = sqlite_file.reopen_set_aside(self.path, SCHEMAS, self._busy_timeout,
                                                    why, self._warn_set_aside)
        except Exception as exc:
            self._stop(exc)
            raise

    def _stop(self, exc: BaseException) -> None:
        self._off = True
        self._ops.clear()
        log.warning("cache L1 journal %s could not be used (%s: %s): left as it is; "
                    "L1 starts empty and is not kept this run", self.path,
                    type(exc).__name__, exc)

    def _warn_set_aside(self, why: BaseException) -> None:
        log.warning("cache L1 journal %s is unreadable (%s: %s): moving it aside "
                    "(%s.corrupt-<UTC time>), starting an empty one", self.path,
                    type(why).__name__, why, self.path)

    def _warn_read_only(self, why: BaseException) -> None:
        log.warning("cache L1 journal %s cannot be written (%s: %s): its entries are "
                    "restored read-only, and changes are not kept this run", self.path,
                    type(why).__name__, why)

    def _load_sync(self, now: float) -> list[Saved]:
        with self._lock:
            try:
                return self._read(now)
            except Exception as exc:
                if self._off:                   # could not be opened (already said)
                    raise
                self._close_db()
                if not sqlite_file.damaged(exc):    # e.g. locked by another process
                    self._stop(exc)
                    raise
                self._connect_set_aside(exc)    # opened, then found malformed
        return []

    def _read(self, now: float) -> list[Saved]:
        """The live entries whose checksum matches (see the module docstring); the file
        made to hold only those, unless it is read-only."""
        db = self._connect()
        if not self._read_only:
            db.execute("DELETE FROM l1 WHERE expires_at <= ?", (now,))
        rows = db.execute(_select(db), (now,)).fetchall()
        found, damaged, unchecked = [], [], []
        for skey, tenant, model, value, expires_at, digest in rows:
            saved = _saved(skey, tenant, model, value, expires_at)
            if saved is None or (digest is not None and digest != _digest(saved)):
                damaged.append(skey)
                continue
            if digest is None:
                unchecked.append(saved)
            found.append(saved)
        if damaged:
            log.warning("cache L1 journal %s: %d entr%s failed the checksum (damaged on "
                        "disk) and were dropped", self.path, len(damaged),
                        "y" if len(damaged) == 1 else "ies")
        if not self._read_only and (damaged or unchecked):
            sqlite_file.transaction(db, [
                *(("DELETE FROM l1 WHERE skey = ?", (skey,)) for skey in damaged),
                *((PUT_DIGEST, (s.skey, _digest(s))) for s in unchecked)])
        return found

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _apply_sync(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            if self._off:
                return
            db = self._connect()
            if not self._read_only:
                sqlite_file.transaction(db, [statement for sql, args in ops
                                             for statement in _with_digest(sql, args)])


def _with_digest(sql: str, args: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
    """A queued write as SQLite takes it: a put's entry spelled out, then its checksum
    (after it: the insert's trigger deletes the entry's previous one)."""
    if sql != PUT:
        return [(sql, args)]
    (saved,) = args
    return [(sql, (saved.skey, saved.tenant, saved.model, saved.value, saved.expires_at)),
            (PUT_DIGEST, (saved.skey, _digest(saved)))]


def _select(db: sqlite3.Connection) -> str:
    """The live entries with their checksums (NULL for none), oldest write first; a file
    opened read-only may predate the checksum table."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "l1_digest" not in tables:
        return ("SELECT skey, tenant, model, value, expires_at, NULL FROM l1 "
                "WHERE expires_at > ? ORDER BY rowid")
    return ("SELECT l1.skey, tenant, model, value, expires_at, l1_digest.digest FROM l1 "
            "LEFT JOIN l1_digest ON l1_digest.skey = l1.skey "
            "WHERE expires_at > ? ORDER BY l1.rowid")


def _digest(saved: Saved) -> bytes:
    """The checksum of an entry: BLAKE2b over its fields, each length-prefixed so that no
    two entries spell the same bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for field in (saved.skey.encode(), saved.tenant.encode(), saved.model.encode(),
                  saved.value, repr(float(saved.expires_at)).encode()):
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.digest()


def _saved(skey: Any, tenant: Any, model: Any, value: Any, expires_at: Any) -> Saved | None:
    """A row as an entry, or None when its columns do not hold what an entry is made of
    (damage that changed a value's type)."""
    if not (isinstance(skey, str) and isinstance(tenant, str) and isinstance(model, str)
            and isinstance(value, bytes) and isinstance(expires_at, int | float)):
        return None
    return Saved(skey, tenant, model, value, float(expires_at))
