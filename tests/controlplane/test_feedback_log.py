"""The judged pairs on disk (``controlplane.adapters.feedback_log``), as calibration reads
them back (``feedback_calibrate.read_feedback_of``, what ``calibrate --from-feedback`` runs).

Tenants are adversaries and cache hits cost them nothing: the operator probe judged its
own semantic hits of a cached 8 KB prompt over and over (about 15 KB a pair), and in the
one shared file about 8,500 verdicts rotated every other tenant's verdicts out of the file
and its ``.1``, so calibration never saw them. Bounds here are small so that a flood takes
a few hundred lines instead of thousands.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading

import pytest

from controlplane import feedback_calibrate
from controlplane.adapters import feedback_log
from controlplane.core import cache_feedback

DIGEST = "0123456789abcdef"
BOUND = 64 * 1024
LONG = "Please explain in detail how the GPU schedules warps. " * 150     # about 8 KB


def pair(tenant: str, i: int, label: int = 1, text: str = LONG) -> cache_feedback.Pair:
    return cache_feedback.Pair(tenant, "llama", f"{text} {i}?", text, label, 0.9, 0.8,
                               DIGEST, "emb", f"{tenant}-{i}", float(i))


def record(sink: feedback_log.JsonlPairs, pairs: list[cache_feedback.Pair]) -> None:
    async def run() -> None:
        for p in pairs:
            await sink.record(p)
    asyncio.run(run())


def verdicts(path: pathlib.Path) -> list[str]:
    """The tenants of every judged hit calibration reads at ``path``, in file order."""
    found, skipped = feedback_calibrate.read_feedback_of([str(path)], [DIGEST])
    assert skipped == 0
    return found[DIGEST]["llama"].tenants if found[DIGEST] else []


def test_a_flood_from_one_tenant_leaves_anothers_verdicts_intact(tmp_path) -> None:
    path = tmp_path / "cache_feedback.jsonl"
    sink = feedback_log.JsonlPairs(path, BOUND, tenants=2)
    record(sink, [pair("alice", i, label=0) for i in range(3)])       # three wrong hits
    record(sink, [pair("mallory", i) for i in range(10 * BOUND // len(LONG))])
    kept = verdicts(path)
    assert kept.count("alice") == 3
    found, _ = feedback_calibrate.read_feedback_of([str(path)], [DIGEST])
    judged = found[DIGEST]["llama"]
    assert sorted(label for t, label in zip(judged.tenants, judged.labels, strict=True)
                  if t == "alice") == [0, 0, 0]
    # mallory kept its own newest verdicts, within twice its share
    assert 0 < kept.count("mallory") * 2 * len(LONG) <= 2 * sink.share


def test_each_tenants_files_stay_within_its_share_and_all_within_twice_the_bound(
        tmp_path) -> None:
    path = tmp_path / "cache_feedback.jsonl"
    tenants = ["a", "b/../c", "d e", "ünï"]     # any name makes a file of its own
    sink = feedback_log.JsonlPairs(path, BOUND, tenants=len(tenants))
    text = "x" * 1000
    line = len(json.dumps(pair("a", 0, text=text).to_json(), ensure_ascii=False).encode())
    record(sink, [pair(t, i, text=text) for i in range(100) for t in tenants])
    files = feedback_log.files_of(path)
    assert {f.parent for f in files} == {feedback_log.tenant_dir(path)}
    per_tenant: dict[str, int] = {}
    for f in files:
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        assert len({r["tenant"] for r in rows}) == 1        # one tenant's lines only
        per_tenant[rows[0]["tenant"]] = per_tenant.get(rows[0]["tenant"], 0) + f.stat().st_size
    assert sorted(per_tenant) == sorted(tenants)
    assert all(size <= 2 * sink.share for size in per_tenant.values())
    assert sum(per_tenant.values()) <= 2 * BOUND
    # each tenant's newest verdict is kept, and at least a full file's worth before it
    for t in tenants:
        newest = feedback_log.tenant_file(path, t).read_text().splitlines()[-1]
        assert json.loads(newest)["request_id"] == f"{t}-99"
    assert all(n * line > sink.share - line for n in map(verdicts(path).count, tenants))


def test_files_of_an_earlier_release_are_read_with_the_tenants_files(tmp_path) -> None:
    path = tmp_path / "cache_feedback.jsonl"
    older = [json.dumps(pair(t, 0).to_json()) + "\n" for t in ("old-a", "old-b")]
    feedback_log.rotated(path).write_text(older[0])
    path.write_text(older[1])
    record(feedback_log.JsonlPairs(path, BOUND, tenants=2), [pair("new", 1)])
    assert sorted(verdicts(path)) == ["new", "old-a", "old-b"]
    # the tenants' folder itself may be named too; a path with nothing kept is an error
    assert verdicts(feedback_log.tenant_dir(path)) == ["new"]
    with pytest.raises(feedback_calibrate.FeedbackError, match=r"nowhere\.jsonl"):
        feedback_calibrate.read_feedback_of([str(tmp_path / "nowhere.jsonl")], [DIGEST])


def test_a_line_cut_short_by_a_crash_costs_only_itself(tmp_path, capsys) -> None:
    path = tmp_path / "cache_feedback.jsonl"
    sink = feedback_log.JsonlPairs(path, BOUND)
    record(sink, [pair("alice", 0, text="short")])
    [file] = feedback_log.files_of(path)
    with file.open("ab") as fh:                          # a crash in mid-write
        fh.write(json.dumps(pair("alice", 1, text="é").to_json()).encode()[:-7] + b"\xc3")
    record(feedback_log.JsonlPairs(path, BOUND), [pair("alice", 2, text="short")])  # restart
    found, _ = feedback_calibrate.read_feedback_of([str(path)], [DIGEST])
    assert found[DIGEST]["llama"].tenants == ["alice", "alice"]
    assert "1 line(s) skipped" in capsys.readouterr().err


def test_two_processes_appending_never_rotate_a_tenants_file_twice(tmp_path) -> None:
    """Every worker of a pod may take a verdict: two writers rotating at once made the
    second replace the first's ``.1`` with a nearly empty file."""
    path = tmp_path / "cache_feedback.jsonl"
    writers = [feedback_log.JsonlPairs(path, 16 * 1024) for _ in range(2)]   # two locks
    text = "x" * 900
    line = len(json.dumps(pair("a", 0, text=text).to_json()).encode()) + 1
    sizes: list[int] = []

    def write(sink: feedback_log.JsonlPairs, start: int) -> None:
        for i in range(start, start + 300):
            record(sink, [pair("a", i, text=text)])
            old = feedback_log.rotated(feedback_log.tenant_file(path, "a"))
            if old.exists():
                sizes.append(old.stat().st_size)

    threads = [threading.Thread(target=write, args=(w, n * 1000))
               for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sizes and min(sizes) > 16 * 1024 - 2 * line     # every .1 was a full file
    for f in feedback_log.files_of(path):
        assert all(json.loads(x)["tenant"] == "a" for x in f.read_text().splitlines())
