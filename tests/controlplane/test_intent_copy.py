"""The Redis intent's local copy, against a real redis-server: moving from no Redis to Redis
keeps the intent kept in the file, and a copy that cannot be read is never what fails a
start while Redis is down. (A start from the copy: tests/controlplane/test_fleet_service.)"""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
import redis

from controlplane.adapters import intent_copy, intent_file, intent_store, redis_limits
from controlplane.core import intent
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


async def test_once_redis_holds_intent_the_file_follows_it(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    path = tmp_path / intent_file.FILE
    path.write_text(json.dumps({"gpu-1": CORDONED}))          # an older copy
    writer = copied(redis_server.url, tmp_path / "other" / intent_file.FILE)
    store = copied(redis_server.url, path)
    try:
        assert await writer.compare_and_set("gpu-2", None, CORDONED)
        assert await store.load() == {"gpu-2": CORDONED}
        assert json.loads(path.read_text()) == {"gpu-2": CORDONED}
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
