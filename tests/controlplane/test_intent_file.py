"""The operator intent's file store (a control plane without Redis): compare-and-set like
the Redis store, kept across a restart, private, a damaged file set aside and never a
crash, and two processes on one file serialised."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from controlplane import errors
from controlplane.adapters import intent_file
from controlplane.core import intent, registry
from synapse_common import clock as clocks

REPO = pathlib.Path(__file__).resolve().parents[2]


async def test_compare_and_set_and_a_restart_reads_what_was_written(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "data" / intent_file.FILE
    store = intent_file.FileIntentStore(path)
    assert await store.load() == {}
    assert await store.compare_and_set("gpu-1", None, "one")
    assert not await store.compare_and_set("gpu-1", None, "again")     # no longer absent
    assert not await store.compare_and_set("gpu-1", "stale", "two")    # someone wrote
    assert await store.compare_and_set("gpu-1", "one", "two")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = intent_file.FileIntentStore(path)
    assert await restarted.load() == {"gpu-1": "two"}
    assert await restarted.get("gpu-1") == "two" and await restarted.get("gpu-2") is None


async def test_a_cordon_survives_a_new_fleet_intent_on_the_same_file(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    reg = registry.Registry(clocks.monotonic, 30)
    await intent.FleetIntent(intent_file.FileIntentStore(path), reg).set_fields(
        "gpu-1", cordoned=True, reason="bad GPU")
    again = intent.FleetIntent(intent_file.FileIntentStore(path), reg)
    await again.sync()
    assert again.get("gpu-1").cordoned and again.get("gpu-1").reason == "bad GPU"


def set_aside(folder: pathlib.Path) -> list[pathlib.Path]:
    return list(folder.glob(f"{intent_file.FILE}.damaged-*"))


def names(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# The last is not UTF-8: it escaped as UnicodeDecodeError, so every sync failed and every
# cordon was refused with 503, the file never set aside (review 91 F3).
@pytest.mark.parametrize("content", [b'{"gpu-1": "{\\"cordoned\\": tr', b'["gpu-1"]',
                                     b'{"gpu-1": {"cordoned": true}}', b'{"gpu-1": "\xff"}'])
async def test_a_damaged_file_is_set_aside_with_an_error_and_the_store_starts_empty(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    path = tmp_path / intent_file.FILE
    path.write_bytes(content)
    store = intent_file.FileIntentStore(path)
    with caplog.at_level(logging.ERROR, "synapse.controlplane.fleet"):
        assert await store.load() == {}
    kept = set_aside(tmp_path)
    assert len(kept) == 1 and kept[0].read_bytes() == content      # nothing lost
    assert str(path) in caplog.text and str(kept[0]) in caplog.text
    assert await store.compare_and_set("gpu-1", None, "fresh")      # and it works on
    assert json.loads(path.read_text()) == {"gpu-1": "fresh"}


async def test_a_file_that_cannot_be_read_refuses_the_change_instead_of_dropping_it(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    path.mkdir()                                    # unreadable as a file
    fleet_intent = intent.FleetIntent(intent_file.FileIntentStore(path),
                                      registry.Registry(clocks.monotonic, 30))
    with pytest.raises(errors.Unavailable):
        await fleet_intent.set_fields("gpu-1", cordoned=True)
    with pytest.raises(OSError):
        await fleet_intent.sync()
    assert path.is_dir()                            # not set aside: it is not damaged


async def test_a_cordon_on_a_file_with_invalid_utf8_is_stored(tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    path.write_bytes(b'{"gpu-1": "\xff"}')
    fleet_intent = intent.FleetIntent(intent_file.FileIntentStore(path),
                                      registry.Registry(clocks.monotonic, 30))
    await fleet_intent.set_fields("gpu-2", cordoned=True)
    assert await fleet_intent.sync() == set() and fleet_intent.get("gpu-2").cordoned
    assert list(json.loads(path.read_text())) == ["gpu-2"] and len(set_aside(tmp_path)) == 1


async def test_a_symlink_at_the_lock_file_is_not_followed(tmp_path: pathlib.Path) -> None:
    """The lock file was opened with O_CREAT through a symlink, creating its target."""
    path = tmp_path / intent_file.FILE
    store = intent_file.FileIntentStore(path)
    target = tmp_path / "elsewhere"
    store.lock_path.symlink_to(target)
    with pytest.raises(OSError):
        await store.load()
    assert not target.exists()


@pytest.mark.parametrize("left_name", [f".{intent_file.FILE}.tmp-k2j4h5g6",
                                       f".{intent_file.FILE}.k2j4h5g6"])    # first release
async def test_temporary_files_a_crash_left_are_removed_at_start(
        tmp_path: pathlib.Path, left_name: str) -> None:
    path = tmp_path / intent_file.FILE
    await intent_file.FileIntentStore(path).compare_and_set("gpu-1", None, "one")
    left = tmp_path / left_name                                 # written, never renamed
    left.write_text('{"gpu-1": "two"}')
    store = intent_file.FileIntentStore(path)                   # the restart
    assert await store.load() == {"gpu-1": "one"}
    assert names(tmp_path) == [f".{intent_file.FILE}.lock", intent_file.FILE]


async def test_a_change_renamed_into_place_is_stored_though_the_folder_flush_fails(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The client got 503 for a change every reader already saw (and retried it)."""
    path = tmp_path / intent_file.FILE
    fsync = os.fsync

    def no_folder_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "folder fsync failed")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    fleet_intent = intent.FleetIntent(intent_file.FileIntentStore(path),
                                      registry.Registry(clocks.monotonic, 30))
    with caplog.at_level(logging.WARNING, "synapse.controlplane.fleet"):
        await fleet_intent.set_fields("gpu-1", cordoned=True)
    assert intent.NodeIntent.from_json(json.loads(path.read_text())["gpu-1"]).cordoned
    assert any(r.levelno == logging.WARNING and "folder" in r.message
               for r in caplog.records)


WRITER = """
import asyncio, sys
from controlplane.adapters import intent_file

async def main(path, rounds):
    store = intent_file.FileIntentStore(path)
    for _ in range(rounds):
        while True:
            current = await store.get("counter")
            if await store.compare_and_set("counter", current, str(int(current or 0) + 1)):
                break

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_two_processes_on_one_file_lose_no_increment(tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    rounds = 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(rounds)],
                              cwd=REPO) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert json.loads(path.read_text()) == {"counter": str(2 * rounds)}
