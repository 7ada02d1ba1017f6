"""The usage an earlier run kept on disk survives until a flush has stored it, and is
counted once however often it is sent: each kept batch carries its id, which the store
applies once (:mod:`controlplane.adapters.usage_journal`)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from controlplane.adapters import redis_limits, redis_usage, usage_db, usage_journal
from controlplane.api import fairness_wiring
from controlplane.api import services as services_mod
from controlplane.core import usage_book
from synapse_common import clock as clocks
from tests import harness
from tests.controlplane import cp_testing as t

ROW = ("2026-12-06", "a", "llama")


def files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.glob(usage_journal.FILE + "*"))


def kept(path: pathlib.Path, rows: usage_book.PlainRows) -> None:
    usage_journal.keep(path, [usage_book.Batch(usage_book.batch_id(), dict(rows))])


def flushed(book: usage_book.UsageBook) -> Any:
    return lambda: book.pending() == {}


def take_then_die(path: pathlib.Path) -> None:
    """A control plane that took the kept rows back and was killed (``kill -9``) before a
    flush stored them."""
    code = ("import os, signal, sys\n"
            "from controlplane.adapters import usage_journal\n"
            "carried = usage_journal.take(sys.argv[1])\n"
            "assert carried.rows\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_rows_taken_back_survive_a_kill_before_any_flush_stored_them(
        tmp_path: pathlib.Path) -> None:
    """Probe finding: the start deleted the file at once; killed while the store was still
    down, the next start found nothing and the usage was never billed."""
    path = tmp_path / usage_journal.FILE
    kept(path, {ROW: {"requests": 3, "cost": 0.5}})
    take_then_die(path)
    carried = usage_journal.take(path)
    assert carried.rows == {ROW: {"requests": 3, "cost": 0.5}}
    carried.done()
    assert files(tmp_path) == []


def test_rows_a_live_process_holds_are_not_taken_by_another_start(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / usage_journal.FILE
    kept(path, {ROW: {"requests": 3}})
    first = usage_journal.take(path)
    assert first.rows == {ROW: {"requests": 3}}
    assert usage_journal.take(path).rows == {}      # the workers of a pod start together
    first.settle({first.batches[0].id})             # its flush failed: still held
    assert usage_journal.take(path).rows == {}
    first.release()                                 # the process stops
    again = usage_journal.take(path)
    assert again.rows == {ROW: {"requests": 3}} and again.batches[0] == first.batches[0]
    again.release()


async def test_a_file_taken_again_after_its_flush_stored_it_is_counted_once(
        tmp_path: pathlib.Path) -> None:
    """Review finding: a kill while the store hung dropped the rows as "maybe stored"; a
    kill after the flush stored them and before the file went would have counted them
    twice. Now the next start sends the same batch ids, and the store ignores them."""
    path = tmp_path / usage_journal.FILE
    kept(path, {ROW: {"requests": 3}, ("2026-12-06", "b", "llama"): {"requests": 1}})
    db = usage_db.UsageDb(str(tmp_path / usage_db.FILE), 62)
    db.open_now(clocks.wall())
    for _ in range(2):          # the first start is killed after its flush, before settle
        carried = usage_journal.take(path)
        book = usage_book.UsageBook(db)
        book.restore(carried.batches)
        await book.flush()
        carried.release()
    carried = usage_journal.take(path)
    book = usage_book.UsageBook(db)
    book.restore(carried.batches)
    await book.flush()
    carried.settle(book.unsent_ids())
    assert files(tmp_path) == []
    found = await db.read(["2026-12-06"], None)
    assert found == {ROW: {"requests": 3}, ("2026-12-06", "b", "llama"): {"requests": 1}}
    db.close()


def test_a_file_of_the_first_format_is_one_batch_with_an_id_of_its_bytes(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / usage_journal.FILE
    path.write_text('[["2026-12-06", "a", "llama", {"requests": 2}]]\n'
                    '[["2026-12-06", "a", "llama", {"requests": 1}]]\n')
    carried = usage_journal.take(path)
    (batch,) = carried.batches
    assert dict(batch.rows) == {ROW: {"requests": 3}} and len(batch.id) == 32
    carried.release()
    (again,) = usage_journal.take(path).batches
    assert again.id == batch.id


async def test_a_first_format_file_that_cannot_be_deleted_counts_once_over_many_starts(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a first-format file got a fresh id at every take, so a read-only
    data dir counted it again at every start (5, 10, 15)."""
    path = tmp_path / usage_journal.FILE
    path.write_text('[["2026-12-06", "a", "llama", {"requests": 5}]]\n')
    real = os.unlink

    def read_only(name: Any, *args: Any, **kwargs: Any) -> Any:
        if usage_journal.FILE in str(name):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", read_only)
    store = usage_book.MemoryUsageStore()
    for _ in range(3):
        carried = usage_journal.take(path)
        book = usage_book.UsageBook(store)
        book.restore(carried.batches)
        await book.flush()
        carried.settle(book.unsent_ids())
    assert (await store.read(["2026-12-06"], None))[ROW]["requests"] == 5
    assert path.exists()


def test_a_malformed_row_or_batch_of_a_kept_file_loses_only_itself(
        tmp_path: pathlib.Path) -> None:
    """Review finding: a format-2 file is one line holding every batch; one malformed row
    dropped the line, every batch after it with it, and the file was then deleted."""
    path = tmp_path / usage_journal.FILE
    row = [*ROW, {"requests": 1}]
    (tmp_path / (usage_journal.FILE + ".kept-x")).write_text(json.dumps({
        "format": 2, "batches": [
            {"id": "b1", "rows": [row]},
            {"id": "b2", "rows": [row, ["2026-12-06", "a", {"requests": 1}]]},
            {"rows": [row]},
            {"id": "b3", "rows": [["2026-12-06", "u", "llama", {"requests": 1000}]]},
            {"id": "b4", "rows": [row, ["2026-12-06", "v", "llama", {
                "requests": 1.5, "errors": True, "prompt_tokens": -1,
                "completion_tokens": 2**63, "cost": float("inf"), "cached_tokens": 4}]]},
        ]}) + "\n")
    carried = usage_journal.take(path)
    assert [(b.id, dict(b.rows)) for b in carried.batches] == [
        ("b1", {ROW: {"requests": 1}}), ("b2", {ROW: {"requests": 1}}),
        ("b3", {("2026-12-06", "u", "llama"): {"requests": 1000}}),
        ("b4", {ROW: {"requests": 1}, ("2026-12-06", "v", "llama"): {"cached_tokens": 4}})]
    assert carried.unreadable == 2 + 5
    carried.settle(["b3"])
    assert files(tmp_path) != []
    carried.release()


def test_a_write_that_fails_leaves_no_temporary_file(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: ``keep`` left ``.usage_pending.jsonl.writing-*`` on a full disk."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        kept(tmp_path / usage_journal.FILE, {ROW: {"requests": 3}})
    assert os.listdir(tmp_path) == []


def test_a_take_that_fails_midway_holds_no_file(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a take that raised left the files it had taken locked for the
    process's life, so no later take (this process's or another's) had them."""
    path = tmp_path / usage_journal.FILE
    kept(path, {ROW: {"requests": 3}})
    kept(path, {ROW: {"requests": 4}})
    real, calls = os.fstat, []

    def failing(fd: int) -> Any:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(fd)
    monkeypatch.setattr(os, "fstat", failing)
    with pytest.raises(OSError):
        usage_journal.take(path)
    monkeypatch.setattr(os, "fstat", real)
    carried = usage_journal.take(path)
    assert carried.rows == {ROW: {"requests": 7}}
    carried.release()


async def test_kept_usage_is_stored_once_redis_comes_back_and_only_then_deleted(
        tmp_path: pathlib.Path, redis_server: harness.RedisServer) -> None:
    """The replica starts while Redis is down: the kept rows stay on disk (a kill now
    would not lose them) until Redis is back and a flush stored them, once."""
    day = usage_book.day_of(clocks.wall())
    kept(tmp_path / usage_journal.FILE, {(day, "a", "llama"): {"requests": 7}})
    redis_server.kill()
    s = t.settings(redis={"url": redis_server.url, "timeout_s": 0.2}, data_dir=str(tmp_path),
                   fairness={"usage": {"flush_interval_s": 0.1}})
    async with t.running(s) as cp:
        failures = cp.services.metrics.registry.get_sample_value
        await harness.until(lambda: (failures("synapse_usage_flush_failures_total") or 0)
                            >= 2, 20, "flushes failing while Redis is down")
        assert len(files(tmp_path)) == 1
        redis_server.start()
        await harness.until(lambda: files(tmp_path) == [], 20, "deleted once stored")
        book = fairness_wiring.get(cp.services).book
        assert book is not None and book.pending() == {}
        stored = await book.store.read([day], "a")
        assert stored[(day, "a", "llama")]["requests"] == 7
    assert files(tmp_path) == []


async def test_a_read_only_data_dir_counts_the_kept_usage_once_over_many_starts(
        tmp_path: pathlib.Path, redis_server: harness.RedisServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Review finding (high): the kept file could not be deleted on a read-only data dir;
    the failed delete killed the flusher and made the stop raise, and every start billed
    the same rows again (7, 14, 21). Now each start sends the same batch id, which Redis
    applies once; the flusher goes on and the stop is clean."""
    day = usage_book.day_of(clocks.wall())
    kept(tmp_path / usage_journal.FILE, {(day, "a", "llama"): {"requests": 7}})

    def read_only(real: Any) -> Any:
        def call(name: Any, *args: Any, **kwargs: Any) -> Any:
            if usage_journal.FILE in str(name):
                raise OSError(errno.EROFS, "Read-only file system")
            return real(name, *args, **kwargs)
        return call
    for name in ("unlink", "replace", "rename"):
        monkeypatch.setattr(os, name, read_only(getattr(os, name)))
    s = t.settings(redis={"url": redis_server.url}, data_dir=str(tmp_path),
                   fairness={"usage": {"flush_interval_s": 0.1}})
    with caplog.at_level(logging.ERROR, "synapse.controlplane.fairness"):
        for _ in range(3):
            async with t.running(s) as cp:
                book = fairness_wiring.get(cp.services).book
                assert book is not None
                await harness.until(flushed(book), 10, "the first flush")
                book.record("b", "llama", usage_book.Counts(requests=1))
                await harness.until(flushed(book), 10, "the flusher goes on")
                stored = await book.store.read([day], None)
                assert stored[(day, "a", "llama")]["requests"] == 7
    assert stored[(day, "b", "llama")]["requests"] == 3
    assert len(files(tmp_path)) == 1
    assert sum("cannot be deleted" in r.getMessage() for r in caplog.records) == 3


# -- the spool: what a failing store left unsent survives a hard kill ---------------------


class Switch:
    """A usage store that fails while ``down`` (an outage) and stores, once per batch id,
    when it is back (in memory, or in ``stored``)."""

    def __init__(self, stored: Any = None) -> None:
        self.down = True
        self.stored = stored or usage_book.MemoryUsageStore()

    async def add(self, rows: usage_book.PlainRows, batch_id: str) -> None:
        if self.down:
            raise ConnectionError("usage store unreachable")
        await self.stored.add(rows, batch_id)

    async def read(self, days: Any, tenant: str | None) -> Any:
        return await self.stored.read(days, tenant)


def start(tmp_path: pathlib.Path, store: Any) -> Any:
    """A process's fairness state (not its app): its services and its usage book on
    ``store``."""
    svc = services_mod.build(t.settings(data_dir=str(tmp_path)))
    fair = fairness_wiring.get(svc)
    assert fair.book is not None
    fair.book.store = store
    return svc, fair


def spools(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.glob(usage_journal.FILE + ".spool-*"))


KILLED_IN_AN_OUTAGE = """
import asyncio, os, signal, sys
from controlplane.adapters import usage_journal
from controlplane.api import fairness_wiring
from controlplane.api import services as services_mod
from controlplane.core import usage_book
from tests.controlplane import test_usage_journal as here

async def main() -> None:
    svc, fair = here.start(here.pathlib.Path(sys.argv[1]), here.Switch())
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    failures = fairness_wiring.FlushFailures(svc.clock)
    for i in range(5):          # the store is down for five flushes, traffic goes on
        fair.book.record("a", "llama", usage_book.Counts(requests=1, cost=0.5))
        if i == 2:
            fair.book.record("b", "llama", usage_book.Counts(requests=4))
        await fairness_wiring._flush(svc, fair, None, failures, None, spool)
    fair.book.record("a", "llama", usage_book.Counts(requests=100))  # since the last flush
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def killed_in_an_outage(folder: pathlib.Path) -> None:
    root = str(pathlib.Path(__file__).resolve().parents[2])     # for ``tests``
    done = subprocess.run([sys.executable, "-c", KILLED_IN_AN_OUTAGE, str(folder)],
                          check=False, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == -signal.SIGKILL


async def test_usage_a_failing_store_left_unsent_survives_a_kill_and_is_stored_once(
        tmp_path: pathlib.Path) -> None:
    """The gap: a store down for long, then ``kill -9`` (no stop, no kept file) lost every
    batch the outage left unsent. Now each failing flush spools them, and the next start
    takes them back; a kill loses only what was recorded since the last flush."""
    killed_in_an_outage(tmp_path)
    assert len(spools(tmp_path)) == 1
    day = usage_book.day_of(clocks.wall())
    store = usage_book.MemoryUsageStore()
    expected = {(day, "a", "llama"): {**usage_book.Counts(requests=5, cost=2.5).as_dict()},
                (day, "b", "llama"): {**usage_book.Counts(requests=4).as_dict()}}
    for _ in range(2):          # the first start is killed after its flush, before settle
        svc, fair = start(tmp_path, store)
        carried = fairness_wiring._restore(svc, fair.book)
        assert carried is not None and carried.rows.keys() == expected.keys()
        await fair.book.flush()
        carried.release()
        assert await store.read([day], None) == expected    # once, whatever is sent again
    svc, fair = start(tmp_path, store)
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    carried = fairness_wiring._restore(svc, fair.book)
    await fairness_wiring._flush(svc, fair, None, None, carried, spool)
    assert files(tmp_path) == [] and not spool
    assert await store.read([day], None) == expected


async def test_the_spool_is_rewritten_when_what_is_unsent_changes_and_deleted_once_stored(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Switch()
    svc, fair = start(tmp_path, store)
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    real, writes = usage_journal._write, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(usage_journal, "_write", counted)

    async def flush() -> None:
        await fairness_wiring._flush(svc, fair, None, None, None, spool)

    await flush()                               # nothing recorded: nothing to keep
    assert writes == [] and spools(tmp_path) == []
    fair.book.record("a", "llama", usage_book.Counts(requests=1))
    await flush()
    assert len(writes) == 1 and spools(tmp_path) == [spool.name]
    assert spool.name.stat().st_mode & 0o777 == 0o600
    for _ in range(3):                          # the outage goes on, no traffic
        await flush()
    assert len(writes) == 1
    fair.book.record("a", "llama", usage_book.Counts(requests=2))
    await flush()                               # new counts wait behind the failing batch
    assert len(writes) == 2
    on_disk = json.loads(spool.name.read_text())["batches"]
    assert [b["id"] for b in on_disk] == [b.id for b in fair.book.spooled()]
    await flush()
    assert len(writes) == 2
    store.down = False
    await flush()
    assert spools(tmp_path) == [] and not spool and len(writes) == 2
    day = usage_book.day_of(clocks.wall())
    assert (await store.read([day], None))[(day, "a", "llama")]["requests"] == 3
    store.down = True                           # a new outage: a new file, as before
    fair.book.record("a", "llama", usage_book.Counts(requests=1))
    await flush()
    assert spools(tmp_path) == [spool.name] and len(writes) == 3
    spool.release()


async def test_a_spool_write_that_fails_is_warned_of_and_the_flushes_go_on(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    store = Switch()
    svc, fair = start(tmp_path, store)
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    failures = fairness_wiring.FlushFailures(svc.clock)
    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.WARNING, "synapse.controlplane.fairness"):
        for _ in range(4):
            fair.book.record("a", "llama", usage_book.Counts(requests=1))
            await fairness_wiring._flush(svc, fair, None, failures, None, spool)
    spooled = [r.getMessage() for r in caplog.records if str(spool.name) in r.getMessage()]
    assert len(spooled) == 1 and "No space left on device" in spooled[0]
    assert os.listdir(tmp_path) == []           # no spool, no temporary file
    monkeypatch.setattr(os, "fsync", real)
    await fairness_wiring._flush(svc, fair, None, failures, None, spool)   # written now
    assert spools(tmp_path) == [spool.name]
    store.down = False
    await fairness_wiring._flush(svc, fair, None, failures, None, spool)
    day = usage_book.day_of(clocks.wall())
    assert (await store.read([day], None))[(day, "a", "llama")]["requests"] == 4
    assert spools(tmp_path) == []


async def test_a_sibling_worker_starting_never_takes_a_live_workers_spool(
        tmp_path: pathlib.Path) -> None:
    """Workers of one pod share ``data_dir``: one that starts while another spools (the
    store down) must not take its batches, or both would hold them."""
    svc, fair = start(tmp_path, Switch())
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    for _ in range(3):
        fair.book.record("a", "llama", usage_book.Counts(requests=1))
        await fairness_wiring._flush(svc, fair, None, None, None, spool)
        sibling_svc, sibling = start(tmp_path, Switch())
        taken = fairness_wiring._restore(sibling_svc, sibling.book)
        assert taken is not None and taken.rows == {} and sibling.book.pending() == {}
        assert spools(tmp_path) == [spool.name]
    spool.release()                             # the worker is killed: the kernel unlocks
    again = usage_journal.take(fairness_wiring._journal(svc))
    day = usage_book.day_of(clocks.wall())
    assert again.rows[(day, "a", "llama")]["requests"] == 3
    again.release()


async def test_a_stop_keeps_what_the_spool_held_in_its_own_file_and_then_drops_the_spool(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, fair = start(tmp_path, Switch())
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    fair.book.record("a", "llama", usage_book.Counts(requests=1))
    await fairness_wiring._flush(svc, fair, None, None, None, spool)
    fair.book.record("a", "llama", usage_book.Counts(requests=2))
    await fairness_wiring._flush(svc, fair, None, None, None, spool)
    fair.book.record("b", "llama", usage_book.Counts(requests=5))     # since the last flush

    def refused(*args: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")
    with monkeypatch.context() as m:            # a stop that cannot write its file
        m.setattr(usage_journal, "keep", refused)
        fairness_wiring._keep(svc, fair.book, None, spool)
    assert spools(tmp_path) == [spool.name]     # still there, and let go for a later start
    day = usage_book.day_of(clocks.wall())
    taken = usage_journal.take(fairness_wiring._journal(svc))
    assert taken.rows == {(day, "a", "llama"): {**usage_book.Counts(requests=3).as_dict()}}
    taken.release()
    (earlier,) = spools(tmp_path)
    svc, fair = start(tmp_path, Switch())       # the next start, the store still down
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    carried = fairness_wiring._restore(svc, fair.book)
    fair.book.record("b", "llama", usage_book.Counts(requests=5))
    await fairness_wiring._flush(svc, fair, None, None, carried, spool)
    assert spools(tmp_path) == sorted([earlier, spool.name])
    (own,) = json.loads(spool.name.read_text())["batches"]      # not what it took back
    assert own["rows"] == [[day, "b", "llama", usage_book.Counts(requests=5).as_dict()]]
    fairness_wiring._keep(svc, fair.book, carried, spool)
    (only,) = files(tmp_path)
    assert ".kept-" in only.name
    taken = usage_journal.take(fairness_wiring._journal(svc))
    assert taken.rows == {(day, "a", "llama"): {**usage_book.Counts(requests=3).as_dict()},
                          (day, "b", "llama"): {**usage_book.Counts(requests=5).as_dict()}}
    taken.release()


# -- the spooled version of the waiting counts is the one sent by their id ----------------


KILLED_IN_THE_RECOVERY = """
import asyncio, os, signal, sys
from controlplane.adapters import redis_limits, redis_usage, usage_journal
from controlplane.api import fairness_wiring
from controlplane.core import usage_book
from tests.controlplane import test_usage_journal as here

async def main() -> None:
    folder, url, kill_at = here.pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    redis_usage.CHUNK_FIELDS = 2
    store = here.Switch(redis_usage.RedisUsageStore(redis_limits.connect(url), 5.0, 30))
    svc, fair = here.start(folder, store)
    spool = usage_journal.Spool(fairness_wiring._journal(svc))

    async def flush() -> None:
        await fairness_wiring._flush(svc, fair, None, None, None, spool)
    for tenants in (["t0"], ["t1"], ["t2"]):    # the outage: a flush after each
        for tenant in tenants:
            fair.book.record(tenant, "llama", usage_book.Counts(requests=1))
        await flush()
    for tenant in ("t3", "t4"):                 # since the last flush
        fair.book.record(tenant, "llama", usage_book.Counts(requests=1))
    store.down = False
    real, calls = redis_usage.RedisUsageStore._add_chunk, [0]

    async def chunk(self, *args):
        await real(self, *args)
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    redis_usage.RedisUsageStore._add_chunk = chunk
    await flush()                               # the recovery
    os.kill(os.getpid(), signal.SIGKILL)        # before the next flush

asyncio.run(main())
"""


def killed_in_the_recovery(folder: pathlib.Path, url: str, kill_at: int) -> None:
    """A process whose usage store (Redis, small chunks) is down for three flushes, then
    back, killed after chunk ``kill_at`` of the recovery flush (0: after that flush)."""
    root = str(pathlib.Path(__file__).resolve().parents[2])     # for ``tests``
    done = subprocess.run(
        [sys.executable, "-c", KILLED_IN_THE_RECOVERY, str(folder), url, str(kill_at)],
        check=False, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kill_at", [1, 2, 3, 0])
async def test_spooled_waiting_counts_count_once_on_redis_after_a_kill_in_the_recovery(
        tmp_path: pathlib.Path, redis_server: harness.RedisServer,
        monkeypatch: pytest.MonkeyPatch, kill_at: int) -> None:
    """Review finding: the counts waiting behind a failing batch were spooled by the id
    reserved for them, grew under it, and the recovery sent the grown version by it.
    Redis marks a batch chunk by chunk, cut from its content, so a kill after the grown
    version's first chunk and a restart sending the spool's smaller one (a marker never
    seen) counted them twice. Now the id goes only with the spool's version, what was
    recorded since with a new id; a kill after any chunk of the recovery (or after it)
    and a restart count every spooled count once, and those recorded since the last
    flush at most once."""
    monkeypatch.setattr(redis_usage, "CHUNK_FIELDS", 2)
    folder = tmp_path / "data"
    killed_in_the_recovery(folder, redis_server.url, kill_at)
    client = redis_limits.connect(redis_server.url)
    try:
        store = redis_usage.RedisUsageStore(client, 5.0, 30)
        svc, fair = start(folder, store)        # the next start
        spool = usage_journal.Spool(fairness_wiring._journal(svc))
        carried = fairness_wiring._restore(svc, fair.book)
        await fairness_wiring._flush(svc, fair, None, None, carried, spool)
        assert files(folder) == []
        day = usage_book.day_of(clocks.wall())
        got = {k[1]: v["requests"] for k, v in (await store.read([day], None)).items()}
    finally:
        await client.aclose()
    since = {"t3": 1, "t4": 1} if kill_at in (0, 3) else {}    # stored, or lost by the kill
    assert got == {"t0": 1, "t1": 1, "t2": 1, **since}


@pytest.mark.parametrize("write_fails", [False, True])
async def test_a_stop_keeps_the_spools_version_of_the_waiting_counts(
        tmp_path: pathlib.Path, redis_server: harness.RedisServer,
        monkeypatch: pytest.MonkeyPatch, write_fails: bool) -> None:
    """A clean stop in an outage: the last flush rewrites the spool (or fails to), then
    the stop's file holds the waiting counts by their id exactly as the spool does, and
    what was recorded after by another; a spool that cannot be deleted then is taken
    beside it, and Redis counts every count once."""
    monkeypatch.setattr(redis_usage, "CHUNK_FIELDS", 2)
    folder = tmp_path / "data"
    client = redis_limits.connect(redis_server.url)
    try:
        redis = redis_usage.RedisUsageStore(client, 5.0, 30)
        svc, fair = start(folder, Switch(redis))
        spool = usage_journal.Spool(fairness_wiring._journal(svc))
        for tenants in (["t0"], ["t1"]):
            for tenant in tenants:
                fair.book.record(tenant, "llama", usage_book.Counts(requests=1))
            await fairness_wiring._flush(svc, fair, None, None, None, spool)
        for tenant in ("t2", "t3"):
            fair.book.record(tenant, "llama", usage_book.Counts(requests=1))
        with monkeypatch.context() as m:
            if write_fails:
                def full(fd: int) -> None:
                    raise OSError(errno.ENOSPC, "No space left on device")
                m.setattr(os, "fsync", full)
            await fairness_wiring._flush(svc, fair, None, None, None, spool)    # the last
        fair.book.record("t4", "llama", usage_book.Counts(requests=1))
        spooled = json.loads(spool.name.read_text())["batches"]
        real = os.unlink

        def stuck(name: Any, *args: Any, **kwargs: Any) -> None:
            if ".spool-" in str(name):
                raise OSError(errno.EACCES, "Permission denied")
            real(name, *args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(os, "unlink", stuck)
            fairness_wiring._keep(svc, fair.book, None, spool)
        (kept_file,) = [f for f in files(folder) if ".kept-" in f.name]
        kept_batches = json.loads(kept_file.read_text())["batches"]
        by_id = {b["id"]: b for b in kept_batches}
        assert all(by_id[b["id"]] == b for b in spooled)      # the same versions
        assert len(spooled[-1]["rows"]) == (1 if write_fails else 3)
        svc, fair = start(folder, redis)        # the next start, the store back
        spool = usage_journal.Spool(fairness_wiring._journal(svc))
        carried = fairness_wiring._restore(svc, fair.book)
        assert carried is not None and len(carried.batches) == len(spooled) + len(kept_batches)
        await fairness_wiring._flush(svc, fair, None, None, carried, spool)
        day = usage_book.day_of(clocks.wall())
        got = {k[1]: v["requests"] for k, v in (await redis.read([day], None)).items()}
    finally:
        await client.aclose()
    assert got == {"t0": 1, "t1": 1, "t2": 1, "t3": 1, "t4": 1}


# -- a spool file let go is never written over ---------------------------------------------


async def test_a_new_spool_never_takes_the_name_of_one_let_go_that_a_sibling_holds(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gap: a spool whose delete failed (EIO) was let go, unlocked, under the one name the
    process kept for its life. A sibling worker starting took it, and the next outage's
    spool was renamed over that name; the sibling's flush then deleted the name it held,
    which was now the live spool, and a kill lost every batch the outage left unsent."""
    store = usage_book.MemoryUsageStore()
    svc, fair = start(tmp_path, Switch(store))
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    fair.book.record("a", "llama", usage_book.Counts(requests=1))
    await fairness_wiring._flush(svc, fair, None, None, None, spool)   # spooled
    assert isinstance(fair.book.store, Switch)
    fair.book.store.down = False
    real = os.unlink

    def failing(name: Any, *args: Any, **kwargs: Any) -> None:
        if ".spool-" in str(name):
            raise OSError(errno.EIO, "Input/output error")
        real(name, *args, **kwargs)
    with monkeypatch.context() as m:        # stored, but the spool cannot be deleted
        m.setattr(os, "unlink", failing)
        await fairness_wiring._flush(svc, fair, None, None, None, spool)
    assert not spool and len(spools(tmp_path)) == 1
    sibling_svc, sibling = start(tmp_path, store)       # takes the spool let go
    carried = fairness_wiring._restore(sibling_svc, sibling.book)
    assert carried is not None and carried.batches
    fair.book.store.down = True                         # a new outage
    fair.book.record("a", "llama", usage_book.Counts(requests=7))
    await fairness_wiring._flush(svc, fair, None, None, None, spool)
    await fairness_wiring._flush(sibling_svc, sibling, None, None, carried, None)
    spool.release()                                     # the worker is killed
    taken = usage_journal.take(fairness_wiring._journal(svc))
    day = usage_book.day_of(clocks.wall())
    assert taken.rows == {(day, "a", "llama"): {**usage_book.Counts(requests=7).as_dict()}}
    taken.release()


@pytest.mark.parametrize("writer", ["keep", "spool"])
def test_a_kept_or_spooled_file_has_its_name_synced_after_it_is_renamed_into_place(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """Gap: the file was fsynced but not its folder, so a power loss after the rename (and
    after the stop deleted the files it replaced) could lose the new name, and the rows
    with it. Now the folder is fsynced once the file has its name."""
    path = tmp_path / usage_journal.FILE
    folder = os.stat(tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append("folder" if (st.st_dev, st.st_ino) == (folder.st_dev, folder.st_ino)
                      else "file")
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append("rename")
        real_replace(src, dst, **kwargs)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    batch = usage_book.Batch(usage_book.batch_id(), {ROW: {"requests": 3}})
    if writer == "keep":
        usage_journal.keep(path, [batch])
    else:
        spool = usage_journal.Spool(path)
        spool.write([batch])
        spool.release()
    assert events == ["file", "rename", "folder"]


async def test_a_spool_write_leaves_the_loop_serving_and_loses_no_count_recorded_meanwhile(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gap: the spool write and its fsyncs ran on the serving event loop, so every request
    waited for the disk at each flush of an outage. Now they run in a thread, and the
    counts recorded while it writes are kept apart from the version the file takes: the
    store gets every count once."""
    store = Switch()
    svc, fair = start(tmp_path, store)
    spool = usage_journal.Spool(fairness_wiring._journal(svc))
    fair.book.record("a", "llama", usage_book.Counts(requests=1))
    await fairness_wiring._flush(svc, fair, None, None, None, spool)
    fair.book.record("a", "llama", usage_book.Counts(requests=2))   # waits, then spooled
    served, waited = threading.Event(), []
    real = os.fsync

    def slow_disk(fd: int) -> None:
        waited.append(served.wait(timeout=5))   # the loop goes on meanwhile, or not
        real(fd)

    async def a_request() -> None:
        await asyncio.sleep(0)
        fair.book.record("a", "llama", usage_book.Counts(requests=4))
        served.set()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", slow_disk)
        request = asyncio.create_task(a_request())
        await fairness_wiring._flush(svc, fair, None, None, None, spool)
        await request
    assert waited and all(waited)
    taken = json.loads(spool.name.read_text())["batches"]
    assert sum(row[3]["requests"] for b in taken for row in b["rows"]) == 3
    store.down = False
    await fairness_wiring._flush(svc, fair, None, None, None, spool)
    day = usage_book.day_of(clocks.wall())
    assert (await store.read([day], None))[(day, "a", "llama")]["requests"] == 7
    assert spools(tmp_path) == []


class _SlowSpoolWrite:
    """A flush whose spool write (1 request stored in an outage, then 2 recorded) waits
    in its thread's fsync until ``go_on`` is set: ``flush`` is that flush's task."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.store = Switch()
        self.svc, self.fair = start(tmp_path, self.store)
        self.spool = usage_journal.Spool(fairness_wiring._journal(self.svc))
        self.writing, self.go_on = threading.Event(), threading.Event()

    async def started(self, monkeypatch: pytest.MonkeyPatch) -> asyncio.Task[None]:
        svc, fair, spool = self.svc, self.fair, self.spool
        fair.book.record("a", "llama", usage_book.Counts(requests=1))
        await fairness_wiring._flush(svc, fair, None, None, None, spool)
        fair.book.record("a", "llama", usage_book.Counts(requests=2))
        real = os.fsync

        def slow_disk(fd: int) -> None:
            self.writing.set()
            self.go_on.wait(timeout=5)
            real(fd)
        monkeypatch.setattr(os, "fsync", slow_disk)
        flush = asyncio.create_task(fairness_wiring._flush(svc, fair, None, None, None,
                                                           spool))
        await harness.until(self.writing.is_set, 10, "the spool write started")
        return flush

    async def stored_after_the_next_start(self) -> int:
        """The requests stored once this process let its spool go and the next start sent
        what is left on disk."""
        self.spool.release()
        again = usage_journal.take(fairness_wiring._journal(self.svc))
        for batch in again.batches:
            await self.store.add(batch.rows, batch.id)
        again.release()
        day = usage_book.day_of(clocks.wall())
        return int((await self.store.read([day], None))[(day, "a", "llama")]["requests"])


async def test_a_stop_during_a_spool_write_lets_it_finish_and_sends_the_files_version(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush loop cancelled (a stop) while the spool is written in its thread: the
    write finishes and the book learns what the file holds before the cancel goes on, so
    the waiting counts are sent by their reserved id as the file holds them, and a kill
    after the recovery flush, before the spool went, counts them once."""
    slow = _SlowSpoolWrite(tmp_path)
    with monkeypatch.context() as m:
        flush = await slow.started(m)
        flush.cancel()
        await asyncio.sleep(0)
        slow.go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await flush
        await harness.until(lambda: len(slow.spool.holds()) == 2, 10, "the write finished")
    slow.store.down = False
    await slow.fair.book.flush()            # the recovery; killed before the spool went
    assert await slow.stored_after_the_next_start() == 3


async def test_a_stop_cancelled_again_during_a_spool_write_still_waits_for_it(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush cancelled twice while the spool is written in its thread (the stop, then
    a time-out around it): the write is still waited for before the cancel goes on.
    Before, the second cancel went on at once; the stop then sent the offered counts by a
    fresh id and deleted the spool, and the thread renamed the file holding them by the
    reserved id into place after it: the next start counted them twice."""
    slow = _SlowSpoolWrite(tmp_path)
    with monkeypatch.context() as m:
        flush = await slow.started(m)
        flush.cancel()
        await asyncio.sleep(0)
        flush.cancel()                  # again
        for _ in range(5):
            await asyncio.sleep(0)
        assert not flush.done()         # still waiting for the write (before: gone on)
        slow.go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await flush
    slow.store.down = False             # the stop's last flush, then its keep
    await fairness_wiring._flush(slow.svc, slow.fair, None, None, None, slow.spool)
    fairness_wiring._keep(slow.svc, slow.fair.book, None, slow.spool)
    assert await slow.stored_after_the_next_start() == 3
