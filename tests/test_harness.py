"""The test harness itself: a private Redis and a Milvus Lite file work."""

from __future__ import annotations

from tests import harness


def test_private_redis_answers_and_is_not_the_shared_one(redis_server: harness.RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.ping()
    redis_server.kill()
    assert not redis_server.ping()
    redis_server.start()
    assert redis_server.ping()


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
