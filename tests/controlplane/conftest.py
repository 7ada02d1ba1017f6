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
