"""How many serving processes a pod runs (``controlplane.workers``), their names, and how
the primary stops them."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
import tempfile

import pydantic
import pytest

from controlplane import workers
from tests.controlplane import cp_testing as t

REDIS = {"url": "redis://127.0.0.1:1/0"}
SHARED_CACHE = {"enabled": True, "semantic_enabled": True, "milvus_uri": "http://milvus:19530"}


def test_auto_runs_one_process_per_cpu_when_the_state_can_be_shared() -> None:
    s = t.settings(redis=REDIS, cache={"enabled": False})
    assert workers.count(s, available=4) == 4
    assert workers.count(t.settings(redis=REDIS, cache=SHARED_CACHE), available=3) == 3
    assert workers.count(s, available=1) == 1
    assert workers.count(s, available=1000) == 64


@pytest.mark.parametrize(("sections", "why"), [
    ({}, "redis.url"),
    ({"redis": REDIS, "cache": {"enabled": True, "semantic_enabled": True}},
     "cache.milvus_uri"),
    ({"redis": REDIS, "cache": {"enabled": True, "milvus_uri": "/var/lib/synapse/l2.db"}},
     "cache.milvus_uri"),
])
def test_auto_runs_one_process_when_the_state_cannot_be_shared(
        sections: dict[str, dict[str, object]], why: str) -> None:
    s = t.settings(**sections)
    assert workers.count(s, available=8) == 1
    reason = workers.why_one(s)
    assert reason is not None and why in reason
    # Asked for explicitly, it is a configuration error naming the field and the reason.
    with pytest.raises(ValueError, match=rf"http.workers: 2 workers .*{why}"):
        workers.count(t.settings(http={"workers": 2}, **sections))


def test_the_reason_says_where_the_intent_is_kept_without_redis() -> None:
    """It said the operator intent lived in each worker's memory: it is in the data
    directory since the file store."""
    reason = workers.why_one(t.settings())
    assert reason is not None and "data_dir/fleet_intent.json" in reason


def test_an_explicit_count_is_kept() -> None:
    s = t.settings(redis=REDIS, cache={"semantic_enabled": False}, http={"workers": 3})
    assert workers.count(s, available=1) == 3
    assert workers.count(t.settings(http={"workers": 1}), available=8) == 1


@pytest.mark.parametrize("bad", [0, 65, "many", -1])
def test_a_bad_count_names_the_field(bad: object) -> None:
    with pytest.raises(pydantic.ValidationError, match="workers"):
        t.settings(http={"workers": bad})


def test_roles_name_their_sockets_and_replicas(tmp_path: pathlib.Path) -> None:
    primary = workers.Role(0, 3, tmp_path)
    second = workers.Role(2, 3, tmp_path)
    assert primary.primary and not second.primary
    assert primary.replica("cp-0") == "cp-0" and second.replica("cp-0") == "cp-0-w2"
    assert second.others("metrics") == (tmp_path / "metrics-0.sock",
                                        tmp_path / "metrics-1.sock")
    assert primary.others("grpc") == (tmp_path / "grpc-1.sock", tmp_path / "grpc-2.sock")


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_containers_cpu_limit_caps_auto(tmp_path: pathlib.Path, files: dict[str, str],
                                          expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert workers.cpu_quota(tmp_path) == expected
    n = workers.cpus(tmp_path)
    assert 1 <= n <= len(os.sched_getaffinity(0))
    if expected is not None:
        assert n <= max(1, int(expected))


def test_a_socket_directory_too_deep_for_unix_sockets_is_a_config_error(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ValueError, match=r"http\.workers: the temporary directory"):
        workers.private_directory(2)
    assert list(deep.iterdir()) == []       # nothing left behind
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = workers.private_directory(2)
    assert made.parent == tmp_path and (made.stat().st_mode & 0o777) == 0o700


# A stand-in worker: its graceful stop (the SIGTERM handler) leaves a mark. It starts with
# SIGTERM blocked (the mask its parent had, kept across exec), so a SIGTERM sent while it
# is still starting waits for the handler instead of killing it.
GRACEFUL_WORKER = """
import os, pathlib, signal, sys, time
def stop(*_):
    pathlib.Path(sys.argv[1], str(os.getpid())).write_text("stopped")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
time.sleep(600)
"""


class _Scripted(workers.Pool):
    def __init__(self, marks: pathlib.Path, role: workers.Role) -> None:
        super().__init__(role, [], 0, stop_grace_s=60)
        self._marks = marks

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-c", GRACEFUL_WORKER, str(self._marks)]


async def test_workers_being_started_as_the_pod_stops_get_their_graceful_stop(
        tmp_path: pathlib.Path) -> None:
    """A worker whose start is under way when the stop begins is sent SIGTERM (its drain
    and grace) and waited for, not killed, nor left running."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "pod").mkdir()
    pool = _Scripted(marks, workers.Role(0, 3, tmp_path / "pod"))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool.start()
        await asyncio.sleep(0)          # each keeper is starting its worker
        await pool.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert len(list(marks.iterdir())) == 2
    assert not (tmp_path / "pod").exists()
