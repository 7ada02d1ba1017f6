"""A rollback to the release before the L1 journal's checksums: that release's writes
still work on a file this release wrote, and this release reads them back afterwards
(:mod:`controlplane.adapters.l1_journal`)."""

from __future__ import annotations

import logging
import pathlib
import sqlite3

import pytest

from controlplane.adapters import l1, l1_journal

# The previous release's statements, as it wrote them (it names no columns).
OLD_PUT = "INSERT OR REPLACE INTO l1 VALUES (?, ?, ?, ?, ?)"
OLD_DELETE = "DELETE FROM l1 WHERE skey = ?"


def reopened(path: pathlib.Path) -> l1.MemoryL1:
    """A new process's L1 over ``path``, read back before it serves."""
    store = l1.MemoryL1(100, 10**6, journal=l1_journal.SqliteJournal(str(path), 3600.0))
    store.restore_now()
    return store


async def test_the_previous_release_writes_a_file_this_one_wrote_and_this_one_reads_it(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Review finding: the checksum column added to ``l1`` failed every write of the
    release before it after a rollback ("table l1 has 6 columns but 5 values")."""
    path = tmp_path / "l1.sqlite"
    first = reopened(path)
    await first.set("acme", "m", "replaced", b"this release's answer", 3600)
    await first.set("acme", "m", "deleted", b"gone at the rollback", 3600)
    await first.set("acme", "m", "kept", b"kept as written", 3600)
    await first.close()
    with sqlite3.connect(path) as db:       # the previous release, after a rollback
        expires = db.execute("SELECT max(expires_at) FROM l1").fetchone()[0]
        db.execute(OLD_PUT, (l1.storage_key("acme", "m", "replaced"), "acme", "m",
                             b"the rollback's answer", expires))
        db.execute(OLD_PUT, (l1.storage_key("acme", "m", "new"), "acme", "m",
                             b"written at the rollback", expires))
        db.execute(OLD_DELETE, (l1.storage_key("acme", "m", "deleted"),))
    with caplog.at_level(logging.WARNING, "synapse.cache"):
        again = reopened(path)
    assert await again.get("acme", "m", "replaced") == b"the rollback's answer"
    assert await again.get("acme", "m", "deleted") is None
    assert await again.get("acme", "m", "kept") == b"kept as written"
    assert await again.get("acme", "m", "new") == b"written at the rollback"
    assert not [r for r in caplog.records if "checksum" in r.getMessage()], \
        "a rolled-back release's write is not damage"
    await again.close()
    with sqlite3.connect(path) as db:       # checked from then on, the rollback's too
        db.execute("UPDATE l1 SET value = ? WHERE value = ?",
                   (b"the rollback's answeR", b"the rollback's answer"))
    checked = reopened(path)
    assert await checked.get("acme", "m", "replaced") is None
    assert await checked.get("acme", "m", "kept") == b"kept as written"
    await checked.close()


async def test_a_file_with_a_checksum_column_in_l1_is_still_read_and_written(
        tmp_path: pathlib.Path) -> None:
    """A file an unreleased build made, with the checksum as a column of ``l1``."""
    path = tmp_path / "l1.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE l1 (skey TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                   "model TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL NOT NULL, "
                   "digest BLOB)")
    store = reopened(path)
    await store.set("acme", "m", "k", b"an answer", 3600)
    await store.close()
    again = reopened(path)
    assert await again.get("acme", "m", "k") == b"an answer"
    await again.close()
