"""Usage and budget spend on the control plane's disk (SQLite in ``data_dir``) when there
is no Redis, so a restart keeps them.

Why: without Redis the usage book and the budgets' spend lived only in the process's
memory. A restart on the same ``data_dir`` gave every tenant a fresh budget and
``synapsectl get usage`` forgot every earlier request; a tenant able to crash the control
plane reset its own budget that way.

- **Write-behind.** The serving path changes memory only (the usage book's pending counts,
  the local token store's spend). The usage flush loop, every
  ``fairness.usage.flush_interval_s``, writes the counts and the spends changed since its
  last round (each one transaction, in a thread); a clean stop writes the rest. A kill
  loses at most the last interval's usage and spend, with one exception that makes the
  bound useful: the charge that takes a budget's spend to its limit wakes the loop at
  once (``LocalTokenStore.on_budget_spent``), so a tenant whose control plane is killed
  right after it exceeded its budget finds it still spent after the restart (only that
  write's few milliseconds are at risk, not an interval's).
- **Read once.** The spends are loaded at start-up (periods that ended are deleted);
  usage reads (``/api/v1/stats``, Admin ``GetUsage``) read the file, off the serving path.
- **Bounded.** The usage rows of the newest ``retention_days`` days are kept (the rule of
  the in-memory store); a spend is deleted once its period has ended. Tokens-per-minute
  buckets are not kept: they refill within a minute anyway.
- **Private** (:mod:`controlplane.adapters.sqlite_file`). It names tenants and their
  usage: the file is made 0600 before SQLite writes to it (its ``-wal`` and ``-shm`` files
  take its mode), a folder it makes 0700.
- **Damaged, locked or read-only** (the rules of :mod:`controlplane.adapters.sqlite_file`,
  shared with the L1 journal, whose tests of those are the model): a file that is not a
  database is moved to ``<path>.corrupt`` and a new one started; one that cannot be
  opened otherwise (locked by another process) is left alone, one warning, and usage and
  spend stay in memory this run; one that cannot be written is read (spends restored, its
  usage readable) and this run's counts are kept in memory only (one warning).
- **One bad row stops no other.** A flush writes every tenant's rows in one transaction,
  so a row SQLite refuses (a count past int64, which only a journal kept by an earlier
  release can still hold: the engine's counts are capped where they are read) failed
  every flush, every tenant's, and the journal kept at the stop brought it back at the
  next start. Such a row is dropped, with a warning naming its tenant, model and day, and
  the others are written. Totals stop at int64's largest (SQLite would turn a sum past it
  into a float), and a value read is clamped to ``0 .. 2**63-1`` so ``GetUsage`` (uint64
  fields) can always answer.
- **Each batch once.** A flush's batch id is inserted into ``applied_batches`` in the
  same transaction as its rows; an id already there means the batch was applied (a flush
  whose answer was lost, a kept file sent again), and nothing is. Ids are pruned with the
  usage days they belong to (the newest ``retention_days``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.adapters import sqlite_file
from controlplane.core import usage_book

FILE = "usage.sqlite"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, tenant TEXT NOT NULL, "
    "model TEXT NOT NULL, kind TEXT NOT NULL, value NOT NULL, "
    "PRIMARY KEY (day, tenant, model, kind)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS spend (key TEXT PRIMARY KEY, spent REAL NOT NULL, "
    "expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS applied_batches (id TEXT PRIMARY KEY, day TEXT)",
)
INT64_MAX = usage_book.COUNT_MAX   # SQLite's largest integer
ADD = ("INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, tenant, model, kind) "
       f"DO UPDATE SET value = min(value + excluded.value, {INT64_MAX})")
PRUNE = ("DELETE FROM usage WHERE day NOT IN "
         "(SELECT DISTINCT day FROM usage ORDER BY day DESC LIMIT ?)")
PRUNE_BATCHES = ("DELETE FROM applied_batches WHERE day < (SELECT min(day) FROM "
                 "(SELECT DISTINCT day FROM usage ORDER BY day DESC LIMIT ?))")
log = logging.getLogger("synapse.controlplane.fairness")

Spends = Mapping[str, tuple[float, float]]     # budget key -> (spent, wall-clock end)
Rows = Mapping[tuple[str, str, str], usage_book.Plain]


class UsageDb:
    """A :class:`usage_book.UsageStore` on disk, and the budgets' spend beside it."""

    def __init__(self, path: str, retention_days: int, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self._retention = retention_days
        self._busy_timeout = busy_timeout_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.read_only = False
        self._memory = usage_book.MemoryUsageStore(retention_days)  # read-only: this run's

    # -- start and stop (blocking: before serving, after it) ------------------------------

    def open_now(self, wall_now: float) -> dict[str, tuple[float, float]]:
        """Open the file and return the spends of periods not yet ended (raises when it
        cannot be used at all; see the module's docstring)."""
        with self._lock:
            self._db, self.read_only = sqlite_file.open_recovering(
                self.path, SCHEMA, "spend", self._busy_timeout,
                warn_set_aside=self._warn_set_aside, warn_read_only=self._warn_read_only)
            try:
                return self._spends(wall_now)
            except sqlite3.DatabaseError as exc:   # opened, then found malformed
                if not sqlite_file.damaged(exc) or self.read_only:
                    raise
                self._close()
                self._db = sqlite_file.reopen_set_aside(self.path, SCHEMA, self._busy_timeout,
                                                        exc, self._warn_set_aside)
                return {}

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- the usage store ------------------------------------------------------------------

    async def add(self, rows: Rows, batch_id: str) -> None:
        rows = {key: counts for key, counts in rows.items() if _storable(*key, counts)}
        if self.read_only:
            await self._memory.add(rows, batch_id)
            return
        await asyncio.to_thread(self._add_sync, rows, batch_id)

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> dict[tuple[str, str, str], usage_book.Plain]:
        found = await asyncio.to_thread(self._read_sync, list(days), tenant)
        if self.read_only:
            for key, plain in (await self._memory.read(days, tenant)).items():
                counts = usage_book.counts_of(found.get(key, {}))
                counts.add(usage_book.counts_of(plain))
                found[key] = counts.as_dict()
        return found

    # -- the spends -----------------------------------------------------------------------

    async def save_spends(self, spends: Spends, wall_now: float) -> None:
        """Write the spends given and delete those whose period has ended."""
        if not self.read_only:
            await asyncio.to_thread(self._save_spends_sync, dict(spends), wall_now)

    # -- in a thread ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError(f"{self.path} is not open")
        return self._db

    def _transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            sqlite_file.transaction(self._conn(), statements)

    def _add_sync(self, rows: Rows, batch_id: str) -> None:
        newest = max((day for day, _, _ in rows), default="")
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                marked = db.execute("INSERT OR IGNORE INTO applied_batches VALUES (?, ?)",
                                    (batch_id, newest)).rowcount
                if marked:
                    db.executemany(ADD, [
                        (day, tenant, model, kind, value)
                        for (day, tenant, model), counts in rows.items()
                        for kind, value in counts.items() if value])
                    db.execute(PRUNE, (self._retention,))
                    db.execute(PRUNE_BATCHES, (self._retention,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read_sync(self, days: list[str], tenant: str | None,
                   ) -> dict[tuple[str, str, str], usage_book.Plain]:
        sql = (f"SELECT day, tenant, model, kind, value FROM usage "
               f"WHERE day IN ({','.join('?' * len(days))})")
        args: list[str] = list(days)
        if tenant is not None:
            sql, args = sql + " AND tenant = ?", [*args, tenant]
        with self._lock:
            found = self._conn().execute(sql, args).fetchall()
        out: dict[tuple[str, str, str], dict[str, int | float]] = {}
        for day, t, model, kind, value in found:
            out.setdefault((str(day), str(t), str(model)), {})[str(kind)] = (
                float(value) if kind == "cost" else _count(value))
        return dict(out)

    def _save_spends_sync(self, spends: dict[str, tuple[float, float]],
                          wall_now: float) -> None:
        self._transaction([
            *(("INSERT OR REPLACE INTO spend VALUES (?, ?, ?)", (key, spent, end))
              for key, (spent, end) in spends.items()),
            ("DELETE FROM spend WHERE expires_at <= ?", (wall_now,))])

    def _spends(self, wall_now: float) -> dict[str, tuple[float, float]]:
        db = self._conn()
        if not self.read_only:
            db.execute("DELETE FROM spend WHERE expires_at <= ?", (wall_now,))
        return {str(k): (float(s), float(e)) for k, s, e in db.execute(
            "SELECT key, spent, expires_at FROM spend WHERE expires_at > ?", (wall_now,))}

    def _warn_read_only(self, why: BaseException) -> None:
        log.warning("usage file %s cannot be written (%s: %s): its usage and budget "
                    "spend are restored read-only, and this run's are kept in memory "
                    "only", self.path, type(why).__name__, why)

    def _warn_set_aside(self, why: BaseException) -> None:
        log.warning("usage file %s is unreadable (%s: %s): moved to %s.corrupt, starting "
                    "an empty one (budgets restart from zero)", self.path,
                    type(why).__name__, why, self.path)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _storable(day: str, tenant: str, model: str, counts: usage_book.Plain) -> bool:
    """Whether every count of the row is one the stores hold (:func:`usage_book.storable`;
    else a warning: the row is dropped)."""
    bad = next(((kind, value) for kind, value in counts.items()
                if not usage_book.storable(kind, value)), None)
    if bad is None:
        return True
    kind, value = bad
    log.warning("usage of tenant %r, model %r on %s is dropped: its %s count (%s) is "
                "not one the usage file holds; the other rows are stored",
                tenant, model, day, kind, usage_book.shown(value))
    return False


def _count(value: Any) -> int:
    """A stored count as the readers take it: an integer from 0 to :data:`INT64_MAX` (a
    total an earlier release let grow past int64 is a float in the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return INT64_MAX if value > 0 else 0
    return int(min(max(value, 0), INT64_MAX))
