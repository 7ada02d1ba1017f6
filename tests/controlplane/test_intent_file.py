"""The operator intent's file store (a control plane without Redis): compare-and-set like
the Redis store, kept across a restart, private, a damaged file set aside and never a
crash, and two processes on one file serialised."""

from __future__ import annotations

import json
import logging
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


@pytest.mark.parametrize("content", ['{"gpu-1": "{\\"cordoned\\": tr', '["gpu-1"]',
                                     '{"gpu-1": {"cordoned": true}}'])
async def test_a_damaged_file_is_set_aside_with_an_error_and_the_store_starts_empty(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, content: str) -> None:
    path = tmp_path / intent_file.FILE
    path.write_text(content)
    store = intent_file.FileIntentStore(path)
    with caplog.at_level(logging.ERROR, "synapse.controlplane.fleet"):
        assert await store.load() == {}
    kept = set_aside(tmp_path)
    assert len(kept) == 1 and kept[0].read_text() == content       # nothing lost
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
