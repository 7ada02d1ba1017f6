"""Usage counts a control plane could not store when it stopped, kept on its disk until
the next start.

A replica adds its pending usage counts to the shared store (Redis) every few seconds
(``core.usage_book``). When it stops while the store is unreachable, the counts not yet
stored would end with the process: requests served and never billed. Instead
:func:`keep` appends them to ``<data_dir>/usage_pending.jsonl``, and the next start takes
them back (:func:`take`) as pending counts, stored with its first flush.

Design decisions:

- One JSON line per stop, written whole with one ``write`` under an exclusive ``flock``:
  the workers of a pod stopping together append to the same file without interleaving.
- :func:`take` claims the file by renaming it first, so when several processes start
  together exactly one gets each line; a line that does not parse, and a value no store
  can hold (not a finite number from 0 to ``COUNT_MAX``), is skipped and counted.
- Private: the file names tenants and their usage, so it is made 0600 (and a folder it has
  to make, 0700).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pathlib
from collections.abc import Mapping

from controlplane.core.usage_book import COUNT_MAX

FILE = "usage_pending.jsonl"

Rows = Mapping[tuple[str, str, str], Mapping[str, int | float]]   # (day, tenant, model) ->


def keep(path: str | os.PathLike[str], rows: Rows) -> None:
    """Append ``rows`` to the file at ``path`` (raises ``OSError`` when it cannot)."""
    target = pathlib.Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = json.dumps([[*key, dict(counts)] for key, counts in rows.items()]) + "\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def take(path: str | os.PathLike[str],
         ) -> tuple[dict[tuple[str, str, str], dict[str, int | float]], int]:
    """The rows kept at ``path``, summed, and how many lines and values could not be read;
    the file is gone afterwards (claimed by this process)."""
    source = pathlib.Path(path)
    claimed = source.with_name(f"{source.name}.{os.getpid()}")
    try:
        source.rename(claimed)
    except FileNotFoundError:
        return {}, 0
    rows: dict[tuple[str, str, str], dict[str, int | float]] = {}
    unreadable = 0
    try:
        with open(claimed, encoding="utf-8") as fh:
            for line in fh:
                try:
                    for day, tenant, model, counts in json.loads(line):
                        row = rows.setdefault((str(day), str(tenant), str(model)), {})
                        for kind, value in counts.items():
                            if _storable(value):
                                row[str(kind)] = min(row.get(str(kind), 0) + value, COUNT_MAX)
                            else:
                                unreadable += 1
                except (ValueError, TypeError, AttributeError):
                    unreadable += 1
    finally:
        claimed.unlink(missing_ok=True)
    return rows, unreadable


def _storable(value: object) -> bool:
    """A count or cost every store can hold: a finite number from 0 to ``COUNT_MAX``.
    Anything else (a file written before engines' counts were bounded, or edited by hand)
    would make every later flush to the store fail, the good rows with it."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= COUNT_MAX)
