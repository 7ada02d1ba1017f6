"""The test harness itself: a private Redis and a Milvus Lite file work."""

from __future__ import annotations

import pathlib
import socket

import pytest

from tests import harness


def test_private_redis_answers_and_is_not_the_shared_one(redis_server: harness.RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.ping(timeout=10)
    redis_server.kill()
    assert not redis_server.ping(timeout=10)       # refused at once
    redis_server.start()
    assert redis_server.ping(timeout=10)


def test_a_port_taken_before_redis_binds_it_is_replaced(tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Free when chosen, the port was taken before redis-server bound it: the fixture
    failed instead of choosing another."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        chosen = iter([busy])
        free_port = harness.free_port
        monkeypatch.setattr(harness, "free_port", lambda: next(chosen, None) or free_port())
        server = harness.RedisServer(tmp_path)
        try:
            assert server.port != busy and server.ping(timeout=10)
        finally:
            server.stop()


def test_milvus_lite_file_in_tmp_path(milvus_lite_path: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(milvus_lite_path)
    try:
        client.create_collection("probe", dimension=4)
        client.insert("probe", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        hits = client.search("probe", data=[[0.1, 0.2, 0.3, 0.4]], limit=1)
        assert hits[0][0]["id"] == 1
    finally:
        client.close()
