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
- Expiry times are wall-clock seconds (a monotonic clock does not survive a restart).
- Every SQLite call runs in a thread, one at a time (one connection, one lock).
- **Private.** It holds every tenant's cached answers: the file is made mode 0600 before
  SQLite writes to it (its ``-wal`` and ``-shm`` files take the database file's mode), and
  a directory it has to create is made 0700. Under the usual umask they were 0644 and
  0755, readable by every local user, whenever ``synapse controlplane`` ran with a
  ``data_dir`` that ``synapse up`` had not made (only ``synapse up`` tightens its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
from typing import Any

from synapse_common import aiotasks
from synapse_common import clock as clocks

SCHEMA = ("CREATE TABLE IF NOT EXISTS l1 (skey TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
          "model TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL NOT NULL)")
log = logging.getLogger("synapse.cache")
MATCH = "DELETE FROM l1 WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR model = ?2)"


@dataclasses.dataclass(frozen=True)
class Saved:
    skey: str
    tenant: str
    model: str
    value: bytes
    expires_at: float       # wall-clock seconds


class SqliteJournal:
    def __init__(self, path: str, flush_interval_s: float = 1.0,
                 sleep: clocks.Sleep = clocks.sleep) -> None:
        self.path = path
        self._interval = flush_interval_s
        self._sleep = sleep
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

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
        self._queue("INSERT OR REPLACE INTO l1 VALUES (?, ?, ?, ?, ?)",
                    (saved.skey, saved.tenant, saved.model, saved.value, saved.expires_at))

    def delete(self, skey: str) -> None:
        self._queue("DELETE FROM l1 WHERE skey = ?", (skey,))

    def delete_matching(self, tenant: str | None, model: str | None) -> None:
        self._queue(MATCH, (tenant, model))

    async def flush(self) -> None:
        ops, self._ops = self._ops, []
        if ops:
            await asyncio.to_thread(self._apply_sync, ops)

    async def close(self) -> None:
        self._closed = True
        await aiotasks.stop(self._task, quiet=True)
        await self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _queue(self, sql: str, args: tuple[Any, ...]) -> None:
        self._ops.append((sql, args))
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await self._sleep(self._interval)
        try:
            await self.flush()
        except Exception as exc:    # the entries stay in memory; only the copy lags
            log.warning("cache L1 journal %s: write failed: %s: %s", self.path,
                        type(exc).__name__, exc)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            for made in (self.path, self.path + "-wal", self.path + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(made, 0o600)   # files made before this rule, too
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as exc:
                self._db = self._open(set_aside=exc)
        return self._db

    def _open(self, set_aside: sqlite3.DatabaseError | None = None) -> sqlite3.Connection:
        """The journal's connection. ``set_aside``: the file could not be opened as a
        journal (a torn or foreign file): it is renamed ``<path>.corrupt`` and a new one
        started, or the journal would fail every write until an operator deleted it."""
        if set_aside is not None:
            log.warning("cache L1 journal %s is unreadable (%s: %s): moved to %s.corrupt, "
                        "starting an empty one", self.path, type(set_aside).__name__,
                        set_aside, self.path)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path + suffix, self.path + ".corrupt" + suffix)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _load_sync(self, now: float) -> list[Saved]:
        with self._lock:
            db = self._connect()
            db.execute("DELETE FROM l1 WHERE expires_at <= ?", (now,))
            found = db.execute("SELECT skey, tenant, model, value, expires_at FROM l1 "
                               "ORDER BY rowid").fetchall()
        return [Saved(str(k), str(t), str(m), bytes(v), float(e)) for k, t, m, v, e in found]

    def _apply_sync(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            db = self._connect()
            db.execute("BEGIN")
            try:
                for sql, args in ops:
                    db.execute(sql, args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
