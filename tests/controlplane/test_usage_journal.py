"""The usage an earlier run kept on disk survives until a flush has stored it, and is never
counted twice (:mod:`controlplane.adapters.usage_journal`)."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

from controlplane.adapters import usage_journal
from controlplane.api import fairness_wiring
from controlplane.core import usage_book
from synapse_common import clock as clocks
from tests import harness
from tests.controlplane import cp_testing as t

ROW = ("2026-12-06", "a", "llama")


def files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.glob(usage_journal.FILE + "*"))


def take_then_die(path: pathlib.Path, *, sending: bool) -> None:
    """A control plane that took the kept rows back and was killed (``kill -9``) before a
    flush stored them, or, with ``sending``, during the flush that carried them."""
    code = ("import os, signal, sys\n"
            "from controlplane.adapters import usage_journal\n"
            "carried = usage_journal.take(sys.argv[1])\n"
            "assert carried.rows\n"
            f"if {sending}: carried.sending()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_rows_taken_back_survive_a_kill_before_any_flush_stored_them(
        tmp_path: pathlib.Path) -> None:
    """Probe finding: the start deleted the file at once; killed while the store was still
    down, the next start found nothing and the usage was never billed."""
    path = tmp_path / usage_journal.FILE
    usage_journal.keep(path, {ROW: {"requests": 3, "cost": 0.5}})
    take_then_die(path, sending=False)
    carried = usage_journal.take(path)
    assert carried.rows == {ROW: {"requests": 3, "cost": 0.5}}
    assert carried.dropped == 0
    carried.done()
    assert files(tmp_path) == []


def test_rows_a_live_process_holds_are_not_taken_by_another_start(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / usage_journal.FILE
    usage_journal.keep(path, {ROW: {"requests": 3}})
    first = usage_journal.take(path)
    assert first.rows == {ROW: {"requests": 3}}
    assert usage_journal.take(path).rows == {}      # the workers of a pod start together
    first.sending()
    assert usage_journal.take(path).rows == {}      # nor while its flush runs
    first.unsent()                                  # the flush failed; the process stops
    first.release()
    again = usage_journal.take(path)
    assert again.rows == {ROW: {"requests": 3}}
    again.release()


def test_rows_of_a_process_killed_during_their_flush_are_dropped_not_counted_twice(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / usage_journal.FILE
    usage_journal.keep(path, {ROW: {"requests": 3}, ("2026-12-06", "b", "llama"): {
        "requests": 1}})
    take_then_die(path, sending=True)
    carried = usage_journal.take(path)
    assert carried.rows == {} and carried.dropped == 2
    assert files(tmp_path) == []


async def test_kept_usage_is_stored_once_redis_comes_back_and_only_then_deleted(
        tmp_path: pathlib.Path, redis_server: harness.RedisServer) -> None:
    """The replica starts while Redis is down: the kept rows stay on disk (a kill now
    would not lose them) until Redis is back and a flush stored them, once."""
    day = usage_book.day_of(clocks.wall())
    usage_journal.keep(tmp_path / usage_journal.FILE, {(day, "a", "llama"): {"requests": 7}})
    redis_server.kill()
    s = t.settings(redis={"url": redis_server.url, "timeout_s": 0.2}, data_dir=str(tmp_path),
                   fairness={"usage": {"flush_interval_s": 0.1}})
    async with t.running(s) as cp:
        failures = cp.services.metrics.registry.get_sample_value
        await harness.until(lambda: (failures("synapse_usage_flush_failures_total") or 0)
                            >= 2, 20, "flushes failing while Redis is down")
        assert [f.name.endswith(usage_journal.SENDING) for f in files(tmp_path)] == [False]
        redis_server.start()
        await harness.until(lambda: files(tmp_path) == [], 20, "deleted once stored")
        book = fairness_wiring.get(cp.services).book
        assert book is not None and book.pending() == {}
        stored = await book.store.read([day], "a")
        assert stored[(day, "a", "llama")]["requests"] == 7
    assert files(tmp_path) == []
