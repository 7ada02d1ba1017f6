"""Files damaged on disk: a second damage keeps the copy of the first
(:mod:`controlplane.adapters.sqlite_file`), and an L1 entry altered on disk is never served
(:mod:`controlplane.adapters.l1_journal`)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pathlib
import sqlite3
import threading
from typing import Any

import pytest

from controlplane.adapters import l1, l1_journal, sqlite_file, usage_db

WALL = 1_800_000_000.0


def reopened(path: pathlib.Path) -> l1.MemoryL1:
    """A new process's L1 over ``path``, read back before it serves."""
    store = l1.MemoryL1(100, 10**6, journal=l1_journal.SqliteJournal(str(path), 3600.0))
    store.restore_now()
    return store


def copies(folder: pathlib.Path, name: str) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(name + ".corrupt"))


@pytest.mark.parametrize("file", ["l1.sqlite", usage_db.FILE])
async def test_a_second_damage_keeps_the_copy_of_the_first(
        tmp_path: pathlib.Path, file: str) -> None:
    """Probe finding: the second damaged file was moved onto the first one's copy,
    which an operator may still have been studying."""
    path = tmp_path / file
    for damage in (b"first damage ", b"second damage "):
        path.write_bytes(damage * 100)
        if file == usage_db.FILE:
            db = usage_db.UsageDb(str(path), 62)
            assert db.open_now(WALL) == {}
            db.close()
        else:
            journal = l1_journal.SqliteJournal(str(path), flush_interval_s=0)
            assert await journal.load(WALL) == []
            await journal.close()
    kept = copies(tmp_path, file)
    assert sorted(p.read_bytes()[:6] for p in kept) == [b"first ", b"second"]
    assert all(p.name.startswith(f"{file}.corrupt-") for p in kept)


def test_a_copy_name_is_never_one_in_use_even_by_a_wal_alone(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "l1.sqlite")
    first = sqlite_file.aside_name(path)
    pathlib.Path(first + "-wal").write_bytes(b"a copy's write-ahead log")
    second = sqlite_file.aside_name(path)
    assert second != first and second.startswith(path + ".corrupt-")


async def test_an_entry_altered_on_disk_is_dropped_not_served(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Probe finding: a same-length byte change inside a stored answer was served as a
    hit with the altered text."""
    path = tmp_path / "l1.sqlite"
    first = reopened(path)
    await first.set("acme", "m", "k", b'{"answer": "the right text"}', 3600)
    await first.set("acme", "m", "other", b'{"answer": "untouched"}', 3600)
    await first.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE l1 SET value = ? WHERE value = ?",
                   (b'{"answer": "the wrong text"}', b'{"answer": "the right text"}'))
    with caplog.at_level(logging.WARNING, "synapse.cache"):
        again = reopened(path)
    assert await again.get("acme", "m", "k") is None
    assert await again.get("acme", "m", "other") == b'{"answer": "untouched"}'
    warned = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert len(warned) == 1 and "1 entry" in warned[0]
    await again.close()
    with sqlite3.connect(path) as db:      # gone from the file too: said once
        assert db.execute("SELECT count(*) FROM l1").fetchone() == (1,)


async def test_entries_an_older_release_wrote_are_kept_and_checked_from_then_on(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "l1.sqlite"
    first = reopened(path)
    await first.set("acme", "m", "k", b"an answer", 3600)
    await first.close()
    with sqlite3.connect(path) as db:      # as an older release's file: no checksums
        saved = db.execute("SELECT skey, tenant, model, value, expires_at FROM l1").fetchall()
        db.execute("DROP TABLE l1")
        db.execute("CREATE TABLE l1 (skey TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                   "model TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL NOT NULL)")
        db.executemany("INSERT INTO l1 VALUES (?, ?, ?, ?, ?)", saved)
    upgraded = reopened(path)
    assert await upgraded.get("acme", "m", "k") == b"an answer"
    await upgraded.close()
    with sqlite3.connect(path) as db:      # given its checksum: damage is caught next time
        db.execute("UPDATE l1 SET value = ?", (b"an ansWer",))
    again = reopened(path)
    assert await again.get("acme", "m", "k") is None
    await again.close()


def test_workers_that_find_one_damaged_file_together_keep_its_copy(
        tmp_path: pathlib.Path) -> None:
    """Review finding: workers started together each checked a copy name then renamed
    onto it, so a second one could rename the first one's fresh file over the damaged
    file's copy. Each round: racers set the same damaged file aside, each then starting
    a fresh file in its place (as a worker reopening its journal does)."""
    racers, rounds = 4, 100
    start, done = threading.Barrier(racers + 1), threading.Barrier(racers + 1)

    def racer() -> None:
        for r in range(rounds):
            path = tmp_path / str(r) / "l1.sqlite"
            start.wait()
            sqlite_file.set_aside(str(path))
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            done.wait()

    threads = [threading.Thread(target=racer) for _ in range(racers)]
    for thread in threads:
        thread.start()
    lost = 0
    for r in range(rounds):
        (tmp_path / str(r)).mkdir()
        (tmp_path / str(r) / "l1.sqlite").write_bytes(b"the damaged original")
        start.wait()
        done.wait()
        lost += b"the damaged original" not in {
            p.read_bytes() for p in copies(tmp_path / str(r), "l1.sqlite")}
    for thread in threads:
        thread.join()
    assert lost == 0, f"the damaged file's copy was overwritten in {lost} of {rounds} rounds"


@pytest.mark.parametrize("taken", ["", "-wal", "-shm"])
def test_a_move_never_replaces_a_name_in_use(tmp_path: pathlib.Path, taken: str) -> None:
    """A name another process holds (any of the three) is left to it, and nothing is
    moved: the caller tries the next name."""
    path, copy = str(tmp_path / "l1.sqlite"), str(tmp_path / "l1.sqlite.corrupt-x")
    for suffix in sqlite_file.SUFFIXES:
        pathlib.Path(path + suffix).write_bytes(b"damaged" + suffix.encode())
    pathlib.Path(copy + taken).write_bytes(b"another process's copy")
    assert not sqlite_file.move_to(path, copy)
    assert pathlib.Path(copy + taken).read_bytes() == b"another process's copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["l1.sqlite", "l1.sqlite-wal", "l1.sqlite-shm", "l1.sqlite.corrupt-x" + taken])
    assert sqlite_file.move_to(path, copy + "-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["l1.sqlite.corrupt-x" + taken, "l1.sqlite.corrupt-x-1", "l1.sqlite.corrupt-x-1-wal",
         "l1.sqlite.corrupt-x-1-shm"])
    assert pathlib.Path(copy + "-1-wal").read_bytes() == b"damaged-wal"


DAMAGE = b"not a database at all " * 200


def _open_and_write(folder: str, racer: int, rounds: int, start: Any, done: Any,
                    results: Any) -> None:
    """A worker process: each round, open the round's damaged usage file as a worker
    starting does, write a row, and hold the connection until every worker has."""
    logging.disable(logging.CRITICAL)
    for r in range(rounds):
        start.wait()
        db = None
        try:
            db, _ = sqlite_file.open_recovering(
                os.path.join(folder, str(r), usage_db.FILE), usage_db.SCHEMA, "spend", 10.0,
                warn_set_aside=lambda exc: None, warn_read_only=lambda exc: None)
            db.execute("INSERT OR REPLACE INTO spend VALUES (?, 1, 1.0)", (f"w{racer}",))
            results.put((r, racer, "wrote"))
        except Exception as exc:    # reported, as the test's failure
            results.put((r, racer, f"{type(exc).__name__}: {exc}"))
        done.wait()
        if db is not None:
            db.close()


def test_processes_that_find_one_damaged_file_together_never_move_a_fresh_one_aside(
        tmp_path: pathlib.Path) -> None:
    """Review finding: processes started together on one damaged file each moved aside
    what stood at its name, another's fresh database too, so that one went on writing
    to a file nobody reads (or failed with "disk I/O error"). Each round: one copy, of
    the damaged bytes, and every process's row in the file at the path."""
    racers, rounds = 6, 12
    ctx = multiprocessing.get_context("spawn")
    start, done, results = ctx.Barrier(racers + 1), ctx.Barrier(racers + 1), ctx.Queue()
    workers = [ctx.Process(target=_open_and_write,
                           args=(str(tmp_path), i, rounds, start, done, results))
               for i in range(racers)]
    for worker in workers:
        worker.start()
    wrong = []
    try:
        for r in range(rounds):
            folder = tmp_path / str(r)
            folder.mkdir()
            (folder / usage_db.FILE).write_bytes(DAMAGE)
            start.wait(timeout=120)
            said = sorted(results.get(timeout=120) for _ in range(racers))
            done.wait(timeout=120)
            failures = [f"{racer}: {what}" for _, racer, what in said if what != "wrote"]
            with contextlib.closing(sqlite3.connect(folder / usage_db.FILE)) as db:
                rows = db.execute("SELECT count(*) FROM spend").fetchone()[0]
            kept = [p.read_bytes() for p in copies(folder, usage_db.FILE)
                    if not p.name.endswith(("-wal", "-shm"))]
            if failures or rows != racers or kept != [DAMAGE]:
                wrong.append(f"round {r}: {rows} rows of {racers}, copies "
                             f"{[k[:16] for k in kept]}, failures {failures[:2]}")
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert not wrong, "\n".join(wrong)
