"""The in-process L1's journal when things go wrong: a start-up over a journal larger
than a tenant's share, a kill right after an invalidation, a journal locked by another
process, a journal on a read-only disk."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3

from controlplane import cache_wiring
from controlplane.adapters import l1, l1_journal
from tests.controlplane import cp_testing as t


def rows(path: str) -> list[tuple[str, bytes]]:
    with sqlite3.connect(path) as db:
        return [(str(a), bytes(b)) for a, b in db.execute("SELECT tenant, value FROM l1")]


def reopened(path: str, **bounds: int) -> l1.MemoryL1:
    """A new process's L1 over ``path``, read back as ``cache_wiring`` does (the
    write-behind interval is long: only what an operation flushed itself is on disk)."""
    limits = {"max_entries": 100, "max_bytes": 10**6, **bounds}
    store = l1.MemoryL1(**limits, journal=l1_journal.SqliteJournal(path, 3600.0))
    store.restore_now()
    return store


def test_start_up_over_a_journal_larger_than_a_tenants_share(tmp_path):
    """No event loop runs yet when ``main`` builds the cache: the restore's evictions
    must not need one (they raised RuntimeError, and the control plane never started)."""
    settings = t.settings(data_dir=str(tmp_path),
                          cache={"semantic_enabled": False, "l1_max_entries": 10})

    async def fill() -> None:
        store = cache_wiring.build_l1(settings, tenants=1)
        for i in range(10):
            await store.set("acme", "llama", f"k{i}", f"v{i}".encode(), 3600)
        await store.close()

    asyncio.run(fill())
    store = cache_wiring.build_l1(settings, tenants=2)      # a tenant added: share 5
    assert len(store) == 5
    path = os.path.join(str(tmp_path), cache_wiring.L1_JOURNAL)
    assert sorted(v for _, v in rows(path)) == [f"v{i}".encode() for i in range(5, 10)]
    asyncio.run(store.close())


async def test_an_invalidation_or_a_wrong_hits_removal_survives_a_kill(tmp_path):
    path = str(tmp_path / "l1.sqlite")
    first = reopened(path)
    await first.set("acme", "m", "k", b"acme's", 3600)
    await first.set("globex", "m", "k", b"judged wrong", 3600)
    await first.set("globex", "m", "kept", b"kept", 3600)
    await first.close()
    second = reopened(path)
    assert await second.invalidate("acme", None) == 1
    assert await second.delete("globex", "m", "k")
    killed = reopened(path)                 # "second" never closed: killed meanwhile
    assert await killed.get("acme", "m", "k") is None
    assert await killed.get("globex", "m", "k") is None
    assert await killed.get("globex", "m", "kept") == b"kept"
    for store in (killed, second):
        await store.close()


async def test_a_journal_locked_by_another_process_is_left_alone(tmp_path, caplog):
    path = str(tmp_path / "l1.sqlite")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute(l1_journal.SCHEMA)
    holder.execute("INSERT INTO l1 VALUES ('s', 'acme', 'm', x'00', 9e9)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        store = l1.MemoryL1(100, 10**6, journal=l1_journal.SqliteJournal(
            path, 3600.0, busy_timeout_s=0.05))
        with caplog.at_level(logging.WARNING, "synapse.cache"):
            store.restore_now()
            await store.set("acme", "m", "new", b"v", 3600)
            await store.invalidate("acme", None)
            await store.close()
        assert len(store) == 0
        assert sorted(os.listdir(tmp_path)) == ["l1.sqlite"], "not set aside as damaged"
        assert any("left as it is" in r.getMessage() for r in caplog.records)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert rows(path) == [("acme", b"\x00")], "this run wrote nothing into it"


async def test_a_read_only_journal_is_restored_and_not_written(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "l1.sqlite")
    first = reopened(path)
    for i in range(3):
        await first.set("acme", "m", f"k{i}", b"kept", 3600)
    await first.close()
    real_open = os.open

    def read_only_disk(file, flags, *args, **kwargs):   # root ignores a file's mode
        if os.fspath(file) == path and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), file)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_disk)
    with caplog.at_level(logging.WARNING, "synapse.cache"):
        again = reopened(path)
        assert len(again) == 3
        assert await again.get("acme", "m", "k0") == b"kept"
        await again.set("acme", "m", "new", b"v", 3600)
        await again.invalidate("acme", "m")
        await again.close()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "restored read-only" in warned[0], warned
    assert len(rows(path)) == 3
