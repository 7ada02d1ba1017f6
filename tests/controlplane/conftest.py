"""Fixtures shared by the control-plane tests."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def directory() -> Iterator[pathlib.Path]:
    """A private (0700) directory for a pod's worker sockets: short, as unix socket paths
    must be (pytest's tmp_path can be too long)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="mesh", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path_factory: pytest.TempPathFactory,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in a directory of its own: a control plane built without
    ``data_dir`` keeps its state, the fleet intent among it, in ``./.synapse``, and a
    cordon or a deploy one test made must not reach the next. Fixtures of a wider scope run
    before this one, in the run's own directory (``tests/conftest.py``), never the
    checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
