"""The QQP dev pairs in shared/ (what the verifier and the tuned embedder are fitted on),
and their first lines as a smaller file for a test."""

from __future__ import annotations

import gzip
import itertools
import pathlib

import pytest

from tests.conftest import SHARED

DEV_PAIRS = SHARED / "data" / "qqp_pairs_dev.jsonl.gz"


def first(tmp_path_factory: pytest.TempPathFactory, name: str, lines: int) -> pathlib.Path:
    """A gzipped file ``name`` of the first ``lines`` dev pairs, in a new temporary folder."""
    if not DEV_PAIRS.exists():
        raise AssertionError(f"{DEV_PAIRS} is missing: the tests expect the shared/ folder")
    path = tmp_path_factory.mktemp("pairs") / name
    with gzip.open(DEV_PAIRS, "rt") as src, gzip.open(path, "wt") as dst:
        dst.writelines(itertools.islice(src, lines))
    return path
