"""Files the control plane writes tenants' text into are private to its user, whatever the
umask: the in-process L1's journal (every tenant's cached answers, controlplane.adapters.
l1_journal) and the feedback pairs (tenants' queries and cached entries' texts,
controlplane.adapters.feedback_log). The operator probe found both 0644 in a 0755
directory when ``synapse controlplane`` made its own ``data_dir``."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.adapters import feedback_log, l1_journal


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The usual umask (022): what a file gets when nothing asks for less."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_l1_journal_and_its_directory_are_private(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    journal = l1_journal.SqliteJournal(str(data / "l1.sqlite"), flush_interval_s=0)
    await journal.load(0.0)
    journal.put(l1_journal.Saved("k", "alice", "m", b'{"answer": "private"}', 2e9))
    await journal.flush()
    made = sorted(p.name for p in data.iterdir())
    assert "l1.sqlite" in made and "l1.sqlite-wal" in made, made
    assert {p.name: mode(p) for p in data.iterdir()} == {name: 0o600 for name in made}
    assert mode(data) == 0o700
    await journal.close()


async def test_a_journal_made_open_before_is_made_private(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "l1.sqlite"
    for name in ("l1.sqlite", "l1.sqlite-wal"):
        (tmp_path / name).touch(mode=0o644)
    journal = l1_journal.SqliteJournal(str(path), flush_interval_s=0)
    await journal.load(0.0)
    assert mode(path) == 0o600 and mode(tmp_path / "l1.sqlite-wal") == 0o600
    await journal.close()


class Pair:
    def to_json(self) -> dict[str, Any]:
        return {"tenant": "alice", "text_a": "my diagnosis", "text_b": "x", "label": 1}


async def test_the_feedback_pairs_file_and_its_directory_are_private(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "feedback" / "pairs.jsonl"
    log = feedback_log.JsonlPairs(path)
    await log.record(Pair())
    [kept] = feedback_log.files_of(path)            # alice's file
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700 and mode(path.parent) == 0o700
    kept.chmod(0o644)                       # made before this rule
    await log.record(Pair())
    assert mode(kept) == 0o600 and len(kept.read_text().splitlines()) == 2


async def test_the_folder_made_for_a_milvus_lite_file_is_private(
        tmp_path: pathlib.Path) -> None:
    """Milvus Lite writes its files (tenants' semantic texts) as the umask says: the
    folder made for it keeps them from other local users."""
    from tests.controlplane.l2 import fakes
    from tests.controlplane.l2 import test_l2_milvus as lite

    folder = tmp_path / "data"
    store = lite.index(str(folder / "l2.db"), "private")
    try:
        await store.insert([fakes.row("s", 0, "alice", "m")])
        await store.flush()
        assert mode(folder) == 0o700
    finally:
        await store.close()


async def test_a_milvus_lite_store_in_a_folder_open_to_others_is_made_private(
        tmp_path: pathlib.Path) -> None:
    """An existing data_dir of mode 0755 (made by hand, or by a volume) used to leave
    Milvus Lite's store, and the tenants' texts in it, readable by every local user."""
    from tests.controlplane.l2 import fakes
    from tests.controlplane.l2 import test_l2_milvus as lite

    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    store = lite.index(str(folder / "l2.db"), "private")
    try:
        await store.insert([fakes.row("s", 0, "alice", "m")])
        await store.flush()
        assert mode(folder) == 0o755                    # the operator's folder, as it was
        assert mode(folder / "l2.db") in (0o700, 0o600)     # the store: ours alone
    finally:
        await store.close()


async def test_an_unreadable_journal_is_set_aside_and_a_new_one_kept(
        tmp_path: pathlib.Path) -> None:
    """A torn or foreign l1.sqlite used to fail every later write too (a warning per
    second of traffic, nothing kept across restarts) until an operator deleted it."""
    path = tmp_path / "l1.sqlite"
    path.write_bytes(b"not a database at all " * 10)
    journal = l1_journal.SqliteJournal(str(path), flush_interval_s=0)
    assert await journal.load(0.0) == []
    journal.put(l1_journal.Saved("k", "alice", "m", b"{}", 2e9))
    await journal.flush()
    await journal.close()
    again = l1_journal.SqliteJournal(str(path), flush_interval_s=0)
    assert [s.skey for s in await again.load(0.0)] == ["k"]
    await again.close()
    (copy,) = [n for n in os.listdir(tmp_path) if n.startswith("l1.sqlite.corrupt-")]
    assert (tmp_path / copy).read_bytes().startswith(b"not a database")
    assert mode(path) == 0o600
