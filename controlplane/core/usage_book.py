"""Usage accounting per tenant x model x UTC day.

Each answered request adds to its row: ``requests``, ``prompt_tokens``,
``completion_tokens``, ``cached_tokens`` (prompt tokens the engine took from its prefix
cache), ``cache_hit_tokens`` (prompt + completion tokens of answers served from the
response cache: what the cache saved; they are not in the prompt and completion counts,
which are the engines' work), ``errors`` and ``cost`` (the price table's, of the engines'
work). The counts come from the engines' ``usage``: a stream whose client did not ask for
usage is asked for it anyway (the usage chunk is stripped before the client sees it). A
stream that ended without it (its client went away, the engine broke it off) is counted
from the control plane's estimate — the prompt's tokens and the content deltas relayed —
and ``estimated`` says how many of the row's requests were counted so.

Recording is a dict update on the serving path; a background loop adds the pending
counts to the shared store every ``fairness.usage.flush_interval_s`` (one store call
per flush and per chunk of its rows, whatever the traffic), so the admission path never
waits on it.
Reads merge the store with this replica's not-yet-flushed counts; other replicas' counts
lag by at most their flush interval.

Exactly once per batch: a flush takes the pending counts as a :class:`Batch` with a fresh
random id, and every store applies a batch id at most once (within the retention). A
store call can fail after the store applied it (a time-out on the answer), so a failed
batch is kept as it is, same id and same rows, and sent again first at the next flush;
the counts recorded meanwhile go to a new pending set and never into a batch already
tried. A retry is then harmless, whatever the first try did. Bounded: the rows of the
unsent batches and the pending ones are at most :data:`PENDING_MAX`; a store down for
long drops new rows beyond it, counted, rather than growing memory.

Kept on disk while the store fails (:meth:`UsageBook.spooled`): while an older batch
fails, the counts recorded meanwhile wait in the pending set, merged by row (so a long
outage holds one row per day, tenant and model, not one per flush). To put them on disk
with the unsent batches they are given an id reserved for them, and the spool file's
version of them is one batch that grows, under that id, only as the file is rewritten:
the process adopts the version the file holds (:meth:`UsageBook.on_disk`) and keeps what
was recorded since apart. A batch id is never sent with content other than a file's,
because a store applies a batch in parts (Redis, by chunks cut from its content, each
marked once): a smaller version on disk and a larger one sent, cut differently, would
both count after a kill. So the flush after the outage sends the file's version by the
reserved id and the counts recorded since the last rewrite as a new batch; a stop keeps
them the same way; and a rewrite that fails leaves both as they were (the file's older
version, and more counts apart). The file is written off the event loop while requests
go on recording, so :meth:`UsageBook.spooled` sets the pending counts it offers apart,
and those recorded during the write stay pending whatever the file took.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from synapse_common import clock as clocks

KINDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens",
         "cache_hit_tokens", "errors", "cost", "estimated")
PENDING_MAX = 50_000        # rows held while the store is failing
COUNT_MAX = 2**63 - 1       # the largest count every store holds (SQLite's, Redis's integer)
log = logging.getLogger("synapse.controlplane.fairness")


class RowKey(NamedTuple):
    day: str                # YYYY-MM-DD (UTC)
    tenant: str
    model: str


@dataclasses.dataclass(slots=True)
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_hit_tokens: int = 0
    errors: int = 0
    cost: float = 0.0
    estimated: int = 0          # requests whose tokens are the control plane's estimate

    def add(self, other: Counts) -> None:
        # Field by field rather than a loop over KINDS with getattr/setattr: every request
        # that ends adds its counts here (test_usage_book checks it covers every kind).
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_hit_tokens += other.cache_hit_tokens
        self.errors += other.errors
        self.cost += other.cost
        self.estimated += other.estimated

    def as_dict(self) -> dict[str, float | int]:
        return {kind: getattr(self, kind) for kind in KINDS}


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    key: RowKey
    counts: Counts


Plain = Mapping[str, int | float]      # a row's counts by kind, as stores hold them
PlainRows = Mapping[tuple[str, str, str], Plain]


def batch_id() -> str:
    """A fresh batch id: random, so replicas and restarts never reuse one."""
    return secrets.token_hex(16)


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Rows a flush sends as one: a store applies a batch id at most once."""
    id: str
    rows: PlainRows


class UsageStore(Protocol):
    async def add(self, rows: PlainRows, batch_id: str) -> None:
        """Add ``rows`` ((day, tenant, model) -> counts) to the stored totals, unless
        ``batch_id`` was applied already (then nothing)."""
        ...

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> Mapping[tuple[str, str, str], Plain]:
        """The stored totals of ``days`` (of one tenant, or all)."""
        ...


def storable(kind: str, value: object) -> bool:
    """Whether every store holds ``value`` as a ``kind`` count: the cost a finite number
    from 0, any other kind an integer (not a bool) from 0 to :data:`COUNT_MAX`. Anything
    else (a kept file edited by hand or written by an older release) a store refuses or
    mangles: Redis refuses ``HINCRBY`` on a field holding ``1.5``, SQLite stores NaN as
    NULL."""
    if isinstance(value, bool):
        return False
    if kind == "cost":
        return isinstance(value, int | float) and math.isfinite(value) and value >= 0
    return isinstance(value, int) and 0 <= value <= COUNT_MAX


def shown(value: object) -> str:
    """``value`` for a log line: a huge integer by its size, never its digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    return repr(value)[:40]


def storable_rows(rows: PlainRows) -> tuple[dict[tuple[str, str, str], Plain], int]:
    """``rows`` without the values no store holds (:func:`storable`), each dropped with a
    warning naming its day, tenant, model and kind; and how many were dropped."""
    out: dict[tuple[str, str, str], Plain] = {}
    dropped = 0
    for (day, tenant, model), counts in rows.items():
        kept: dict[str, int | float] = {}
        for kind, value in counts.items():
            if storable(kind, value):
                kept[kind] = value
            else:
                dropped += 1
                log.warning("usage of tenant %r, model %r on %s: its %s value (%s) is "
                            "dropped (not a count any store holds); the others are "
                            "stored", tenant, model, day, kind, shown(value))
        if kept:
            out[(day, tenant, model)] = kept
    return out, dropped


def counts_of(plain: Plain) -> Counts:
    c = Counts()
    for kind in KINDS:
        value = plain.get(kind, 0)
        setattr(c, kind, float(value) if kind == "cost" else int(value))
    return c


class MemoryUsageStore:
    """Usage kept in this process (no Redis configured), pruned to ``retention_days``."""

    def __init__(self, retention_days: int = 62) -> None:
        self._rows: dict[tuple[str, str, str], Counts] = {}
        self._applied: dict[str, str] = {}      # batch id -> its newest day
        self._retention = retention_days

    async def add(self, rows: PlainRows, batch_id: str) -> None:
        if batch_id in self._applied:
            return
        self._applied[batch_id] = max((k[0] for k in rows), default="")
        for key, counts in rows.items():
            self._rows.setdefault(key, Counts()).add(counts_of(counts))
        days = sorted({k[0] for k in self._rows})
        for old in days[:-self._retention]:
            for k in [k for k in self._rows if k[0] == old]:
                del self._rows[k]
        if days[:-self._retention]:
            first = days[-self._retention]
            self._applied = {b: d for b, d in self._applied.items() if d >= first}

    async def read(self, days: Sequence[str], tenant: str | None,
                   ) -> dict[tuple[str, str, str], Plain]:
        wanted = set(days)
        return {k: v.as_dict() for k, v in self._rows.items()
                if k[0] in wanted and (tenant is None or k[1] == tenant)}


def day_of(wall_s: float) -> str:
    """The UTC day of ``wall_s``, ``YYYY-MM-DD`` (memoised by day number: every request
    asks, and formatting a datetime costs more than the rest of the accounting)."""
    return _day_name(int(wall_s // 86_400))


@functools.lru_cache(maxsize=8)
def _day_name(day: int) -> str:
    return datetime.datetime.fromtimestamp(day * 86_400, datetime.UTC).strftime("%Y-%m-%d")


def days_since(wall_s: float, since_s: float) -> list[str]:
    """The UTC days from ``wall_s - since_s`` to ``wall_s``, oldest first."""
    first = datetime.datetime.fromtimestamp(wall_s - max(0.0, since_s), datetime.UTC).date()
    last = datetime.datetime.fromtimestamp(wall_s, datetime.UTC).date()
    out = []
    while first <= last:
        out.append(first.isoformat())
        first += datetime.timedelta(days=1)
    return out


class UsageBook:
    def __init__(self, store: UsageStore, wall: clocks.Clock = clocks.wall) -> None:
        self.store = store
        self._wall = wall
        self._pending: dict[RowKey, Counts] = {}
        self._unsent: list[Batch] = []      # tried and failed, oldest first: sent as they are
        self._unsent_rows = 0
        self._pending_id: str | None = None     # reserved once the pending set was offered
        self._spooled: Batch | None = None      # by that id: what the spool file holds
        self._offered: Batch | None = None      # the last :meth:`spooled` made of them
        self._offering: dict[RowKey, Counts] = {}   # their pending part, set apart
        self.dropped = 0            # rows lost while the store failed

    def record(self, tenant: str, model: str, counts: Counts) -> None:
        key = RowKey(day_of(self._wall()), tenant, model or "unknown")
        row = self._pending.get(key)
        if row is None:
            if (len(self._pending) + len(self._offering) + self._unsent_rows >= PENDING_MAX
                    and key not in self._offering
                    and (self._spooled is None or key not in self._spooled.rows)):
                self.dropped += 1
                return
            row = self._pending[key] = Counts()
        row.add(counts)

    async def flush(self) -> None:
        """Send the unsent batches, oldest first, then the pending counts as a new batch;
        a batch that fails stays unsent as it is (and the exception is the caller's to
        count). The pending counts wait while an older batch fails; those a spool file
        holds go first, as the file holds them, by its id."""
        self._unset()
        while self._unsent:
            batch = self._unsent[0]
            await self.store.add(batch.rows, batch.id)
            self._unsent.pop(0)
            self._unsent_rows -= len(batch.rows)
        if self._spooled is not None:
            batch, self._spooled, self._pending_id = self._spooled, None, None
            try:
                await self.store.add(batch.rows, batch.id)
            except BaseException:
                self._unsent.append(batch)      # tried: sent as it is from now on
                raise
            self._unsent_rows -= len(batch.rows)
        if not self._pending:
            return
        batch = self._take_pending()
        try:
            await self.store.add(batch.rows, batch.id)
        except BaseException:
            self._unsent.append(batch)
            self._unsent_rows += len(batch.rows)
            raise

    def pending_rows(self) -> dict[tuple[str, str, str], Plain]:
        """The counts recorded since the last flush or spool file took them, as a store
        takes them."""
        out: dict[RowKey, Counts] = {}
        for part in (self._offering, self._pending):
            for key, counts in part.items():
                out.setdefault(key, Counts()).add(counts)
        return {(k.day, k.tenant, k.model): v.as_dict() for k, v in out.items()}

    def pending(self) -> dict[tuple[str, str, str], Plain]:
        """Every count not stored yet (unsent batches and pending), summed."""
        out: dict[RowKey, Counts] = {}
        self._sum_into(out, None, None)
        return {(k.day, k.tenant, k.model): v.as_dict() for k, v in out.items()}

    def batches(self) -> list[Batch]:
        """What is not stored, as batches to keep: the unsent ones with their ids, the
        spool file's version of the pending counts by its id, and those recorded since as
        a new one (taken: a later flush sends them by these ids)."""
        self._unset()
        if self._spooled is not None:
            self._unsent.append(self._spooled)
            self._spooled = self._pending_id = None
        if self._pending:
            batch = self._take_pending()
            self._unsent.append(batch)
            self._unsent_rows += len(batch.rows)
        return list(self._unsent)

    def spooled(self) -> list[Batch]:
        """What is not stored, as batches to write to the spool file while the store
        fails, without taking anything: the unsent batches, and the pending counts (the
        file's version of them and those recorded since, merged) as one batch by the id
        reserved for them. Sent by that id only once :meth:`on_disk` says a file holds
        this version. The pending counts it offers are set apart until :meth:`on_disk`
        (what is recorded meanwhile, while the file is written off the event loop, is
        not in that version); only :meth:`record` and the reads may run in between."""
        self._unset()
        out = list(self._unsent)
        if self._pending or self._spooled is not None:
            if self._pending_id is None:
                self._pending_id = batch_id()
            rows: dict[tuple[str, str, str], Plain] = (
                dict(self._spooled.rows) if self._spooled is not None else {})
            for key, counts in self._pending.items():
                row = (key.day, key.tenant, key.model)
                if row in rows:
                    merged = counts_of(rows[row])
                    merged.add(counts)
                    rows[row] = merged.as_dict()
                else:
                    rows[row] = counts.as_dict()
            self._offered = Batch(self._pending_id, rows)
            out.append(self._offered)
        self._offering, self._pending = self._pending, {}
        return out

    def on_disk(self, batches: Iterable[Batch]) -> None:
        """The spool file holds ``batches`` (after a write, or a write that failed and
        left it as it was): when it holds the pending counts as the last :meth:`spooled`
        offered them, the file's batch is adopted, to be sent as it is, and the counts
        recorded since the offer stay pending beside it. Any other version is the one
        adopted already (or none): the counts offered are pending again."""
        offered = self._offered
        held = (next((b for b in batches if b.id == offered.id), None)
                if offered is not None else None)
        if offered is None or held is None or held != offered:
            self._unset()
            return
        old = len(self._spooled.rows) if self._spooled is not None else 0
        self._spooled, self._offered, self._offering = held, None, {}
        self._unsent_rows += len(held.rows) - old

    def _unset(self) -> None:
        """The pending counts the last offer set apart are pending again (no file took
        them), before the ones recorded since."""
        self._offered = None
        if not self._offering:
            return
        merged, self._offering = self._offering, {}
        for key, counts in self._pending.items():
            if key in merged:
                merged[key].add(counts)
            else:
                merged[key] = counts
        self._pending = merged

    def _take_pending(self) -> Batch:
        """The counts recorded since the spool file last took them, by a fresh id (the
        reserved one names the file's version only, taken first)."""
        batch = Batch(batch_id(), self.pending_rows())
        self._pending = {}
        self._pending_id = None
        return batch

    def unsent_ids(self) -> set[str]:
        """The ids of the batches not stored: the unsent ones and the spool file's
        version of the pending counts."""
        ids = {b.id for b in self._unsent}
        if self._spooled is not None:
            ids.add(self._spooled.id)
        return ids

    def restore(self, batches: Iterable[Batch]) -> None:
        """Batches an earlier run did not store, sent first (by their ids) at the next
        flush."""
        for batch in batches:
            self._unsent.append(batch)
            self._unsent_rows += len(batch.rows)

    def _sum_into(self, out: dict[RowKey, Counts], days: set[str] | None,
                  tenant: str | None) -> None:
        parts: list[Iterable[tuple[RowKey, Counts]]] = [
            ((RowKey(*k), counts_of(v)) for k, v in b.rows.items())
            for b in (*self._unsent, *([self._spooled] if self._spooled else []))]
        parts += [self._offering.items(), self._pending.items()]
        for part in parts:
            for key, counts in part:
                if ((days is None or key.day in days)
                        and (tenant is None or key.tenant == tenant)):
                    out.setdefault(key, Counts()).add(counts)

    async def query(self, tenant: str | None = None, since_s: float = 86_400.0) -> list[Row]:
        """Rows of the days overlapping the last ``since_s`` seconds, stored and pending,
        sorted by day, tenant, model."""
        days = days_since(self._wall(), since_s)
        stored = await self.store.read(days, tenant)
        totals = {RowKey(*k): counts_of(v) for k, v in stored.items()}
        self._sum_into(totals, set(days), tenant)
        return [Row(k, totals[k]) for k in sorted(totals, key=lambda k: (k.day, k.tenant,
                                                                        k.model))]


def totals(rows: Iterable[Row]) -> Counts:
    out = Counts()
    for r in rows:
        out.add(r.counts)
    return out
