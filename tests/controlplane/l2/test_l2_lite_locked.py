"""Two processes on one Milvus Lite file (two control planes on one data dir): the second
says in one line that its L2 is off because another process holds the file, naming the
file as the data dir knows it, with neither Milvus Lite's traceback nor the path."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import subprocess
import sys

import pytest

from controlplane.adapters import milvus

HOLD = """
import sys, time
from pymilvus import MilvusClient
MilvusClient(uri=sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def test_a_lite_file_another_process_holds_is_one_clear_line(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "secret-place").mkdir()
    uri = str(tmp_path / "secret-place" / "l2.db")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, uri], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        store = milvus.MilvusStore(uri, "c", label="l2.db")
        caplog.set_level(logging.INFO)
        with pytest.raises(milvus.L2Unavailable, match="another process holds it"):
            asyncio.run(store.open())
    finally:
        holder.kill()
        holder.wait()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in said] == [
        "L2 (the semantic cache) is off in this process: another process holds the Milvus "
        "Lite file l2.db (one control plane per data dir, or cache.milvus_uri on a Milvus "
        "server)"]
    assert "secret-place" not in caplog.text
