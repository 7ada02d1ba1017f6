"""The capped log: what a refused write costs (its lines, never the writer)."""

from __future__ import annotations

import pathlib

from synapse_common import capped_log


def test_a_log_the_disk_refuses_loses_lines_and_resumes_once_there_is_room(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "child.log"
    path.symlink_to("/dev/full")                  # every write: ENOSPC
    log = capped_log.CappedFile(path, max_bytes=4096)
    log.write(b"lost\n")
    log.write(b"lost too\n")
    path.unlink()                                 # room again: a real file in its place
    log.write(b"kept\n")
    log.close()
    assert path.read_bytes() == b"kept\n"
