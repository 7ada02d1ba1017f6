"""The Redis intent's local copy, against a real redis-server: moving from no Redis to Redis
keeps the intent kept in the file, and a copy that cannot be read is never what fails a
start while Redis is down. (A start from the copy: tests/controlplane/test_fleet_service.)"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import pytest
import redis

from controlplane.adapters import intent_copy, intent_file, intent_store, redis_limits
from controlplane.core import intent, registry
from synapse_common import clock as clocks
from tests import harness

CORDONED = intent.NodeIntent(cordoned=True, reason="bad GPU").to_json()


def copied(redis_url: str, path: pathlib.Path) -> intent_copy.CopiedIntentStore:
    return intent_copy.CopiedIntentStore(
        intent_store.RedisIntentStore(redis_limits.connect(redis_url)), path)


async def test_adding_redis_copies_the_files_intent_into_it_instead_of_erasing_it(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Review 91 F4: the first load from the empty Redis wrote {} over fleet_intent.json,
    so every cordon made without Redis was gone, in effect and on disk."""
    path = tmp_path / intent_file.FILE
    assert await intent_file.FileIntentStore(path).compare_and_set("gpu-1", None, CORDONED)
    store = copied(redis_server.url, path)
    try:
        with caplog.at_level(logging.WARNING, "synapse.controlplane.fleet"):
            assert await store.load() == {"gpu-1": CORDONED}
            assert await store.load() == {"gpu-1": CORDONED}
        assert await store.get("gpu-1") == CORDONED                 # in Redis now
        assert json.loads(path.read_text()) == {"gpu-1": CORDONED}  # and still on disk
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(path) in warnings[0], warnings
    finally:
        await store.close()


async def test_the_file_follows_redis_where_redis_holds_the_later_change(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    path.write_text(json.dumps({"gpu-1": CORDONED}))          # an older copy
    writer = copied(redis_server.url, tmp_path / "other" / intent_file.FILE)
    store = copied(redis_server.url, path)
    later = intent.NodeIntent(reason="fixed", version=5).to_json()
    try:
        assert await writer.compare_and_set("gpu-1", None, later)
        assert await store.load() == {"gpu-1": later}
        assert json.loads(path.read_text()) == {"gpu-1": later}
    finally:
        await writer.close()
        await store.close()


async def test_a_copy_that_is_not_utf8_fails_a_start_with_the_stores_own_error(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Review 91 F3: UnicodeDecodeError escaped instead of the Redis error."""
    path = tmp_path / intent_file.FILE
    path.write_bytes(b'{"gpu-1": "\xff"}')
    redis_server.kill()
    store = copied(redis_server.url, path)
    try:
        with caplog.at_level(logging.ERROR, "synapse.controlplane.fleet"), \
                pytest.raises(redis.exceptions.ConnectionError):
            await store.load()
    finally:
        await store.close()
    assert any(str(path) in r.message for r in caplog.records if r.levelno == logging.ERROR)


# -- two control planes on one Redis ----------------------------------------------------

DEPLOYED = {"e": {"model": "m"}}


def control_plane(store: intent.IntentStore) -> intent.FleetIntent:
    return intent.FleetIntent(store, registry.Registry(clocks.monotonic, 30))


def stored(redis_url: str, node: str) -> intent.NodeIntent | None:
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hget(intent_store.KEY, node)
    finally:
        client.close()
    return None if raw is None else intent.NodeIntent.from_json(raw.decode())


def flush(redis_url: str) -> None:
    """Redis losing its data: a restart without persistence, a failover to an empty one."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()


async def test_a_redis_that_lost_its_data_gets_the_replicas_intent_back_before_applying(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """The empty load lifted every cordon and stopped every engine deployed through the
    control plane (its desired set gone), and the copies were overwritten with it: the
    copy into Redis ran once, at a process's first load."""
    a = control_plane(copied(redis_server.url, tmp_path / "a" / intent_file.FILE))
    b = control_plane(copied(redis_server.url, tmp_path / "b" / intent_file.FILE))
    try:
        await a.set_fields("gpu-1", cordoned=True, reason="bad GPU", desired=DEPLOYED)
        await a.sync()
        await b.sync()
        flush(redis_server.url)
        assert await a.sync() == set() and await b.sync() == set()   # no engine to stop
        for replica in (a, b):
            assert replica.get("gpu-1").cordoned and replica.get("gpu-1").desired == DEPLOYED
        back = stored(redis_server.url, "gpu-1")
        assert back is not None and back.cordoned and back.reason == "bad GPU"
        for name in ("a", "b"):
            kept = json.loads((tmp_path / name / intent_file.FILE).read_text())
            assert intent.NodeIntent.from_json(kept["gpu-1"]).cordoned
    finally:
        await a.close()
        await b.close()


async def test_a_change_made_without_redis_on_the_same_file_after_the_copy_reaches_redis(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """A rolling update adding Redis, old and new pod on one data_dir: the old pod's cordon
    made after the new pod copied the file into Redis never reached Redis, and the new
    pod's next change rewrote the file without it, so the old pod lifted it too."""
    path = tmp_path / intent_file.FILE
    old = control_plane(intent_file.FileIntentStore(path))
    new = control_plane(copied(redis_server.url, path))
    try:
        await old.set_fields("gpu-1", cordoned=True, reason="bad GPU")
        await new.sync()                                         # the file into Redis
        await old.set_fields("gpu-2", cordoned=True, reason="bad fan")
        await new.set_fields("gpu-1", cordoned=False, reason="")   # a change in Redis
        for _ in range(2):
            await new.sync()
            await old.sync()
        for replica in (old, new):
            assert replica.get("gpu-2").cordoned and replica.get("gpu-2").reason == "bad fan"
            assert not replica.get("gpu-1").cordoned
        in_redis = stored(redis_server.url, "gpu-2")
        assert in_redis is not None and in_redis.cordoned
    finally:
        await old.close()
        await new.close()


async def test_after_a_data_loss_the_first_copy_in_is_followed_and_an_old_one_never_overwrites(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """Copies of one node's record that disagree after Redis lost its data: whichever
    replica loads first puts its copy back, and the others follow it (there is no telling
    which was the later change without trusting the replicas' clocks: review 117). A pod
    starting with an old copy (a volume kept from before) never puts it over what Redis
    holds."""
    a = control_plane(copied(redis_server.url, tmp_path / "a" / intent_file.FILE))
    b = control_plane(copied(redis_server.url, tmp_path / "b" / intent_file.FILE))
    try:
        await a.set_fields("gpu-1", cordoned=True, reason="bad GPU")
        await a.sync()
        await b.sync()
        old_copy = (tmp_path / "a" / intent_file.FILE).read_text()
        await b.set_fields("gpu-1", cordoned=False, reason="")
        await b.sync()                         # a has not loaded since: its copy is older
        flush(redis_server.url)
        await a.sync()                         # a's copy goes first into the empty Redis
        await b.sync()
        await a.sync()
        for replica in (a, b):
            assert replica.get("gpu-1").cordoned and replica.get("gpu-1").reason == "bad GPU"
        after = stored(redis_server.url, "gpu-1")
        assert after is not None and after.cordoned
        await b.set_fields("gpu-1", cordoned=False, reason="")
        kept = tmp_path / "kept" / intent_file.FILE
        kept.parent.mkdir()
        kept.write_text(old_copy)
        c = control_plane(copied(redis_server.url, kept))
        try:
            await c.sync()
            assert not c.get("gpu-1").cordoned
            assert not intent.NodeIntent.from_json(json.loads(kept.read_text())["gpu-1"]).cordoned
            in_redis = stored(redis_server.url, "gpu-1")
            assert in_redis is not None and not in_redis.cordoned
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


def old_release_record(cordoned: bool) -> str:
    """A record as a release before versions wrote it (no "version": read as 0)."""
    return json.dumps({"cordoned": cordoned, "draining": False, "reason": "",
                       "desired": {}}, sort_keys=True)


async def test_an_older_releases_change_is_not_reverted_by_a_newer_replicas_copy(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """Review 117 MEDIUM-1, a rolling upgrade: an old-release replica's uncordon (a record
    without a version) was older than the new replica's copy of the cordon by version, so
    the copy went back into Redis at its next load: the uncordon reported done, then
    reverted."""
    new = control_plane(copied(redis_server.url, tmp_path / "new" / intent_file.FILE))
    old = intent_store.RedisIntentStore(redis_limits.connect(redis_server.url))
    try:
        await new.set_fields("gpu-1", cordoned=True, reason="maintenance")
        await new.sync()                             # the new replica's copy: the cordon
        assert await old.compare_and_set("gpu-1", await old.get("gpu-1"),
                                         old_release_record(False))
        await new.sync()
        await new.sync()
        assert await old.get("gpu-1") == old_release_record(False)
        assert not new.get("gpu-1").cordoned
        kept = json.loads((tmp_path / "new" / intent_file.FILE).read_text())
        assert kept == {"gpu-1": old_release_record(False)}
    finally:
        await old.close()
        await new.close()


async def test_an_uncordon_right_after_redis_lost_its_data_is_written_and_stays(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """Review 117 LOW-2: against the empty Redis the uncordon found no record (read as
    uncordoned) and wrote nothing, then the replica's copy re-cordoned the node."""
    a = control_plane(copied(redis_server.url, tmp_path / "a" / intent_file.FILE))
    try:
        await a.set_fields("gpu-1", cordoned=True, reason="bad GPU")
        await a.sync()
        flush(redis_server.url)
        change = await a.set_fields("gpu-1", cordoned=False, reason="")
        assert change.before.cordoned and not change.after.cordoned
        await a.sync()
        await a.sync()
        assert not a.get("gpu-1").cordoned
        in_redis = stored(redis_server.url, "gpu-1")
        assert in_redis is not None and not in_redis.cordoned
    finally:
        await a.close()


async def test_a_replica_whose_clock_runs_ahead_never_beats_the_operators_later_change(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """Review 117 LOW-2: after a data loss the copy of a replica whose clock ran ahead
    carried the highest version, so the operators' later changes through another replica
    lost to it at its next load."""
    fast = intent.FleetIntent(copied(redis_server.url, tmp_path / "fast" / intent_file.FILE),
                              registry.Registry(clocks.monotonic, 30),
                              wall=lambda: time.time() + 600)
    b = control_plane(copied(redis_server.url, tmp_path / "b" / intent_file.FILE))
    try:
        await fast.set_fields("gpu-1", cordoned=True, reason="stale")
        await fast.sync()
        await b.sync()
        flush(redis_server.url)
        await b.set_fields("gpu-1", cordoned=False, reason="fixed")
        await b.sync()
        for _ in range(2):
            await fast.sync()
            await b.sync()
        for replica in (fast, b):
            assert not replica.get("gpu-1").cordoned and replica.get("gpu-1").reason == "fixed"
    finally:
        await fast.close()
        await b.close()


async def test_a_copy_that_followed_redis_goes_back_in_only_where_redis_kept_its_base(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """The same text back in Redis (an old release writes no version, so its records
    repeat) after a sibling worker sharing the file followed a change in between: the base
    is kept in the file's folder, shared, so the file's record (what Redis held in between)
    is not taken for a change made without Redis."""
    path = tmp_path / intent_file.FILE
    w1 = copied(redis_server.url, path)
    w2 = copied(redis_server.url, path)
    old = intent_store.RedisIntentStore(redis_limits.connect(redis_server.url))
    try:
        assert await old.compare_and_set("gpu-1", None, old_release_record(False))
        await w1.load()
        assert await old.compare_and_set("gpu-1", old_release_record(False),
                                         old_release_record(True))
        await w2.load()
        assert await old.compare_and_set("gpu-1", old_release_record(True),
                                         old_release_record(False))
        assert await w1.load() == {"gpu-1": old_release_record(False)}
        assert await old.get("gpu-1") == old_release_record(False)
    finally:
        await old.close()
        await w1.close()
        await w2.close()
