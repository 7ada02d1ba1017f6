"""The log keeper of one ``synapse up`` child (:class:`controlplane.embedded.Child`): a
small process that reads the child's output on its stdin until every holder of the pipe
has closed it, writes it into the child's size-capped log
(:mod:`synapse_common.capped_log`) and echoes its ERROR lines on its own stderr, which is
``synapse up``'s (:class:`controlplane.embedded_checks.ErrorEcho`).

A process, not a thread of ``synapse up``: a ``synapse up`` that is SIGKILLed leaves
children that drain for a while (the kernel sends them SIGTERM) and log while they do. A
thread dies with ``synapse up``, and what the children write then goes into a pipe nobody
reads: their last lines were lost, and a write failing with EPIPE may end a child in the
middle of its drain. The keeper outlives ``synapse up`` and ends when the child's output
ends. It runs in its own session, so Ctrl-C at the terminal does not end it before the
children it keeps have stopped.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import IO

from controlplane import embedded_checks
from synapse_common import capped_log

READ_CHUNK = 65536


def command(name: str, log_path: pathlib.Path, max_bytes: int) -> list[str]:
    """The keeper's command line, for a child called ``name`` logging to ``log_path``."""
    return [sys.executable, "-m", "controlplane.embedded_log", name, str(log_path),
            str(max_bytes)]


def keep(source: int, log: capped_log.CappedFile, echo: embedded_checks.ErrorEcho) -> None:
    """Everything read from ``source`` into ``log`` and ``echo``, until its end."""
    while chunk := os.read(source, READ_CHUNK):
        log.write(chunk)        # loses what the disk refuses, never raises for it
        echo.feed(chunk)        # its errors on the terminal too: the disk may be full


def main(argv: list[str] | None = None, stream: IO[str] | None = None) -> int:
    name, path, max_bytes = argv if argv is not None else sys.argv[1:]
    log_path = pathlib.Path(path)
    log = capped_log.CappedFile(log_path, int(max_bytes))
    try:
        keep(sys.stdin.fileno(), log, embedded_checks.ErrorEcho(name, log_path, stream))
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
