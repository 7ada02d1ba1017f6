"""Fixtures shared by every test: real redis-server, Milvus Lite in tmp_path, processes."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from tests import fleet, harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The whole run works in a directory of its own, set before any other fixture: what a
    process started without ``data_dir`` keeps in ``./.synapse`` (the fleet intent, its
    lock) must not land in the checkout, whatever the fixture's scope or the test's folder.
    Tests reach the repository's files through ``REPO``, never the working directory;
    tests/controlplane/conftest.py gives each of its tests a directory of its own too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="session", autouse=True)
def pod_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """With ``SYNAPSE_TEST_WORKERS`` above 1: the redis-server that fleets without one of
    their own share as pods (a database each: ``tests.fleet.as_pod``)."""
    if fleet.WORKERS <= 1:
        yield
        return
    server = harness.RedisServer(tmp_path_factory.mktemp("pod-redis"))
    fleet.POD_REDIS.append(server.url.removesuffix("/0"))
    yield
    fleet.POD_REDIS.clear()
    server.stop()


@pytest.fixture
def redis_server(tmp_path: pathlib.Path) -> Iterator[harness.RedisServer]:
    """A private redis-server on a free port; ``.url``, ``.kill()``, ``.start()``."""
    server = harness.RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def milvus_lite_path(tmp_path: pathlib.Path) -> str:
    """Path of a Milvus Lite database file in tmp_path (created on first use)."""
    return str(tmp_path / "milvus-lite.db")


@pytest.fixture
def processes(tmp_path: pathlib.Path) -> Iterator[harness.ProcessPool]:
    """Start console scripts as subprocesses; every one is stopped at teardown."""
    pool = harness.ProcessPool(tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def reference_dir() -> pathlib.Path:
    path = SHARED / "reference"
    if not path.is_dir():
        raise AssertionError(f"{path} is missing: the tests expect the shared/ folder beside "
                             "the repository")
    return path
